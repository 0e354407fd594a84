"""bench confirm and bench report on a tiny real study: confirm runs hang under the study, the report
is built from MLflow alone, holds every section, and its numbers are the ones MLflow holds."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

import bench.confirm
import bench.data
import bench.rescore
import bench.run
import bench.tune.study
from bench import config, records, stats, tracking
from bench.errors import TrackingError
from bench.cli import cli
from bench.data import CIFAR10
from bench.console import duration
from bench.report import build_report
from bench.report.tables import hardware_line, pct
from bench.runtime import cpu_name
from bench.tune import TuneOptions, run_study
from conftest import module_store
REPO = Path(__file__).resolve().parents[1]

TINY = {"train_subset": 400, "val_size": 200, "batch_size": 100, "eval_batch_size": 1000}
NORMS = ("bn", "gn")
SECTIONS = ("## Results per norm", "## Which differences are larger than the seed-to-seed spread", "## Training curves",
            "## Optimisation history", "## Accuracy against parameters", "## Misclassified test images", "## Confusion matrices", "## Batch-size sensitivity", "## Sources")
FIGURES = ("curves.png", "history.png", "pareto.png", "misclassified.png", "confusion.png", "batch_sizes.png")


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture(scope="module")
def studies(cifar, tmp_path_factory):
    """Two tiny studies (bn, gn: 2 trials, 1 epoch), confirmed with 2 seeds, plus batch-size runs at 50,
    all in an isolated MLflow store; data is a 400/200/300 real slice."""
    tiny = CIFAR10(cifar.train.take(400), cifar.val.take(200), cifar.test.take(300), cifar.source + " (slice)", cifar.digest)
    with module_store(tmp_path_factory.mktemp("report"), tiny, (bench.tune.study, bench.confirm)) as root:
        for norm in NORMS:
            exp = config.override(config.load(REPO / "experiments" / f"{norm}.toml"), **TINY)
            run_study(exp, TuneOptions(trials=2, epochs=1, threads=1, pruner="none"))
        confirmed = invoke("confirm", "--norm", "all", "--seeds", "2", "--epochs", "1", "--threads", "1")
        assert confirmed.exit_code == 0, confirmed.output
        first = invoke("report", "--batch-sizes", "50", "--epochs", "1", "--threads", "1", "--out", "reports/first")
        assert first.exit_code == 0, first.output
        yield root


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """Any attempt to read CIFAR-10 fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the report must not load data")

    for module, name in ((bench.data, "load_cifar10"), (bench.run, "load_data"), (bench.tune.study, "load_data"), (bench.confirm, "load_data")):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "nowhere"))


def runs(study: str, kind: str) -> list:
    return mlflow.search_runs(experiment_names=[study], filter_string=f"tags.`bench.kind` = '{kind}'", output_format="list")


