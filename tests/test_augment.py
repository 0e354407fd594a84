"""Recipe options on tiny batches: random erasing, MixUp / CutMix targets, the warm-up + cosine
schedule, stochastic depth, their config errors, and one short run with all of them on."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import config
from bench.augment import ERASING_SCALE, batch_mixer, random_erasing, shown_labels
from bench.config import TrainConfig
from bench.errors import ConfigError
from bench.models import create_model
from bench.train import create_optimizer, create_scheduler, fit, resolve_runtime
from test_train import tiny

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def batch(b=64, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g) + 5, torch.randint(0, 10, (b,), generator=g)  # no zero pixels


# ---------------------------------------------------------------- random erasing


def test_erasing_sets_one_box_per_image_to_zero_and_leaves_the_rest():
    x, _ = batch()
    out = random_erasing(x, 1.0, torch.Generator().manual_seed(1))
    changed = out != x
    assert torch.equal(out[changed], torch.zeros_like(out[changed]))  # changed pixels are erased, nothing else
    for mask in changed.any(1):  # per image: the erased pixels fill their bounding box exactly
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = torch.zeros_like(mask)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(mask, box)
        assert 1 <= int(mask.sum()) <= math.ceil(ERASING_SCALE[1] * 32 * 32 * 1.1)
    assert torch.equal(changed, changed[:, :1].expand_as(changed))  # every channel of the box


def test_erasing_probability_sets_the_share_of_images_touched():
    x, _ = batch(b=2000)
    assert torch.equal(random_erasing(x, 0.0, torch.Generator().manual_seed(0)), x)
    touched = (random_erasing(x, 0.5, torch.Generator().manual_seed(0)) != x).flatten(1).any(1).float().mean()
    assert 0.45 < touched < 0.55
    first, again = (random_erasing(x, 0.5, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, again)  # seeded


# ---------------------------------------------------------------- mixup / cutmix


def own_share(targets: torch.Tensor, y: torch.Tensor) -> float:
    """MixUp's lam: the weight of an image's own label, read where it differs from its neighbour's
    (torchvision mixes image i with image i-1)."""
    i = 0 if y[0] != y[-1] else 1
    return float(targets[i, y[i]])


def test_without_mixing_the_batch_and_labels_pass_unchanged():
    x, y = batch()
    out, targets = batch_mixer(0.0, 0.0, 10)(x, y)
    assert out is x and targets is y


def test_mixup_blends_each_image_with_its_neighbour_and_its_targets_sum_to_one():
    x, y = batch(b=8)
    torch.manual_seed(0)
    out, targets = batch_mixer(0.4, 0.0, 10)(x, y)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
    one_hot = F.one_hot(y, 10).float()
    lam = own_share(targets, y)
    assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0), atol=1e-6)
    assert torch.allclose(out, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area():
    x, y = batch(b=8)
    torch.manual_seed(2)
    out, targets = batch_mixer(0.0, 1.0, 10)(x, y)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    from_neighbour = (out == x.roll(1, 0)) & (out != x)
    assert torch.equal(out[~from_neighbour], x[~from_neighbour])  # every pixel is its own or its neighbour's
    pasted = from_neighbour[0].all(0).float().mean()
    one_hot = F.one_hot(y, 10).float()
    assert torch.allclose(targets, (1 - pasted) * one_hot + pasted * one_hot.roll(1, 0), atol=1e-6)


def test_training_accuracy_counts_the_class_each_mixed_image_mostly_shows():
    x, y = batch(b=8)
    assert shown_labels(y) is y
    for seed in range(50):  # a batch whose images are mostly their neighbour's (lam < 0.5)
        torch.manual_seed(seed)
        _, targets = batch_mixer(0.2, 0.0, 10)(x, y)
        lam = own_share(targets, y)
        if lam < 0.45:
            break
    assert lam < 0.45
    differ = y != y.roll(1)
    assert torch.equal(shown_labels(targets)[differ], y.roll(1)[differ])


def test_with_both_each_batch_uses_one_of_the_two():
    x, y = batch(b=16)
    torch.manual_seed(0)
    mix = batch_mixer(0.4, 1.0, 10)
    kinds = set()
    for _ in range(20):
        out, targets = mix(x, y)
        assert torch.allclose(targets.sum(1), torch.ones(16))
        kinds.add("cutmix" if ((out == x) | (out == x.roll(1, 0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}


# ---------------------------------------------------------------- warm-up + cosine


def lrs(cfg: TrainConfig, steps: int) -> list[float]:
    optimizer = create_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = create_scheduler(optimizer, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_with_warm_up_ramps_linearly_then_decays_to_zero():
    cfg = TrainConfig(epochs=10, lr=1.0, optimizer="adamw", schedule="cosine", lr_warmup_epochs=2)
    values = lrs(cfg, 100)
    assert values[0] == pytest.approx(0.01)
    assert values[:20] == sorted(values[:20]) and values[20] == pytest.approx(1.0)
    assert values[20:] == sorted(values[20:], reverse=True) and values[-1] < 0.01
    assert lrs(dataclasses.replace(cfg, lr_warmup_epochs=0), 100)[0] == pytest.approx(1.0)


# ---------------------------------------------------------------- stochastic depth


def test_drop_path_rises_over_the_blocks_keeps_the_count_and_is_off_in_eval():
    exp = config.override(config.load(EXPERIMENTS / "convnext_ln.toml"), drop_path=0.2)
    shape = dataclasses.asdict(exp.model)
    torch.manual_seed(0)
    model = create_model(**shape)
    torch.manual_seed(0)
    plain = create_model(**{**shape, "drop_path": 0.0})
    rates = [getattr(block.drop_path, "p", 0.0) for stage in model.stages for block in list(stage)[1:]]
    assert rates == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval()
    assert torch.allclose(model(x), plain(x))


# ---------------------------------------------------------------- config and a short run


@pytest.mark.parametrize("values, message", [
    ({"lr_warmup_epochs": 2}, "onecycle has its own warm-up"),
    ({"schedule": "cosine", "lr_warmup_epochs": 15}, r"lr_warmup_epochs \(15\) must be below epochs \(15\)"),
    ({"erasing": 1.5}, r"erasing must be in \[0, 1\]"),
    ({"mixup": -1}, "mixup must be >= 0"),
    ({"drop_path": 0.1}, "drop_path applies to preset convnext"),
])
def test_bad_recipe_values_are_one_line_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        config.override(config.load(EXPERIMENTS / "bn.toml"), **values)


def test_a_run_with_every_recipe_option_trains_finite_and_reports_hard_label_accuracy(small_cifar):
    data = tiny(small_cifar, n_train=256, n_val=100, n_test=100)
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer="adamw", lr=2e-3, schedule="cosine", lr_warmup_epochs=1,
                      mixup=0.2, cutmix=1.0, erasing=0.25, label_smoothing=0.1)
    model = create_model("convnext", "ln", drop_path=0.1, width1=8, width2=16, width3=16)
    result = fit(model, data, cfg, resolve_runtime(cfg, "ln"))
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["train_acc"] <= 1 for r in result.history)
    assert 0 <= result.test_acc <= 1
