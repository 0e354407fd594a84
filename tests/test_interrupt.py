"""Ctrl-C / SIGTERM during a study: deferred to the next batch, never swallowed."""

import gc
import os
import signal
import subprocess
import sys

import mlflow
import pytest
import torch

from bench import interrupt
from bench.config import TrainConfig
from bench.data import Split
from bench.models import create_model
from bench.train import create_optimizer, create_scheduler, resolve_runtime, train_one_epoch
from conftest import fixture_data_dir


def test_first_signal_sets_the_flag_and_the_second_interrupts_at_once():
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert not interrupt.requested()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_during_a_destructor_is_not_lost():
    """Raised there, KeyboardInterrupt would be printed as 'Exception ignored' and dropped: the flag keeps it."""

    class SignalsWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    with interrupt.deferred():
        SignalsWhileCollected()
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()


def test_training_stops_at_the_next_batch_once_a_stop_is_requested():
    model = create_model("seed_bn")
    cfg = TrainConfig(batch_size=8, epochs=1)
    split = Split(torch.zeros(64, 3, 32, 32, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64))
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg, total_steps=8)
    rt = resolve_runtime(cfg, "bn", torch.device("cpu"))
    steps = []
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            train_one_epoch(model, split, optimizer, scheduler, cfg, rt, torch.Generator(), ema=None,
                            on_step=lambda *a: steps.append(a))
    assert optimizer.state == {} and not steps  # not one step was taken


def test_sigterm_ends_a_training_run_as_killed_not_running(tmp_path):
    """What `bench confirm --jobs` forwards to its workers: the run is closed in MLflow, exit 130."""
    cmd = [sys.executable, "-m", "bench.cli", "train", "--norm", "bn", "--epochs", "3", "--threads", "1",
           "--data-dir", str(fixture_data_dir()), "--set", "train_subset=3000", "--set", "val_size=200"]
    # mlflow.set_tracking_uri (earlier tests) exports MLFLOW_TRACKING_URI: the run must go to this folder's store.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    for line in proc.stdout:
        if "epoch   1/3" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]
