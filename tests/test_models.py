"""Models: the seed presets layer by layer, parameter counts, the budget and norm errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bench.errors import BudgetError
from bench.models import (
    PRESETS,
    Dropout,
    build_checked,
    check_budget,
    count_params,
    count_params_fast,
    create_model,
    make_norm,
    make_summary,
    max_width,
)

SEEDS = [Path("/work/shared/seeds"), Path(__file__).resolve().parents[2] / "shared" / "seeds"]

# The seeds' tables (shared/seeds/000_*.txt and 001_*.txt), copied verbatim.
SEED_BN_TABLE = """
            Conv2d-1           [-1, 16, 30, 30]             432
              ReLU-2           [-1, 16, 30, 30]               0
       BatchNorm2d-3           [-1, 16, 30, 30]              32
           Dropout-4           [-1, 16, 30, 30]               0
            Conv2d-5           [-1, 32, 28, 28]           4,608
              ReLU-6           [-1, 32, 28, 28]               0
       BatchNorm2d-7           [-1, 32, 28, 28]              64
           Dropout-8           [-1, 32, 28, 28]               0
            Conv2d-9           [-1, 10, 28, 28]             320
        MaxPool2d-10           [-1, 10, 14, 14]               0
           Conv2d-11           [-1, 16, 14, 14]           1,440
             ReLU-12           [-1, 16, 14, 14]               0
      BatchNorm2d-13           [-1, 16, 14, 14]              32
          Dropout-14           [-1, 16, 14, 14]               0
           Conv2d-15           [-1, 16, 12, 12]           2,304
             ReLU-16           [-1, 16, 12, 12]               0
      BatchNorm2d-17           [-1, 16, 12, 12]              32
          Dropout-18           [-1, 16, 12, 12]               0
           Conv2d-19           [-1, 16, 12, 12]           2,304
             ReLU-20           [-1, 16, 12, 12]               0
      BatchNorm2d-21           [-1, 16, 12, 12]              32
          Dropout-22           [-1, 16, 12, 12]               0
           Conv2d-23           [-1, 10, 12, 12]             160
        MaxPool2d-24             [-1, 10, 6, 6]               0
           Conv2d-25             [-1, 16, 6, 6]           1,440
             ReLU-26             [-1, 16, 6, 6]               0
      BatchNorm2d-27             [-1, 16, 6, 6]              32
          Dropout-28             [-1, 16, 6, 6]               0
           Conv2d-29             [-1, 16, 6, 6]           2,304
             ReLU-30             [-1, 16, 6, 6]               0
      BatchNorm2d-31             [-1, 16, 6, 6]              32
          Dropout-32             [-1, 16, 6, 6]               0
           Conv2d-33             [-1, 16, 6, 6]           2,304
             ReLU-34             [-1, 16, 6, 6]               0
      BatchNorm2d-35             [-1, 16, 6, 6]              32
          Dropout-36             [-1, 16, 6, 6]               0
        AvgPool2d-37             [-1, 16, 1, 1]               0
           Conv2d-38             [-1, 10, 1, 1]             160