def table_row(text: str, norm: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {norm} |"))


def test_confirm_runs_hang_under_the_study_and_resume(studies, no_data):
    for norm in NORMS:
        parent = runs(norm, "study")[0]
        confirms = runs(norm, "confirm")
        assert sorted(int(r.data.tags[records.TAG_SEED]) for r in confirms) == [0, 1]
        for run in confirms:
            assert run.data.tags[records.PARENT] == parent.info.run_id == run.data.tags[records.TAG_STUDY_RUN]
            assert run.data.tags[records.TAG_SOURCE_RUN] == parent.data.tags["bench.best_run_id"]
            assert run.data.params["epochs"] == "1" and run.data.params["train_subset"] == "0"
            assert run.data.params["seed"] == run.data.tags[records.TAG_SEED]
    again = invoke("confirm", "--norm", "bn", "--seeds", "2", "--epochs", "1")  # nothing left: no data, no runs
    assert again.exit_code == 0 and "to run none" in again.output
    assert len(runs("bn", "confirm")) == 2


def test_confirm_retrains_a_chosen_trial_instead_of_the_best(studies):
    exp = config.override(config.load(REPO / "experiments" / "bn.toml"), **TINY)
    run_study(exp, TuneOptions(trials=2, epochs=1, threads=1, pruner="none", study="pick"))  # its own study: the others' counts stay
    record = records.load_study("bn", "pick")
    other = next(r for r in records.trained(record.trials) if r.info.run_id != record.best.info.run_id)
    picked = invoke("confirm", "--norm", "bn", "--study", "pick", "--trial", str(records.trial_number(other)),
                    "--seeds", "1", "--epochs", "1", "--threads", "1")
    assert picked.exit_code == 0, picked.output
    (run,) = runs("pick", "confirm")
    assert run.data.tags[records.TAG_SOURCE_RUN] == other.info.run_id and run.data.params["lr"] == other.data.params["lr"]
    assert records.load_study("bn", "pick").confirms == []  # the best trial is still unconfirmed
    one_line_error(invoke("confirm", "--norm", "bn", "--study", "pick", "--trial", "7"), "no trained trial 7", "choose one of 0, 1")
    one_line_error(invoke("confirm", "--norm", "all", "--trial", "0"), "--trial", "single --norm")


def test_report_from_mlflow_alone_holds_every_section_and_mlflow_numbers(studies, no_data):
    out = build_report("bn,gn", studies / "reports" / "second")
    text = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in text
    for figure in FIGURES:
        assert (out / figure).stat().st_size > 5000 and f"]({figure})" in text

    for norm in NORMS:
        parent = runs(norm, "study")[0]
        metrics = parent.data.metrics
        row = table_row(text, norm)
        best = mlflow.get_run(parent.data.tags["bench.best_run_id"])
        assert f"{pct(metrics['best_val_acc'])} (#{int(metrics['best_trial'])})" in row
        assert f"{int(best.data.metrics['n_params']):,}" in row
        assert f"{int(metrics['trials_complete'])} / {int(metrics['trials_pruned'])} / {int(metrics['trials_failed'])} / {int(metrics['trials_rejected'])}" in row
        assert duration(metrics["study_seconds"]) in row
        trials_section = text.split("## Accuracy against parameters")[1].split("## Misclassified")[0]
        assert (f"| {norm} | #{int(metrics['best_trial'])} | {int(best.data.metrics['n_params']):,} | {pct(metrics['best_val_acc'])} | "
                f"{pct(best.data.metrics['test_acc'])} | {best.data.metrics['mean_epoch_seconds']:.1f} |") in trials_section
        for name in ("lr", "dropout", "weight_decay", "width"):
            assert f"{name}=" in row
        accs = np.array([r.data.metrics["test_acc"] for r in runs(norm, "confirm")])
        assert f"{pct(accs.mean())} ± {100 * accs.std(ddof=1):.2f} pp (n=2)" in row
        half = 12.7062 * accs.std(ddof=1) / math.sqrt(2)  # t(0.975, 1)
        assert f"[{pct(accs.mean() - half)}, {pct(accs.mean() + half)}]" in row
        epoch_seconds = np.mean([r.data.metrics["mean_epoch_seconds"] for r in runs(norm, "confirm")])
        assert f"| {epoch_seconds:.1f} |" in row
        assert {r.data.tags["bench.hardware"] for r in runs(norm, "confirm")} == {cpu_name()}  # what the seconds were measured on
        batch = runs(norm, "batch_size")[0]
        assert batch.data.params["batch_size"] == "50"
        assert float(batch.data.params["lr"]) == pytest.approx(float(best.data.params["lr"]) / 2)
        assert pct(batch.data.metrics["test_acc"]) in table_row(text.split("## Batch-size sensitivity")[1], norm)

    a, b = (np.array([r.data.metrics["test_acc"] for r in runs(n, "confirm")]) for n in NORMS)
    t = (a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2)
    assert f"t = {t:.2f}" in text
    assert re.search(r"\*\*Larger than the seed-to-seed spread:\*\* .+\.\n\*\*Within the spread:\*\* .+\.", text)
    assert f"Timings (s / epoch, wall time) from runs on one processor: {cpu_name()}." in text

    report_run = runs("reports", "report")[0]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(report_run.info.run_id)}
    assert {"report.md", *FIGURES} <= logged
    assert report_run.data.metrics["bn.confirm_seeds"] == 2


