"""Faults against the real components (issue 15): a killed `mlflow server`, a stopped PostgreSQL with
``--jobs 2``, a full disk, a torn journal, two studies started at once on a fresh store, and the
retry cap. Each costs one line and no data, and after the same command resumes, Optuna and MLflow
agree trial for trial with no configuration run twice.

Every test runs ``bench tune`` as real processes on a tiny real slice (tests/test_distributed.py).
The mlflow-server test starts a server of its own (it kills it); the PostgreSQL test stops and
restarts the database of ``.ci/services.sh`` (``$BENCH_SERVICES_DIR``); the disk test mounts a
small tmpfs (root only, skipped otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from bench import tracking
from bench.tune import open_storage
from test_distributed import REPO, TINY, Worker, data_dir, check_one_study, mlflow_runs, study_name, tune_cmd, wait_for_line

PATIENCE = 600  # seconds a run may take on a loaded machine (each takes well under a minute on an idle one)
MLFLOW_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


@pytest.fixture(autouse=True)
def no_process_left(monkeypatch):
    """Every ``bench tune`` a test started is ended with it, even when the test fails half way."""
    started = []
    original = Worker.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(Worker, "__init__", init)
    yield
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` in its own process group (so SIGKILL takes its workers too)."""
    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")]
    proc = subprocess.Popen(cmd, stdout=(folder / "server.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + PATIENCE
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    kill_group(proc)
    pytest.fail(f"mlflow server did not answer in {PATIENCE} s")


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(PATIENCE)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def assert_stores_agree(study: optuna.Study, runs: list) -> None:
    """Every trial that ran is in MLflow once, in the same state; nothing left RUNNING anywhere."""
    by_number = {int(r.data.tags[tracking.TAG_TRIAL]): r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        run = by_number.get(t.number)
        assert run is not None, f"trial {t.number} ({t.state.name}) has no MLflow run"
        expected = "KILLED" if t.user_attrs.get("interrupted") else MLFLOW_STATUS[t.state]
        assert run.info.status == expected, (t.number, t.state.name, run.info.status, run.data.tags.get(tracking.TAG_ERROR))
        if t.state == TrialState.FAIL:
            assert run.data.tags.get(tracking.TAG_ERROR), f"trial {t.number}'s run FAILED without a reason"


def assert_each_failure_rerun_once(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.FAIL and not t.user_attrs.get("surplus"):
            retries = [r.number for r in trials if r.user_attrs.get("retry_of") == t.number]
            assert len(retries) == 1, f"trial {t.number} re-queued as {retries}"


# ---------------------------------------------------------------- tracking server lost


def test_killed_tracking_server_is_one_line_in_seconds_and_the_resume_fails_the_lost_run(tmp_path):
    port = free_port()
    server = start_mlflow_server(tmp_path / "server", port)
    uri = f"http://127.0.0.1:{port}"
    cmd = tune_cmd("--tracking-uri", uri, "--trials", "2", epochs=2)
    try:
        first = Worker(cmd, tmp_path, "first")
        wait_for_line([first], "epoch   1/2", PATIENCE)
        kill_group(server)
        killed_at = time.time()
        assert first.wait(120) == 2, first.output
        seconds = time.time() - killed_at
        out = first.output
        assert "Traceback" not in out
        assert f"warning: tracking server {uri} unreachable, retrying" in out
        assert error_lines(out) == [line for line in out.splitlines() if f"lost the MLflow tracking server {uri}" in line], out
        assert len(error_lines(out)) == 1 and seconds < 45, (seconds, out)

        server = start_mlflow_server(tmp_path / "server", port)
        second = Worker(cmd, tmp_path, "second")
        assert second.wait(PATIENCE) == 0, second.output
        assert "re-queued failed trial(s) [0]" in second.output

        study = optuna.load_study(study_name="bn", storage=open_storage(str(tmp_path / "mlruns/optuna.journal")))
        runs = mlflow_runs(uri, "bn")
        lost = study.trials[0]
        assert lost.state == TrialState.FAIL and "Connection refused" in lost.user_attrs["fail_reason"]
        check_one_study(study, runs, 2)  # one parent (the resume joined the one left open), both trials once
        assert_stores_agree(study, runs)
        assert_each_failure_rerun_once(study)
        lost_run = next(r for r in runs if r.data.tags.get(tracking.TAG_TRIAL) == "0")
        assert "Connection refused; configuration re-queued" in lost_run.data.tags[tracking.TAG_ERROR]
        print("\n" + json.dumps({"fault": "mlflow server SIGKILLed mid-trial", "seconds_to_error": round(seconds, 1),
                                 "console": out.splitlines()[-3:], "after_resume": trial_table(study, runs)}, indent=2))
    finally:
        kill_group(server)


def test_killed_tracking_server_mid_confirm_is_one_line_and_the_seed_resumes_from_its_last_epoch(tmp_path):
    port = free_port()
    server = start_mlflow_server(tmp_path / "server", port)
    uri = f"http://127.0.0.1:{port}"
    try:
        assert Worker(tune_cmd("--tracking-uri", uri, "--trials", "1"), tmp_path, "tune").wait(PATIENCE) == 0
        shutil.copytree(REPO / "experiments", tmp_path / "experiments")  # confirm reads the study's experiment file
        confirm = [sys.executable, "-m", "bench.cli", "confirm", "--norm", "bn", "--seeds", "1", "--epochs", "3",
                   "--data-dir", data_dir(), *TINY, "--tracking-uri", uri]
        first = Worker(confirm, tmp_path, "first")
        wait_for_line([first], "epoch   1/3", PATIENCE)
        kill_group(server)
        assert first.wait(120) == 2, first.output
        out = first.output
        assert "Traceback" not in out and len(error_lines(out)) == 1, out
        assert f"lost the MLflow tracking server {uri}" in error_lines(out)[0] and "continues from its last epoch" in out
        [checkpoint] = (tmp_path / "mlruns" / "checkpoints").glob("*.pt")

        server = start_mlflow_server(tmp_path / "server", port)
        second = Worker(confirm, tmp_path, "second")
        assert second.wait(PATIENCE) == 0, second.output
        assert f"resuming run {checkpoint.stem} after epoch" in second.output
        [run] = [r for r in mlflow_runs(uri, "bn") if r.data.tags.get(tracking.TAG_KIND) == "confirm"]
        assert run.info.run_id == checkpoint.stem and run.info.status == "FINISHED" and "test_acc" in run.data.metrics
        steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(set(steps)) == [1, 2, 3]
        assert not checkpoint.exists()
    finally:
        kill_group(server)


def trial_table(study: optuna.Study, runs: list) -> list[dict]:
    by_number = {r.data.tags.get(tracking.TAG_TRIAL): r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"}
    rows = []
    for t in study.get_trials(deepcopy=False):
        run = by_number.get(str(t.number))
        rows.append({"trial": t.number, "optuna": t.state.name, "retry_of": t.user_attrs.get("retry_of"),
                     "mlflow": run.info.status if run else None, "error": run.data.tags.get(tracking.TAG_ERROR, "")[:120] if run else None})
    return rows


# ---------------------------------------------------------------- PostgreSQL lost, --jobs 2


def pg_ctl(*args: str) -> subprocess.CompletedProcess:
    bin_dir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    data = Path(os.environ.get("BENCH_SERVICES_DIR", "/tmp/bench-services")) / "pg"
    cmd = [str(bin_dir / "pg_ctl"), "-D", str(data), *args]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def steady_bn_experiment(folder: Path) -> Path:
    """bn.toml with a learning rate low enough (0.02-0.04) that a 300-image trial learns slowly and steadily.
    At bn.toml's 0.1 the baseline's validation fell from 35% to chance at the one-cycle peak on an AVX2-only
    CPU (float32; BatchNorm's running statistics lag at three steps an epoch), so its re-run ended `collapsed`
    and the test failed on the machine, not on the fault handling."""
    text = (REPO / "experiments/bn.toml").read_text()
    text = text.replace("lr = 0.1\n", "lr = 0.03\n").replace("[search.lr]\nlow = 0.02\nhigh = 0.4", "[search.lr]\nlow = 0.02\nhigh = 0.04")
    assert "lr = 0.03\n" in text and "high = 0.04" in text, "experiments/bn.toml changed: update steady_bn_experiment"
    path = folder / "bn_steady.toml"
    path.write_text(text)
    return path


def test_stopped_postgres_with_jobs_2_is_one_line_per_process_and_each_trial_reruns_once(servers, tmp_path):
    pg, server = servers
    name = study_name("pglost")
    # No pruner: a trial pruned before the stop would let its worker start a third, and the stop must find
    # trials 0 and 1 running.
    cmd = tune_cmd("--storage", pg, "--study", name, "--tracking-uri", server, "--trials", "2", "--jobs", "2",
                   "-e", str(steady_bn_experiment(tmp_path)), "--pruner", "none", epochs=20)
    launcher = Worker(cmd, tmp_path, "launcher")
    deadline = time.time() + PATIENCE
    # Both workers mid-trial. The second starts a second or two after the first, so the trials are
    # long enough that the first is still training when the second reports its first epoch.
    while launcher.output.count("epoch   1/20") < 2:
        assert time.time() < deadline and launcher.proc.poll() is None, launcher.output
        time.sleep(0.2)
    stopped = pg_ctl("stop", "-m", "immediate", "-w")
    stopped_at = time.time()
    try:
        assert stopped.returncode == 0, stopped.stderr
        assert launcher.wait(120) == 2, launcher.output
        seconds = time.time() - stopped_at
    finally:
        started = subprocess.run([str(REPO / ".ci/services.sh"), "start"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
    out = launcher.output
    masked = tracking.mask_url(pg)
    assert "Traceback" not in out and "Exception in thread" not in out, out
    errors = error_lines(out)
    assert len(errors) == 3 and all(f"lost the Optuna storage {masked}" in e for e in errors), out  # 2 workers, the launcher
    assert seconds < 60, seconds

    again = Worker(cmd, tmp_path, "again")
    assert again.wait(PATIENCE) == 0, again.output
    assert "recovered dead worker trial(s) [0, 1]" in again.output
    study = optuna.load_study(study_name=name, storage=open_storage(pg))
    runs = mlflow_runs(server, name)
    check_one_study(study, runs, 2)  # 2 distinct configurations, nothing RUNNING, one parent
    assert_each_failure_rerun_once(study)
    assert_stores_agree(study, runs)
    print("\n" + json.dumps({"fault": "PostgreSQL stopped -m immediate, --jobs 2", "seconds_to_error": round(seconds, 1),
                             "console": errors, "after_resume": trial_table(study, runs)}, indent=2))


# ---------------------------------------------------------------- disk full


@pytest.fixture
def small_mlruns(tmp_path) -> Path:
    """``mlruns/`` on a real 16 MB filesystem (tmpfs). ``fill`` takes what is free; with the space back
    the resume must fit three trials' models and the parent's summary (3 MB did not, with a wide model drawn)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = tmp_path / "mlruns"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem; returns the file to delete for space back."""
    ballast = folder / "ballast"
    with ballast.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return ballast


def test_full_disk_stops_the_study_in_one_line_and_it_resumes_with_space_back(tmp_path, small_mlruns):
    cmd = tune_cmd("--trials", "3", epochs=2)
    full = Worker(cmd, tmp_path, "full")
    wait_for_line([full], "epoch   1/2", PATIENCE)
    ballast = fill(small_mlruns)  # the disk fills up mid-trial
    filled_at = time.time()
    assert full.wait(PATIENCE) == 2, full.output
    seconds = time.time() - filled_at
    out = full.output
    assert "Traceback" not in out, out
    assert len(error_lines(out)) == 1 and error_lines(out)[0].startswith("error: disk full"), out
    assert out.strip().splitlines()[-1] == error_lines(out)[0]

    ballast.unlink()  # space back
    resumed = Worker(cmd, tmp_path, "resumed")
    assert resumed.wait(PATIENCE) == 0, resumed.output
    study = optuna.load_study(study_name="bn", storage=open_storage(str(tmp_path / "mlruns/optuna.journal")))
    runs = mlflow_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "bn")
    check_one_study(study, runs, 3)
    assert_stores_agree(study, runs)
    assert_each_failure_rerun_once(study)
    print("\n" + json.dumps({"fault": "mlruns/ on a 16 MB tmpfs, filled mid-trial", "seconds_to_error": round(seconds, 1),
                             "console": error_lines(out), "resume_console": resumed.output.splitlines()[:1],
                             "after_resume": trial_table(study, runs)}, indent=2))


# ---------------------------------------------------------------- torn journal


def test_torn_journal_record_is_dropped_with_a_backup_and_every_finished_trial_kept(tmp_path):
    assert Worker(tune_cmd("--trials", "2"), tmp_path, "first").wait(PATIENCE) == 0
    journal = tmp_path / "mlruns/optuna.journal"
    before = optuna.load_study(study_name="bn", storage=open_storage(str(journal))).trials
    whole = journal.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    journal.write_bytes(whole + last[: len(last) // 2])  # a write cut off half way (crash, full disk)
    torn_size = journal.stat().st_size

    resumed = Worker(tune_cmd("--trials", "3"), tmp_path, "resumed")
    assert resumed.wait(PATIENCE) == 0, resumed.output
    n_lines = whole.count(b"\n")
    assert (f"Optuna journal mlruns/optuna.journal had 1 torn record(s), a write cut off by a crash or a full disk: "
            f"line {n_lines + 1} at byte {len(whole):,} ({len(last) // 2:,} bytes)") in resumed.output
    backups = list(journal.parent.glob("optuna.journal.torn-*"))
    assert len(backups) == 1 and backups[0].stat().st_size == torn_size
    study = optuna.load_study(study_name="bn", storage=open_storage(str(journal)))
    after = study.trials
    assert len([t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3
    for old, new in zip(before, after):
        assert (old.number, old.state, old.params, old.value) == (new.number, new.state, new.params, new.value)
    assert_stores_agree(study, mlflow_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "bn"))


# ---------------------------------------------------------------- two studies at once


def test_two_studies_started_at_once_on_a_fresh_store_both_run(tmp_path):
    workers = [Worker(tune_cmd("--trials", "1", "--norm", norm, "-e", str(REPO / f"experiments/{norm}.toml")), tmp_path, norm)
               for norm in ("bn", "gn", "ln")]  # the last --norm and -e win
    codes = [w.wait(PATIENCE) for w in workers]
    assert codes == [0, 0, 0], "\n\n".join(w.output for w in workers)
    for norm in ("bn", "gn", "ln"):
        study = optuna.load_study(study_name=norm, storage=open_storage(str(tmp_path / "mlruns/optuna.journal")))
        check_one_study(study, mlflow_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", norm), 1)


# ---------------------------------------------------------------- retry cap


def test_a_configuration_that_always_kills_its_worker_is_marked_failed_after_the_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_MAX_RETRIES", "1")  # two tries
    cmd = tune_cmd("--trials", "2", "--pruner", "none", epochs=2)
    victims = []
    for attempt in range(2):  # the poisoned configuration: its worker dies mid-trial, every time
        run = Worker(cmd, tmp_path, f"killed{attempt}")
        _, line = wait_for_line([run], "epoch   1/2", PATIENCE)
        victims.append(int(line.split()[1]))
        run.proc.send_signal(signal.SIGKILL)
        run.wait(PATIENCE)
    assert victims == [0, 1]

    last = Worker(cmd, tmp_path, "last")
    assert last.wait(PATIENCE) == 0, last.output
    assert "trial   1  params" in last.output and "FAILED after 2 tries (trials 0, 1): worker" in last.output
    assert "configuration marked failed, not re-queued (BENCH_MAX_RETRIES=1)" in last.output
    study = optuna.load_study(study_name="bn", storage=open_storage(str(tmp_path / "mlruns/optuna.journal")))
    t0, t1, t2 = study.trials
    assert t0.state == t1.state == TrialState.FAIL and t0.params == t1.params
    assert t1.system_attrs["retry_history"] == [0] and t1.user_attrs["retry_of"] == 0
    assert t2.state == TrialState.COMPLETE and t2.params != t0.params  # the study went on, and finished
    runs = mlflow_runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "bn")
    capped = next(r for r in runs if r.data.tags.get(tracking.TAG_TRIAL) == "1")
    assert capped.info.status == "FAILED" and capped.data.tags["bench.retries_exhausted"] == "2"
    assert "retries used up: 2 tries failed (trials 0, 1)" in capped.data.tags[tracking.TAG_ERROR]
    parent = next(r for r in runs if r.data.tags[tracking.TAG_KIND] == "study" and r.info.lifecycle_stage == "active")
    assert parent.info.status == "FINISHED"
    assert_stores_agree(study, runs)


def test_a_trial_re_queued_twice_runs_once(isolated_mlruns):
    """Two processes that find the same failed trial at once may both re-queue it: the first retry
    popped runs, the second is skipped unrun."""
    journal = isolated_mlruns / "mlruns/optuna.journal"
    study = optuna.create_study(study_name="bn", storage=open_storage(str(journal)))
    failed = optuna.trial.create_trial(state=TrialState.FAIL, params={"lr": 0.1}, user_attrs={"interrupted": True},
                                       distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)})
    study.add_trial(failed)
    from bench.tune.recovery import guard, requeue_interrupted

    other = optuna.load_study(study_name="bn", storage=open_storage(str(journal)))
    assert requeue_interrupted(study) == [0]
    other._storage.get_trial(0)  # a second process that read the trials before the first re-queue
    other.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params={"lr": 0.1}, distributions=failed.distributions,
                                              user_attrs={"retry_of": 0}))
    ran = []
    from rich.console import Console

    study.optimize(guard(lambda trial: ran.append(trial.number) or trial.suggest_float("lr", 0.01, 1), Console()), n_trials=2,
                   catch=(Exception,))
    assert ran == [1]
    assert study.trials[2].state == TrialState.FAIL and study.trials[2].user_attrs["duplicate_of"] == 1
