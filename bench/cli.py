"""The ``bench`` command line: a thin click layer over the library functions."""

from __future__ import annotations

import dataclasses
import sys

import click
from rich.console import Console

from . import config as config_mod
from .cli_options import (POSITIVE, SEED, FiniteFloat, Hyperparameter, OneLineErrors, PresetOption, data_options,
                          experiment_options, friendly_errors, load_experiment, runtime_options)
from .errors import BenchError

# Logs piped to a file get full-width lines and tables instead of the 80-column default.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bench")
def cli():
    """Experiment-tracked benchmarking of small CNNs on CIFAR-10."""
    from . import settings

    try:
        settings.check()
    except BenchError as err:  # one line, exit 2, like the commands' own errors
        bad_setting = click.ClickException(str(err))
        bad_setting.exit_code = 2
        raise bad_setting from None


@cli.command()
@experiment_options
@friendly_errors
def summary(experiment_file, norm, assignments, **values):
    """Per-layer table (output shape, parameters) and whether the model fits the budget."""
    from .models import count_params, create_model, make_summary

    exp = load_experiment(experiment_file, norm, assignments, **values)
    model = create_model(**dataclasses.asdict(exp.model))
    console.print(make_summary(model))
    n, budget = count_params(model), exp.budget.max_params
    verdict = "[green]within[/]" if n <= budget else "[red]OVER[/]"
    console.print(f"{exp.model.preset} {model_settings(exp.model)}: {n:,} parameters, {verdict} the budget of {budget:,}")


def model_settings(model: config_mod.ModelConfig) -> str:
    """``norm=gn groups=8 dropout=0.1``: the norm and every model field not at its default (what --set changed)."""
    defaults = config_mod.ModelConfig()
    changed = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
               if f.name not in ("preset", "norm") and getattr(model, f.name) != getattr(defaults, f.name)}
    return " ".join(f"{k}={v}" for k, v in {"norm": model.norm, **changed}.items())


@cli.command()
@experiment_options
@data_options
@click.option("--save", type=click.Path(dir_okay=False), help="Write the trained model (checkpoint with its config) here.")
@runtime_options
@click.option("--no-track", is_flag=True, help="Do not log this run to MLflow.")
@friendly_errors
def train(experiment_file, norm, assignments, data_dir, download, save, device, threads, tracking_uri, no_track, **values):
    """Train one model and report train/val/test accuracy, time and images/s."""
    from .run import run_training

    exp = load_experiment(experiment_file, norm, assignments, **values)
    run_training(
        exp, data_dir=data_dir, download=download, save=save, device=device, threads=threads,
        tracking_uri=None if no_track else (tracking_uri or ""), console=console,
    )


@cli.command()
@experiment_options
@data_options
@click.option("--trials", type=POSITIVE, help="Trials in the study in total (re-running resumes up to this); default from the experiment.")
@click.option("--more", is_flag=True, help="Run --trials more trials instead of topping the study up to --trials.")
@click.option("--study", help="Optuna study and MLflow experiment name (default: the experiment's name).")
@click.option("--storage", envvar="BENCH_STORAGE", show_envvar=True,
              help="Optuna storage URL (default: journal file mlruns/optuna.journal). With a password, prefer $BENCH_STORAGE "
                   "or --storage-file: a command line shows in `ps` to every user.")
@click.option("--storage-file", envvar="BENCH_STORAGE_FILE", show_envvar=True, type=click.Path(dir_okay=False),
              help="Read the storage URL from this file (mode 600, one line).")
