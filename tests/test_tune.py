"""bench tune: studies, nested MLflow runs, registry, resume, budget rejection, NaN and Ctrl-C."""

from __future__ import annotations

import copy
import dataclasses

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState
from rich.console import Console

from bench import config, tracking
from bench.errors import ConfigError
from bench.tune import TuneOptions, open_storage, prepare_study, run_study
from conftest import fixture_data_dir

REPO = Path(__file__).resolve().parents[1]
TINY = {"train_subset": 400, "val_size": 200, "batch_size": 100, "eval_batch_size": 2000}


def data_dir() -> str:
    return str(fixture_data_dir())


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Fresh MLflow and Optuna state in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # mlflow keeps the last URI process-wide; earlier tests set theirs
    torch.set_num_threads(1)
    return tmp_path


def tiny_experiment(norm: str = "bn", **overrides) -> config.Experiment:
    exp = config.load(REPO / "experiments" / f"{norm}.toml")
    return config.override(exp, **{**TINY, **overrides})


def over_budget_experiment() -> config.Experiment:
    """Every sampled width is over the budget, so trials are rejected untrained; no baseline (its width 1.0 is outside)."""
    exp = tiny_experiment()
    exp.search["width"] = config.Dimension("width", low=4.0, high=5.0)
    exp.tune.baseline = False
    return exp


def runs_of(study: str) -> list:
    return mlflow.search_runs(experiment_names=[study], output_format="list")


def load_study(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(None))


def test_study_makes_parent_and_nested_runs_with_epochs_and_models(store):
    exp = tiny_experiment()
    run_study(exp, TuneOptions(trials=3, epochs=2, data_dir=data_dir(), threads=1))

    runs = runs_of("bn")
    parents = [r for r in runs if r.data.tags[tracking.TAG_KIND] == "study"]
    trials = [r for r in runs if r.data.tags[tracking.TAG_KIND] == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    client = mlflow.MlflowClient()
    for run in trials:
        assert run.info.status == "FINISHED"
        state = run.data.tags[tracking.TAG_STATE]
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == ([1, 2] if state == "COMPLETE" else [1])
        assert {"lr", "train_loss", "images_per_s"} <= set(run.data.metrics)
        assert run.data.params["norm"] == "bn" and "lr" in run.data.params
        assert run.inputs.dataset_inputs[0].dataset.name == "cifar10"
    complete = [r for r in trials if r.data.tags[tracking.TAG_STATE] == "COMPLETE"]
    model = mlflow.pytorch.load_model(complete[0].data.tags["bench.model_uri"])
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    assert parents[0].data.metrics["best_val_acc"] == max(r.data.metrics["best_val_acc"] for r in complete)

    registered = mlflow.pytorch.load_model("models:/cifar10-bn/latest").eval()
    with torch.inference_mode():
        assert registered(torch.randn(2, 3, 32, 32)).argmax(1).shape == (2,)


def test_rerun_resumes_to_the_total(store):
    exp = tiny_experiment(epochs=1)
    opts = TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1)
    run_study(exp, opts)
    run_study(exp, opts)  # already at the total: nothing runs
    assert len(load_study("bn").trials) == 2
    run_study(exp, TuneOptions(trials=3, epochs=1, data_dir=data_dir(), threads=1))
    study = load_study("bn")
    assert len(study.trials) == 3 and [t.number for t in study.trials] == [0, 1, 2]
    assert len([r for r in runs_of("bn") if r.data.tags[tracking.TAG_KIND] == "trial"]) == 3


@pytest.mark.parametrize("worker", ["", "1"])
def test_a_resumed_study_draws_new_configurations(store, monkeypatch, worker):
    """TPE's startup trials come from its seeded RNG: a resume (or a --jobs worker re-launched on the
    study) seeded as before replayed the configurations already run."""
    if worker:
        monkeypatch.setenv("BENCH_WORKER_INDEX", worker)
    exp = over_budget_experiment()  # trials are rejected untrained: only the draws matter
    run_study(exp, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1))
    run_study(exp, TuneOptions(trials=4, epochs=1, data_dir=data_dir(), threads=1))
    drawn = [tuple(sorted(t.params.items())) for t in load_study("bn").trials]
    assert len(drawn) == 4 and len(set(drawn)) == 4


