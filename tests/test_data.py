"""Data: both on-disk layouts from small files the tests write, every corrupt-data error, the
seeded validation split, augmentation and normalisation."""

from __future__ import annotations

import pytest
import torch

from bench.data import (
    MEAN,
    STD,
    Split,
    crop_and_flip,
    cutout,
    eval_batches,
    load_cifar10,
    normalize,
    read_bin_file,
    train_batches,
)
from bench.errors import DataError


def as_numpy_records(split: Split) -> dict[bytes, int]:
    """image bytes (planar RGB, as in the files) -> label."""
    images = split.images.reshape(len(split), 3 * 32 * 32).numpy()
    return {img.tobytes(): int(label) for img, label in zip(images, split.labels.numpy())}


def check_matches_fake(data, fake, val_size):
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.images.shape == (5 * fake.per_batch - val_size, 3, 32, 32)
    assert data.val.images.shape == (val_size, 3, 32, 32)
    # Test set: the file's order, pixels planar RGB -> [3, 32, 32].
    test_images, test_labels = fake.test
    assert torch.equal(data.test.images, torch.from_numpy(test_images.reshape(-1, 3, 32, 32)))
    assert data.test.labels.tolist() == test_labels.tolist()
    assert data.test.images[0, 1, 2, 3].item() == test_images[0, 1024 + 2 * 32 + 3]
    # Train + val: exactly the images written, each with its own label.
    expected = {img.tobytes(): int(label) for img, label in zip(fake.train_images, fake.train_labels)}
    got = {**as_numpy_records(data.train), **as_numpy_records(data.val)}
    assert len(got) == len(expected) == 5 * fake.per_batch
    assert got == expected


# ---------------------------------------------------------------- reading both layouts


def test_reads_binary_layout_in_standard_subfolder(fake_cifar):
    fake_cifar.write_bin()
    data = load_cifar10(fake_cifar.root, val_size=10, seed=0, expected_records=None)
    check_matches_fake(data, fake_cifar, 10)
    assert data.source.startswith("bin:") and data.source.endswith("cifar-10-batches-bin")


def test_reads_binary_files_placed_directly_in_the_folder(fake_cifar):
    fake_cifar.write_bin(fake_cifar.root)
    data = load_cifar10(fake_cifar.root, val_size=0, seed=0, expected_records=None)
    check_matches_fake(data, fake_cifar, 0)


def test_reads_torchvision_python_layout(fake_cifar):
    fake_cifar.write_py()
    data = load_cifar10(fake_cifar.root, val_size=10, seed=0, expected_records=None)
    check_matches_fake(data, fake_cifar, 10)
    assert data.source.startswith("py:")


def test_python_layout_folder_itself_as_data_dir(fake_cifar):
    folder = fake_cifar.write_py()
    data = load_cifar10(folder, val_size=10, seed=0, expected_records=None)
    check_matches_fake(data, fake_cifar, 10)


def test_both_layouts_give_identical_tensors_and_digest(fake_cifar, tmp_path):
    fake_cifar.write_bin(tmp_path / "b" / "cifar-10-batches-bin")
    fake_cifar.write_py(tmp_path / "p" / "cifar-10-batches-py")
    a = load_cifar10(tmp_path / "b", val_size=7, seed=3, expected_records=None)
    b = load_cifar10(tmp_path / "p", val_size=7, seed=3, expected_records=None)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).images, getattr(b, name).images)
        assert torch.equal(getattr(a, name).labels, getattr(b, name).labels)
    assert a.digest == b.digest


def test_data_dir_from_environment_then_dot_data(fake_cifar, tmp_path, monkeypatch):
    fake_cifar.write_bin()
    monkeypatch.setenv("BENCH_DATA_DIR", str(fake_cifar.root))
    assert len(load_cifar10(None, val_size=0, expected_records=None).test) == fake_cifar.n_test
    monkeypatch.delenv("BENCH_DATA_DIR")
    monkeypatch.chdir(tmp_path)  # fake_cifar.root is tmp_path / "data"
    assert len(load_cifar10(None, val_size=0, expected_records=None).test) == fake_cifar.n_test


# ---------------------------------------------------------------- errors


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_no_data_found(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "empty")
    msg = one_line(err)
    assert "no CIFAR-10 found" in msg and str(tmp_path / "empty") in msg and "BENCH_DATA_DIR" in msg


