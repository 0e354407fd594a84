"""The command line's shared parts: option types, the option groups commands share, loading an
experiment with flags on top, and one-line errors."""

from __future__ import annotations

import functools
import math
import sys

import click

from . import config as config_mod
from .errors import BenchError


class PresetOption(click.Option):
    """``--preset``, whose help lists the registered models. The list is read when help is shown, so
    that commands start without importing torch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.note = self.help

    def get_help_record(self, ctx):
        from .models import preset_help

        self.help = " ".join(filter(None, (preset_help(), self.note)))
        return super().get_help_record(ctx)


class Hyperparameter(click.ParamType):
    """A flag for a hyperparameter, converted and checked by the rule the experiment file obeys
    (``config.RULES``), so a bad value fails before anything runs."""

    def __init__(self, field: str):
        self.field = field
        self.name = config_mod.hyperparameter_types()[field].__name__

    def convert(self, value, param, ctx):
        try:
            return config_mod.parse_value(self.field, value)
        except BenchError as err:
            self.fail(str(err).removeprefix(f"{self.field}: "), param, ctx)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass its comparisons or its open ends)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


SEED = click.IntRange(0, config_mod.SEED_MAX)
POSITIVE = click.IntRange(1)


def experiment_options(f):
    """Options shared by every command that builds a model or trains: experiment file and overrides."""
    options = [
        click.option("--experiment", "-e", "experiment_file", type=click.Path(dir_okay=False), help="Experiment TOML (default: experiments/<norm>.toml)."),
        click.option("--norm", type=click.Choice((*config_mod.NORMS, "all")), help="Normalisation: bn, gn, ln (GroupNorm with 1 group), lnc (LayerNorm over channels, ConvNeXt's), lnchw (seed LayerNorm)."),
        click.option("--preset", cls=PresetOption),
        click.option("--width", type=Hyperparameter("width"), help="Width multiplier on the preset's channels."),
        click.option("--groups", type=Hyperparameter("groups"), help="GroupNorm groups."),
        click.option("--dropout", type=Hyperparameter("dropout")),
        click.option("--lr", type=Hyperparameter("lr"), help="Peak learning rate."),
        click.option("--epochs", type=Hyperparameter("epochs")),
        click.option("--batch-size", type=Hyperparameter("batch_size")),
        click.option("--seed", type=Hyperparameter("seed")),
        click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE", help="Any other hyperparameter, e.g. --set weight_decay=1e-4 (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def data_options(f):
    f = click.option("--download", is_flag=True, help="Download CIFAR-10 with torchvision if it is not found.")(f)
    f = click.option("--data-dir", type=click.Path(file_okay=False), help="CIFAR-10 folder (default: $BENCH_DATA_DIR, else ./data).")(f)
    return f


def runtime_options(f):
    """Where to run and where to record: --device, --threads, --tracking-uri."""
    f = click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db).")(f)
    f = click.option("--threads", type=POSITIVE, help="CPU threads (default: the cores this process may use).")(f)
    f = click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available).")(f)
    return f


def load_experiment(experiment_file, norm, assignments=(), **values) -> config_mod.Experiment:
    """The experiment file (explicit, or experiments/<norm>.toml), then flags on top."""
    path = experiment_file or config_mod.find_experiment(config_mod.norm_experiment(norm))
    exp = config_mod.load(path)
    flags = {k: v for k, v in values.items() if v is not None}
    config_mod.override(exp, **{**config_mod.parse_assignments(assignments), **flags, "norm": norm})
    return exp


def friendly_errors(f):
    """User-facing errors: one line on stderr, exit 2. Ctrl-C/SIGTERM: exit 130, work kept."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except BenchError as err:
            from .tracking import mask_url

            click.echo(f"error: {mask_url(str(err))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper


class OneLineErrors(click.Group):
    """click's usage errors (bad flag values, unknown options) as one ``error:`` line, exit 2, like
    every other user error, instead of a usage banner."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        argv = list(kwargs.get("args") or (args[0] if args else None) or sys.argv[1:])
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # bare `bench`: the help, as click prints it
            click.echo(err.format_message(), err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            hint = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) else ""
            click.echo(f"error: {misplaced_experiment_file(err, argv) or err.format_message() + hint}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def misplaced_experiment_file(err: click.ClickException, argv: list[str]) -> str | None:
    """`bench tune experiments/x.toml`: the file given as an argument, which no command takes. Say where it goes."""
    ctx = getattr(err, "ctx", None)
    if ctx is None or "unexpected extra argument" not in err.format_message():
        return None
    if not any(param.name == "experiment_file" for param in ctx.command.params):
        return None
    stray = [arg for before, arg in zip([None, *argv], argv) if arg.endswith(".toml") and before not in ("-e", "--experiment")]
    if not stray:
        return None
    return f"{stray[0]} is an experiment file: pass it with -e (`{ctx.command_path} -e {stray[0]} ...`)"