def drawn_configurations(study: optuna.Study) -> set[tuple]:
    return {tuple(sorted(t.params.items())) for t in study.trials}


def test_a_process_joining_a_study_a_sibling_just_created_draws_its_own_configurations(store):
    """Workers started by hand at once: the one that did not create the study must not replay the
    creator's seeded draws (CI saw two of three such workers run one configuration)."""
    exp = over_budget_experiment()
    opts = TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1)
    creator = run_study(exp, dataclasses.replace(opts, study="alone"))  # what the creator draws with this seed
    prepare_study(exp, dataclasses.replace(opts, study="shared"))  # a sibling created "shared" an instant earlier
    joiner = run_study(exp, dataclasses.replace(opts, study="shared"))
    assert len(joiner.trials) == 2 and not drawn_configurations(creator) & drawn_configurations(joiner)


def test_only_the_process_that_creates_a_study_queues_its_baseline(store):
    exp = tiny_experiment()
    _, created = prepare_study(exp, TuneOptions())
    study, created_again = prepare_study(exp, TuneOptions())
    assert created and not created_again
    assert [t.user_attrs.get("baseline") for t in study.trials] == [True]


def test_a_fresh_study_seeded_alike_draws_alike(store):
    exp = over_budget_experiment()
    first = run_study(exp, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1, study="a"))
    second = run_study(exp, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1, study="b"))
    assert [t.params for t in first.trials] == [t.params for t in second.trials]


def test_over_budget_space_is_rejected_before_training(store, monkeypatch):
    exp = over_budget_experiment()

    def no_training(*args, **kwargs):
        raise AssertionError("an over-budget trial must not train")

    monkeypatch.setattr("bench.tune.objective.train_tracked", no_training)
    console = Console(record=True, width=200)
    study = run_study(exp, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1), console)
    lines = [line for line in console.export_text().splitlines() if line.startswith("trial ")]
    assert len(lines) == 2 and all("REJECTED (over the 50,000 budget" in line and "nan" not in line for line in lines)
    for trial in study.trials:
        assert trial.user_attrs["rejected"] and trial.user_attrs["n_params"] > 50_000
        assert trial.system_attrs["constraints:params_over_budget"] > 0  # the sampler sees the constraint
    for run in runs_of("bn"):
        if run.data.tags[tracking.TAG_KIND] == "trial":
            assert run.data.tags[tracking.TAG_STATE] == "REJECTED" and run.data.metrics["n_params"] > 50_000


def test_resuming_with_a_changed_search_space_is_refused_before_any_trial(store, monkeypatch):
    exp = over_budget_experiment()  # trials are rejected, not trained
    run_study(exp, TuneOptions(trials=1, epochs=1, data_dir=data_dir(), threads=1))
    run_study(exp, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1))  # same space: resumes

    exp.search["lr"] = config.Dimension("lr", low=0.05, high=0.6, log=True)
    with pytest.raises(ConfigError, match=r"different search space \(lr changed\).*--study"):
        run_study(exp, TuneOptions(trials=3, epochs=1, data_dir=data_dir(), threads=1))
    assert len(load_study("bn").trials) == 2
    run_study(exp, TuneOptions(trials=1, epochs=1, data_dir=data_dir(), threads=1, study="bn_new_lr"))
    assert load_study("bn_new_lr").trials[0].distributions["lr"].low == 0.05


def test_resuming_with_changed_fixed_settings_is_refused_before_any_trial(store):
    exp = over_budget_experiment()  # trials are rejected, not trained
    run_study(exp, TuneOptions(trials=1, epochs=1, data_dir=data_dir(), threads=1))
    recorded = exp.train.tta_shift
    assert load_study("bn").user_attrs["fixed_recipe"]["tta_shift"] == str(recorded)
    faster = config.override(copy.deepcopy(exp), eval_batch_size=123)  # speed only: resumes
    run_study(faster, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1))

    changed = 1 - recorded
    with pytest.raises(ConfigError, match=rf"other fixed settings \(tta_shift {recorded} -> {changed}\).*--study"):
        run_study(config.override(copy.deepcopy(exp), tta_shift=changed), TuneOptions(trials=3, epochs=1, data_dir=data_dir(), threads=1))
    with pytest.raises(ConfigError, match=r"epochs 1 -> 2"):
        run_study(exp, TuneOptions(trials=3, epochs=2, data_dir=data_dir(), threads=1))
    with pytest.raises(ConfigError, match=r"norm bn -> gn"):
        run_study(config.override(copy.deepcopy(exp), norm="gn"), TuneOptions(trials=3, epochs=1, data_dir=data_dir(), threads=1, study="bn"))
    assert len(load_study("bn").trials) == 2
    assert load_study("bn").user_attrs["norm"] == "bn"  # a refused run does not relabel the study


