"""``bench tune --jobs K``: K local worker processes on one study, each with an equal share of the cores.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console

from .. import faults, tracking, workers
from ..config import Experiment
from ..errors import ConfigError, TrackingError
from .recovery import end_runs_of_failed_trials, finished_count, fail_dead_local_trials, recover
from .options import TuneOptions, worker_environment
from .storage import storage_label
from .study import finish_parent, open_study_parent, prepare_study, print_where, study_target
from .objective import registry_name
from .space import trial_epochs
from .summary import print_outcome


def auto_jobs(opts: TuneOptions) -> int:
    """``--jobs auto``: one single-threaded worker per core. Measured on 2 cores (README, "Parallel
    and distributed studies"): 2 workers x 1 thread trained 1.54x the images/s of 1 worker x 2
    threads. One worker where workers cannot share the study (SQLite) or would share one GPU."""
    return workers.auto_jobs(opts.device, opts.threads, shareable=not (opts.storage or "").startswith("sqlite"))


def run_workers(exp: Experiment, opts: TuneOptions, worker_argv: list[str], jobs: int, console: Console | None = None) -> None:
    """Start ``jobs`` worker processes on one study, each with an equal share of the cores,
    all nesting their trials under one parent run."""
    console = console or Console()
    if opts.storage and opts.storage.startswith("sqlite"):
        raise ConfigError("--jobs needs a storage safe for concurrent writers: the default journal file or postgresql://...; not SQLite")
    uri = tracking.setup(opts.tracking_uri)
    study, _ = prepare_study(exp, opts)  # created once here, so workers do not race to create it
    recovered, requeued = recover(study)  # here once, not in every worker: each failed trial is re-queued once
    done, target = study_target(study, exp, opts)
    parent_id, _ = open_study_parent(study, exp, opts, target, {"bench.jobs": jobs})
    threads = workers.threads_per_worker(jobs, opts.threads)
    # The total is fixed here: with --more, workers starting at different moments would each add N.
    cmd = [sys.executable, "-m", "bench.cli", "tune", *worker_argv, "--trials", str(target), "--jobs", "1", "--threads", str(threads)]
    console.print(f"starting {jobs} workers x {threads} thread(s) on study '{study.study_name}' ({done} of {target} trials finished"
                  + (f"; recovered dead worker trial(s) {recovered}" if recovered else "")
                  + (f"; re-queued failed trial(s) {requeued}" if requeued else "") + ")")
    start = time.time()
    env = worker_environment(opts.storage, uri)
    codes, interrupted = workers.run_all([cmd] * jobs, [{**env, "BENCH_PARENT_RUN_ID": parent_id, "BENCH_WORKER_INDEX": str(i),
                                                   "BENCH_LONE_THREADS": str(threads * jobs)} for i in range(jobs)])
    status = "KILLED" if interrupted else "FINISHED"
    try:
        recovered = fail_dead_local_trials(study)  # trials of workers killed outright (kill -9, OOM)
        end_runs_of_failed_trials(study)
        done = finished_count(study)
    except Exception as err:  # the workers each said what they lost; the launcher says it once more, in one line
        raise TrackingError(f"{faults.lost_store_message(err, storage_label(opts.storage), tracking.mask_url(uri))} "
                            f"(worker exit codes {codes})") from None
    if status == "FINISHED" and any(codes):
        if done < target:
            status = "FAILED"
        else:
            console.print(f"worker exit codes {codes}: the others re-ran what the failed worker left; the study has its {target} trials")
    epochs = trial_epochs(exp, opts)
    finish_parent(study, parent_id, status, time.time() - start, console, epochs)
    if status == "KILLED":
        raise KeyboardInterrupt
    print_outcome(study, console, exp.model.norm, epochs, registry_name(study.study_name), exp.name)
    print_where(study, parent_id, uri, console)
    if status == "FAILED":
        raise TrackingError(f"{sum(bool(c) for c in codes)} of {jobs} workers failed (exit codes {codes}); {done} of {target} trials finished"
                            + (f", dead workers' trial(s) {recovered} re-queued" if recovered else "") + "; re-run the same command to resume")


# Set by run_workers for each worker; the storage URL and tracking URI go through the environment
# (a password in them would show in `ps` to every user of the machine).
VALUE_OPTIONS = ("--jobs", "--threads", "--norm", "--trials", "--storage", "--storage-file", "--tracking-uri")


FLAG_OPTIONS = ("--more",)


def worker_argv(argv: list[str], norm: str) -> list[str]:
    """The user's ``bench tune`` arguments for one worker: this norm, without --jobs/--threads/--trials/--more
    and without the storage and tracking URIs (``worker_environment`` carries them)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in VALUE_OPTIONS:
            skip = "=" not in arg
            continue
        if name in FLAG_OPTIONS:
            continue
        out.append(arg)
    return [*out, "--norm", norm]
