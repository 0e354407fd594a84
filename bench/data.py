"""CIFAR-10 in memory as uint8 tensors, a seeded validation split, and batched GPU/CPU augmentation.

Two on-disk layouts are read:
- the binary layout ``cifar-10-batches-bin`` (``data_batch_1..5.bin``, ``test_batch.bin``; records of
  1 label byte + 3,072 pixel bytes, planar RGB),
- torchvision's ``cifar-10-batches-py`` (pickles, md5-checked by ``torchvision.datasets.CIFAR10``).

Where to look: ``--data-dir``, else ``$BENCH_DATA_DIR``, else ``./data``. A directory may hold the
files directly or in one of the two standard sub-folders.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import crop_and_flip, cutout, random_erasing
from .errors import DataError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_BIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_BIN = "test_batch.bin"
BIN_DIR, PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]
    soft: torch.Tensor | None = None  # float [N, classes]: teachers' probabilities, when distilling

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n], None if self.soft is None else self.soft[:n])


@dataclass
class CIFAR10:
    train: Split
    val: Split
    test: Split
    source: str  # where it was read from
    digest: str  # sha256 of the training + test bytes, for run records

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES


# ---------------------------------------------------------------- locating and reading


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get("BENCH_DATA_DIR") or "data")


def _find_layout(root: Path) -> tuple[str, Path] | None:
    for folder in (root, root / BIN_DIR):
        if (folder / TRAIN_BIN[0]).exists() or (folder / TEST_BIN).exists():
            return "bin", folder
    for folder in (root / PY_DIR, root):
        if (folder / "data_batch_1").exists() or (folder / "test_batch").exists():
            return "py", folder
    return None


def read_bin_file(path: Path, expected_records: int | None = 10_000) -> Split:
    """One ``*.bin`` batch file into a uint8 Split, with every check a corrupt file could fail."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path} is missing; restore it or point --data-dir/BENCH_DATA_DIR at a complete copy")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DataError(
            f"CIFAR-10 file {path} is truncated or corrupt ({raw.size} bytes is not a multiple of "
            f"{RECORD_BYTES}); replace it with a fresh copy"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    if expected_records is not None and len(records) != expected_records:
        raise DataError(
            f"CIFAR-10 file {path} holds {len(records)} records, expected {expected_records}; replace it with a fresh copy"
        )
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"CIFAR-10 file {path} has label {labels.max()} (> 9): corrupt; replace it with a fresh copy")
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def _digest(train: Split, test: Split) -> hashlib._Hash:
    """sha256 of train images, train labels, test images, test labels: the same for both layouts."""
    digest = hashlib.sha256()
    for t in (train.images, train.labels, test.images, test.labels):
        digest.update(t.contiguous().numpy())
    return digest


def _read_bin(folder: Path, expected_records: int | None) -> tuple[Split, Split, hashlib._Hash]:
    parts = [read_bin_file(folder / name, expected_records) for name in TRAIN_BIN + [TEST_BIN]]
    train = Split(torch.cat([p.images for p in parts[:-1]]), torch.cat([p.labels for p in parts[:-1]]))
    return train, parts[-1], _digest(train, parts[-1])


def _read_py(root: Path, download: bool) -> tuple[Split, Split, hashlib._Hash]:
    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

    splits = []
    for is_train in (True, False):
        try:
            ds = TorchvisionCIFAR10(str(root), train=is_train, download=download)
        except RuntimeError as err:
            bad = _first_bad_py_file(root / PY_DIR, TorchvisionCIFAR10)
            what = f"file {bad} is missing or fails its md5 check" if bad else f"under {root / PY_DIR} is unreadable ({err})"
            raise DataError(
                f"CIFAR-10 (python layout) {what}; "
                "run with --download or point --data-dir/BENCH_DATA_DIR at a complete copy"
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets, dtype=torch.int64)
        splits.append(Split(images, labels))
    return splits[0], splits[1], _digest(splits[0], splits[1])


def _first_bad_py_file(folder: Path, dataset_cls) -> Path | None:
    """The first file torchvision's integrity check rejects, to name it in the error."""
    from torchvision.datasets.utils import check_integrity

    files = dataset_cls.train_list + dataset_cls.test_list + [[dataset_cls.meta["filename"], dataset_cls.meta["md5"]]]
    for name, md5 in files:
        if not check_integrity(str(folder / name), md5):
            return folder / name
    return None


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    download: bool = False,
    expected_records: int | None = 10_000,
) -> CIFAR10:
    """Read CIFAR-10 once into memory and carve a seeded validation split from the training set.

    ``expected_records`` is the number of images per batch file (10,000 in the real data set);
    tests pass ``None`` to read small files they write.
    """
    root = default_data_dir(data_dir)
    layout = _find_layout(root)
    if layout is None and download:
        layout = ("py", root / PY_DIR)
    if layout is None:
        raise DataError(
            f"no CIFAR-10 found in {root.resolve()} (looked for {BIN_DIR}/*.bin, {PY_DIR}/, or the files "
            "themselves); set BENCH_DATA_DIR or --data-dir to the folder, or pass --download"
        )
    kind, folder = layout
    if kind == "py" and folder.name != PY_DIR:
        raise DataError(
            f"CIFAR-10 python batches found directly in {folder}, but torchvision reads them only from a "
            f"folder named {PY_DIR}: move them into {folder / PY_DIR}"
        )
    if kind == "bin":
        train, test, digest = _read_bin(folder, expected_records)
    else:
        train, test, digest = _read_py(folder.parent if folder.name == PY_DIR else root, download)
    if not 0 <= val_size < len(train):
        raise DataError(f"val_size {val_size} must be in [0, {len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return CIFAR10(
        train=Split(train.images[train_idx], train.labels[train_idx]),
        val=Split(train.images[val_idx], train.labels[val_idx]),
        test=test,
        source=f"{kind}:{folder.resolve()}",
        digest=digest.hexdigest()[:16],
    )


# ---------------------------------------------------------------- batches and augmentation


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] -> per-channel standardised float."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).to(dtype)


def train_batches(
    split: Split,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    padding: int = 4,
    flip: bool = True,
    cutout_size: int = 0,
    erasing: float = 0.0,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
):
    """Yield shuffled, augmented, normalised (images, labels, soft labels or None) batches for one epoch."""
    order = torch.randperm(len(split), generator=generator)
    for start in range(0, len(split), batch_size):
        idx = order[start : start + batch_size]
        images = split.images[idx].to(device, non_blocking=True)
        x = normalize(crop_and_flip(images, padding, flip, generator), dtype)
        if cutout_size:  # after normalising, so the square is the mean colour
            x = cutout(x, cutout_size, generator)
        if erasing:
            x = random_erasing(x, erasing, generator)
        soft = None if split.soft is None else split.soft[idx].to(device, non_blocking=True)
        yield x.contiguous(memory_format=memory_format), split.labels[idx].to(device, non_blocking=True), soft


def eval_batches(
    split: Split,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
):
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device, non_blocking=True)
        yield normalize(images, dtype).contiguous(memory_format=memory_format), split.labels[start : start + batch_size].to(device)