def test_confusion_matrix_counts_every_test_image_of_every_seed(studies, no_data):
    from bench.report.figures import confusion

    record = records.load_study("bn")
    matrix = confusion([tracking.load_predictions(r.info.run_id) for r in record.confirms])
    assert matrix.sum() == 2 * 300
    assert np.trace(matrix) / 300 == pytest.approx(sum(r.data.metrics["test_acc"] for r in record.confirms), abs=1e-6)


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0]


def test_confirm_seed_runs_exactly_the_seeds_given_skipping_finished_ones(studies):
    exp = config.override(config.load(REPO / "experiments" / "bn.toml"), **TINY)
    run_study(exp, TuneOptions(trials=2, epochs=1, threads=1, pruner="none", study="spread"))  # its own study: the others' counts stay
    first = invoke("confirm", "--norm", "bn", "--study", "spread", "--seed", "2", "--epochs", "1", "--threads", "1")
    assert first.exit_code == 0 and "to run [2]" in first.output, first.output
    second = invoke("confirm", "--norm", "bn", "--study", "spread", "--seed", "3", "--seed", "2", "--epochs", "1", "--threads", "1")
    assert second.exit_code == 0 and "seeds done [2], to run [3]" in second.output, second.output
    assert sorted(int(r.data.params["seed"]) for r in runs("spread", "confirm")) == [2, 3]
    negative = invoke("confirm", "--norm", "bn", "--study", "spread", "--seed", "-1")
    assert negative.exit_code == 2 and "Invalid value for '--seed': -1 is not in the range x>=0" in negative.output


def test_confirm_knows_a_recipe_however_its_values_are_spelled(studies):
    exp = config.override(config.load(REPO / "experiments" / "bn.toml"), **TINY)
    run_study(exp, TuneOptions(trials=1, epochs=1, threads=1, pruner="none", study="spelling"))
    first = invoke("confirm", "--norm", "bn", "--study", "spelling", "--seed", "0", "--epochs", "1", "--threads", "1",
                   "--set", "grad_clip=8.0", "--set", "flip=False")
    assert first.exit_code == 0 and "epochs=1 flip=false grad_clip=8;" in first.output, first.output
    again = invoke("confirm", "--norm", "bn", "--study", "spelling", "--seed", "0", "--epochs", "1", "--set", "grad_clip=8", "--set", "flip=no")
    assert again.exit_code == 0 and "seeds done [0], to run none" in again.output, again.output


def test_a_field_the_trial_did_not_log_joins_the_recipe_when_the_file_sets_it():
    exp = config.override(config.load(REPO / "experiments" / "gated_bn.toml"), epochs=50)
    logged = {k: str(v) for k, v in exp.hyperparameters().items() if k != "grad_clip"}  # a trial from before grad_clip
    assert bench.confirm.recipe(exp, {"lr": "0.05"}, logged) == "epochs=50 lr=0.05"
    in_file = config.override(exp, grad_clip=8.0)
    assert bench.confirm.recipe(in_file, {"lr": "0.05"}, logged) == "epochs=50 grad_clip=8 lr=0.05"
    assert bench.confirm.recipe(in_file, {"lr": "0.05"}, logged) == bench.confirm.recipe(exp, {"lr": "0.05", "grad_clip": "8"}, logged)
    assert bench.confirm.recipe(in_file, {"grad_clip": "2"}, logged) == "epochs=50 grad_clip=2"  # the override wins
    assert bench.confirm.recipe(in_file, {}, {**logged, "grad_clip": "8.0"}) == "epochs=50"  # logged: the trial's value, not the file's


