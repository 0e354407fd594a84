"""``bench speed``: what its figures mean, on scripted timings and accuracies (so a wrong median,
ratio, target or width fails a test), and that the real pipelines run a few steps of data.
Real timings are never asserted: the machine is shared."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from rich.console import Console

from bench.cli import cli
from bench.config import TrainConfig
from bench.data import CIFAR10
from bench.errors import ConfigError
from bench.models import Dropout, count_params, count_params_fast
from bench.speed import (GridOptions, render_grid, SpeedOptions, bench_model, render, render_time_to_accuracy, run_grid, run_speed,
                         seed_model, time_to_accuracy, write_json)
from bench.speed import ablation, benchmark, grid, measure, to_accuracy
from bench.speed.ablation import StepSetup
from bench.runtime import cpu_name
from bench.speed.measure import flops_per_image, interleaved, matmul_gflops

# seed_bn's convolution output channels, as bench/models/seed.py builds them at width 1 and 1.75
CHANNELS = {1.0: [16, 32, 10, 16, 16, 16, 10, 16, 16, 16, 10], 1.75: [28, 56, 10, 28, 28, 28, 10, 28, 28, 28, 10]}


def tiny_options(**kwargs) -> SpeedOptions:
    return SpeedOptions(**{"steps": 2, "repeats": 2, "batch_size": 32, "threads": 1, "workers": 0,
                           "eval_images": 64, "warmup_steps": 1, **kwargs})


def text_of(draw, report) -> str:
    out = io.StringIO()
    draw(report, Console(file=out, width=200))
    return out.getvalue()


class FakeClock:
    """Stands in for the ``time`` module: ``perf_counter`` moves only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def script(monkeypatch, module, *phases: dict) -> None:
    """``module.interleaved`` returns these rates, one dict (runner name -> rates) per call in turn; warm-up does nothing."""
    rates_per_call = iter(phases)

    def scripted_interleaved(runners: dict, images: int, repeats: int) -> dict[str, list[float]]:
        rates = next(rates_per_call)
        return {name: rates[name] for name in runners}

    monkeypatch.setattr(module, "interleaved", scripted_interleaved)
    monkeypatch.setattr(module, "warm_up", lambda runners, images: None)


# ---------------------------------------------------------------- measuring


def test_interleaved_runs_the_runners_in_turn_and_reports_images_per_second(monkeypatch):
    clock, order = FakeClock(), []
    monkeypatch.setattr(measure, "time", clock)

    def runner(name: str, seconds: float):
        def run(images: int) -> int:
            order.append(name)
            clock.now += seconds
            return images
        return run

    rates = interleaved({"a": runner("a", 2.0), "b": runner("b", 0.5)}, images=100, repeats=3)
    assert order == ["a", "b"] * 3
    assert rates == {"a": [50.0] * 3, "b": [200.0] * 3}


def test_matmul_peak_is_the_fastest_repeat(monkeypatch):
    durations = iter([0.0, 0.3, 0.0, 0.1, 0.0, 0.2])  # (start, end) of each timed repeat

    class Clock:
        perf_counter = staticmethod(lambda: next(durations))

    monkeypatch.setattr(measure, "time", Clock)
    assert matmul_gflops(torch.float32, torch.device("cpu"), n=8, repeats=3) == pytest.approx(2 * 8**3 / 0.1 / 1e9)


def test_flops_are_per_image_and_count_two_per_multiply_add():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    assert flops_per_image(conv, 2, train=False) == flops_per_image(conv, 4, train=False) == 2 * 32 * 32 * 4 * 3 * 3 * 3
    assert flops_per_image(conv, 2, train=True) == flops_per_image(conv, 4, train=True) > flops_per_image(conv, 2, train=False)


# ---------------------------------------------------------------- run_speed on scripted rates

TRAIN_RATES = {"baseline": [100.0, 400.0, 200.0], "bench": [900.0, 400.0, 500.0]}  # medians 200, 500 (means differ): 2.5x
EVAL_RATES = {"baseline": [1000.0, 1000.0, 1000.0], "bench": [4000.0, 3000.0, 8000.0]}  # 4x
PEAKS = {torch.float32: 100.0, torch.bfloat16: 400.0}


@pytest.fixture
def scripted_report(monkeypatch, small_cifar) -> dict:
    script(monkeypatch, benchmark, TRAIN_RATES, EVAL_RATES)
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda dtype, device: PEAKS[dtype])
    return run_speed(tiny_options(repeats=3), small_cifar)


