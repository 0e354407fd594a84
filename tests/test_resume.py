"""Epoch checkpoints: a run interrupted mid-epoch and resumed ends exactly as an uninterrupted one, and
``bench confirm`` resumes an interrupted seed in its own MLflow run instead of starting it over; a lost
tracking server outside a study is one line (the real-server case is in test_faults.py)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

import bench.confirm
import bench.interrupt
import bench.runtime
import bench.train
import bench.tune.study
from bench import config, records
from bench.tracking import handover
from bench.checkpoint import EpochCheckpoint, age, checkpoint_dir, sweep_leftovers
from bench.cli import cli
from bench.config import TrainConfig
from bench.data import CIFAR10
from bench.models import create_model
from bench.train import fit, resolve_runtime
from bench.tune import TuneOptions, run_study
from conftest import module_store, take
from test_report import TINY
from test_train import without_timing

REPO = Path(__file__).resolve().parents[1]
# Every piece of state a resume must restore: momentum, a two-part schedule, EMA, dropout and mixup
# (torch's global generator) and the crops and flips (the data generator).
RECIPE = {"epochs": 3, "batch_size": 64, "seed": 0, "schedule": "cosine", "lr_warmup_epochs": 1, "ema": 0.9, "mixup": 0.2}


def new_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("seed_bn", "bn", dropout=0.2)


def interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    """The next ``fit`` gets Ctrl-C at the third step of its ``epoch``-th epoch (counted from its start)."""
    real_epoch, real_check = bench.train.train_one_epoch, bench.interrupt.check
    epochs, steps = [], []

    def train_one_epoch(*args, **kwargs):
        epochs.append(1)
        return real_epoch(*args, **kwargs)

    def check():
        if len(epochs) == epoch:
            steps.append(1)
            if len(steps) == 3:
                raise KeyboardInterrupt
        real_check()

    monkeypatch.setattr(bench.train, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(bench.interrupt, "check", check)


def test_a_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(small_cifar, tmp_path, monkeypatch):
    data = take(small_cifar, 640, 200, 200)
    cfg = TrainConfig(**RECIPE)
    rt = resolve_runtime(cfg, "bn")
    straight_model = new_model()
    straight = fit(straight_model, data, cfg, rt)

    checkpoint = EpochCheckpoint(tmp_path / "run.pt", {"recipe": "a"})
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(new_model(), data, cfg, rt, checkpoint=checkpoint)
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 1
    monkeypatch.undo()

    epochs_seen = []
    resumed_model = new_model()  # fresh weights: everything must come from the checkpoint
    resumed = fit(resumed_model, data, cfg, rt, on_epoch=lambda e, r: epochs_seen.append(e), checkpoint=checkpoint)
    assert epochs_seen == [2, 3]
    assert without_timing(resumed.history) == without_timing(straight.history)
    assert resumed.test_acc == straight.test_acc and resumed.recipe_ablation == straight.recipe_ablation
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name
    assert resumed.seconds >= sum(r["epoch_seconds"] for r in resumed.history)  # the first session's time counts


def test_a_checkpoint_of_other_settings_is_ignored_and_a_live_one_is_not_taken(tmp_path):
    saved = EpochCheckpoint(tmp_path / "run.pt", {"lr": "0.1"})
    saved.save({"epoch": 4})
    assert saved.load()["epoch"] == 4 and not saved.path.with_suffix(".partial").exists()
    assert EpochCheckpoint(saved.path, {"lr": "0.2"}).load() is None

    assert saved.lock()
    other = EpochCheckpoint(saved.path, {"lr": "0.1"})
    assert not other.lock()  # as a second process would see it while the first trains
    saved.unlock()
    assert other.lock()
    other.remove()
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_runs_are_swept_and_live_or_resumable_runs_kept(tmp_path):
    for stem in ("killed_early", "killed_mid_write", "resumable", "live"):
        (tmp_path / f"{stem}.lock").touch()
    (tmp_path / "killed_mid_write.partial").write_bytes(b"half")
    EpochCheckpoint(tmp_path / "resumable.pt", {}).save({"epoch": 3})
    live = EpochCheckpoint(tmp_path / "live.pt", {})
    assert live.lock()  # flock conflicts between two open files, as between two processes

    assert sweep_leftovers(tmp_path) == []  # too new: a process may be about to take its lock
    an_hour_ago = time.time() - 3600
    for path in tmp_path.iterdir():
        os.utime(path, (an_hour_ago, an_hour_ago))
    swept = sweep_leftovers(tmp_path)

    assert sorted(p.name for p in swept) == ["killed_early.lock", "killed_mid_write.lock", "killed_mid_write.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.lock", "resumable.lock", "resumable.pt"]
    assert not EpochCheckpoint(live.path, {}).lock()  # still its owner's
    live.remove()
    assert age(tmp_path / "finished-meanwhile.lock") == 0  # a file removed between listing and reading is no leftover


# ---------------------------------------------------------------- bench confirm


@pytest.fixture(scope="module")
def study(cifar, tmp_path_factory):
    """A one-trial bn study in an isolated store, on a 400/200/300 slice."""
    tiny = CIFAR10(cifar.train.take(400), cifar.val.take(200), cifar.test.take(300), cifar.source + " (slice)", cifar.digest)
    with module_store(tmp_path_factory.mktemp("resume"), tiny, (bench.tune.study, bench.confirm)) as root:
        run_study(config.override(config.load(REPO / "experiments" / "bn.toml"), **TINY), TuneOptions(trials=1, epochs=1, threads=1))
        yield root


def confirm_runs() -> list:
    return mlflow.search_runs(experiment_names=["bn"], filter_string="tags.`bench.kind` = 'confirm'", output_format="list")


def test_confirm_resumes_an_interrupted_seed_in_the_same_run(study, monkeypatch):
    args = ["confirm", "--norm", "bn", "--seeds", "1", "--epochs", "3", "--threads", "1"]
    interrupt_in_epoch(monkeypatch, 2)
    stopped = CliRunner().invoke(cli, args)
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    [killed] = confirm_runs()
    assert killed.info.status == "KILLED" and (checkpoint_dir() / f"{killed.info.run_id}.pt").exists()

    other_recipe = CliRunner().invoke(cli, [*args[:-4], "--epochs", "1", "--threads", "1"])  # not this checkpoint's recipe
    assert other_recipe.exit_code == 0 and "resuming" not in other_recipe.output, other_recipe.output

    leftover = checkpoint_dir() / "killed-before-its-first-epoch.lock"
    leftover.touch()
    os.utime(leftover, (time.time() - 3600,) * 2)
    first_machine = killed.data.tags["bench.hardware"]
    monkeypatch.setattr(bench.runtime, "cpu_name", lambda: "Another CPU")  # the seed resumes on another machine
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming run {killed.info.run_id} after epoch 1/3" in resumed.output
    assert not leftover.exists()
    run = mlflow.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and "bench.state" not in run.data.tags
    assert run.data.tags["bench.resumed_after_epoch"] == "1" and "test_acc" in run.data.metrics
    assert run.data.tags["bench.hardware"] == f"{first_machine}, then Another CPU"  # its seconds span both
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(steps) == [1, 2, 3]  # each epoch logged once, across the two sessions
    assert not list(checkpoint_dir().glob(f"{run.info.run_id}.*"))
    assert len(records.derived_runs(records.load_study("bn"), "confirm")) == 2  # the resumed one and the 1-epoch one

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "to run none" in again.output

    diverged = CliRunner().invoke(cli, [*args, "--set", "lr=1e12"])  # would diverge again on resume: no checkpoint kept
    assert diverged.exit_code == 2 and "lower the learning rate" in diverged.output, diverged.output
    assert not list(checkpoint_dir().glob("*.pt"))


def test_confirm_skips_a_seed_another_process_is_training_or_finished_meanwhile(study, monkeypatch):
    """Two `bench confirm` on one machine (`--seeds 3` started beside a `--seed 2`): the second one
    trains no seed twice, whether the other process still trains it or finished it meanwhile."""
    args = ["confirm", "--norm", "bn", "--seeds", "1", "--epochs", "2", "--threads", "1"]
    interrupt_in_epoch(monkeypatch, 2)
    assert CliRunner().invoke(cli, args).exit_code == 130
    monkeypatch.undo()
    [paused] = [r for r in confirm_runs() if r.data.tags["bench.recipe"] == "epochs=2"]
    runs_before = len(confirm_runs())
    training = EpochCheckpoint(checkpoint_dir() / f"{paused.info.run_id}.pt", {})
    assert training.lock()  # as the process training the seed holds it

    beside = CliRunner().invoke(cli, args)
    assert beside.exit_code == 0, beside.output
    assert f"bn confirm-seed-0 skipped: another process on this machine is training it (run {paused.info.run_id})" in beside.output
    assert len(confirm_runs()) == runs_before and mlflow.get_run(paused.info.run_id).info.status == "KILLED"

    training.unlock()  # that process ends; the seed resumes and finishes here
    assert f"resuming run {paused.info.run_id}" in CliRunner().invoke(cli, args).output
    monkeypatch.setattr(bench.confirm, "finished_keys", lambda *_: set())  # listed as to run just before another process finished it
    late = CliRunner().invoke(cli, args)
    assert late.exit_code == 0 and f"skipped: finished meanwhile by another process (run {paused.info.run_id})" in late.output, late.output
    assert len(confirm_runs()) == runs_before


def test_a_seed_cut_off_on_one_machine_resumes_on_another_once_its_heartbeat_is_stale(study, monkeypatch, tmp_path):
    """The checkpoint travels on the MLflow run: a machine with an empty checkpoint folder resumes the
    seed from it, but not while the run's heartbeat says another host is still training it."""
    args = ["confirm", "--norm", "bn", "--seeds", "1", "--epochs", "2", "--threads", "1", "--set", "label_smoothing=0.1"]
    interrupt_in_epoch(monkeypatch, 2)
    assert CliRunner().invoke(cli, args).exit_code == 130
    monkeypatch.undo()
    [cut] = [r for r in confirm_runs() if "label_smoothing" in r.data.tags["bench.recipe"]]
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(cut.info.run_id, "checkpoint")] == [f"checkpoint/{cut.info.run_id}.pt"]
    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path / "another-machine"))

    client.update_run(cut.info.run_id, status="RUNNING")  # as a machine that is still training it, or vanished
    client.set_tag(cut.info.run_id, handover.TAG_WORKER, "elsewhere:4242")
    client.set_tag(cut.info.run_id, handover.TAG_HEARTBEAT, f"{time.time() - 60:.0f}")
    beside = CliRunner().invoke(cli, args)
    assert beside.exit_code == 0, beside.output
    assert f"skipped: elsewhere:4242 is training it (run {cut.info.run_id}, last heartbeat 1 min ago" in beside.output
    assert len([r for r in confirm_runs() if "label_smoothing" in r.data.tags["bench.recipe"]]) == 1

    client.set_tag(cut.info.run_id, handover.TAG_HEARTBEAT, f"{time.time() - 60 * (handover.stale_minutes() + 1):.0f}")
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming run {cut.info.run_id} after epoch 1/2" in resumed.output
    run = mlflow.get_run(cut.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[handover.TAG_WORKER].endswith(f":{os.getpid()}")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == [1, 2]
    assert client.list_artifacts(run.info.run_id, "checkpoint") == []  # finished: the shared checkpoint is gone
    assert not list((tmp_path / "another-machine").iterdir())


def test_a_run_counts_as_alive_elsewhere_only_running_on_another_host_with_a_recent_heartbeat():
    from types import SimpleNamespace

    def run(status, worker, minutes_ago):
        tags = {handover.TAG_WORKER: worker, handover.TAG_HEARTBEAT: str(time.time() - 60 * minutes_ago)}
        return SimpleNamespace(info=SimpleNamespace(status=status, run_id="r1"), data=SimpleNamespace(tags=tags))

    assert "other:7 is training it" in handover.alive_elsewhere(run("RUNNING", "other:7", 2))
    assert handover.alive_elsewhere(run("RUNNING", "other:7", handover.stale_minutes() + 1)) is None  # its machine is gone
    assert handover.alive_elsewhere(run("KILLED", "other:7", 2)) is None  # ended: free to resume
    assert handover.alive_elsewhere(run("RUNNING", f"{socket.gethostname()}:7", 2)) is None  # this host: the file lock decides
    assert handover.alive_elsewhere(run("RUNNING", "", 2)) is None  # from before heartbeats


def test_of_two_machines_that_start_one_seed_at_once_the_later_gives_way(study, monkeypatch):
    """Both create a run before seeing the other's; the one created later is deleted unrun."""
    args = ["confirm", "--norm", "bn", "--seeds", "1", "--epochs", "1", "--threads", "1", "--set", "dropout=0.1"]
    rivals = []

    def race(record, kind, key):  # the other machine creates its run just after this one looked
        rival = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("bn").experiment_id, run_name="confirm-seed-0", tags={
            **{k: str(v) for k, v in key.items()}, "bench.kind": kind, records.TAG_SOURCE_RUN: record.best.info.run_id,
            handover.TAG_WORKER: "elsewhere:4242", handover.TAG_HEARTBEAT: f"{time.time():.0f}"})
        rivals.append(rival)
        return None  # looked before the rival's run existed

    monkeypatch.setattr(bench.confirm, "taken", race)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    [rival] = rivals
    assert f"skipped: elsewhere:4242 started it a moment earlier (run {rival.info.run_id})" in result.output
    mine = [r for r in confirm_runs() if "dropout" in r.data.tags["bench.recipe"]]
    assert [r.info.run_id for r in mine] == [rival.info.run_id]  # this machine's run is deleted, the rival's untouched
    assert mlflow.get_run(rival.info.run_id).info.status == "RUNNING"


