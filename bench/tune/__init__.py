"""Optuna studies: one per experiment and norm, every trial a nested MLflow run.

- ``options``: what the command line asked for (``TuneOptions``);
- ``storage``: the Optuna storage (journal file by default, any storage URL);
- ``space``: sampler, pruner, search space and the resume checks;
- ``objective``: one trial, budget check to trained model;
- ``recovery``: which trials count, and re-queueing of dead or interrupted ones;
- ``study``: the run loop shared by one or several workers;
- ``launch``: ``--jobs K`` local worker processes;
- ``summary``: best trials, counts and plots for the console and the parent run.
"""

from .launch import auto_jobs, run_workers, worker_argv
from .options import TuneOptions
from .space import create_pruner, create_sampler, search_distributions, suggest
from .storage import open_storage
from .study import prepare_study, run_study
from .summary import best_table, best_trials_markdown

__all__ = ["TuneOptions", "auto_jobs", "best_table", "best_trials_markdown", "create_pruner", "create_sampler", "open_storage",
           "prepare_study", "run_study", "run_workers", "search_distributions", "suggest", "worker_argv"]
