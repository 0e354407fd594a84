"""``bench speed``: the report's shape and keys on a few steps of real data, never its timings."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from rich.console import Console

from bench.cli import cli
from bench.data import CIFAR10
from bench.errors import ConfigError
from bench.models import Dropout, count_params
from bench.speed import SpeedOptions, bench_model, render, run_speed, seed_model, write_json

SIDES = {"baseline", "bench"}
RATES = {"images_per_s", "min", "max", "repeats"}
FIGURES = RATES | {"setup"}
FLOP_FIGURES = {"gflops", "pct_fp32_peak", "pct_bf16_peak"}


def tiny_options(**kwargs) -> SpeedOptions:
    return SpeedOptions(**{"steps": 2, "repeats": 2, "batch_size": 32, "threads": 1, "workers": 0,
                           "eval_images": 64, "warmup_steps": 1, **kwargs})


@pytest.fixture(scope="module")
def report(small_cifar) -> dict:
    return run_speed(tiny_options(), small_cifar)


def test_report_has_every_figure_for_both_pipelines(report):
    assert set(report) == {"machine", "options", "model", "train", "eval"}
    for phase in ("train", "eval"):
        assert set(report[phase]) == SIDES | {"ratio"}
        for side in SIDES:
            figures = report[phase][side]
            assert FIGURES <= set(figures)
            assert len(figures["repeats"]) == 2
            assert figures["min"] <= figures["images_per_s"] <= figures["max"]
        assert report[phase]["ratio"] == pytest.approx(report[phase]["bench"]["images_per_s"] / report[phase]["baseline"]["images_per_s"])
    assert FLOP_FIGURES <= set(report["train"]["bench"])
    assert not FLOP_FIGURES & set(report["eval"]["bench"])


def test_report_describes_machine_and_model(report):
    machine, model = report["machine"], report["model"]
    assert machine["threads"] == 1
    assert machine["fp32_matmul_gflops"] > 0 and machine["bf16_matmul_gflops"] > 0
    assert (model["preset"], model["norm"], model["params"]) == ("seed_bn", "bn", 18_064)
    assert model["train_mflop_per_image"] > model["eval_mflop_per_image"] > 0


def test_report_is_json_and_renders(report, tmp_path):
    write_json(report, tmp_path / "speed.json")
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(report))
    out = io.StringIO()
    render(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "Training: bench/baseline" in text and "Evaluation: bench/baseline" in text


def test_ablation_rows_start_with_their_reference(small_cifar):
    knobs = ("bf16", "channels_last", "fused", "dropout", "inference_mode")
    rows = run_speed(tiny_options(repeats=1, ablate=True, knobs=knobs), small_cifar)["ablation"]
    assert [(r["phase"], r["knob"]) for r in rows] == [
        ("train", "reference"), ("train", "bf16"), ("train", "channels_last"), ("train", "fused"), ("train", "dropout"),
        ("eval", "reference"), ("eval", "inference_mode"), ("eval", "bf16"), ("eval", "channels_last"),
    ]
    assert all(set(r) == RATES | {"phase", "knob", "what", "numerics", "speedup"} for r in rows)
    assert [r["speedup"] for r in rows if r["knob"] == "reference"] == [1.0, 1.0]


def test_seed_model_is_the_bench_model_with_torch_dropout():
    seed, ours = seed_model("seed_bn", "bn"), bench_model("seed_bn", "bn")
    assert not any(isinstance(m, Dropout) for m in seed.modules())
    assert sum(type(m) is nn.Dropout for m in seed.modules()) == sum(isinstance(m, Dropout) for m in ours.modules()) == 8
    assert count_params(seed) == count_params(ours)
    assert all(torch.equal(a, b) for a, b in zip(seed.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "--steps must be >= 1"),
    ({"workers": -1}, "--workers must be >= 0"),
    ({"eval_images": 0}, "--eval-images must be in"),
    ({"steps": 1000}, "--steps x --batch-size must be <= 2000"),
    ({"knobs": ("warp_drive",)}, "unknown knob 'warp_drive'"),
])
def test_bad_options_name_the_flag(small_cifar, change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        run_speed(tiny_options(**change), small_cifar)


def test_cli_prints_tables_and_writes_json(cifar_dir, tmp_path):
    out = tmp_path / "speed.json"
    args = ["speed", "--steps", "1", "--repeats", "1", "--batch-size", "16", "--threads", "1", "--workers", "0",
            "--eval-images", "32", "--data-dir", str(cifar_dir), "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "bench/baseline" in result.output
    assert set(json.loads(out.read_text())["train"]) == SIDES | {"ratio"}


def test_cli_bad_input_is_one_line(cifar_dir):
    result = CliRunner().invoke(cli, ["speed", "--steps", "0", "--data-dir", str(cifar_dir)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: Invalid value for '--steps': 0 is not in the range x>=1. (see `cli speed --help`)"]


def test_time_to_accuracy_trains_both_pipelines_and_finds_the_first_epoch(small_cifar):
    from bench.config import TrainConfig
    from bench.speed import time_to_accuracy

    data = CIFAR10(train=small_cifar.train.take(256), val=small_cifar.val.take(64), test=small_cifar.test.take(200),
                   source=small_cifar.source, digest=small_cifar.digest)
    result = time_to_accuracy(data, TrainConfig(epochs=2, batch_size=64), target=0.01, workers=0)
    for side in ("baseline", "bench"):
        curve = result["curves"][side]
        assert [p["epoch"] for p in curve] == [1, 2]
        assert curve[0]["seconds"] < curve[1]["seconds"]
        assert result[side]["epoch"] == 1 and result[side]["final_test_acc"] == curve[-1]["test_acc"]
    unreachable = time_to_accuracy(data, TrainConfig(epochs=1, batch_size=64), target=1.0, workers=0)
    assert unreachable["bench"]["epoch"] is None or unreachable["curves"]["bench"][0]["test_acc"] == 1.0