def test_confirm_jobs_deals_the_seeds_out_to_worker_processes(studies, cifar_dir):
    exp = config.override(config.load(REPO / "experiments" / "bn.toml"), **TINY)
    run_study(exp, TuneOptions(trials=1, epochs=1, threads=1, study="parallel"))
    args = ("confirm", "--norm", "bn", "--study", "parallel", "--seeds", "3", "--jobs", "2", "--epochs", "1",
            "--set", "train_subset=300", "--set", "val_size=200", "--data-dir", str(cifar_dir))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "starting 2 workers x 1 thread(s): seeds [0, 2] / [1]" in result.output and "3 confirm run(s)" in result.output
    confirms = runs("parallel", "confirm")
    assert sorted(int(r.data.params["seed"]) for r in confirms) == [0, 1, 2]
    assert {r.data.tags[records.TAG_RECIPE] for r in confirms} == {"epochs=1 train_subset=300 val_size=200"}
    again = invoke(*args)
    assert again.exit_code == 0 and "to run none" in again.output and "starting" not in again.output

    failing = invoke(*args, "--set", "lr=1e12")  # every worker diverges and says so on its own line
    last = failing.output.strip().splitlines()[-1]
    assert failing.exit_code == 2 and "Traceback" not in failing.output
    assert last.startswith("error: 2 of 2 confirm workers failed (exit codes [2, 2])") and "re-run" in last
    statuses = sorted(r.info.status for r in runs("parallel", "confirm"))
    assert statuses == ["FAILED"] * 2 + ["FINISHED"] * 3  # one failed run per worker, recorded; the finished seeds kept
    one_line_error(invoke(*args[:8], "0"), "--jobs '0'")


def rescored(run_id: str) -> dict[str, float]:
    return {k: v for k, v in mlflow.get_run(run_id).data.metrics.items() if k.startswith("rescore.")}


