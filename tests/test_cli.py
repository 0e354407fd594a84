"""The command line: ``bench summary``, ``bench train`` on a tiny real slice, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli import cli
from bench.models import count_params, create_model

ENV = {"COLUMNS": "200", "BENCH_THREADS": "1"}
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), env=ENV)


def assert_user_error(result, *needles: str):
    """Exit status 2 and exactly one line, ``error: ...``, naming what went wrong; no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------- summary


@pytest.mark.parametrize("args,total,layer", [
    (("--norm", "bn"), "18,064", "BatchNorm2d"),
    (("--norm", "gn"), "18,064", "GroupNorm"),
    (("--norm", "ln"), "18,064", "GroupNorm"),
    (("--experiment", str(EXPERIMENTS / "seed_gn.toml")), "47,236", "LayerNorm"),
])
def test_summary_table_totals_and_verdict(args, total, layer):
    result = invoke("summary", *args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count(layer) == 8  # one norm after each of the 8 3x3 convs
    assert out.count("Conv2d") == 11 and out.count("MaxPool2d") == 2
    assert re.search(rf"Total params: {total}\b", out)
    assert re.search(rf"{total} parameters, within the budget of 50,000", out)
    assert "[1, 10]" in out  # the classifier's output


def test_summary_with_width_reports_over_budget():
    result = invoke("summary", "--norm", "bn", "--width", "3")
    assert result.exit_code == 0, result.output
    n = count_params(create_model("seed_bn", "bn", width=3.0))
    assert f"{n:,} parameters, OVER the budget of 50,000" in result.output


def test_summary_builds_the_model_the_set_assignments_describe():
    result = invoke("summary", "--norm", "gn", "--set", "groups=8", "--set", "dropout=0.1", "--set", "width=1.5")
    assert result.exit_code == 0, result.output
    assert "seed_bn norm=gn dropout=0.1 width=1.5 groups=8: 37,464 parameters, within the budget of 50,000" in result.output
    assert_user_error(invoke("summary", "--norm", "gn", "--set", "groups=3"), "groups")  # 3 divides no width: --set reached the model


def test_summary_bad_groups_is_a_user_error():
    assert_user_error(invoke("summary", "--norm", "gn", "--groups", "3"), "3 groups", "16 channels")


# ---------------------------------------------------------------- train


def test_train_tiny_run_saves_a_loadable_checkpoint(cifar_dir, isolated_mlruns, cifar):
    from bench.config import TrainConfig
    from bench.run import load_checkpoint
    from bench.train import evaluate, resolve_runtime

    ckpt = isolated_mlruns / "out" / "model.pt"
    result = invoke(
        "train", "--norm", "bn", "--data-dir", str(cifar_dir), "--epochs", "1", "--no-track", "--threads", "1",
        "--set", "train_subset=500", "--set", "val_size=200", "--set", "batch_size=32", "--save", str(ckpt),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    assert "49,800 train / 200 val / 10,000 test" in out  # --set val_size reached the loader
    assert "epoch   1/1" in out and "test acc" in out and "img/s" in out
    assert f"saved model to {ckpt}" in out
    assert not (isolated_mlruns / "mlruns").exists()  # --no-track: nothing logged
    row = re.search(r"([\d.]+)%\s*│\s*([\d.]+)%\s*│\s*([\d.]+)%", out)
    assert row, out
    printed_test_acc = float(row.group(3)) / 100

    model = load_checkpoint(ckpt)
    assert not model.training
    assert count_params(model) == 18_064
    fresh = create_model("seed_bn", "bn")
    assert not torch.equal(model.layers[0].weight, fresh.layers[0].weight)  # trained weights, not a new model
    assert model.layers[2].num_batches_tracked.item() == 16  # 500 images / 32 per batch, one epoch
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    # The checkpoint is the model that was tested: same test accuracy as the run printed.
    rt = resolve_runtime(TrainConfig(), "bn")
    model.to(memory_format=rt.memory_format)
    _, acc = evaluate(model, cifar.test, rt)
    assert acc == pytest.approx(printed_test_acc, abs=0.002)


def test_bad_set_is_a_one_line_error():
    assert_user_error(invoke("train", "--norm", "bn", "--set", "lr", "--no-track"), "--set 'lr'", "NAME=VALUE")
    assert_user_error(invoke("train", "--norm", "bn", "--set", "learning_rate=1", "--no-track"), "learning_rate")
    assert_user_error(invoke("summary", "--set", "epochs=many"), "epochs", "many")


def test_missing_experiment_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.toml"
    assert_user_error(invoke("train", "--experiment", str(missing), "--no-track"), str(missing), "not found")


def test_missing_data_dir_is_a_one_line_error(tmp_path, isolated_mlruns):
    missing = tmp_path / "no-such-dir"
    result = invoke("train", "--norm", "bn", "--data-dir", str(missing), "--epochs", "1", "--no-track", "--threads", "1")
    assert_user_error(result, "no CIFAR-10 found", str(missing))


def test_over_budget_width_is_a_one_line_error_before_reading_data(tmp_path, isolated_mlruns):
    n = count_params(create_model("seed_bn", "bn", width=3.0))
    result = invoke("train", "--norm", "bn", "--width", "3", "--data-dir", str(tmp_path / "none"), "--no-track", "--threads", "1")
    assert_user_error(result, f"{n:,} parameters", "50,000")


# Every numeric flag refuses 0, negatives, huge values, nan and inf where they make no sense, before
# any work: no data read, nothing written to MLflow or Optuna (docs/hardening.md lists what each prints).
BAD_NUMBERS = [
    (["tune", "--trials", "0"], "Invalid value for '--trials': 0 is not in the range x>=1"),  # ran the file's 20 trials
    (["tune", "--trials", "-3"], "Invalid value for '--trials': -3 is not in the range x>=1"),  # exited 0, doing nothing
    (["tune", "--epochs", "0"], "Invalid value for '--epochs': epochs must be >= 1, got 0"),  # fell back to the default
    (["tune", "--tune-epochs", "0"], "Invalid value for '--tune-epochs': 0 is not in the range x>=1"),
    (["tune", "--timeout", "nan"], "Invalid value for '--timeout': nan is not a finite number"),
    (["tune", "--timeout", "-5"], "Invalid value for '--timeout': -5.0 is not in the range x>0"),
    (["tune", "--seed", "-1"], "Invalid value for '--seed': seed must be in [0, 4294967295], got -1"),
    (["tune", "--threads", "0"], "Invalid value for '--threads': 0 is not in the range x>=1"),
    (["train", "--batch-size", "-1"], "Invalid value for '--batch-size': batch_size must be in [1, 50000], got -1"),
    (["train", "--lr", "nan"], "Invalid value for '--lr': expected a finite number, got nan"),
    (["train", "--lr", "inf"], "Invalid value for '--lr': expected a finite number, got inf"),
    (["train", "--dropout", "1.5"], "Invalid value for '--dropout': dropout must be in [0, 1), got 1.5"),
    (["train", "--width", "inf"], "Invalid value for '--width': expected a finite number, got inf"),  # was a traceback
    (["train", "--set", "epochs=2.5"], "epochs: expected an integer, got 2.5"),  # was truncated to 2
    (["train", "--set", "epochs=1e400"], "epochs: expected a finite number, got inf"),  # was a traceback
    (["train", "--set", "weight_decay=inf"], "weight_decay: expected a finite number, got inf"),
    (["train", "--set", "momentum=0"], "nesterov = true needs momentum > 0"),  # was torch's ValueError mid-run
    (["speed", "--steps", "-1"], "Invalid value for '--steps': -1 is not in the range x>=1"),
    (["speed", "--to-accuracy", "nan"], "Invalid value for '--to-accuracy': nan is not a finite number"),
    (["speed", "--widths", "0,1"], "--widths '0,1': width must be > 0 and <= 8, got 0.0"),
]


@pytest.mark.parametrize("args,message", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_errors_before_any_work(args, message, isolated_mlruns):
    result = invoke(*args, "--data-dir", str(isolated_mlruns / "no-data"))
    assert_user_error(result, message)
    assert not (isolated_mlruns / "mlruns").exists()  # no MLflow store, no Optuna journal: nothing ran


def test_click_usage_errors_are_one_line_too():
    assert_user_error(invoke("tune", "--bogus"), "No such option", "--bogus", "tune --help")  # click's wording varies by version
    assert_user_error(invoke("ui", "--port", "0"), "Invalid value for '--port': 0 is not in the range 1<=x<=65535")
    assert invoke("--help").exit_code == 0 and invoke("tune", "--help").exit_code == 0


def test_bad_flag_value_is_rejected_by_click():
    result = invoke("train", "--norm", "instance")
    assert result.exit_code == 2 and "Invalid value for '--norm'" in result.output


def test_experiment_file_given_as_an_argument_says_to_use_e():
    assert_user_error(invoke("tune", "--norm", "gn", "experiments/gated_gn.toml", "--trials", "1"),
                      "experiments/gated_gn.toml is an experiment file: pass it with -e", "-e experiments/gated_gn.toml")
    # Any other stray argument keeps click's own message.
    assert_user_error(invoke("tune", "--norm", "gn", "stray"), "unexpected extra argument (stray)", "tune --help")