def test_a_study_older_than_the_record_is_checked_against_its_last_trained_trial(store):
    exp = tiny_experiment()
    run_study(exp, TuneOptions(trials=1, epochs=1, data_dir=data_dir(), threads=1))
    load_study("bn").set_user_attr("fixed_recipe", None)  # as a study from before the record
    with pytest.raises(ConfigError, match=r"label_smoothing 0.0 -> 0.1"):
        run_study(config.override(copy.deepcopy(exp), label_smoothing=0.1), TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1))
    run_study(exp, TuneOptions(trials=1, epochs=1, data_dir=data_dir(), threads=1))  # unchanged: accepted and recorded
    assert load_study("bn").user_attrs["fixed_recipe"]["label_smoothing"] == "0.0"


def test_nan_trial_fails_and_study_goes_on(store):
    exp = tiny_experiment()
    study = optuna.create_study(study_name="bn", storage=open_storage(None), direction="maximize")
    study.enqueue_trial({"lr": 1e12, "dropout": 0.0, "weight_decay": 1e-4, "width": 1.0})  # diverges
    study = run_study(exp, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1))
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and "loss became" in study.trials[0].user_attrs["diverged"]
    assert len(states) == 2 and states[1] != TrialState.FAIL
    failed = [r for r in runs_of("bn") if r.data.tags.get(tracking.TAG_TRIAL) == "0"][0]
    assert failed.info.status == "FAILED" and "DivergedError" in failed.data.tags[tracking.TAG_ERROR]


def test_sigint_mid_trial_leaves_records_consistent_and_resumes(store):
    cmd = [sys.executable, "-m", "bench.cli", "tune", "--norm", "bn", "--trials", "2", "--tune-epochs", "3",
           "--threads", "1", "--data-dir", data_dir(), "-e", str(REPO / "experiments/bn.toml"),
           "--set", "train_subset=3000", "--set", "val_size=200", "--pruner", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=store)
    for line in proc.stdout:  # wait until the first trial has finished an epoch
        if "epoch   1/3" in line:
            break
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "resume" in out

    study = load_study("bn")
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert study.trials[0].user_attrs["interrupted"]
    runs = runs_of("bn")
    assert {r.info.status for r in runs} == {"KILLED"}  # the trial and its parent; nothing left RUNNING

    done = subprocess.run(cmd, capture_output=True, text=True, cwd=store, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    study = load_study("bn")
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 2
    assert finished[0].user_attrs["retry_of"] == 0 and finished[0].params == study.trials[0].params
    assert not [r for r in runs_of("bn") if r.info.status == "RUNNING"]


def test_jobs_auto_is_one_single_threaded_worker_per_core_where_workers_can_share_the_study(monkeypatch):
    from bench.tune import auto_jobs

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert auto_jobs(TuneOptions(device="cpu")) == 3
    assert auto_jobs(TuneOptions(device="cpu", threads=2)) == 2
    assert auto_jobs(TuneOptions(device="cpu", storage="sqlite:///x.db")) == 1  # SQLite: no concurrent writers
    assert auto_jobs(TuneOptions(device="cuda")) == 1


def test_worker_argv_drops_what_the_launcher_sets_for_each_worker():
    from bench.tune import worker_argv

    argv = ["--norm", "all", "--jobs", "auto", "--trials=9", "--more", "--threads", "2", "--set", "lr=0.1"]
    assert worker_argv(argv, "gn") == ["--set", "lr=0.1", "--norm", "gn"]


def test_tiny_architecture_study_runs_end_to_end(store, cifar, monkeypatch):
    """experiments/resnet_bn.toml on a real slice: over-budget samples are rejected untrained, the
    rest train; the parent run holds the best-trials table and the accuracy-parameters Pareto plot."""
    from bench.data import CIFAR10

    tiny = CIFAR10(cifar.train.take(300), cifar.val.take(100), cifar.test.take(100), cifar.source + " (slice)", cifar.digest)
    monkeypatch.setattr("bench.tune.study.load_data", lambda *args, **kwargs: tiny)
    exp = config.override(config.load(REPO / "experiments" / "resnet_bn.toml"), train_subset=300, batch_size=100)
    study = run_study(exp, TuneOptions(trials=8, epochs=1, threads=1))

    rejected = [t for t in study.trials if t.user_attrs.get("rejected")]
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("rejected")]
    assert rejected and trained and len(rejected) + len(trained) + sum(t.state == TrialState.PRUNED for t in study.trials) == 8
    assert all(t.user_attrs["n_params"] > 50_000 and "epoch_seconds" not in t.user_attrs for t in rejected)
    assert all(t.user_attrs["n_params"] <= 50_000 and t.user_attrs["epoch_seconds"] > 0 for t in trained)
    assert {t.params["blocks1"] for t in study.trials} <= {1, 2, 3}

    parent = next(r for r in runs_of("resnet_bn") if r.data.tags[tracking.TAG_KIND] == "study")
    assert parent.data.params["space.width1"] == "[8, 24] step 8" and parent.data.params["space.lr"] == "[0.05, 0.6] log"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/best_trials.md", "study/pareto_params.html"} <= artifacts
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study/best_trials.md")
    best = max(trained, key=lambda t: t.value)
    assert f"| {best.number} | {best.user_attrs['n_params']:,} | {best.value:.4f} |" in table
    assert len(table.strip().splitlines()) == 4 + min(len(trained), 10)