def test_rescore_scores_a_logged_model_under_each_tta_on_val_and_test(studies, monkeypatch):
    tiny = bench.confirm.load_data()  # the fixture's slice
    monkeypatch.setattr(bench.rescore, "load_cifar10", lambda *args, **kwargs: tiny)
    run = runs("bn", "confirm")[0]
    result = invoke("rescore", run.info.run_id, "--shift", "1", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "flip_shift1" in result.output
    scores = rescored(run.info.run_id)
    assert set(scores) == {f"rescore.{split}_acc_{name}" for split in ("val", "test") for name in ("none", "flip", "flip_shift1")}
    # bn.toml evaluates without TTA: the plain pass of the logged model reproduces the run's own test accuracy.
    assert scores["rescore.test_acc_none"] == pytest.approx(run.data.metrics["test_acc"], abs=1 / len(tiny.test))


def test_rescore_errors_name_the_run_and_the_fix(studies, monkeypatch):
    one_line_error(invoke("rescore", "0" * 32), "no MLflow run", "run id")
    parent = runs("bn", "study")[0]
    one_line_error(invoke("rescore", parent.info.run_id), "logged no model")
    tiny = bench.confirm.load_data()
    other_copy = CIFAR10(tiny.train, tiny.val, tiny.test, tiny.source, "0" * 16)
    monkeypatch.setattr(bench.rescore, "load_cifar10", lambda *args, **kwargs: other_copy)
    one_line_error(invoke("rescore", runs("bn", "confirm")[0].info.run_id), "not the one run", "BENCH_DATA_DIR")
    assert rescored(parent.info.run_id) == {}


def test_report_reads_a_chosen_trial_under_one_tta_and_one_epoch_count(studies):
    exp = config.override(config.load(REPO / "experiments" / "bn.toml"), **TINY)
    run_study(exp, TuneOptions(trials=2, epochs=1, threads=1, pruner="none", study="tta"))
    record = records.load_study("bn", "tta")
    other = records.trial_number(next(r for r in records.trained(record.trials) if r.info.run_id != record.best.info.run_id))
    # without shift TTA in the run itself, the flip_shift1 score must come from what rescore logged
    confirm = ("confirm", "--norm", "bn", "--study", "tta", "--trial", str(other), "--threads", "1", "--set", "tta_shift=0")
    assert invoke(*confirm, "--seeds", "2", "--epochs", "1").exit_code == 0
    assert invoke(*confirm, "--seeds", "1", "--epochs", "2").exit_code == 0
    one_epoch = [r for r in runs("tta", "confirm") if r.data.params["epochs"] == "1"]
    for run, acc in zip(one_epoch, (0.5, 0.7)):  # as `bench rescore --shift 1` logs them
        tracking.log_to_run(run.info.run_id, metrics={"rescore.test_acc_flip_shift1": acc})

    text = (build_report(f"bn=tta@{other}", studies / "reports" / "tta", tta="flip_shift1", confirm_epochs=1) / "report.md").read_text()
    row = table_row(text, "tta")
    assert f"(#{other})" in row and "60.00% ± 14.14 pp (n=2)" in row and "| 1 epochs (tta_shift=0)," in row  # the setting changed from the trial shows
    assert "the same test-time augmentation, `flip_shift1`" in text

    with pytest.raises(TrackingError, match=r"no test accuracy under TTA 'flip_shift1'; score it with `bench rescore \w+ --shift 1`"):
        build_report(f"bn=tta@{other}", studies / "reports" / "tta2", tta="flip_shift1", confirm_epochs=2)
    one_line_error(invoke("report", "--norms", "bn=tta@x"), "after @ give a trial number")
    one_line_error(invoke("report", "--norms", "bn=tta@99"), "no trained trial 99")

    # the experiment files evaluate with flip + shift TTA: a recipe without it is the newest 2-seed one
    assert invoke(*confirm, "--seeds", "2", "--epochs", "1", "--set", "tta_flip=false").exit_code == 0
    text = (build_report(f"bn=tta@{other},gn", studies / "reports" / "tta3") / "report.md").read_text()
    assert "**Warning:** the norms' confirm runs were scored with different test-time augmentation (tta: `none`; gn: `flip_shift1`)" in text


def test_test_accuracy_under_a_tta_comes_from_rescore_the_fit_ablation_or_the_run_itself():
    from types import SimpleNamespace

    def run(metrics, flip="False", shift="0"):
        return SimpleNamespace(data=SimpleNamespace(metrics={"test_acc": 0.8, **metrics}, params={"tta_flip": flip, "tta_shift": shift}),
                               info=SimpleNamespace(run_id="r1"))

    flip_run = run({"test_acc_raw": 0.7, "test_acc_raw_tta": 0.8, "rescore.test_acc_flip_shift1": 0.81}, flip="True")
    assert [records.test_accuracy(flip_run, t) for t in (None, "flip", "none", "flip_shift1")] == [0.8, 0.8, 0.7, 0.81]
    ema_run = run({"test_acc_raw_tta_shift1": 0.1, "test_acc_ema": 0.2, "test_acc_ema_tta_shift1": 0.85}, flip="True", shift="1")
    assert records.test_accuracy(ema_run, "flip_shift1") == 0.8  # its own recipe: the evaluated (averaged) weights
    assert records.test_accuracy(run({"test_acc_ema": 0.2, "test_acc_ema_tta_shift1": 0.85}), "flip_shift1") == 0.85
    with pytest.raises(TrackingError, match="`bench rescore r1` first"):
        records.test_accuracy(run({}), "flip")


def test_missing_study_is_one_line_error(studies, no_data):
    one_line_error(invoke("report", "--norms", "bn,ln"), "no study 'ln'", "bench tune --norm ln")
    one_line_error(invoke("confirm", "--norm", "ln"), "no study 'ln'")


def test_study_without_finished_trial_is_one_line_error(studies, no_data):
    with tracking.run("empty", "empty-study", "study", tags={tracking.TAG_NORM: "ln"}) as parent:
        pass
    with tracking.run("empty", "trial-0", "trial", tags={tracking.TAG_STATE: "PRUNED", tracking.TAG_TRIAL: 0, "mlflow.parentRunId": parent.info.run_id}):
        pass
    one_line_error(invoke("report", "--norms", "ln=empty"), "study 'empty' has no complete trial", "1 pruned")
    one_line_error(invoke("confirm", "--norm", "ln", "--study", "empty"), "no complete trial")


def test_unreachable_tracking_server_is_one_line_error(studies, no_data):
    try:
        one_line_error(invoke("report", "--tracking-uri", "http://127.0.0.1:9"), "unreachable")
    finally:
        mlflow.set_tracking_uri(f"sqlite:///{studies}/mlruns/mlflow.db")


def test_t_intervals_and_welch_match_tables():
    values = [0.80, 0.82, 0.81, 0.83, 0.79]
    s = stats.summarize(values)  # t(0.975, 4) = 2.7764 (published tables)
    half = 2.7764 * np.std(values, ddof=1) / math.sqrt(5)
    assert (s.n, s.mean, s.low, s.high) == pytest.approx((5, 0.81, 0.81 - half, 0.81 + half), abs=1e-5)
    pair = stats.summarize([0.80, 0.82])  # t(0.975, 1) = 12.7062
    assert stats.two_run_bound(pair) == pytest.approx(12.7062 * pair.std * math.sqrt(2), rel=1e-5)
    assert math.isnan(stats.two_run_bound(stats.summarize([0.8])))
    assert (stats.summarize([0.8, 0.8]).low, stats.summarize([0.8, 0.8]).high) == (0.8, 0.8)
    w = stats.welch([1, 2, 3, 4], [2, 3, 5, 7, 9])  # R: t = -1.8827, df = 5.7922, p-value = 0.1105
    assert (w.t, w.df, w.p) == pytest.approx((-1.8827, 5.7922, 0.1105), abs=1e-4)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_seeds_that_score_exactly_alike_give_no_spread_to_test_against(recwarn):
    """Two LayerNorm seeds of this project both scored 77.56%: a zero spread called a single GroupNorm
    run 1.3 points away 'larger than the seed-to-seed spread' (t = -inf)."""
    from types import SimpleNamespace

    from bench.report.numbers import compare
    from bench.report.tables import statement

    norms = [SimpleNamespace(name=n, test_values=v) for n, v in
             (("bn", [0.7953, 0.8130, 0.8084]), ("gn", [0.7624]), ("ln", [0.7756, 0.7756]))]
    bn_gn, bn_ln, gn_ln = compare(norms)
    assert gn_ln.test is None and not gn_ln.exceeds_spread and "ln score exactly alike" in gn_ln.untestable
    assert bn_ln.test is not None and math.isfinite(bn_ln.test.t) and bn_gn.single == "gn"  # bn's own spread is enough
    assert not [w for w in recwarn if "Precision loss" in str(w.message)]
    text = "\n".join(statement([bn_gn, bn_ln, gn_ln]))
    assert "**Not testable:** gn vs ln (the confirm seeds of ln score exactly alike" in text
    both_alike = compare([SimpleNamespace(name="a", test_values=[0.8, 0.8]), SimpleNamespace(name="b", test_values=[0.7, 0.7])])
    assert both_alike[0].test is None and "a and b score exactly alike" in both_alike[0].untestable
    with pytest.raises(ValueError, match="needs a spread"):  # the tests themselves refuse a zero spread
        stats.welch([0.8, 0.8], [0.7, 0.7])
    with pytest.raises(ValueError, match="needs a spread"):
        stats.single_run_test([0.8, 0.8], [0.7])


def test_a_single_run_is_tested_against_the_other_norms_seeds():
    from types import SimpleNamespace

    from bench.report.numbers import compare
    from bench.report.tables import comparison_line

    w = stats.single_run_test([0.85, 0.84], [0.77])  # df 1: Student's t is Cauchy, p = 1 - 2/pi * atan(|t|)
    se = 0.01 / math.sqrt(2) * math.sqrt(1.5)
    assert (w.diff, w.t, w.df) == pytest.approx((0.075, 0.075 / se, 1))
    assert w.p == pytest.approx(1 - 2 / math.pi * math.atan(0.075 / se), abs=1e-6)
    assert (w.low, w.high) == pytest.approx((0.075 - 12.7062 * se, 0.075 + 12.7062 * se), abs=1e-5)
    flipped = stats.single_run_test([0.77], [0.85, 0.84])
    assert (flipped.diff, flipped.p) == pytest.approx((-w.diff, w.p))
    with pytest.raises(ValueError):
        stats.single_run_test([0.8], [0.7])

    norms = [SimpleNamespace(name=n, test_values=v) for n, v in (("bn", [0.85, 0.84]), ("gn", [0.77]), ("ln", []))]
    bn_gn, bn_ln, gn_ln = compare(norms)
    assert bn_gn.single == "gn" and bn_gn.adjusted_p == pytest.approx(w.p) and bn_gn.exceeds_spread is (w.p < 0.05)
    assert "gn is a single run" in comparison_line(bn_gn)
    assert bn_ln.test is None and gn_ln.test is None and "not testable" in comparison_line(gn_ln)


def test_main_recipe_prefers_most_seeds_then_newest():
    from types import SimpleNamespace

    def run(seed, recipe, start):
        return SimpleNamespace(data=SimpleNamespace(tags={records.TAG_SEED: str(seed), records.TAG_RECIPE: recipe}),
                               info=SimpleNamespace(start_time=start))

    full = [run(s, "epochs=15", 10 + s) for s in range(3)]
    smoke = [run(0, "epochs=1 train_subset=300", 99)]
    newer_seed0 = run(0, "epochs=15", 50)
    chosen = records.main_recipe(sorted([*full, *smoke, newer_seed0], key=lambda r: -r.info.start_time), records.TAG_SEED)
    assert chosen == [newer_seed0, full[1], full[2]]
    assert records.main_recipe([smoke[0]], records.TAG_SEED) == smoke


def test_tags_that_spell_one_recipe_differently_are_one_recipe():
    assert records.canonical_recipe("epochs=15 weight_decay=1e-4 grad_clip=8.0 tta_every_epoch=False") == \
        "epochs=15 grad_clip=8 tta_every_epoch=false weight_decay=0.0001"
    assert records.canonical_recipe("epochs=50 lr=0.05 tta_every_epoch=false") == "epochs=50 lr=0.05 tta_every_epoch=false"
    assert records.canonical_recipe("epochs=2 preset=resnet_wide") == "epochs=2 preset=resnet_wide"
    assert records.canonical_recipe("") == ""

    def run(seed, recipe):
        return SimpleNamespace(data=SimpleNamespace(tags={records.TAG_SEED: str(seed), records.TAG_RECIPE: recipe}),
                               info=SimpleNamespace(start_time=seed))

    old, new = run(0, "epochs=15 grad_clip=8.0"), run(1, "epochs=15 grad_clip=8")
    assert records.main_recipe([new, old], records.TAG_SEED) == [old, new]


def test_report_and_workers_import_no_training_code():
    import os
    import subprocess
    import sys

    probe = ("import sys, bench.report, bench.workers; "
             "print(sorted(m for m in ('bench.train', 'bench.run', 'bench.tune', 'bench.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_the_seed_layernorm_study_is_confirmed_by_its_norm_alone(cifar, tmp_path):
    """`bench tune --norm lnchw` trains experiments/seed_gn.toml and names its study after it;
    `bench confirm --norm lnchw` finds that study and that file (it looked for 'lnchw' and lnchw.toml)."""
    tiny = CIFAR10(cifar.train.take(300), cifar.val.take(200), cifar.test.take(200), cifar.source + " (slice)", cifar.digest)
    with module_store(tmp_path, tiny, (bench.tune.study, bench.confirm)):
        invoke("tune", "--norm", "lnchw", "--trials", "1", "--tune-epochs", "1", "--threads", "1")
        invoke("confirm", "--norm", "lnchw", "--seeds", "1", "--epochs", "1", "--threads", "1")
        confirmed = runs("seed_gn", "confirm")
    assert len(confirmed) == 1 and confirmed[0].data.params["norm"] == "lnchw"


def test_timings_from_different_processors_are_flagged_per_norm():
    xeon, epyc = "Intel(R) Xeon(R) Platinum", "AMD EPYC"
    same = [SimpleNamespace(name="bn", hardware={epyc: 2}), SimpleNamespace(name="ln", hardware={epyc: 1})]
    assert hardware_line(same) == f"Timings (s / epoch, wall time) from runs on one processor: {epyc}."
    mixed = [SimpleNamespace(name="bn", hardware={xeon: 2}), SimpleNamespace(name="ln", hardware={xeon: 1, epyc: 1}),
             SimpleNamespace(name="gn", hardware={"not recorded": 1})]
    line = hardware_line(mixed)
    assert line.startswith("**Timings come from different processors**")
    assert f"bn: {xeon} (2 runs); ln: {xeon} (1 run), {epyc} (1 run); gn: not recorded (1 run)" in line
