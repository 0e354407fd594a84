"""The study procedure: the baseline trial, successive halving's rungs, the champion alias, the fast
width grid, the rank correlations behind the rungs and the end-of-study outcome."""

from __future__ import annotations

import mlflow
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from bench import config, tracking
from bench.errors import ConfigError
from bench.models import count_params, count_params_fast, create_model
from bench.tune import TuneOptions, prepare_study, run_study, suggest
from bench.tune.recovery import requeue_interrupted
from bench.tune.rungs import rank_correlations
from bench.tune.space import baseline_params, enqueue_baseline, rungs
from bench.tune.study import pruner_label
from bench.tune.summary import next_steps, outcome_metrics
import test_tune
from test_tune import REPO, data_dir, load_study, runs_of, tiny_experiment

store = test_tune.store  # the fixture: fresh MLflow and Optuna state in a temporary folder

FILE_DEFAULTS = {"lr": 0.1, "dropout": 0.05, "weight_decay": 5e-4, "width": 1.0}


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_the_norms_share_one_procedure(norm):
    exp, bn = config.load(REPO / "experiments" / f"{norm}.toml"), config.load(REPO / "experiments" / "bn.toml")
    assert exp.tune == bn.tune and exp.budget == bn.budget and exp.train == bn.train
    assert {k: v for k, v in exp.search.items() if k != "groups"} == bn.search
    assert exp.tune.epochs == 0 and exp.tune.train_subset == 0 and exp.tune.pruner == "halving"  # the real schedule


def test_trial_0_trains_the_experiment_files_values_and_a_resumed_study_keeps_it(store):
    exp = tiny_experiment()
    assert baseline_params(exp) == FILE_DEFAULTS
    console = Console(record=True, width=200)
    run_study(exp, TuneOptions(trials=1, epochs=1, data_dir=data_dir(), threads=1), console)
    run_study(exp, TuneOptions(trials=2, epochs=1, data_dir=data_dir(), threads=1), console)
    study = load_study("bn")
    assert len(study.trials) == 2
    assert study.trials[0].params == FILE_DEFAULTS and study.trials[0].user_attrs["baseline"]
    assert not study.trials[1].user_attrs.get("baseline")  # enqueued once, not again on resume
    baseline_runs = [r for r in runs_of("bn") if r.data.tags.get("bench.baseline") == "true"]
    assert len(baseline_runs) == 1 and float(baseline_runs[0].data.params["lr"]) == 0.1
    text = console.export_text()
    assert "trial   0 (baseline)" in text and "baseline -> best" in text and "bench confirm --norm bn --seeds 3" in text


def test_a_baseline_outside_its_search_range_is_an_error_before_any_work():
    exp = tiny_experiment()
    exp.search["lr"] = config.Dimension("lr", low=0.2, high=0.4, log=True)
    with pytest.raises(ConfigError, match=r"lr = 0.1 inside \[search.lr\]"):
        baseline_params(exp)


def test_an_interrupted_baseline_is_queued_again_as_the_baseline():
    exp = tiny_experiment()
    study = optuna.create_study(direction="maximize")
    assert enqueue_baseline(study, exp) and not enqueue_baseline(study, exp)
    trial = study.ask()
    suggest(trial, exp)  # takes the queued values
    trial.set_user_attr("interrupted", True)  # as Ctrl-C leaves it
    study.tell(trial, state=TrialState.FAIL)
    assert requeue_interrupted(study) == [0]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["baseline"]
    assert (waiting[0].params or waiting[0].system_attrs.get("fixed_params")) == FILE_DEFAULTS  # the re-run trains the same values


def test_rungs_follow_min_epochs_and_the_reduction_factor():
    exp = tiny_experiment()
    assert rungs(exp, 15) == [1, 3, 9]
    exp.tune.min_epochs, exp.tune.reduction_factor = 2, 4
    assert rungs(exp, 15) == [2, 8] and rungs(exp, 2) == []


