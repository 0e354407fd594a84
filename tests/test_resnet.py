"""The residual family: structure, parameter counts, width scaling, norm errors, the budget, and the
resnet experiment files whose search space spans over-budget architectures."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn

from bench.config import RESNET_SHAPES, Experiment, ModelConfig, load, override
from bench.errors import BudgetError, ConfigError
from bench.models import (
    ALL_PRESETS,
    BasicBlock,
    Dropout,
    build_checked,
    count_params,
    count_params_fast,
    create_model,
    make_summary,
)
from bench.tune import suggest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NORM_LAYER = {"bn": nn.BatchNorm2d, "gn": nn.GroupNorm, "ln": nn.GroupNorm}
DEFAULT_PARAMS = 47_514  # 16/32/40, one block per stage; every norm here has a per-channel affine


def groups_for(preset: str, norm: str) -> int:
    return 2 if (preset, norm) == ("seed_gn", "gn") else 4  # seed_gn has 10-channel layers


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_meta_count_equals_real_count_for_every_preset_and_norm(preset, norm):
    kwargs = {"preset": preset, "norm": norm, "groups": groups_for(preset, norm)}
    assert count_params_fast(**kwargs) == count_params(create_model(**kwargs))


@pytest.mark.parametrize("arch", [
    {"blocks": 2, "width1": 12, "width2": 24, "width3": 24},
    {"stem": 8, "dropout_at": "blocks"},
    {"width": 0.7, "norm": "gn", "groups": 4},
    {"width1": 8, "width2": 8, "width3": 8},  # no projection in stage 1, stride-only projections after
    {"blocks1": 3, "blocks2": 2, "width1": 8},
])
def test_meta_count_equals_real_count_for_other_shapes(arch):
    kwargs = {"preset": "resnet", **arch}
    assert count_params_fast(**kwargs) == count_params(create_model(**kwargs))


@pytest.mark.parametrize("preset,params,blocks", [("resnet_deep", 37_594, 4), ("resnet_wide", 48_226, 3)])
def test_named_shapes_fit_the_budget_and_set_their_fields(preset, params, blocks):
    assert count_params(build_checked(50_000, preset=preset)) == params
    beside = create_model(preset, width1=8)
    assert len([m for m in beside.modules() if isinstance(m, BasicBlock)]) == blocks
    # One expansion of the name for create_model and experiment files: a field given beside it wins in both.
    assert beside.stem[0].out_channels == 8
    from_config = override(Experiment(), preset=preset, width1=8).model
    assert count_params(beside) == count_params_fast(**vars(from_config)) < params

    exp = override(load(EXPERIMENTS / "resnet_bn.toml"), width3=40, preset=preset)  # order of the names does not matter
    shape = {k: getattr(exp.model, k) for k in RESNET_SHAPES[preset]}
    assert exp.model.preset == "resnet" and shape == {**RESNET_SHAPES[preset], "width3": 40}  # a field set beside it wins


def test_named_shape_in_an_experiment_file_is_logged_as_its_fields(tmp_path):
    path = tmp_path / "wide.toml"
    path.write_text('[model]\npreset = "resnet_wide"\nnorm = "ln"\nblocks2 = 2\n')
    model = load(path).model
    assert (model.preset, model.width1, model.width2, model.width3, model.blocks1, model.blocks2) == ("resnet", 24, 32, 32, 0, 2)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_default_resnet_fits_the_budget(norm):
    model = build_checked(50_000, preset="resnet", norm=norm)
    assert count_params(model) == DEFAULT_PARAMS
    norms = [m for m in model.modules() if isinstance(m, NORM_LAYER[norm])]
    assert len(norms) == 1 + 2 * 3 + 2  # stem, two per block, projections of stages 2 and 3
    if norm == "ln":
        assert all(m.num_groups == 1 for m in norms)


def test_defaults_come_from_the_model_config():
    assert count_params(create_model(**vars(ModelConfig(preset="resnet")))) == DEFAULT_PARAMS


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_forward_gives_logits_per_image(norm):
    torch.manual_seed(0)
    model = create_model("resnet", norm, dropout=0.1)
    x = torch.randn(4, 3, 32, 32)
    assert model.train()(x).shape == (4, 10)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_structure_stem_stages_projections_head():
    model = create_model("resnet", "bn", blocks=2)
    assert all(c.bias is None for c in model.modules() if isinstance(c, nn.Conv2d))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6
    projected = [not isinstance(b.shortcut, nn.Identity) for b in blocks]
    assert projected == [False, False, True, False, True, False]  # stem width = width1: stage 1 keeps its input
    shapes = []
    model.stages.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    model.eval()(torch.zeros(1, 3, 32, 32))
    assert shapes == [(16, 32, 32), (32, 16, 16), (40, 8, 8), (40, 8, 8)]
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 40


@pytest.mark.parametrize("stride2,stride3,sides", [(2, 2, (32, 16, 8)), (2, 1, (32, 16, 16)), (1, 2, (32, 32, 16)), (1, 1, (32, 32, 32))])
def test_stage_strides_move_the_resolution_not_the_parameter_count(stride2, stride3, sides):
    model = create_model("resnet", "bn", stride2=stride2, stride3=stride3)
    sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert tuple(sizes) == sides
    assert count_params(model) == count_params_fast(preset="resnet", stride2=stride2, stride3=stride3) == DEFAULT_PARAMS
    # a stage without downsampling but a width change still gets its projection shortcut
    assert [isinstance(stage[0].shortcut, nn.Identity) for stage in model.stages] == [True, False, False]


def test_a_stride_one_stage_costs_four_times_the_multiply_adds():
    def stage3_mult_adds(**kwargs) -> int:
        model, counts = create_model("resnet", "bn", **kwargs).eval(), []
        for conv in (m for m in model.stages[2].modules() if isinstance(m, nn.Conv2d)):
            conv.register_forward_hook(lambda m, i, o: counts.append(o.shape[-1] * o.shape[-2] * m.weight.numel()))
        model(torch.zeros(1, 3, 32, 32))
        return sum(counts)

    assert stage3_mult_adds(stride3=1) == 4 * stage3_mult_adds()


def test_per_stage_block_counts_override_blocks():
    model = create_model("resnet", "bn", blocks=2, blocks1=3, blocks3=1)
    assert [len(stage) for stage in model.stages] == [3, 2, 1]
    assert count_params_fast(preset="resnet", blocks1=1, blocks2=1, blocks3=1) == DEFAULT_PARAMS


def test_stem_width_adds_a_projection_in_stage_one():
    model = create_model("resnet", "bn", stem=8)
    assert model.stem[0].out_channels == 8
    assert not isinstance(model.stages[0][0].shortcut, nn.Identity)


@pytest.mark.parametrize("dropout_at", ["head", "blocks"])
def test_dropout_placement(dropout_at):
    model = create_model("resnet", "bn", dropout=0.2, dropout_at=dropout_at)
    in_blocks = [m for b in model.modules() if isinstance(b, BasicBlock) for m in b.modules() if isinstance(m, Dropout)]
    assert model.dropout.p == (0.2 if dropout_at == "head" else 0.0)
    assert [m.p for m in in_blocks] == ([0.2] * 3 if dropout_at == "blocks" else [])


def conv_widths(model: nn.Module) -> set[int]:
    return {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)}


def test_width_scales_every_residual_width():
    half = create_model("resnet", "bn", width=0.5, stem=24)
    assert half.stem[0].out_channels == 12
    assert conv_widths(half) == {12, 8, 16, 20}
    assert count_params(half) < DEFAULT_PARAMS / 3
    wider = create_model("resnet", "gn", width=1.3, groups=4)  # 20.8, 41.6, 52 -> multiples of 4
    assert conv_widths(wider) == {20, 40, 52}
    assert count_params_fast(preset="resnet", norm="gn", width=1.3, groups=4) == count_params(wider) > 50_000


def test_seed_presets_ignore_the_residual_fields():
    assert count_params(create_model("seed_bn", "bn", width1=64, blocks=3, dropout_at="blocks")) == 18_064
    with pytest.raises(TypeError):
        create_model("seed_bn", widht1=64)  # a misspelt field is not silently ignored


@pytest.mark.parametrize("arch,groups,channels", [({}, 3, 16), ({}, 16, 40), ({"stem": 12}, 8, 12)])
def test_groupnorm_groups_must_divide_every_width(arch, groups, channels):
    kwargs = {"preset": "resnet", "norm": "gn", "groups": groups, **arch}
    for build in (lambda: create_model(**kwargs), lambda: count_params_fast(**kwargs)):
        with pytest.raises(BudgetError) as err:
            build()
        assert f"{groups} groups do not divide {channels} channels" in str(err.value)


def test_seed_layernorm_is_refused_for_residual_models():
    for build in (lambda: create_model("resnet", "lnchw"), lambda: count_params_fast(preset="resnet", norm="lnchw")):
        with pytest.raises(BudgetError, match="'lnchw'.*only for the seed presets; use ln"):
            build()


def test_over_budget_architecture_raises_naming_the_count():
    kwargs = {"preset": "resnet", "norm": "bn", "width1": 24, "width2": 40, "width3": 56, "blocks": 2}
    n = count_params_fast(**kwargs)
    assert n > 50_000
    with pytest.raises(BudgetError) as err:
        build_checked(50_000, **kwargs)
    assert f"{n:,} parameters" in str(err.value) and "budget of 50,000" in str(err.value)


def test_unknown_preset_lists_the_residual_one():
    with pytest.raises(BudgetError, match="seed_bn, seed_gn, resnet"):
        create_model("resnet_xl")


def test_summary_lists_the_blocks():
    text = make_summary(create_model("resnet", "ln"))
    assert f"{DEFAULT_PARAMS:,}" in text and "BasicBlock" in text and "[1, 40, 8, 8]" in text


# ---------------------------------------------------------------- the experiment files


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_resnet_experiments_load_with_architecture_dimensions(norm):
    exp = load(EXPERIMENTS / f"resnet_{norm}.toml")
    assert (exp.model.preset, exp.model.norm, exp.budget.max_params) == ("resnet", norm, 50_000)
    assert {"lr", "dropout", "weight_decay", "label_smoothing", "width1", "width2", "width3", "blocks1", "blocks2"} <= set(exp.search)
    assert ("groups" in exp.search) == (norm == "gn")
    assert count_params_fast(**vars(exp.model)) == DEFAULT_PARAMS
    assert (exp.train.ema, exp.train.tta_flip, exp.train.tta_shift) == (0.0, True, 1)  # measured: flip and shift TTA kept, EMA not


ARCH = ("width1", "width2", "width3", "blocks1", "blocks2")


def corner(exp, pick) -> dict:
    """The search space's smallest (pick=min) or largest (pick=max) architecture, other dimensions at their low end."""
    values = {}
    for name, dim in exp.search.items():
        values[name] = pick(dim.choices) if dim.choices is not None else (pick(dim.low, dim.high) if name in ARCH else dim.low)
    return values


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_sampled_over_budget_architecture_is_caught_before_any_model_is_built(norm, monkeypatch):
    exp = load(EXPERIMENTS / f"resnet_{norm}.toml")
    built = []
    monkeypatch.setattr(nn.Conv2d, "reset_parameters", lambda self: built.append(self.weight.device.type))
    largest = suggest(optuna.trial.FixedTrial(corner(exp, max)), exp)
    assert (largest.model.width3, largest.model.blocks1, largest.model.blocks2) == (48, 3, 2)
    assert count_params_fast(**vars(largest.model)) > exp.budget.max_params
    smallest = suggest(optuna.trial.FixedTrial(corner(exp, min)), exp)
    assert count_params_fast(**vars(smallest.model)) <= exp.budget.max_params
    assert built and set(built) == {"meta"}  # only meta-device counting, no real weights


@pytest.mark.parametrize("assignment,message", [
    ({"width2": 0}, "width2 must be >= 1"),
    ({"blocks": 0}, "blocks must be >= 1"),
    ({"stem": -8}, "stem must be >= 0"),
    ({"blocks2": -1}, "blocks2 must be >= 0"),
    ({"dropout_at": "stem"}, "dropout_at: 'stem' is not one of head, blocks"),
    ({"ema": 1.0}, r"ema must be in \[0, 1\)"),
    ({"grad_clip": -1.0}, r"grad_clip must be >= 0 \(a global L2 norm"),
    ({"stride3": 3}, "stride3 must be 1 or 2"),
    ({"preset": "convnext", "stride2": 1}, "stride2 applies to preset resnet, not 'convnext'; remove it or set stride2=2"),
])
def test_bad_residual_and_recipe_fields_are_config_errors(assignment, message):
    with pytest.raises(ConfigError, match=message):
        override(load(EXPERIMENTS / "resnet_bn.toml"), **assignment)
