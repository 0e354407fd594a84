"""The ConvNeXt family end to end at toy size: `bench tune` on its experiment files (widths, blocks and
GroupNorm's groups searched under the budget), `bench confirm` of each norm's best with two seeds, and
`bench report` comparing the norms, all from one MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

import bench.confirm
import bench.tune.study
from bench import config, tracking
from bench.cli import cli
from bench.data import CIFAR10
from bench.models import ConvNeXtBlock, count_params_fast
from bench.tune import TuneOptions, run_study
from conftest import module_store

REPO = Path(__file__).resolve().parents[1]
TINY = {"train_subset": 400, "val_size": 200, "batch_size": 100, "eval_batch_size": 1000, "tta_shift": 0}
NORMS = ("bn", "gn", "ln", "lnc")


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    return result


def runs(study: str, kind: str) -> list:
    return mlflow.search_runs(experiment_names=[study], filter_string=f"tags.`bench.kind` = '{kind}'", output_format="list")


@pytest.fixture(scope="module")
def convnext_studies(cifar, tmp_path_factory):
    """One 3-trial, 1-epoch study per norm on a 400/200/300 slice, each best confirmed with 2 seeds, and a report."""
    tiny = CIFAR10(cifar.train.take(400), cifar.val.take(200), cifar.test.take(300), cifar.source + " (slice)", cifar.digest)
    with module_store(tmp_path_factory.mktemp("convnext"), tiny, (bench.tune.study, bench.confirm)) as root:
        for norm in NORMS:
            exp = config.override(config.load(REPO / "experiments" / f"convnext_{norm}.toml"), **TINY)
            run_study(exp, TuneOptions(trials=3, epochs=1, threads=1, pruner="none"))
            invoke("confirm", "--norm", norm, "--study", f"convnext_{norm}", "--seeds", "2", "--epochs", "1", "--threads", "1")
        invoke("report", "--norms", ",".join(f"{n}=convnext_{n}" for n in NORMS), "--threads", "1", "--out", "reports/convnext")
        yield root


def model_of(norm: str, params: dict) -> dict:
    """The create_model keywords a trial's logged parameters describe."""
    exp = config.load(REPO / "experiments" / f"convnext_{norm}.toml")
    return vars(config.override(exp, **{k: params[k] for k in exp.search if k in vars(exp.model)}).model)


@pytest.mark.parametrize("norm", NORMS)
def test_every_trial_is_a_convnext_of_its_norm_within_the_budget_counted_exactly(convnext_studies, norm):
    trials = runs(f"convnext_{norm}", "trial")
    assert len(trials) == 3
    trained = [r for r in trials if r.data.tags[tracking.TAG_STATE] != "REJECTED"]
    assert trained, "at least the baseline trains"
    for run in trained:
        params = run.data.params
        assert (params["preset"], params["norm"]) == ("convnext", norm) and params["kernel"] in ("3", "5", "7")
        assert run.data.metrics["n_params"] == count_params_fast(**model_of(norm, params)) <= 50_000
    baseline = next(r for r in trials if r.data.tags[tracking.TAG_TRIAL] == "0")
    assert (baseline.data.metrics["n_params"], baseline.data.params["kernel"]) == (46_410, "7")  # the file's own shape


@pytest.mark.parametrize("norm", NORMS)
def test_the_registered_best_is_a_convnext_that_predicts(convnext_studies, norm):
    model = mlflow.pytorch.load_model(f"models:/cifar10-convnext_{norm}/latest").eval()
    assert any(isinstance(m, ConvNeXtBlock) for m in model.modules())
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_each_norm_is_confirmed_with_two_seeds_and_the_report_tests_every_pair(convnext_studies):
    for norm in NORMS:
        confirmed = runs(f"convnext_{norm}", "confirm")
        assert sorted(r.data.params["seed"] for r in confirmed) == ["0", "1"]
        assert {r.data.params["preset"] for r in confirmed} == {"convnext"}
    text = (convnext_studies / "reports" / "convnext" / "report.md").read_text()
    for norm in NORMS:
        row = next(line for line in text.splitlines() if line.startswith(f"| convnext_{norm} |"))
        assert "(n=2)" in row
    verdicts = [line for line in text.splitlines() if line.startswith("- convnext_") and " − " in line]
    pairs = [f"- convnext_{a} − convnext_{b}" for i, a in enumerate(NORMS) for b in NORMS[i + 1:]]
    assert [v.split(" = ")[0] for v in verdicts] == pairs and len(pairs) == 6
    assert all("Holm-adjusted p" in v for v in verdicts)
