"""The ConvNeXt-style family: parameter counts against a closed form, the budget, every norm in both
memory layouts, norm errors, one training step, its experiment files and its place in --preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.config import load, override
from bench.errors import BudgetError, ConfigError
from bench.models import ConvNeXtBlock, build_checked, count_params, count_params_fast, create_model, list_models
from bench.models.depthwise import DepthwiseConv2d, DepthwiseConvFunction
from bench.models.layers import ChannelLayerNorm, make_norm

KERNEL = 7  # ConvNeXt's, the default
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NORMS = ("bn", "gn", "ln", "lnc")
DEFAULT_SHAPE = {"width1": 16, "width2": 32, "width3": 48, "blocks1": 2, "blocks2": 1, "blocks3": 1}
DEFAULT_PARAMS = 46_410


def expected_params(stem: int, widths: tuple[int, ...], blocks: tuple[int, ...], k: int = KERNEL,
                    expansion: int = 4, gated: bool = False) -> int:
    """The count by hand, for any number of stages; every norm here has a per-channel weight and bias (2C).
    A block: depthwise conv, norm, 1x1 up to the hidden width (twice that when gated), 1x1 back."""
    def block(c: int) -> int:
        hidden = expansion * c
        up = 2 * hidden if gated else hidden
        return k * k * c + 2 * c + (c * up + up) + (hidden * c + c)

    downsample = lambda ci, co: 2 * ci + 4 * ci * co + co
    n = 27 * stem + 2 * stem + (stem * widths[0] + widths[0] if stem != widths[0] else 0)
    n += sum(b * block(c) for b, c in zip(blocks, widths))
    n += sum(downsample(ci, co) for ci, co in zip(widths, widths[1:]))
    return n + 2 * widths[-1] + 10 * widths[-1] + 10


def default(norm: str, **extra) -> dict:
    return {"preset": "convnext", "norm": norm, **DEFAULT_SHAPE, **extra}


@pytest.mark.parametrize("norm", NORMS)
def test_default_shape_count_matches_the_closed_form_and_the_meta_count(norm):
    model = build_checked(50_000, **default(norm))
    expected = expected_params(16, (16, 32, 48), (2, 1, 1))
    assert count_params(model) == count_params_fast(**default(norm)) == expected == DEFAULT_PARAMS


@pytest.mark.parametrize("arch", [
    {"stem": 8},  # a 1x1 projection into stage 1
    {"blocks": 2, "blocks1": 0, "blocks2": 0, "blocks3": 0},
    {"width1": 8, "width2": 24, "width3": 56, "blocks1": 3, "blocks2": 2},
])
def test_other_shapes_count_as_the_closed_form(arch):
    kwargs = {**default("ln"), **arch}
    blocks = tuple(kwargs[f"blocks{i}"] or kwargs.get("blocks", 1) for i in (1, 2, 3))
    widths = (kwargs["width1"], kwargs["width2"], kwargs["width3"])
    expected = expected_params(kwargs.get("stem") or widths[0], widths, blocks)
    assert count_params(create_model(**kwargs)) == count_params_fast(**kwargs) == expected


@pytest.mark.parametrize("kernel", [3, 5, 9])
def test_the_depthwise_kernel_is_a_field_counted_exactly(kernel):
    kwargs = default("bn", kernel=kernel)
    model = create_model(**kwargs)
    assert {b.residual[0].kernel_size for b in model.modules() if isinstance(b, ConvNeXtBlock)} == {(kernel, kernel)}
    assert count_params(model) == count_params_fast(**kwargs) == expected_params(16, (16, 32, 48), (2, 1, 1), kernel)
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("changes,message", [
    ({"kernel": 4}, "kernel must be 3, 5, 7 or 9"),
    ({"preset": "resnet", "kernel": 3}, "kernel applies to preset convnext, not 'resnet'"),
])
def test_bad_kernels_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        override(load(EXPERIMENTS / "convnext_ln.toml"), **changes)


def test_depthwise_conv_stays_float32_under_cpu_bf16_autocast_and_matches_nn_conv2d():
    torch.manual_seed(0)
    dw = DepthwiseConv2d(8, 8, 7, padding=3, groups=8, bias=False)
    plain = nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False)
    plain.load_state_dict(dw.state_dict())  # same parameters, same names: logged models still load
    x = torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dw(x).dtype == torch.float32 and plain(x).dtype == torch.bfloat16
        # the 1x1 conv after it still runs in bf16
        assert nn.Conv2d(8, 4, 1)(dw(x)).dtype == torch.bfloat16
    torch.testing.assert_close(dw(x), plain(x))


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_the_depthwise_function_has_nn_conv2ds_output_and_gradients(kernel):
    torch.manual_seed(kernel)
    plain = nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6, bias=False)
    x = torch.randn(3, 6, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    ours_x = x.detach().clone().requires_grad_()
    weight = plain.weight.detach().clone().requires_grad_()
    grad = torch.randn(3, 6, 9, 9)
    plain(x).backward(grad)
    out = DepthwiseConvFunction.apply(ours_x, weight, kernel // 2)
    out.backward(grad)
    torch.testing.assert_close(out, plain(x))
    torch.testing.assert_close(ours_x.grad, x.grad)
    torch.testing.assert_close(weight.grad, plain.weight.grad)


@pytest.mark.parametrize("changes", [{"stride": 2}, {"dilation": 2}, {"bias": True}, {"padding": 0}])
def test_only_a_plain_same_size_depthwise_conv_takes_the_fused_path(changes):
    assert DepthwiseConv2d(4, 4, 5, padding=2, groups=4, bias=False).plain_depthwise()
    kwargs = {"padding": 2, "bias": False, **changes}
    assert not DepthwiseConv2d(4, 4, 5, groups=4, **kwargs).plain_depthwise()


@pytest.mark.parametrize("norm, fused", [("bn", True), ("lnc", True), ("gn", False), ("ln", False)])
def test_the_fused_weight_gradient_is_off_where_a_groupnorm_follows_the_conv(norm, fused):
    model = create_model(**default(norm))
    convs = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    assert convs and all(conv.fused_weight_grad is fused for conv in convs)


def test_a_model_pickled_before_the_fused_path_existed_still_runs():
    """MLflow logs whole pickled modules: a gated_bn final logged before ``fused_weight_grad`` was added
    has convs without the attribute, and a teacher or a report loading it must not fail on it."""
    import pickle

    model = create_model(**default("bn")).eval()
    for conv in (m for m in model.modules() if isinstance(m, DepthwiseConv2d)):
        del conv.__dict__["fused_weight_grad"]  # as the older code pickled it
    old = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(old(x), model(x))


def test_over_budget_shape_is_refused_naming_its_count():
    kwargs = default("bn", width3=64, blocks2=2)
    n = count_params_fast(**kwargs)
    assert n > 50_000
    with pytest.raises(BudgetError) as err:
        build_checked(50_000, **kwargs)
    assert f"{n:,} parameters" in str(err.value) and "budget of 50,000" in str(err.value)


def test_width_scales_every_stage_to_group_multiples():
    model = create_model(**default("gn", groups=8, width=1.3))  # 20.8, 41.6, 62.4 -> multiples of 8
    assert [stage[-1].residual[0].out_channels for stage in model.stages] == [24, 40, 64]


def test_structure_depthwise_blocks_and_stage_resolutions():
    model = create_model(**default("ln"))
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert len(blocks) == 4
    dw = [b.residual[0] for b in blocks]
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (KERNEL, KERNEL) for c in dw)
    assert all(isinstance(b.residual[1], nn.GroupNorm) and b.residual[1].num_groups == 1 for b in blocks)
    assert [b.residual[2].out_channels for b in blocks] == [64, 64, 128, 192]  # 4x expansion
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    model.eval()(torch.zeros(1, 3, 32, 32))
    assert shapes == [(16, 32, 32), (32, 16, 16), (48, 8, 8)]
    assert model.dropout.p == 0.05 and model.classifier.in_features == 48


@pytest.mark.parametrize("norm", NORMS)
def test_forward_gives_logits_in_both_memory_layouts(norm):
    torch.manual_seed(0)
    model = create_model(**default(norm, dropout=0.1)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == out_cl.shape == (4, 10) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out_cl, out, atol=1e-4, rtol=1e-4)
    assert model.train()(x).shape == (4, 10)


def test_channel_layernorm_normalises_each_position_over_the_channels_only():
    """lnc is ConvNeXt's LayerNorm: every (image, row, column) has mean 0 and variance 1 over C, in either
    layout and under bf16 autocast; ln (one group over C,H,W) only reaches that per image."""
    lnc, ln = make_norm("lnc", 8, 0, 4), make_norm("ln", 8, 0, 4)
    assert isinstance(lnc, ChannelLayerNorm) and [p.shape for p in lnc.parameters()] == [(8,), (8,)]
    x = torch.randn(2, 8, 5, 5) * torch.linspace(0.1, 5, 25).view(1, 1, 5, 5) + 3  # positions of unequal scale
    for layout in (torch.contiguous_format, torch.channels_last):
        out = lnc(x.contiguous(memory_format=layout))
        assert out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out.mean(1), torch.zeros(2, 5, 5), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(2, 5, 5), atol=1e-3, rtol=0)
    assert ln(x).var(1, unbiased=False).std() > 0.5  # per position the spread still follows the input's scale
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lnc(x.contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(out).all() and abs(out.float().mean(1)).max() < 0.05


def test_seed_layernorm_is_refused():
    for build in (lambda: create_model("convnext", "lnchw"), lambda: count_params_fast(preset="convnext", norm="lnchw")):
        with pytest.raises(BudgetError, match="'lnchw'.*only for the seed presets; use ln for convnext"):
            build()


@pytest.mark.parametrize("arch,groups,channels", [({}, 3, 16), ({}, 32, 16), ({"stem": 12}, 8, 12)])
def test_groupnorm_groups_must_divide_every_width(arch, groups, channels):
    kwargs = default("gn", groups=groups, **arch)
    for build in (lambda: create_model(**kwargs), lambda: count_params_fast(**kwargs)):
        with pytest.raises(BudgetError, match=f"{groups} groups do not divide {channels} channels"):
            build()


@pytest.mark.parametrize("norm", NORMS)
def test_training_steps_lower_the_loss_with_finite_gradients(norm):
    torch.manual_seed(0)
    model = create_model(**default(norm, width1=8, width2=16, width3=32, blocks1=1, dropout=0.0))
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_preset_is_listed_for_the_cli():
    from click.testing import CliRunner

    from bench.cli import cli

    assert "convnext" in list_models()
    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert "convnext (ConvNeXt blocks, shape from width1..3, blocks1..3)" in help_text


@pytest.mark.parametrize("norm", NORMS)
def test_experiment_files_differ_only_in_the_norm(norm):
    exp, ln = load(EXPERIMENTS / f"convnext_{norm}.toml"), load(EXPERIMENTS / "convnext_ln.toml")
    assert (exp.model.preset, exp.model.norm, exp.budget.max_params) == ("convnext", norm, 50_000)
    assert count_params_fast(**vars(exp.model)) == DEFAULT_PARAMS
    assert {"lr", "dropout", "weight_decay", "width1", "width2", "width3", "blocks1", "blocks2"} <= set(exp.search)
    assert ("groups" in exp.search) == (norm == "gn")
    assert exp.train == ln.train and exp.tune == ln.tune
    assert {k: v for k, v in exp.search.items() if k != "groups"} == ln.search
    if norm == "gn":
        assert exp.search["groups"].choices == [2, 4, 8]
