"""``compile = true``: the training step runs through torch.compile and learns what the eager step
learns; the setting is speed-only (a confirmation's recipe, a study's fixed settings and a checkpoint's
identity ignore it; a confirmation compiles as its trial did, or as --set says); without a C++
compiler it is one error before any training."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

import bench.models.depthwise
import bench.runtime
from bench.checkpoint import EpochCheckpoint, run_config
from bench.config import Experiment, TrainConfig, load, override
from bench.confirm import best_experiment, recipe
from bench.errors import ConfigError
from bench.records import StudyRecord
from bench.models import create_model
from bench.models.depthwise import DepthwiseConv2d, depthwise_weight_grad as weight_grad
from bench.speed.grid import experiment_variant
from bench.train import fit, resolve_runtime
from bench.tune.space import fixed_recipe
from conftest import take
from test_convnext_gated import EXPERIMENTS
from test_train import without_timing

needs_compiler = pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"), reason="torch.compile needs a C++ compiler on the CPU")
# The smallest gated two-stage model: one block a stage, so the graph compiles in seconds.
SMALL_GATED = {"preset": "convnext", "norm": "bn", "stages": 2, "gated": True, "expansion": 1, "kernel": 3,
               "width1": 8, "width2": 16, "blocks1": 1, "blocks2": 1, "dropout": 0.1}
# fp32 so that the fused kernels differ from the eager ones by rounding only; 320 images in batches
# of 96 end with a batch of 32, the second graph of a static compile.
RECIPE = {"epochs": 2, "batch_size": 96, "seed": 0, "precision": "fp32", "tta_flip": True}


def trained(data, **changes):
    torch.manual_seed(0)
    model = create_model(**SMALL_GATED)
    cfg = TrainConfig(**RECIPE, **changes)
    return model, fit(model, data, cfg, resolve_runtime(cfg, "bn", preset="convnext"))


@needs_compiler
def test_a_compiled_step_learns_what_the_eager_step_learns(small_cifar):
    data = take(small_cifar, 320, 200, 200)
    eager_model, eager = trained(data)
    compiled_model, compiled = trained(data, compile=True)
    for ours, theirs in zip(without_timing(compiled.history), without_timing(eager.history)):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-3), key
    # The caller keeps the plain module: its weights are the trained ones, saved without a compile prefix.
    assert compiled_model.state_dict().keys() == eager_model.state_dict().keys()
    for name, tensor in eager_model.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[name], tensor, rtol=1e-3, atol=1e-3)
    assert compiled.test_acc == pytest.approx(eager.test_acc, abs=0.01)


def compiled_depthwise_grads(monkeypatch, cpu_has_avx512: bool) -> list[int]:
    """Compile a depthwise conv's loss, backpropagate, check its weight gradient against nn.Conv2d's;
    returns the kernel size of every ``depthwise_weight_grad`` call the compiled backward made."""
    calls = []
    monkeypatch.setattr(bench.models.depthwise, "FUSED_WEIGHT_GRAD_WINS", cpu_has_avx512)
    monkeypatch.setattr(bench.models.depthwise, "depthwise_weight_grad",
                        lambda *args: calls.append(args[2]) or weight_grad(*args))
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = DepthwiseConv2d(8, 8, 5, padding=2, groups=8, bias=False)
    plain = torch.nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(4, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    torch.compile(lambda t: conv(t).square().sum(), dynamic=False)(x).backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    return calls


@needs_compiler
def test_a_compiled_depthwise_conv_computes_its_weight_gradient_as_a_fused_sum_with_avx512(monkeypatch):
    assert compiled_depthwise_grads(monkeypatch, cpu_has_avx512=True) == [5]  # traced once into the compiled backward


@needs_compiler
def test_without_avx512_a_compiled_depthwise_conv_keeps_onednns_weight_gradient(monkeypatch):
    assert compiled_depthwise_grads(monkeypatch, cpu_has_avx512=False) == []


def test_compile_is_not_part_of_a_recipe_a_study_or_a_checkpoint(tmp_path):
    exp = override(load(EXPERIMENTS / "gated_bn.toml"), epochs=3)
    assert recipe(exp, {"compile": False, "ema": 0.99}) == recipe(exp, {"ema": 0.99}) == "epochs=3 ema=0.99"
    assert fixed_recipe(exp, 2) == fixed_recipe(override(exp, compile=False), 2)

    eager = run_config(Experiment().hyperparameters())
    saved = EpochCheckpoint(tmp_path / "run.pt", eager)
    saved.save({"epoch": 2})
    compiled = run_config(override(Experiment(), compile=True).hyperparameters())
    assert EpochCheckpoint(saved.path, compiled).load()["epoch"] == 2  # resumes with compile toggled
    older = {k: v for k, v in eager.items() if k != "compile"}  # a checkpoint from before the setting existed
    assert EpochCheckpoint(saved.path, older).load()["epoch"] == 2


def test_a_checkpoint_from_before_a_field_existed_resumes_at_its_default(tmp_path):
    current = run_config(load(EXPERIMENTS / "gated_bn.toml").hyperparameters())
    saved = EpochCheckpoint(tmp_path / "run.pt", {k: v for k, v in current.items() if k != "layer_scale"})
    saved.save({"epoch": 29})
    assert EpochCheckpoint(saved.path, current).load()["epoch"] == 29  # layer_scale arrived later, at 0.0
    scaled = run_config(override(load(EXPERIMENTS / "gated_bn.toml"), layer_scale=0.1).hyperparameters())
    assert EpochCheckpoint(saved.path, scaled).load() is None  # not at its default: another training
    assert EpochCheckpoint(saved.path, run_config(override(Experiment(), lr=0.2).hyperparameters())).load() is None


def test_a_confirmation_compiles_as_its_trial_did_unless_told_otherwise(monkeypatch):
    monkeypatch.chdir(EXPERIMENTS.parent)
    def record(params):
        trial = SimpleNamespace(data=SimpleNamespace(params=params, tags={}))
        return StudyRecord(norm="gated_bn", study="gated_bn", experiment_id="1", parents=[], trials=[trial], best=trial)
    compiled = record({"lr": "0.05", "compile": "True"})
    older = record({"lr": "0.05", "compile": "False"})  # as a trial logged before the file compiled
    assert best_experiment(compiled, epochs=3).train.compile is True
    assert best_experiment(older, epochs=3).train.compile is False
    assert best_experiment(older, overrides={"compile": True}).train.compile is True


def test_without_a_cxx_compiler_compile_is_one_error_before_training(small_cifar, monkeypatch):
    monkeypatch.setattr(bench.runtime.shutil, "which", lambda name: None)
    data = take(small_cifar, 96, 50, 50)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler.*set compile = false"):
        trained(data, compile=True)
    assert len(trained(data)[1].history) == 2  # the eager step needs no compiler


def test_the_speed_benchmark_takes_compile_as_a_runtime_change():
    label, model, runtime = experiment_variant("gated_bn:compile=true")
    assert label == "gated_bn:compile=true" and runtime == {"compile": True} and model["gated"] is True
    with pytest.raises(ConfigError, match="lr"):
        experiment_variant("gated_bn:lr=0.2")