def test_pareto_front_keeps_only_trials_nothing_smaller_beats():
    from bench.stats import pareto_front

    params = [40_000, 30_000, 45_000, 30_000, 20_000]
    accs = [0.80, 0.78, 0.79, 0.70, 0.60]
    assert pareto_front(params, accs) == [4, 1, 0]  # 45k is beaten by 40k, the second 30k by the first


def test_median_pruner_waits_for_trained_trials_not_rejected_ones():
    """Rejected trials complete without reporting epochs; a median over one trained trial is no median."""
    from bench.tune import create_pruner

    exp = config.load(REPO / "experiments" / "resnet_bn.toml")
    study = optuna.create_study(direction="maximize", pruner=create_pruner("median", exp))
    for _ in range(exp.tune.startup_trials):  # over budget: complete, no intermediate values
        study.add_trial(optuna.trial.create_trial(value=0.0, user_attrs={"rejected": True}))
    study.add_trial(optuna.trial.create_trial(value=0.6, intermediate_values={1: 0.3, 2: 0.5, 3: 0.6}))
    trial = study.ask()
    trial.report(0.2, 3)
    assert not trial.should_prune()  # one trained reference trial: keep going
    for acc in (0.55, 0.5, 0.45, 0.4):
        study.add_trial(optuna.trial.create_trial(value=acc, intermediate_values={3: acc}))
    assert trial.should_prune()  # five trained trials at epoch 3, all above 0.2


def test_workers_get_sigterm_forwarded_and_the_launcher_reports_the_interrupt(tmp_path):
    """SIGTERM to the launcher (a scheduler stopping the job) must reach every worker, so each can
    record its trial or seed before exiting; the launcher then reports the interrupt."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(
        "import sys\n"
        "from bench.workers import run_all\n"
        "child = [sys.executable, '-c', 'import signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); sys.stdout.write(\"ready\\\\n\"); sys.stdout.flush(); time.sleep(60)']\n"
        "codes, interrupted = run_all([child, child])\n"
        "print('codes', codes, 'interrupted', interrupted, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, str(launcher)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert [proc.stdout.readline().strip() for _ in range(2)] == ["ready", "ready"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "codes [7, 7] interrupted True" in out