def test_missing_binary_file_is_named(fake_cifar):
    folder = fake_cifar.write_bin()
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError) as err:
        load_cifar10(fake_cifar.root, val_size=0, expected_records=None)
    msg = one_line(err)
    assert str(folder / "data_batch_3.bin") in msg and "missing" in msg


def test_missing_test_file_is_named(fake_cifar):
    folder = fake_cifar.write_bin()
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="test_batch.bin"):
        load_cifar10(fake_cifar.root, val_size=0, expected_records=None)


@pytest.mark.parametrize("cut", [1, 3072, 3073 * 20])
def test_truncated_binary_file_is_named(fake_cifar, cut):
    folder = fake_cifar.write_bin()
    path = folder / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-cut])
    if cut == 3073 * 20:  # the whole file gone: empty
        assert path.stat().st_size == 0
    with pytest.raises(DataError) as err:
        load_cifar10(fake_cifar.root, val_size=0, expected_records=None)
    msg = one_line(err)
    assert str(path) in msg and "truncated" in msg


def test_wrong_record_count_is_named(fake_cifar):
    folder = fake_cifar.write_bin()
    # The real data set has 10,000 records per file; these have 20.
    with pytest.raises(DataError) as err:
        load_cifar10(fake_cifar.root, val_size=0)
    msg = one_line(err)
    assert "data_batch_1.bin" in msg and "20 records" in msg and "10000" in msg
    assert len(read_bin_file(folder / "data_batch_1.bin", expected_records=20)) == 20


def test_bad_label_is_named(fake_cifar):
    folder = fake_cifar.write_bin()
    images, labels = fake_cifar.train[3]
    labels = labels.copy()
    labels[5] = 10
    fake_cifar.write_records(folder / "data_batch_4.bin", images, labels)
    with pytest.raises(DataError) as err:
        load_cifar10(fake_cifar.root, val_size=0, expected_records=None)
    msg = one_line(err)
    assert str(folder / "data_batch_4.bin") in msg and "label 10" in msg


def test_corrupt_python_layout_file_is_named(fake_cifar):
    folder = fake_cifar.write_py()
    path = folder / "data_batch_2"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the md5 check must catch it
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        load_cifar10(fake_cifar.root, val_size=0, expected_records=None)
    msg = one_line(err)
    assert str(path) in msg and "--download" in msg


def test_python_batches_outside_their_folder_name_are_a_clear_error(fake_cifar):
    fake_cifar.write_py(fake_cifar.root / "mycopy")
    with pytest.raises(DataError) as err:
        load_cifar10(fake_cifar.root / "mycopy", val_size=0, expected_records=None)
    msg = one_line(err)
    assert str(fake_cifar.root / "mycopy") in msg and "cifar-10-batches-py" in msg


def test_missing_python_layout_file_is_named(fake_cifar):
    folder = fake_cifar.write_py()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError) as err:
        load_cifar10(fake_cifar.root, val_size=0, expected_records=None)
    assert str(folder / "test_batch") in one_line(err)


def test_val_size_must_leave_training_images(fake_cifar):
    fake_cifar.write_bin()
    with pytest.raises(DataError, match="val_size 100"):
        load_cifar10(fake_cifar.root, val_size=100, expected_records=None)


# ---------------------------------------------------------------- validation split


def test_seeded_split_is_deterministic_disjoint_and_complete(fake_cifar):
    fake_cifar.write_bin()
    a = load_cifar10(fake_cifar.root, val_size=25, seed=1, expected_records=None)
    b = load_cifar10(fake_cifar.root, val_size=25, seed=1, expected_records=None)
    c = load_cifar10(fake_cifar.root, val_size=25, seed=2, expected_records=None)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    train, val = set(as_numpy_records(a.train)), set(as_numpy_records(a.val))
    assert len(val) == 25 and len(train) == 75
    assert not train & val
    assert len(train | val) == 100
    assert a.digest == c.digest  # the digest is of the files, not the split