def test_throughput_is_the_median_with_its_spread_and_the_ratio_is_bench_over_baseline(scripted_report):
    train, evaluation = scripted_report["train"], scripted_report["eval"]
    assert {k: train["baseline"][k] for k in ("images_per_s", "min", "max", "repeats")} == {
        "images_per_s": 200.0, "min": 100.0, "max": 400.0, "repeats": TRAIN_RATES["baseline"]}
    assert (train["bench"]["images_per_s"], train["ratio"]) == (500.0, 2.5)
    assert (evaluation["bench"]["images_per_s"], evaluation["ratio"]) == (4000.0, 4.0)


def test_gflops_are_flops_per_image_times_images_per_second_against_the_peaks(scripted_report):
    bench = scripted_report["train"]["bench"]
    gflops = scripted_report["model"]["train_mflop_per_image"] * 1e6 * 500.0 / 1e9
    assert bench["gflops"] == pytest.approx(gflops)
    assert (bench["pct_fp32_peak"], bench["pct_bf16_peak"]) == (pytest.approx(gflops), pytest.approx(gflops / 4))
    assert (scripted_report["machine"]["fp32_matmul_gflops"], scripted_report["machine"]["bf16_matmul_gflops"]) == (100.0, 400.0)
    assert "gflops" not in scripted_report["eval"]["bench"]


def test_report_names_the_model_it_measured(scripted_report):
    model = scripted_report["model"]
    assert (model["preset"], model["norm"]) == ("seed_bn", "bn")
    assert model["params"] == count_params_fast(preset="seed_bn", norm="bn") == 18_064
    assert model["train_mflop_per_image"] > model["eval_mflop_per_image"] > 0
    assert scripted_report["options"]["threads"] == scripted_report["machine"]["threads"] == 1


def test_report_renders_its_ratios_and_round_trips_as_json(scripted_report, tmp_path):
    text = text_of(render, scripted_report)
    assert "Training: bench/baseline = 2.50x" in text and "Evaluation: bench/baseline = 4.00x" in text
    write_json(scripted_report, tmp_path / "speed.json")
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(scripted_report))


# ---------------------------------------------------------------- ablation


def test_ablation_speedup_is_each_knob_against_its_reference(monkeypatch, small_cifar):
    script(monkeypatch, benchmark, TRAIN_RATES, EVAL_RATES,
           {"reference": [200.0, 100.0, 600.0], "bf16": [300.0] * 3, "dropout": [100.0] * 3},
           {"reference": [1000.0] * 3, "inference_mode": [500.0, 600.0, 700.0], "bf16": [2000.0] * 3})
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda dtype, device: PEAKS[dtype])
    rows = run_speed(tiny_options(repeats=3, ablate=True, knobs=("bf16", "dropout", "inference_mode")), small_cifar)["ablation"]
    assert [(r["phase"], r["knob"], r["speedup"]) for r in rows] == [
        ("train", "reference", 1.0), ("train", "bf16", 1.5), ("train", "dropout", 0.5),
        ("eval", "reference", 1.0), ("eval", "inference_mode", 0.6), ("eval", "bf16", 2.0),  # bf16 is a knob of both phases
    ]
    assert [r["what"] for r in rows[1:3]] == ["bf16 autocast", "packed-bytes Dropout"]


@pytest.mark.parametrize("knobs, threads, setups", [
    (("bf16", "batch256"), 2, {"bf16": StepSetup(dtype=torch.bfloat16), "batch256": StepSetup(batch_size=256)}),
    (("threads",), 2, {"threads": StepSetup(threads=1)}),
    (("dropout", "fused"), 2, {"fused": StepSetup(sgd="fused"), "dropout": StepSetup(packed_dropout=True)}),
])
def test_each_knob_changes_only_its_part_of_the_seed_step(monkeypatch, small_cifar, knobs, threads, setups):
    monkeypatch.setattr(ablation, "setup_train_runner", lambda setup, opts, data, device: setup)
    variants = ablation.train_ablation(tiny_options(knobs=knobs), small_cifar, torch.device("cpu"), threads)
    assert {name: setup for name, (_, _, setup) in variants.items()} == {"reference": StepSetup(), **setups}
    if "threads" in knobs:
        assert variants["threads"][0] == "1 thread (not 2)"


# ---------------------------------------------------------------- the seed pipeline and bad options


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
    report = json.loads(out.read_text())
    assert report["train"]["ratio"] == report["train"]["bench"]["images_per_s"] / report["train"]["baseline"]["images_per_s"]


