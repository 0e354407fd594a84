"""The ConvNeXt family's gated, two-stage shape (``gated``, ``expansion``, ``stages``): counts against a
closed form, the gate's arithmetic, stage resolutions, the field checks, the experiment files, and a toy
study of gated_ln through `bench tune`, `bench confirm` and the registered model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
import torch.nn.functional as F

import bench.confirm
import bench.tune.study
from bench.config import load, override
from bench.confirm import best_experiment
from bench.data import CIFAR10
from bench.errors import ConfigError
from bench.models import ConvNeXtBlock, build_checked, count_params, count_params_fast, create_model
from bench.models.convnext import ConvNeXt, GatedReLU
from bench.records import StudyRecord
from bench.tune import TuneOptions, run_study
from conftest import module_store
from test_convnext import expected_params
from test_convnext_study import TINY, invoke, runs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NORMS = ("bn", "gn", "ln", "lnc")
GATED = {"preset": "convnext", "stages": 2, "gated": True, "expansion": 1, "kernel": 5,
         "width1": 32, "width2": 48, "blocks1": 3, "blocks2": 3}


@pytest.mark.parametrize("norm", NORMS)
def test_gated_two_stage_count_matches_the_closed_form_and_the_meta_count(norm):
    kwargs = {**GATED, "norm": norm}
    model = build_checked(50_000, **kwargs)
    assert count_params(model) == count_params_fast(**kwargs) == expected_params(32, (32, 48), (3, 3), 5, 1, True) == 44_922


@pytest.mark.parametrize("changes", [{"expansion": 2}, {"gated": False, "expansion": 3}, {"stages": 3, "width3": 64, "blocks3": 1}])
def test_other_gated_shapes_count_as_the_closed_form(changes):
    kwargs = {**GATED, "norm": "bn", **changes}
    widths = (32, 48, 64)[: kwargs["stages"]]
    blocks = (3, 3, 1)[: kwargs["stages"]]
    assert count_params_fast(**kwargs) == expected_params(32, widths, blocks, 5, kwargs["expansion"], kwargs["gated"])


def test_layer_scale_adds_one_factor_per_block_channel_and_scales_the_branch():
    kwargs = {**GATED, "norm": "bn"}
    assert count_params(build_checked(50_000, **kwargs, layer_scale=0.1)) == count_params_fast(**kwargs, layer_scale=0.1) == 44_922 + 3 * 32 + 3 * 48
    torch.manual_seed(0)
    plain = ConvNeXtBlock(8, "bn", 4, kernel=3, gated=True, expansion=1).eval()
    torch.manual_seed(0)
    scaled = ConvNeXtBlock(8, "bn", 4, kernel=3, gated=True, expansion=1, layer_scale=0.1).eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(scaled(x) - x, 0.1 * (plain(x) - x))
    assert torch.equal(scaled.residual[-1].gamma, torch.full((8, 1, 1), 0.1))


def test_the_gate_is_relu_of_the_first_half_times_the_second():
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(GatedReLU()(x), F.relu(x[:, :3]) * x[:, 3:])


def test_two_stages_end_at_16x16_and_every_block_is_gated():
    model = create_model(**GATED, norm="bn").eval()
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert shapes == [(32, 32, 32), (48, 16, 16)]
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert len(blocks) == 6 and all(isinstance(b.residual[3], GatedReLU) for b in blocks)
    assert [b.residual[2].out_channels for b in blocks] == [64] * 3 + [96] * 3  # 2 x hidden, hidden = width
    assert model.classifier.in_features == 48


def test_gated_model_trains_in_both_memory_layouts():
    torch.manual_seed(0)
    model = create_model(**GATED, norm="lnc")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)),
                                   model.to(memory_format=torch.contiguous_format)(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("changes,message", [
    ({"stages": 4}, "stages must be 2 or 3"),
    ({"expansion": 0}, "expansion must be >= 1 and <= 8"),
    ({"preset": "resnet", "gated": True}, "gated applies to preset convnext, not 'resnet'"),
    ({"preset": "resnet", "stages": 2}, "stages applies to preset convnext, not 'resnet'"),
    ({"layer_scale": -0.1}, r"layer_scale must be in \[0, 1\]"),
    ({"preset": "resnet", "layer_scale": 0.1}, "layer_scale applies to preset convnext, not 'resnet'"),
])
def test_bad_gated_fields_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        override(load(EXPERIMENTS / "convnext_ln.toml"), **changes)


@pytest.mark.parametrize("norm", ("bn", "gn", "ln"))
def test_gated_experiment_files_differ_only_in_the_norm(norm):
    exp, bn = load(EXPERIMENTS / f"gated_{norm}.toml"), load(EXPERIMENTS / "gated_bn.toml")
    assert (exp.model.preset, exp.model.norm, exp.model.stages, exp.model.gated) == ("convnext", norm, 2, True)
    assert count_params_fast(**vars(exp.model)) <= exp.budget.max_params == 50_000
    assert exp.train == bn.train and exp.tune == bn.tune
    assert {k: v for k, v in exp.search.items() if k != "groups"} == bn.search


def test_a_toy_gated_study_tunes_confirms_and_registers_a_gated_two_stage_model(cifar, tmp_path_factory):
    tiny = CIFAR10(cifar.train.take(400), cifar.val.take(200), cifar.test.take(300), cifar.source + " (slice)", cifar.digest)
    with module_store(tmp_path_factory.mktemp("gated"), tiny, (bench.tune.study, bench.confirm)):
        # Trials of three shapes would build three compiled graphs: the study runs eager and only the
        # confirmation compiles (--set, since it follows its trial otherwise).
        run_study(override(load(EXPERIMENTS / "gated_ln.toml"), **TINY, compile=False), TuneOptions(trials=3, epochs=1, threads=1, pruner="none"))
        invoke("confirm", "--norm", "ln", "--study", "gated_ln", "--seeds", "1", "--epochs", "1", "--threads", "1", "--set", "compile=true")
        trained = [r for r in runs("gated_ln", "trial") if "n_params" in r.data.metrics]
        assert trained and all(r.data.metrics["n_params"] <= 50_000 for r in trained)
        [confirmed] = runs("gated_ln", "confirm")
        params = confirmed.data.params
        assert (params["preset"], params["norm"], params["stages"], params["gated"], params["expansion"]) == ("convnext", "ln", "2", "True", "1")
        assert params["compile"] == "True" and {r.data.params["compile"] for r in trained} == {"False"}
        assert confirmed.data.tags["bench.recipe"] == "epochs=1"  # compile is not part of the recipe
        assert {r.data.tags["bench.experiment"] for r in runs("gated_ln", "study")} == {"gated_ln"}
        model = mlflow.pytorch.load_model("models:/cifar10-gated_ln/latest").eval()
    [network] = [m for m in model.modules() if isinstance(m, ConvNeXt)]  # inside the raw-image wrapper
    blocks = [m for m in network.modules() if isinstance(m, ConvNeXtBlock)]
    assert len(network.stages) == 2 and blocks and all(isinstance(b.residual[3], GatedReLU) for b in blocks)
    with torch.inference_mode():
        assert model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 10)


def test_a_confirmation_starts_from_the_file_its_study_was_tuned_from(monkeypatch):
    """`bench confirm --norm bn --study gated_bn`: what the trial did not log (here nothing) comes from
    gated_bn.toml, not bn.toml; a study tuned before the tag existed falls back to the norm's file."""
    monkeypatch.chdir(EXPERIMENTS.parent)
    def record(tags):
        trial = SimpleNamespace(data=SimpleNamespace(params={}, tags={}))
        parents = [SimpleNamespace(data=SimpleNamespace(tags=t)) for t in tags]
        return StudyRecord(norm="bn", study="gated_bn", experiment_id="1", parents=parents, trials=[trial], best=trial)
    gated, bn = load(EXPERIMENTS / "gated_bn.toml"), load(EXPERIMENTS / "bn.toml")
    tuned = best_experiment(record([{}, {"bench.experiment": "gated_bn"}]))
    assert (tuned.model, tuned.train) == (gated.model, override(gated, train_subset=0).train)
    for older in ([{}], [{"bench.experiment": "gone_from_experiments"}]):
        assert best_experiment(record(older)).train.epochs == bn.train.epochs != gated.train.epochs
