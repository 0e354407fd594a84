"""The ConvNeXt stems (``stem_kind``): exact counts, the resolution each gives stage 1, the whitening
filters fitted to the images and frozen through training, and the config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.config import TrainConfig, load, override
from bench.data import CIFAR10, normalize
from bench.errors import ConfigError
from bench.models import count_params, count_params_fast, create_model
from bench.models.stems import WHITEN_EPS, WHITEN_IMAGES, WhiteningStem, whitening_layers
from bench.runtime import resolve_runtime
from bench.train import create_optimizer, fit

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SHAPE = {"preset": "convnext", "width1": 16, "width2": 32, "width3": 48, "blocks1": 2, "blocks2": 1, "blocks3": 1}
BODY = 46_410 - (27 * 16 + 2 * 16)  # the default model without its 3x3 conv-norm stem


def convnext(stem_kind: str, norm: str = "bn", **extra):
    return create_model(**SHAPE, norm=norm, stem_kind=stem_kind, **extra)


@pytest.mark.parametrize("stem_kind, stem_params", [
    ("conv", 27 * 16 + 2 * 16),  # 3x3x3 filters, norm weight and bias
    ("patch", 12 * 16 + 2 * 16),  # 2x2x3 filters, norm
    ("whiten", 24 * 12 + (24 * 16 + 16)),  # 24 frozen 2x2x3 filters, then the 1x1 projection to width1
])
def test_each_stem_is_counted_exactly_frozen_filters_included(stem_kind, stem_params):
    kwargs = {**SHAPE, "norm": "ln", "stem_kind": stem_kind}
    assert count_params(create_model(**kwargs)) == count_params_fast(**kwargs) == BODY + stem_params


@pytest.mark.parametrize("stem_kind, side", [("conv", 32), ("patch", 16), ("whiten", 31)])
def test_stage_one_runs_at_the_stems_resolution(stem_kind, side):
    model = convnext(stem_kind)
    stage1 = model.stages[0](model.stem(torch.randn(2, 3, 32, 32)))
    assert stage1.shape == (2, 16, side, side)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def correlated_images(n: int = 400) -> torch.Tensor:
    """Smooth random images: neighbouring pixels and channels strongly correlated, as in photographs."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 1, 8, 8, generator=g).repeat(1, 3, 1, 1) + 0.2 * torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def test_whitening_filters_decorrelate_the_patches_to_unit_variance():
    images = correlated_images()
    stem = WhiteningStem()
    stem.fit(images)
    out = stem.conv(images).permute(1, 0, 2, 3).reshape(24, -1).double()
    covariance = out[:12] @ out[:12].T / out.shape[1]
    patches = torch.nn.functional.unfold(images, 2).transpose(1, 2).reshape(-1, 12).double()
    raw = patches.T @ patches / len(patches)
    variances = torch.linalg.eigvalsh(raw)
    assert (raw - torch.diag(raw.diagonal())).abs().max() > 0.1  # the test images are far from white
    # Whitened: uncorrelated, and each direction's variance v / (v + eps), about 1 for v >> eps.
    assert (covariance - torch.diag(covariance.diagonal())).abs().max() < 1e-3
    expected = (variances / (variances + WHITEN_EPS)).sort().values
    assert torch.allclose(covariance.diagonal().sort().values, expected, atol=1e-3)
    assert torch.equal(stem.conv.weight[12:], -stem.conv.weight[:12])


def test_fit_sets_the_whitening_from_the_training_images_and_never_trains_it(small_cifar):
    data = CIFAR10(small_cifar.train.take(256), small_cifar.val.take(64), small_cifar.test.take(64), small_cifar.source, small_cifar.digest)
    torch.manual_seed(0)
    model = convnext("whiten")
    (stem,) = whitening_layers(model)
    expected = WhiteningStem()
    expected.fit(normalize(data.train.images[:WHITEN_IMAGES]))
    config = TrainConfig(epochs=1, batch_size=64, seed=0, optimizer="adamw", lr=1e-2, weight_decay=0.05)
    assert all(p is not stem.conv.weight for g in create_optimizer(model, config).param_groups for p in g["params"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fit(model, data, config, resolve_runtime(config, "bn"))
    assert torch.allclose(stem.conv.weight.float(), expected.conv.weight, atol=1e-5)  # fitted, then frozen through 4 steps
    assert not torch.equal(model.stages[0][0].weight, before["stages.0.0.weight"])  # the projection after it trains


def test_stems_other_than_whiten_have_nothing_to_fit():
    assert whitening_layers(convnext("conv")) == [] and whitening_layers(convnext("patch")) == []


@pytest.mark.parametrize("changes, message", [
    ({"stem_kind": "pixel"}, "stem_kind: 'pixel' is not one of conv, patch, whiten"),
    ({"stem_kind": "whiten", "stem": 8}, "stem = 8: the whitening stem has 24 channels"),
    ({"preset": "resnet", "stem_kind": "patch"}, "stem_kind applies to preset convnext, not 'resnet'"),
])
def test_bad_stems_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        override(load(EXPERIMENTS / "convnext_bn.toml"), **changes)