def test_the_study_header_names_the_rungs_or_says_there_are_none():
    exp = tiny_experiment()
    exp.tune.pruner = "halving"
    opts = TuneOptions()
    assert pruner_label(exp, opts, 10) == "successive halving at epochs 1, 3, 9 (best 1/3 go on)"
    assert pruner_label(exp, opts, 1) == "successive halving: no rung within 1 epoch, every trial runs to the end"


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_never_becomes_champion(store, monkeypatch):
    monkeypatch.setattr("bench.tune.study.create_pruner", lambda name, exp: AlwaysPrune())
    study = run_study(tiny_experiment(), TuneOptions(trials=3, epochs=2, data_dir=data_dir(), threads=1))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]  # the baseline is never pruned
    champion = tracking.champion("cifar10-bn")
    assert champion.tags["trial"] == "0" and champion.tags["baseline"] == "true"
    assert len(mlflow.MlflowClient().search_model_versions("name='cifar10-bn'")) == 1
    assert all("bench.registered_version" not in r.data.tags for r in runs_of("bn") if r.data.tags.get(tracking.TAG_STATE) == "PRUNED")


def test_the_champion_alias_moves_only_on_improvement(store):
    tracking.setup()
    with tracking.run("bn", "model", "train"):
        uri = tracking.log_model(torch.nn.Conv2d(3, 10, 32))
    name = "cifar10-test"
    assert tracking.champion(name) is None
    first = tracking.promote_champion(uri, name, 0.50, tags={"val_acc": "0.5000", "trial": 1})
    assert tracking.champion(name).version == first
    assert tracking.promote_champion(uri, name, 0.45, tags={"val_acc": "0.4500", "trial": 2}) is None  # worse: not even registered
    assert tracking.promote_champion(uri, name, 0.50, tags={"val_acc": "0.5000", "trial": 3}) is None  # a tie is no improvement
    assert tracking.champion(name).version == first
    better = tracking.promote_champion(uri, name, 0.55, tags={"val_acc": "0.5500", "trial": 4})
    assert better != first and tracking.champion(name).version == better
    assert tracking.champion_uri(name) == "models:/cifar10-test@champion"
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{name}'")) == 2


@pytest.mark.parametrize("norm,groups", [("bn", 4), ("gn", 2), ("gn", 4), ("gn", 8), ("ln", 4)])
def test_the_width_grid_keeps_the_budget_check_exact(norm, groups):
    exp = config.load(REPO / "experiments" / f"{norm}.toml")
    for width in exp.search["width"].choices:
        kwargs = {"preset": "seed_bn", "norm": norm, "width": width, "groups": groups}
        model = create_model(**kwargs)
        assert count_params_fast(**kwargs) == count_params(model)  # what the budget check counts is what trains
        if norm == "gn":  # widths snap to multiples of the group count (28 channels become 32 with 8 groups: over budget, rejected)
            assert all(m.num_channels % groups == 0 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
        else:
            assert count_params(model) <= exp.budget.max_params
    assert count_params_fast(preset="seed_bn", norm=norm, width=2.0, groups=groups) > exp.budget.max_params


def synthetic_study(curves: dict[int, list[float]], baseline: int | None = None) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dist = {"lr": FloatDistribution(0.01, 1.0)}
    for number, curve in curves.items():
        values = dict(enumerate(curve, 1))
        study.add_trial(create_trial(value=max(curve), params={"lr": 0.1 + number / 100}, distributions=dist, intermediate_values=values,
                                     user_attrs={"baseline": number == baseline, "test_acc": max(curve) - 0.01, "n_params": 1000}))
    return study


def test_rank_correlations_per_epoch():
    # epoch 1 ranks the trials backwards, epoch 2 as the final objective does
    study = synthetic_study({0: [0.40, 0.60, 0.61], 1: [0.30, 0.70, 0.71], 2: [0.20, 0.80, 0.81], 3: [0.10, 0.90, 0.91]})
    result = rank_correlations(study, reduction_factor=2)
    rows = {r["epoch"]: r for r in result["rows"]}
    assert rows[1]["spearman"] == pytest.approx(-1.0) and rows[2]["spearman"] == pytest.approx(1.0)
    assert not rows[1]["best_kept"] and rows[2]["best_kept"] and rows[2]["best_rank"] == 1
    assert result["kept_per_rung"] == 2


def test_rank_correlations_need_fully_trained_trials():
    with pytest.raises(ConfigError, match="need 3 or more"):
        rank_correlations(synthetic_study({0: [0.1, 0.2], 1: [0.3, 0.4]}))


def test_outcome_is_baseline_to_best_with_the_epochs_pruning_saved():
    study = synthetic_study({0: [0.50, 0.60, 0.62], 1: [0.55, 0.65, 0.70]}, baseline=0)
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.2}, distributions={"lr": FloatDistribution(0.01, 1.0)},
                                 intermediate_values={1: 0.3}))  # pruned at the first rung
    m = outcome_metrics(study, epochs=3)
    assert m["baseline_trial"] == 0 and m["best_trial"] == 1
    assert m["gain_val_acc"] == pytest.approx(0.08) and m["gain_test_acc"] == pytest.approx(0.08)
    assert (m["epochs_trained"], m["epochs_unpruned"], m["epochs_saved"]) == (7, 9, 2)