"""

SEED_GN_TABLE = """
            Conv2d-1            [-1, 4, 30, 30]             108
              ReLU-2            [-1, 4, 30, 30]               0
         LayerNorm-3            [-1, 4, 30, 30]           7,200
           Dropout-4            [-1, 4, 30, 30]               0
            Conv2d-5            [-1, 8, 28, 28]             288
              ReLU-6            [-1, 8, 28, 28]               0
         LayerNorm-7            [-1, 8, 28, 28]          12,544
           Dropout-8            [-1, 8, 28, 28]               0
            Conv2d-9            [-1, 4, 28, 28]              32
        MaxPool2d-10            [-1, 4, 14, 14]               0
           Conv2d-11           [-1, 10, 14, 14]             360
             ReLU-12           [-1, 10, 14, 14]               0
        LayerNorm-13           [-1, 10, 14, 14]           3,920
          Dropout-14           [-1, 10, 14, 14]               0
           Conv2d-15           [-1, 16, 12, 12]           1,440
             ReLU-16           [-1, 16, 12, 12]               0
        LayerNorm-17           [-1, 16, 12, 12]           4,608
          Dropout-18           [-1, 16, 12, 12]               0
           Conv2d-19           [-1, 16, 12, 12]           2,304
             ReLU-20           [-1, 16, 12, 12]               0
        LayerNorm-21           [-1, 16, 12, 12]           4,608
          Dropout-22           [-1, 16, 12, 12]               0
           Conv2d-23           [-1, 10, 12, 12]             160
        MaxPool2d-24             [-1, 10, 6, 6]               0
           Conv2d-25             [-1, 16, 6, 6]           1,440
             ReLU-26             [-1, 16, 6, 6]               0
        LayerNorm-27             [-1, 16, 6, 6]           1,152
          Dropout-28             [-1, 16, 6, 6]               0
           Conv2d-29             [-1, 16, 6, 6]           2,304
             ReLU-30             [-1, 16, 6, 6]               0
        LayerNorm-31             [-1, 16, 6, 6]           1,152
          Dropout-32             [-1, 16, 6, 6]               0
           Conv2d-33             [-1, 16, 6, 6]           2,304
             ReLU-34             [-1, 16, 6, 6]               0
        LayerNorm-35             [-1, 16, 6, 6]           1,152
          Dropout-36             [-1, 16, 6, 6]               0
        AvgPool2d-37             [-1, 16, 1, 1]               0
           Conv2d-38             [-1, 10, 1, 1]             160