def test_a_bad_stale_minutes_setting_is_one_line_naming_it(study, monkeypatch):
    for bad in ("soon", "0", "-5", "inf"):
        monkeypatch.setenv("BENCH_STALE_MINUTES", bad)
        result = CliRunner().invoke(cli, ["confirm", "--norm", "bn", "--seeds", "1", "--epochs", "2", "--threads", "1"])
        assert result.exit_code == 2 and f"error: BENCH_STALE_MINUTES='{bad}': expected a positive number of minutes" in result.output, result.output
        assert "Traceback" not in result.output


def test_only_a_live_rival_started_earlier_makes_a_new_run_give_way():
    from types import SimpleNamespace

    def run(run_id, start, worker, status="RUNNING", minutes_ago=1):
        tags = {handover.TAG_WORKER: worker, handover.TAG_HEARTBEAT: str(time.time() - 60 * minutes_ago)}
        return SimpleNamespace(info=SimpleNamespace(status=status, run_id=run_id, start_time=start), data=SimpleNamespace(tags=tags))

    mine = run("m", 100, handover.worker_id())
    earlier, later = run("a", 99, "other:1"), run("b", 101, "other:2")
    assert handover.earlier_claim(mine, [mine, later, earlier]) is earlier
    assert handover.earlier_claim(mine, [mine, later]) is None  # the later one gives way, not this one
    assert handover.earlier_claim(mine, [run("a", 99, "other:1", status="KILLED")]) is None  # ended: resumable, not a rival
    assert handover.earlier_claim(mine, [run("a", 99, "other:1", minutes_ago=handover.stale_minutes() + 1)]) is None  # machine gone
    assert handover.earlier_claim(mine, [run("a", 100, "other:1")]).info.run_id == "a"  # same millisecond: the run id decides
    dead_here = run("a", 99, f"{socket.gethostname()}:999999999")
    assert handover.earlier_claim(mine, [dead_here]) is None  # this host, its process gone


def test_a_lost_tracking_server_outside_a_study_is_one_error_saying_what_is_kept():
    import requests

    from bench import faults
    from bench.errors import ConfigError, TrackingError

    with pytest.raises(TrackingError, match=r"^lost the MLflow tracking server http://host:5000 \(ConnectionError: refused\); seeds kept; re-run"):
        with faults.tracking_lost("http://host:5000", "seeds kept"):
            raise requests.exceptions.ConnectionError("refused")
    with pytest.raises(ConfigError):  # the harness's own errors pass as they are
        with faults.tracking_lost("http://host:5000", "seeds kept"):
            raise ConfigError("bad value")
    with pytest.raises(ValueError):  # and so do bugs, with their traceback
        with faults.tracking_lost("http://host:5000", "seeds kept"):
            raise ValueError("a bug")