@click.option("--timeout", type=FiniteFloat(0, min_open=True), help="Stop starting new trials after this many seconds.")
@click.option("--pruner", type=click.Choice(config_mod.PRUNERS), help="Pruner (default from the experiment).")
@click.option("--tune-epochs", "tune_epochs", type=POSITIVE, help="Epochs per trial (default: [tune] epochs).")
@runtime_options
@click.option("--jobs", default="auto", show_default=True, help="Local worker processes on the study: an integer, or auto (one single-threaded worker per core where the storage allows it).")
@friendly_errors
def tune(experiment_file, norm, assignments, data_dir, download, trials, more, study, storage, storage_file, timeout, pruner,
         tune_epochs, device, threads, tracking_uri, jobs, epochs, seed, **values):
    """Optuna study over the experiment's search space; every trial a nested MLflow run.

    --norm all runs one study per norm (bn, gn, ln) in turn. --epochs sets epochs per trial.
    """
    from .tune import TuneOptions, auto_jobs, run_study, run_workers, worker_argv
    from .tune.options import resolve_storage

    storage = resolve_storage(storage, storage_file)
    norms = config_mod.STUDY_NORMS if norm == "all" else (norm,)
    for one in norms:
        exp = load_experiment(experiment_file, one, assignments, **values)
        opts = TuneOptions(trials=trials, more=more, epochs=tune_epochs or epochs, study=study if len(norms) == 1 else None,
                           storage=storage, timeout=timeout, seed=seed or 0, pruner=pruner, tracking_uri=tracking_uri,
                           data_dir=data_dir, download=download, threads=threads, device=device)
        n_jobs = parse_jobs(jobs) or auto_jobs(opts)
        if n_jobs > 1:
            run_workers(exp, opts, worker_argv(sys.argv[2:], exp.model.norm), n_jobs, console)
        else:
            run_study(exp, opts, console)


@cli.command()
@click.option("--study", "studies", required=True, multiple=True, help="A study whose trials trained every epoch (e.g. one run with --pruner none); repeat to pool studies of one procedure.")
@click.option("--storage", help="Optuna storage URL (default: journal file mlruns/optuna.journal).")
@click.option("--reduction-factor", default=3, show_default=True, type=click.IntRange(2), help="Successive halving's cut: the best 1/N go on.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the table to this JSON file.")
@friendly_errors
def rungs(studies, storage, reduction_factor, json_path):
    """How well each epoch's validation accuracy ranks a study's trials as their final result does (Spearman)."""
    import json
    from pathlib import Path

    from .tune.rungs import rank_correlations, render_rungs
    from .tune.storage import load_existing_study

    result = rank_correlations([load_existing_study(name, storage) for name in studies], reduction_factor)
    render_rungs(result, console)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--tracking-uri", help="Backend store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db).")
@friendly_errors
def ui(host, port, tracking_uri):
    """Serve the MLflow UI on the project's store."""
    from .servers import serve_ui

    serve_ui(host, port, tracking_uri, echo=console.print)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--storage", help="Optuna storage URL (default: journal file mlruns/optuna.journal).")
@friendly_errors
def dashboard(host, port, storage):
    """Serve optuna-dashboard on the project's Optuna store (pip install 'bench[dashboard]')."""
    from .servers import serve_dashboard

    serve_dashboard(host, port, storage, echo=console.print)


@cli.command()
@click.option("--norm", type=click.Choice(config_mod.NORMS), default="bn", show_default=True)
@click.option("--preset", cls=PresetOption, help="Default: seed_gn for lnchw, else seed_bn.")
@click.option("--steps", type=POSITIVE, default=50, show_default=True, help="Training steps per repeat and contender.")
@click.option("--repeats", type=POSITIVE, default=5, show_default=True, help="Interleaved repeats; the median is reported.")
@click.option("--batch-size", type=Hyperparameter("batch_size"), default=128, show_default=True)
@click.option("--threads", type=POSITIVE, help="CPU threads (default: the cores this process may use).")
@click.option("--workers", type=click.IntRange(0), default=2, show_default=True, help="DataLoader workers of the seed-style baseline.")
@click.option("--eval-images", type=POSITIVE, default=10_000, show_default=True, help="Test images per evaluation pass.")
@click.option("--ablate", is_flag=True, help="Also measure each optimisation alone against the seed's fp32 eager step.")
@click.option("--knob", "knobs", multiple=True, help="Limit --ablate to this knob (repeatable): bf16, channels_last, foreach, fused, dropout, batch256, batch512, compile, threads, inference_mode, eval_batch256, eval_batch1000.")
@click.option("--profile", is_flag=True, help="Also list the ops the bench training step spends its time in.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure to this JSON file.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the models, shuffling and augmentation.")
@click.option("--to-accuracy", type=FiniteFloat(0, 1, min_open=True), help="Instead: train both pipelines for --epochs with the experiment's recipe and report the wall clock to this test accuracy.")
@click.option("--epochs", type=click.IntRange(1), help="Epochs for --to-accuracy (default: the experiment's).")
@click.option("--widths", help="Instead: the training step at these width multipliers (e.g. 1,1.5,1.75), against the first.")
@click.option("--experiments", help="Instead: the training step of these experiments' models (e.g. resnet_bn,convnext_bn), against the "
              "first; NAME:FIELD=VALUE changes a model field, precision, channels_last or compile of one (convnext_ln:kernel=3, gated_bn:compile=true).")