def test_generated_fixture_is_in_the_official_layout(cifar_dir, cifar):
    """What the training, tuning and report tests run on: the real loader's default checks pass."""
    names = sorted(p.name for p in cifar_dir.iterdir())
    assert names == [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    assert all((cifar_dir / n).stat().st_size == 10_000 * 3073 for n in names)
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (45_000, 5_000, 10_000)
    assert torch.bincount(cifar.test.labels, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(torch.cat([cifar.train.labels, cifar.val.labels]), minlength=10).tolist() == [5000] * 10
    # Each class has its own pattern: the mean image of a class is far from the others'.
    means = torch.stack([cifar.test.images[cifar.test.labels == c].float().mean(0) for c in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 100


def test_real_cifar10_sizes_and_classes(real_cifar):
    cifar = real_cifar
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (45_000, 5_000, 10_000)
    assert cifar.train.images.shape[1:] == (3, 32, 32) and cifar.train.images.dtype == torch.uint8
    # 5,000 training and 1,000 test images per class (SOURCE.md of the shared copy; also the official set)
    counts = torch.bincount(torch.cat([cifar.train.labels, cifar.val.labels]), minlength=10)
    assert counts.tolist() == [5000] * 10
    assert torch.bincount(cifar.test.labels, minlength=10).tolist() == [1000] * 10
    # the validation split is spread over the classes, not one block of them
    assert torch.bincount(cifar.val.labels, minlength=10).min() > 400


# ---------------------------------------------------------------- augmentation and normalisation


def random_images(b=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_crop_without_padding_or_flip_is_identity():
    x = random_images()
    out = crop_and_flip(x, 0, False, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_flip_really_flips_about_half_the_images():
    x = random_images()
    out = crop_and_flip(x, 0, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f != s for f, s in zip(flipped, same))  # each image is exactly one of the two
    assert 16 <= sum(flipped) <= 48
    # rows are untouched: the flip is horizontal (last axis), not vertical
    i = flipped.index(True)
    assert not torch.equal(out[i], x[i].flip(-2))


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = random_images(32)
    out = crop_and_flip(x, 4, False, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = []
    for o, p in zip(out, padded):
        found = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(o, p[:, dy:dy + 32, dx:dx + 32])]
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 5  # different images, different offsets


def test_augmentation_is_seeded():
    x = random_images()
    a = crop_and_flip(x, 4, True, torch.Generator().manual_seed(5))
    b = crop_and_flip(x, 4, True, torch.Generator().manual_seed(5))
    c = crop_and_flip(x, 4, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, 8, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    full = 0
    for img in out:
        assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])  # same square in every channel
        zero = img[0] == 0
        n = int(zero.sum())
        assert 0 < n <= 64
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h * w == n and h <= 8 and w <= 8  # one solid rectangle
        full += n == 64
    assert full > 10  # most centres are far enough from the border to keep the whole square


def test_normalize_uses_per_channel_stats():
    mean = torch.tensor(MEAN) * 255
    x = mean.round().to(torch.uint8).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    assert out.abs().max() < 0.5 / 255 / min(STD) + 1e-6
    white = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten()
    expected = (255 - mean) / (torch.tensor(STD) * 255)
    assert torch.allclose(white, expected)
    assert normalize(x, torch.bfloat16).dtype == torch.bfloat16


def test_normalized_real_images_are_standardised(real_cifar):
    x = normalize(real_cifar.train.images[:2000])
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=0.05)
    assert torch.allclose(std, torch.ones(3), atol=0.05)


def test_train_batches_cover_the_split_once_shuffled_and_seeded():
    soft = torch.softmax(torch.randn(50, 10), 1)
    split = Split(random_images(50), torch.arange(50) % 10, soft)
    batches = list(train_batches(split, 16, torch.Generator().manual_seed(0), torch.device("cpu"), padding=0, flip=False))
    assert [len(y) for _, y, _ in batches] == [16, 16, 16, 2]
    x = torch.cat([b for b, _, _ in batches])
    assert x.dtype == torch.float32 and x.shape == (50, 3, 32, 32)
    # every image once: match each output to its source by value
    source = normalize(split.images)
    order = [int(((source - xi).abs().flatten(1).sum(1) == 0).nonzero()) for xi in x]
    assert sorted(order) == list(range(50)) and order != list(range(50))
    labels = torch.cat([y for _, y, _ in batches])
    assert torch.equal(labels, split.labels[order])
    assert torch.equal(torch.cat([t for _, _, t in batches]), soft[order])  # a teacher's soft labels travel with their image
    again = torch.cat([b for b, _, _ in train_batches(split.take(50), 16, torch.Generator().manual_seed(0), torch.device("cpu"), padding=0, flip=False)])
    assert torch.equal(x, again)
    assert all(t is None for *_, t in train_batches(Split(split.images, split.labels), 16, torch.Generator(), torch.device("cpu")))


def test_eval_batches_keep_order():
    split = Split(random_images(25), torch.arange(25) % 10)
    batches = list(eval_batches(split, 10, torch.device("cpu")))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    assert torch.equal(torch.cat([b for b, _ in batches]), normalize(split.images))
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)