"""

ROW = re.compile(r"^\s*(\w+)-\d+\s+\[-1, ([\d, ]+)\]\s+([\d,]+)\s*$")
NORMS_PER_PRESET = {"seed_bn": ["bn", "gn", "ln", "lnc"], "seed_gn": ["bn", "gn", "ln", "lnc", "lnchw"]}


def parse_table(text: str) -> list[tuple[str, tuple[int, ...], int]]:
    """(layer type, output shape without the batch, parameters) for every row of a torchsummary table."""
    rows = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            shape = tuple(int(x) for x in m.group(2).split(","))
            rows.append((m.group(1), shape, int(m.group(3).replace(",", ""))))
    return rows


def layer_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """The same rows measured from the model: forward hooks on every leaf module, in call order."""
    rows = []

    def hook(module, _inputs, output):
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((type(module).__name__, tuple(output.shape[1:]), params))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert out.shape == (2, 10)
    return rows


def norm_kwargs(preset: str, norm: str) -> dict:
    # seed_gn has 4- and 10-channel layers: 2 groups is the largest count dividing every width.
    return {"preset": preset, "norm": norm, "groups": 2 if (preset, norm) == ("seed_gn", "gn") else 4}


def test_a_registered_family_is_built_counted_checked_and_listed(monkeypatch):
    from click.testing import CliRunner

    from bench.cli import cli
    from bench.models import list_models, register_model, registry

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # the new family lives for this test only

    @register_model(default_norm="ln", help="one conv")
    def tiny(cfg):
        return nn.Sequential(nn.Conv2d(3, cfg.width1, 3, bias=False), make_norm(cfg.norm, cfg.width1, 30, cfg.groups),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cfg.width1, 10))

    assert list_models()[-1] == "tiny"
    model = create_model("tiny", width1=8)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 1  # its own default norm
    assert count_params(model) == count_params_fast(preset="tiny", width1=8) == 3 * 9 * 8 + 2 * 8 + 8 * 10 + 10
    with pytest.raises(BudgetError, match="over the budget of 100"):
        build_checked(100, preset="tiny", width1=8)
    help_text = " ".join(CliRunner().invoke(cli, ["summary", "--help"]).output.split())
    assert "resnet_wide (width1=24, width3=32), convnext (ConvNeXt blocks, shape from width1..3, blocks1..3), tiny (one conv)." in help_text
    with pytest.raises(ValueError, match="'tiny' is registered twice"):
        register_model(tiny)
    with pytest.raises(BudgetError, match="choose one of seed_bn, seed_gn, resnet, resnet_deep, resnet_wide, convnext, tiny"):
        create_model("huge")


@pytest.mark.parametrize("prefix,text", [("000_", SEED_BN_TABLE), ("001_", SEED_GN_TABLE)])
def test_hardcoded_tables_match_seed_files(prefix, text):
    files = [f for d in SEEDS if d.is_dir() for f in sorted(d.glob(f"{prefix}*.txt"))]
    if not files:
        pytest.skip("shared/seeds not found")
    assert parse_table(files[0].read_text()) == parse_table(text)


def test_seed_bn_preset_matches_seed_table_layer_by_layer():
    model = create_model("seed_bn", "bn")
    assert layer_table(model) == parse_table(SEED_BN_TABLE)


def test_seed_gn_preset_matches_seed_table_layer_by_layer():
    model = create_model("seed_gn")  # its own norm: the seed's LayerNorm over (C, H, W)
    assert layer_table(model) == parse_table(SEED_GN_TABLE)


@pytest.mark.parametrize("preset,expected", [("seed_bn", 18_064), ("seed_gn", 47_236)])
def test_seed_parameter_counts(preset, expected):
    assert count_params(create_model(preset)) == expected
    assert count_params_fast(preset=preset) == expected


@pytest.mark.parametrize("norm,layer", [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm), ("ln", nn.GroupNorm)])
def test_seed_bn_topology_with_other_norms_keeps_shapes_and_count(norm, layer):
    model = create_model("seed_bn", norm, groups=4)
    rows = layer_table(model)
    reference = parse_table(SEED_BN_TABLE)
    # Same layers and shapes, the norm swapped; per-channel affine keeps the count at 18,064.
    assert [(t, s) for t, s, _ in rows] == [(layer.__name__ if t == "BatchNorm2d" else t, s) for t, s, _ in reference]
    assert count_params(model) == 18_064
    norms = [m for m in model.modules() if isinstance(m, layer)]
    assert len(norms) == 8
    if norm == "ln":
        assert all(m.num_groups == 1 for m in norms)
    if norm == "gn":
        assert all(m.num_groups == 4 for m in norms)


def test_relu_comes_before_the_norm():
    layers = list(create_model("seed_bn", "bn").layers)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm2d):
            assert isinstance(layers[i - 1], nn.ReLU) and isinstance(layers[i - 2], nn.Conv2d)
            assert isinstance(layers[i + 1], Dropout)


def test_no_conv_has_a_bias():
    for preset in PRESETS:
        convs = [m for m in create_model(preset).modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 11
        assert all(c.bias is None for c in convs)


@pytest.mark.parametrize("preset,norm", [(p, n) for p, norms in NORMS_PER_PRESET.items() for n in norms])
def test_every_preset_and_norm_fits_the_budget(preset, norm):
    kwargs = norm_kwargs(preset, norm)
    model = build_checked(50_000, **kwargs)  # raises BudgetError if over
    n = count_params(model)
    assert 0 < n <= 50_000
    assert count_params_fast(**kwargs) == n


def test_seed_layernorm_on_the_wider_topology_is_over_budget():
    # lnchw's per-position affine on seed_bn's 32x28x28 maps alone is 50,176 parameters.
    with pytest.raises(BudgetError, match="115,696"):
        build_checked(50_000, preset="seed_bn", norm="lnchw")


@pytest.mark.parametrize("kwargs", [
    {"preset": "seed_bn", "norm": "bn", "width": 1.5},
    {"preset": "seed_bn", "norm": "gn", "width": 1.3, "groups": 4},
    {"preset": "seed_bn", "norm": "ln", "width": 0.6},
    {"preset": "seed_gn", "norm": "lnchw", "width": 0.8},
    {"preset": "seed_gn", "norm": "gn", "groups": 2, "width": 2.0},
])
def test_count_params_fast_on_meta_equals_real_count(kwargs):
    real = count_params(create_model(**kwargs))
    assert count_params_fast(**kwargs) == real
    assert real != count_params(create_model(**{**kwargs, "width": 1.0}))  # width changed the model


def test_over_budget_width_raises_naming_count_and_budget():
    kwargs = {"preset": "seed_bn", "norm": "bn", "width": 3.0}
    n = count_params(create_model(**kwargs))
    assert n > 50_000
    with pytest.raises(BudgetError) as err:
        build_checked(50_000, **kwargs)
    assert f"{n:,}" in str(err.value)
    assert "50,000" in str(err.value)
    with pytest.raises(BudgetError, match="budget of 20,000"):
        check_budget(20_001, 20_000)
    check_budget(20_000, 20_000)  # exactly at the budget is fine


def test_width_lets_a_model_use_the_budget():
    w = max_width(50_000, preset="seed_bn", norm="bn")
    assert w > 1.5
    n = count_params_fast(preset="seed_bn", norm="bn", width=w)
    assert 40_000 < n <= 50_000
    assert count_params_fast(preset="seed_bn", norm="bn", width=w + 0.05) > 50_000


def test_groupnorm_width_scaling_keeps_channels_divisible():
    model = create_model("seed_bn", "gn", width=1.3, groups=4)
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels % 4 == 0 for m in gns)
    assert max(m.num_channels for m in gns) > 32


@pytest.mark.parametrize("preset,groups,channels", [("seed_bn", 3, 16), ("seed_gn", 4, 10), ("seed_bn", 64, 16)])
def test_bad_group_count_is_a_clear_error(preset, groups, channels):
    with pytest.raises(BudgetError) as err:
        create_model(preset, "gn", groups=groups)
    msg = str(err.value)
    assert f"{groups} groups" in msg and f"{channels} channels" in msg
    with pytest.raises(BudgetError):
        count_params_fast(preset=preset, norm="gn", groups=groups)


def test_unknown_preset_and_norm_are_errors():
    with pytest.raises(BudgetError, match="seed_xl"):
        create_model("seed_xl")
    with pytest.raises(BudgetError, match="instance"):
        create_model("seed_bn", "instance")


@pytest.mark.parametrize("preset,norm", [(p, n) for p, norms in NORMS_PER_PRESET.items() for n in norms])
def test_forward_gives_logits_per_image(preset, norm):
    torch.manual_seed(0)
    model = create_model(**norm_kwargs(preset, norm))
    x = torch.randn(5, 3, 32, 32)
    model.train()
    assert model(x).shape == (5, 10)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (5, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # depends on the input


def test_dropout_drops_and_rescales_in_training_only():
    drop = Dropout(0.25)
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert abs(y.mean().item() - 1.0) < 0.02
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_dropout_rounds_p_to_256ths_and_keeps_the_expectation():
    torch.manual_seed(0)
    y = Dropout(0.05).train()(torch.ones(400_000, dtype=torch.bfloat16))
    kept = y != 0
    assert abs(kept.float().mean().item() - 243 / 256) < 0.002  # 0.05 drops 13/256
    assert torch.allclose(y[kept].float(), torch.full((int(kept.sum()),), 256 / 243), rtol=1e-2)
    assert abs(y.float().mean().item() - 1.0) < 0.005 and y.dtype == torch.bfloat16
    assert torch.equal(Dropout(1.0).train()(torch.ones(10)), torch.zeros(10))


def test_random_bytes_are_uniform_in_every_byte_of_the_draw():
    from bench.models import random_bytes_like

    torch.manual_seed(0)
    x = torch.empty(64, 8, 16, 16).to(memory_format=torch.channels_last)
    b = random_bytes_like(x)
    assert b.shape == x.shape and b.is_contiguous(memory_format=torch.channels_last) and b.dtype == torch.uint8
    per_position = b.permute(0, 2, 3, 1).reshape(-1, 8).float().mean(0)  # byte k of each 64-bit draw
    assert torch.allclose(per_position, torch.full((8,), 127.5), atol=2.0)  # random_() alone leaves bit 63 at 0


def test_make_summary_lists_layers_and_total():
    text = make_summary(create_model("seed_gn"))
    assert "47,236" in text
    assert re.search(r"Total mult-adds \(M\): \d+\.\d\d\n", text) and "Units." not in text
    assert text.count("LayerNorm") == 8
    assert "[1, 16, 6, 6]" in text