def test_cli_bad_input_is_one_line(cifar_dir):
    result = CliRunner().invoke(cli, ["speed", "--steps", "0", "--data-dir", str(cifar_dir)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: Invalid value for '--steps': 0 is not in the range x>=1. (see `cli speed --help`)"]


# ---------------------------------------------------------------- time to accuracy


def curve(accuracies: list[float], seconds_per_epoch: float) -> list[dict]:
    return [{"epoch": epoch, "test_acc": acc, "seconds": epoch * seconds_per_epoch} for epoch, acc in enumerate(accuracies, 1)]


@pytest.fixture
def scripted_curves(monkeypatch):
    monkeypatch.setattr(to_accuracy, "baseline_curve", lambda data, cfg, preset, norm, workers, device: curve([0.3, 0.6, 0.8], 60.0))
    monkeypatch.setattr(to_accuracy, "bench_curve", lambda data, cfg, preset, norm, device: curve([0.55, 0.7, 0.9], 20.0))


@pytest.mark.parametrize("target, baseline, bench", [
    (0.5, (2, 120.0), (1, 20.0)),
    (0.6, (2, 120.0), (2, 40.0)),  # reaching the target exactly counts
    (0.8, (3, 180.0), (3, 60.0)),
    (0.95, (None, None), (None, None)),
])
def test_time_to_accuracy_is_the_first_epoch_reaching_the_target(scripted_curves, small_cifar, target, baseline, bench):
    result = time_to_accuracy(small_cifar, TrainConfig(epochs=3), target=target)
    assert (result["baseline"]["epoch"], result["baseline"]["seconds"]) == baseline
    assert (result["bench"]["epoch"], result["bench"]["seconds"]) == bench
    assert (result["baseline"]["final_test_acc"], result["baseline"]["total_seconds"]) == (0.8, 180.0)
    assert (result["bench"]["final_test_acc"], result["bench"]["total_seconds"]) == (0.9, 60.0)


def test_time_to_accuracy_trains_both_pipelines_with_the_seeds_crop(monkeypatch, small_cifar):
    paddings = {}
    monkeypatch.setattr(to_accuracy, "baseline_curve", lambda data, cfg, *rest: paddings.setdefault("baseline", cfg.crop_padding) and curve([0.5], 1.0))
    monkeypatch.setattr(to_accuracy, "bench_curve", lambda data, cfg, *rest: paddings.setdefault("bench", cfg.crop_padding) and curve([0.5], 1.0))
    result = time_to_accuracy(small_cifar, TrainConfig(epochs=1, crop_padding=2), target=0.5)
    assert paddings == {"baseline": 4, "bench": 4} and result["recipe"]["crop_padding"] == 4


def test_time_to_accuracy_renders_how_much_sooner_or_not_reached(scripted_curves, small_cifar):
    reached = text_of(render_time_to_accuracy, time_to_accuracy(small_cifar, TrainConfig(epochs=3), target=0.5))
    assert "bench reaches 50% 6.00x sooner" in reached
    unreached = text_of(render_time_to_accuracy, time_to_accuracy(small_cifar, TrainConfig(epochs=3), target=0.95))
    assert "not reached" in unreached and "sooner" not in unreached


def test_real_curves_test_after_every_epoch_on_the_clock(small_cifar):
    data = CIFAR10(train=small_cifar.train.take(256), val=small_cifar.val.take(64), test=small_cifar.test.take(200),
                   source=small_cifar.source, digest=small_cifar.digest)
    result = time_to_accuracy(data, TrainConfig(epochs=2, batch_size=64), target=1.0, workers=0)
    for side in ("baseline", "bench"):
        points = result["curves"][side]
        assert [p["epoch"] for p in points] == [1, 2]
        assert 0 < points[0]["seconds"] < points[1]["seconds"] == result[side]["total_seconds"]
        assert all(round(p["test_acc"] * 200) == pytest.approx(p["test_acc"] * 200) for p in points)  # a share of 200 images
        assert result[side]["final_test_acc"] == points[-1]["test_acc"]


# ---------------------------------------------------------------- the width grid


def test_width_rows_carry_their_model_and_the_ratio_against_the_first_width(monkeypatch, small_cifar):
    script(monkeypatch, grid, {1.75: [100.0, 400.0, 200.0], 1.0: [300.0, 400.0, 200.0]})
    report = run_grid(GridOptions(widths=(1.75, 1.0), steps=1, repeats=3, batch_size=16, threads=1), small_cifar)
    assert [row["width"] for row in report["rows"]] == [1.75, 1.0]
    for row in report["rows"]:
        assert row["params"] == count_params_fast(preset="seed_bn", norm="bn", width=row["width"], groups=4)
        assert row["channels"] == CHANNELS[row["width"]]
    assert [(row["images_per_s"], row["ratio"]) for row in report["rows"]] == [(200.0, 1.0), (300.0, 1.5)]


def test_experiment_rows_measure_each_model_at_its_own_shape_and_norm(monkeypatch, small_cifar):
    script(monkeypatch, grid, {"resnet_bn": [400.0, 400.0, 400.0], "convnext_ln": [100.0, 120.0, 80.0]})
    report = run_grid(GridOptions(experiments=("resnet_bn", "convnext_ln"), steps=1, repeats=3, batch_size=16, threads=1), small_cifar)
    resnet, convnext = report["rows"]
    assert (resnet["label"], resnet["params"], convnext["label"], convnext["params"]) == ("resnet_bn", 47_514, "convnext_ln", 46_410)
    assert "width" not in resnet and resnet["channels"] != convnext["channels"]
    assert [(row["images_per_s"], row["ratio"]) for row in report["rows"]] == [(400.0, 1.0), (100.0, 0.25)]
    text = text_of(render_grid, report)
    assert "training step by model" in text and "vs resnet_bn" in text and "0.25x" in text
    assert report["cpu"] == cpu_name() and cpu_name() in text  # speeds compare only within one machine


def test_an_experiment_row_can_change_model_fields(monkeypatch, small_cifar):
    script(monkeypatch, grid, {"convnext_ln": [100.0], "convnext_ln:kernel=3": [150.0]})
    report = run_grid(GridOptions(experiments=("convnext_ln", "convnext_ln:kernel=3"), steps=1, repeats=1, batch_size=16, threads=1), small_cifar)
    full, small = report["rows"]
    assert (small["label"], small["ratio"]) == ("convnext_ln:kernel=3", 1.5)
    assert full["params"] - small["params"] == (49 - 9) * (2 * 16 + 32 + 48)  # 40 weights per depthwise channel
    with pytest.raises(ConfigError, match="kernel must be 3, 5, 7 or 9"):
        run_grid(GridOptions(experiments=("convnext_ln:kernel=4",), steps=1, repeats=1, batch_size=16, threads=1), small_cifar)


def test_cli_experiments_refuses_an_unknown_one_and_widths_beside_it(cifar_dir):
    base = ["speed", "--steps", "1", "--repeats", "1", "--batch-size", "16", "--data-dir", str(cifar_dir)]
    unknown = CliRunner().invoke(cli, [*base, "--experiments", "resnet_bn,nosuch"])
    assert unknown.exit_code != 0 and "no experiment file nosuch.toml" in unknown.output and "Traceback" not in unknown.output
    both = CliRunner().invoke(cli, [*base, "--experiments", "resnet_bn", "--widths", "1"])
    assert both.exit_code != 0 and "give one of them" in both.output


@pytest.mark.parametrize("change, message", [
    ({"widths": ()}, "--widths needs positive width multipliers"),
    ({"widths": (1.0, 0.0)}, "--widths needs positive width multipliers"),
    ({"steps": 1000}, "--steps x --batch-size must be <= 2000"),
])
def test_bad_grid_options_name_the_flag(small_cifar, change, message):
    with pytest.raises(ConfigError, match=message):
        run_grid(GridOptions(**{"widths": (1.0,), "batch_size": 16, **change}), small_cifar)


def test_cli_widths_writes_one_row_per_width(cifar_dir, tmp_path):
    out = tmp_path / "widths.json"
    args = ["speed", "--widths", "1,1.75", "--steps", "1", "--repeats", "1", "--batch-size", "16", "--threads", "1",
            "--data-dir", str(cifar_dir), "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "vs width 1" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["width"], r["params"], r["channels"], r["ratio"]) for r in rows[:1]] == [(1.0, 18_064, CHANNELS[1.0], 1.0)]
    assert (rows[1]["width"], rows[1]["params"]) == (1.75, count_params_fast(preset="seed_bn", norm="bn", width=1.75, groups=4))


def test_an_experiment_row_can_change_its_layout_and_precision_but_not_the_recipe(monkeypatch, small_cifar):
    script(monkeypatch, grid, {"convnext_ln": [100.0], "convnext_ln:channels_last=off:precision=fp32": [50.0]})
    report = run_grid(GridOptions(experiments=("convnext_ln", "convnext_ln:channels_last=off:precision=fp32"), steps=1, repeats=1,
                                  batch_size=16, threads=1), small_cifar)
    default, changed = report["rows"]
    assert "channels_last" in default["runtime"]
    assert changed["runtime"].startswith("cpu float32 nchw")
    with pytest.raises(ConfigError, match="lr would be ignored"):
        run_grid(GridOptions(experiments=("convnext_ln:lr=0.3",), steps=1, repeats=1, batch_size=16, threads=1), small_cifar)