@data_options
@friendly_errors
def speed(data_dir, download, json_path, knobs, to_accuracy, epochs, widths, experiments, **options):
    """Training and evaluation images/s of the harness against the seed notebooks' pipeline, interleaved."""
    from .data import load_cifar10
    from .speed import SpeedOptions, render, render_time_to_accuracy, run_speed, time_to_accuracy, write_json

    if widths or experiments:
        return width_grid(widths, experiments, data_dir, download, json_path, options)
    ablate = options.pop("ablate") or bool(knobs)
    opts = SpeedOptions(**options, knobs=tuple(knobs), ablate=ablate)
    data = load_cifar10(data_dir, download=download)
    with console.status("measuring") as status:
        if to_accuracy:
            exp = load_experiment(None, opts.norm, (), epochs=epochs, batch_size=opts.batch_size, seed=opts.seed)
            report = time_to_accuracy(data, exp.train, to_accuracy, opts.model_preset, opts.norm, opts.workers,
                                      progress=lambda message: status.update(f"training: {message}"))
        else:
            report = run_speed(opts, data, progress=lambda message: status.update(f"measuring: {message}"))
    (render_time_to_accuracy if to_accuracy else render)(report, console)
    if json_path:
        write_json(report, json_path)
        console.print(f"wrote {json_path}")


def width_grid(widths: str | None, experiments: str | None, data_dir, download, json_path, options) -> None:
    from .data import load_cifar10
    from .speed import GridOptions, render_grid, run_grid, write_json

    if widths and experiments:
        raise config_mod.ConfigError("--widths and --experiments each choose what to measure: give one of them")
    try:
        grid = tuple(config_mod.parse_value("width", w) for w in widths.split(",")) if widths else ()
    except BenchError as err:
        raise config_mod.ConfigError(f"--widths {widths!r}: {err}; expected comma-separated multipliers, e.g. 1,1.5,1.75") from None
    names = tuple(n.strip() for n in experiments.split(",") if n.strip()) if experiments else ()
    opts = GridOptions(widths=grid, experiments=names, norm=options["norm"], preset=options["preset"] or "seed_bn", steps=options["steps"],
                       repeats=options["repeats"], batch_size=options["batch_size"], threads=options["threads"], seed=options["seed"])
    data = load_cifar10(data_dir, download=download)
    with console.status("measuring") as status:
        report = run_grid(opts, data, progress=lambda message: status.update(f"measuring: {message}"))
    render_grid(report, console)
    if json_path:
        write_json(report, json_path)
        console.print(f"wrote {json_path}")