def test_a_trial_below_the_baselines_value_at_a_rung_is_pruned(store):
    """The baseline is never pruned, yet its value counts at each rung: before, the first trial to
    reach a rung competed with nobody and trained in full however poor it was."""
    exp = tiny_experiment(train_subset=2000)
    exp.search["lr"] = config.Dimension("lr", low=1e-5, high=0.4, log=True)
    opts = TuneOptions(trials=2, epochs=2, data_dir=data_dir(), threads=1)  # one rung, at epoch 1
    study, _ = prepare_study(exp, opts)
    study.enqueue_trial({**FILE_DEFAULTS, "lr": 1e-5})  # learns almost nothing in one epoch
    study = run_study(exp, opts)
    baseline, poor = study.trials
    assert baseline.state == TrialState.COMPLETE and "completed_rung_0" in baseline.system_attrs
    assert poor.intermediate_values[1] < baseline.intermediate_values[1]
    assert poor.state == TrialState.PRUNED and len(poor.intermediate_values) == 1


def test_the_last_trial_running_takes_the_idle_workers_threads(store, monkeypatch):
    monkeypatch.setenv("BENCH_LONE_THREADS", "2")  # what `--jobs 2` gives each of its single-threaded workers
    monkeypatch.setattr("bench.tune.study.create_pruner", lambda name, exp: optuna.pruners.NopPruner())
    console = Console(record=True, width=200)
    threads_by_epoch = []
    monkeypatch.setattr("bench.tune.objective.Objective._line",
                        lambda self, trial, *args: threads_by_epoch.append((trial.number, torch.get_num_threads())))
    run_study(tiny_experiment(), TuneOptions(trials=2, epochs=2, data_dir=data_dir(), threads=1), console)
    lines = [line for line in console.export_text().splitlines() if "the last one running" in line]
    assert lines == ["trial   1  the last one running: 2 threads from epoch 2"]  # trial 0 had trial 1 still to start
    assert threads_by_epoch == [(0, 1), (1, 2)]


def test_when_no_trial_beats_the_baseline_the_end_says_so_and_how_to_go_on(monkeypatch):
    monkeypatch.setattr(tracking, "champion", lambda name: None)
    study = optuna.create_study(direction="maximize", study_name="gn")
    study.add_trial(create_trial(value=0.73, user_attrs={"baseline": True}))
    assert not any("beat the baseline" in line for line in next_steps(study, "gn", "cifar10-gn"))  # the baseline alone
    study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.4}))
    assert "no trial beat the baseline in 2 trials; more trials resume this study: bench tune --norm gn --trials 4" in next_steps(study, "gn", "cifar10-gn")
    # a study of another experiment file is resumed with that file (--norm would load gn.toml's space and be refused)
    other = optuna.create_study(direction="maximize", study_name="convnext_gn")
    for t in study.trials:
        other.add_trial(t)
    assert ("more trials resume this study: bench tune -e experiments/convnext_gn.toml --study convnext_gn --trials 4"
            in " ".join(next_steps(other, "gn", "cifar10-convnext_gn", "convnext_gn")))
    assert "bench tune --norm lnchw --study convnext_gn --trials 4" in " ".join(next_steps(other, "lnchw", "r", "seed_gn"))  # its own file
    study.add_trial(create_trial(value=0.78))
    assert not any("beat the baseline" in line for line in next_steps(study, "gn", "cifar10-gn"))


def test_a_warm_up_longer_than_the_trials_is_refused_before_any_trial(store):
    exp = tiny_experiment(schedule="cosine", lr_warmup_epochs=2)  # fine for the file's 15 epochs
    with pytest.raises(ConfigError, match=r"lr_warmup_epochs \(2\) must be below epochs \(1\)"):
        run_study(exp, TuneOptions(trials=1, epochs=1, data_dir=data_dir(), threads=1))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