@cli.command()
@click.option("--norm", required=True, type=click.Choice((*config_mod.NORMS, "all")), help="Norm whose study to confirm; all = every studied norm.")
@click.option("--seeds", default=5, show_default=True, type=click.IntRange(1), help="Re-train with seeds 0..N-1 (seeds already done are skipped).")
@click.option("--seed", "seed_list", multiple=True, type=click.IntRange(0), help="Re-train with exactly this seed (repeatable) instead of 0..N-1: one confirmation split over cores or machines.")
@click.option("--epochs", type=click.IntRange(1), help="Epochs per run (default: the experiment file's train.epochs).")
@click.option("--study", help="Study / MLflow experiment name (default: the norm).")
@click.option("--trial", type=click.IntRange(0), help="Re-train this trial number instead of the best (the runner-up, a smaller model of the Pareto front).")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE", help="Override a hyperparameter of the best trial, e.g. --set train_subset=500 for a smoke run.")
@click.option("--jobs", default="1", show_default=True, help="Local worker processes the seeds are dealt out to (an integer, or auto: one per core).")
@data_options
@runtime_options
@friendly_errors
def confirm(norm, seeds, seed_list, epochs, study, trial, assignments, jobs, data_dir, download, device, threads, tracking_uri):
    """Re-train a study's best trial with several seeds, each an MLflow run under the study's parent run."""
    from .confirm import ConfirmOptions, run_confirm
    from .workers import auto_jobs

    opts = ConfirmOptions(seeds=seeds, seed_list=seed_list, jobs=parse_jobs(jobs) or auto_jobs(device, threads), epochs=epochs,
                          study=study, trial=trial, overrides=config_mod.parse_assignments(assignments), tracking_uri=tracking_uri,
                          data_dir=data_dir, download=download, threads=threads, device=device)
    run_confirm(norm, opts, console)


@cli.command()
@click.argument("run_id")
@click.option("--shift", "shifts", multiple=True, type=click.IntRange(1, 4), default=(1, 2), show_default=True,
              help="Pixel shifts to try with flip-TTA (repeatable).")
@data_options
@runtime_options
@friendly_errors
def rescore(run_id, shifts, data_dir, download, device, threads, tracking_uri):
    """Validation and test accuracy of a logged model under each test-time augmentation, no re-training."""
    from .console import table
    from .rescore import rescore as rescore_run

    scores = rescore_run(run_id, tuple(shifts), data_dir, download, device, threads, tracking_uri)
    console.print(table(f"run {run_id}: accuracy by test-time augmentation (choose on val)", ("TTA", "val acc", "test acc"),
                        [(name, f"{accs['val']:.2%}", f"{accs['test']:.2%}") for name, accs in scores.items()]))
    console.print("logged to the run as rescore.val_acc_<TTA> / rescore.test_acc_<TTA>")


@cli.command()
@click.option("--norms", help="Comma-separated norms, NORM=STUDY for a non-default study name, NORM=STUDY@TRIAL for a "
              "trial other than the best (default: every studied norm).")
@click.option("--tta", type=click.Choice(config_mod.tta_names()), help="Compare test accuracies under this test-time augmentation "
              "(from `bench rescore` or the runs' own ablation) instead of as each run was trained.")
@click.option("--confirm-epochs", type=click.IntRange(1), help="Compare only the confirm runs trained for this many epochs.")
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default: reports/<timestamp>).")
@click.option("--batch-sizes", help="Also train each norm's best configuration at these batch sizes (e.g. 16,64,256; lr scaled linearly).")
@click.option("--epochs", type=click.IntRange(1), help="Epochs of the --batch-sizes runs (default: the experiment file's train.epochs).")
@data_options
@runtime_options
@friendly_errors
def report(norms, tta, confirm_epochs, out, batch_sizes, epochs, data_dir, download, device, threads, tracking_uri):
    """Markdown + PNG report of the studies from MLflow, logged as a report run."""
    from .report import run_report

    sizes = parse_batch_sizes(batch_sizes)
    opts = config_mod.RuntimeOptions(tracking_uri=tracking_uri, data_dir=data_dir, download=download, threads=threads, device=device)
    run_report(norms, out, sizes, opts, console, tta, confirm_epochs, epochs)


def parse_jobs(text: str) -> int:
    """``--jobs``: a positive integer, or auto (resolved by the caller, returned as 0)."""
    if text == "auto":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise config_mod.ConfigError(f"--jobs {text!r}: expected a positive integer or auto")
    return int(text)


def parse_batch_sizes(text: str | None) -> list[int]:
    from .errors import ConfigError

    try:
        sizes = [int(part) for part in (text or "").split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes {text!r}: expected comma-separated integers, e.g. 16,64,256") from None
    if any(size < 1 for size in sizes):
        raise ConfigError(f"--batch-sizes {text!r}: batch sizes must be >= 1")
    return sizes


def main():
    cli()


if __name__ == "__main__":
    main()
