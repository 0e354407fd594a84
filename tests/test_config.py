"""Config: experiment TOML files, their errors, search spaces, overrides and --set parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import config
from bench.config import Experiment, coerce, find_experiment, from_dict, load, override, parse_assignments
from bench.errors import ConfigError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the shipped experiment files


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_loads(path):
    exp = load(path)
    assert exp.name == path.stem
    assert exp.model.norm in config.NORMS
    assert exp.budget.max_params == 50_000
    for dim in exp.search.values():
        assert (dim.choices is not None) or (dim.low <= dim.high)


def test_one_experiment_file_per_norm():
    for norm in ("bn", "gn", "ln"):
        assert load(find_experiment(norm, [EXPERIMENTS])).model.norm == norm
    assert load(EXPERIMENTS / "seed_gn.toml").model.preset == "seed_gn"
    # The norms that only fit their own family: --norm lnchw trains seed_gn.toml, --norm lnc convnext_lnc.toml.
    for norm, preset in (("lnchw", "seed_gn"), ("lnc", "convnext")):
        exp = load(find_experiment(config.norm_experiment(norm), [EXPERIMENTS]))
        assert (exp.model.norm, exp.model.preset) == (norm, preset)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_can_run_as_declared(path):
    """Its defaults fit the budget and lie inside its search space (so trial 0 can be the baseline),
    and every width on its grid is a model that builds within the budget at the default groups."""
    from bench.models import count_params_fast
    from bench.tune.space import baseline_params

    exp = load(path)
    assert count_params_fast(**vars(exp.model)) <= exp.budget.max_params
    if exp.search and exp.tune.baseline:
        assert set(baseline_params(exp)) == set(exp.search)
    for width in (exp.search["width"].choices or []) if "width" in exp.search else []:
        assert count_params_fast(**{**vars(exp.model), "width": width}) <= exp.budget.max_params, (path.stem, width)


def test_missing_sections_take_defaults(tmp_path):
    exp = load(write(tmp_path, 'description = "d"\n[train]\nlr = 0.2\n', "mine.toml"))
    assert exp.name == "mine" and exp.description == "d"
    assert exp.train.lr == 0.2
    assert exp.train.epochs == config.TrainConfig().epochs
    assert exp.model == config.ModelConfig()
    assert exp.search == {}


def test_hyperparameters_are_one_flat_namespace():
    hp = Experiment().hyperparameters()
    assert hp["norm"] == "bn" and hp["lr"] == 0.1 and hp["cutout"] == 0
    assert "max_params" not in hp and "trials" not in hp


# ---------------------------------------------------------------- errors in files


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml not found"):
        load(tmp_path / "nope.toml")


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[train\nlr = 1\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(path) in str(err.value) and "not valid TOML" in str(err.value)


@pytest.mark.parametrize("text,key", [
    ("[train]\nlrr = 0.1\n", "train.lrr"),
    ("[model]\ndepth = 3\n", "model.depth"),
    ("[budget]\nmax = 3\n", "budget.max"),
    ("[tune]\ntrails = 3\n", "tune.trails"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert f"unknown key '{key}'" in str(err.value)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        load(write(tmp_path, "[optim]\nlr = 0.1\n"))


def test_section_must_be_a_table():
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        from_dict({"train": 3})


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "lr", '"fast"', "train.lr: expected a number"),
    ("train", "epochs", "1.5", "train.epochs: expected an integer"),
    ("train", "epochs", "true", "train.epochs: expected an integer"),
    ("train", "nesterov", '"maybe"', "train.nesterov: expected true or false"),
    ("train", "nesterov", "1.5", "train.nesterov: expected true or false"),
    ("model", "preset", "3", "model.preset: expected a string"),
    ("model", "norm", '"instance"', "norm: 'instance' is not one of"),
    ("train", "optimizer", '"lion"', "optimizer: 'lion'"),
    ("train", "schedule", '"step"', "schedule: 'step'"),
    ("tune", "pruner", '"hyperband"', "pruner: 'hyperband'"),
    ("model", "dropout", "1.0", "dropout must be in"),
    ("model", "width", "0", "width must be > 0"),
    ("model", "groups", "0", "groups must be >= 1"),
    ("train", "epochs", "0", "epochs must be >= 1"),
    ("train", "lr", "-0.1", "lr must be > 0"),
    ("train", "momentum", "1.0", "momentum must be in"),
    ("train", "cutout", "33", "cutout must be in"),
    ("train", "tta_shift", "5", "tta_shift must be in"),
    ("train", "val_size", "50000", "val_size must be in"),
    ("budget", "max_params", "0", "max_params must be >= 1"),
    # issue 14: non-finite numbers, out-of-range seeds, sizes that would allocate gigabytes, [tune] fields
    ("train", "lr", "nan", "train.lr: expected a finite number, got nan"),
    ("train", "lr", "inf", "train.lr: expected a finite number, got inf"),
    ("train", "weight_decay", "-inf", "train.weight_decay: expected a finite number"),
    ("model", "dropout", "nan", "model.dropout: expected a finite number"),
    ("model", "width", "inf", "model.width: expected a finite number"),
    ("train", "epochs", "inf", "train.epochs: expected a finite number"),
    ("train", "seed", "-1", r"seed must be in \[0, 4294967295\], got -1"),
    ("train", "batch_size", "1000000", r"batch_size must be in \[1, 50000\], got 1000000"),
    ("train", "crop_padding", "100", "crop_padding must be in"),
    ("model", "width", "100", "width must be > 0 and <= 8, got 100"),
    ("model", "width1", "100000", "width1 must be >= 1 and <= 256"),
    ("model", "blocks", "1000", "blocks must be >= 1 and <= 16"),
    ("tune", "trials", "0", "tune.trials must be >= 1, got 0"),
    ("tune", "trials", "-3", "tune.trials must be >= 1, got -3"),
    ("tune", "epochs", "-1", "tune.epochs must be >= 0"),
    ("tune", "warmup_epochs", "-1", "tune.warmup_epochs must be >= 0"),
    ("tune", "startup_trials", "-1", "tune.startup_trials must be >= 0"),
])
def test_bad_values_name_the_key(tmp_path, section, key, value, match):
    with pytest.raises(ConfigError, match=match):
        load(write(tmp_path, f"[{section}]\n{key} = {value}\n"))


def test_integer_valued_float_is_accepted_for_int_and_int_for_float(tmp_path):
    exp = load(write(tmp_path, "[train]\nepochs = 3.0\nlr = 1\n"))
    assert exp.train.epochs == 3 and isinstance(exp.train.epochs, int)
    assert exp.train.lr == 1.0 and isinstance(exp.train.lr, float)


# ---------------------------------------------------------------- search spaces


def test_search_dimensions(tmp_path):
    exp = load(write(tmp_path, """
[search.lr]
low = 0.01
high = 0.5
log = true
[search.cutout]
low = 0
high = 16
step = 4
[search.optimizer]
choices = ["sgd", "adamw"]
"""))
    assert exp.search["lr"].log and exp.search["lr"].low == 0.01
    assert exp.search["cutout"].step == 4 and isinstance(exp.search["cutout"].low, int)
    assert exp.search["optimizer"].choices == ["sgd", "adamw"]


@pytest.mark.parametrize("table,match", [
    ("[search.lr]\nlow = 0.5\nhigh = 0.01\n", r"search.lr: low \(0.5\) is greater than high \(0.01\)"),
    ("[search.lr]\nlow = 0.0\nhigh = 0.1\nlog = true\n", "search.lr: a log scale needs low > 0"),
    ("[search.lr]\nlow = 0.01\n", "search.lr: needs both low and high"),
    ("[search.lrate]\nlow = 0.01\nhigh = 0.1\n", "unknown search dimension 'search.lrate'"),
    ("[search.lr]\nlow = 0.01\nhigh = 0.1\nscale = 2\n", "unknown key 'search.lr.scale'"),
    ("[search.optimizer]\nlow = 1\nhigh = 2\n", "search.optimizer: 'optimizer' is not numeric"),
    ("[search.groups]\nchoices = []\n", "search.groups.choices: expected a non-empty list"),
    ("[search.groups]\nchoices = [1, \"many\"]\n", "search.groups: expected a number"),
    ("[search]\nlr = 0.1\n", "search.lr: expected a table"),
    # issue 14: bounds and steps a trial could not use, found when the file is read
    ("[search.lr]\nlow = -1\nhigh = 0.1\nlog = true\n", "search.lr: a log scale needs low > 0, got -1"),
    ("[search.lr]\nlow = nan\nhigh = 0.1\n", "search.lr.low: expected a finite number"),
    ("[search.lr]\nlow = 0.01\nhigh = inf\n", "search.lr.high: expected a finite number"),
    ("[search.lr]\nlow = -0.1\nhigh = 0.1\n", r"search.lr.low = -0.1: lr must be > 0"),
    ("[search.dropout]\nlow = 0.0\nhigh = 1.5\n", r"search.dropout.high = 1.5: dropout must be in \[0, 1\)"),
    ("[search.dropout]\nchoices = [0.1, 2.0]\n", "search.dropout.choices = 2.0: dropout must be in"),
    ("[search.epochs]\nlow = 0\nhigh = 3\n", "search.epochs.low = 0: epochs must be >= 1"),
    ("[search.cutout]\nlow = 0\nhigh = 16\nstep = 0\n", "search.cutout.step must be > 0"),
    ("[search.lr]\nlow = 0.01\nhigh = 0.1\nstep = -0.01\n", "search.lr.step must be > 0"),
    ("[search.lr]\nlow = 0.01\nhigh = 0.1\nlog = true\nstep = 0.01\n", "search.lr: give step or log = true, not both"),
])
def test_bad_search_space_names_the_dimension(tmp_path, table, match):
    with pytest.raises(ConfigError, match=match):
        load(write(tmp_path, table))


# ---------------------------------------------------------------- overrides and --set


def test_override_sets_the_right_section_with_types():
    exp = override(Experiment(), lr="0.05", norm="gn", groups="8", nesterov="off", width=None, cutout=8)
    assert exp.train.lr == 0.05 and isinstance(exp.train.lr, float)
    assert exp.model.norm == "gn" and exp.model.groups == 8
    assert exp.train.nesterov is False
    assert exp.model.width == 1.0  # None is ignored
    assert exp.train.cutout == 8


def test_override_errors_name_the_hyperparameter():
    with pytest.raises(ConfigError, match="unknown hyperparameter 'learning_rate'"):
        override(Experiment(), learning_rate=0.1)
    with pytest.raises(ConfigError, match="batch_size: expected a number, got 'big'"):
        override(Experiment(), batch_size="big")
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        override(Experiment(), epochs="0")
    with pytest.raises(ConfigError, match="norm: 'xx'"):
        override(Experiment(), norm="xx")


def test_parse_assignments():
    assert parse_assignments(["lr=0.1", " cutout = 8 ", "schedule=cosine"]) == {"lr": "0.1", "cutout": "8", "schedule": "cosine"}
    assert parse_assignments(["note=a=b"]) == {"note": "a=b"}
    assert parse_assignments([]) == {}
    for bad in ("lr", "=0.1", " =1"):
        with pytest.raises(ConfigError) as err:
            parse_assignments([bad])
        assert f"--set {bad!r}" in str(err.value) and "NAME=VALUE" in str(err.value)


@pytest.mark.parametrize("value,kind,expected", [
    ("true", bool, True), ("Off", bool, False), ("1", bool, True), (" 1e-4 ", float, 1e-4),
    ("8", int, 8), ("8.0", int, 8), (3, float, 3.0), ("sgd", str, "sgd"),
])
def test_coerce(value, kind, expected):
    out = coerce("k", value, kind)
    assert out == expected and type(out) is kind


@pytest.mark.parametrize("value,kind,match", [
    ("2.5", int, "k: expected an integer, got 2.5"),  # was silently truncated to 2
    ("1e400", int, "k: expected a finite number, got inf"),  # was an OverflowError traceback
    ("nan", float, "k: expected a finite number, got nan"),
    ("-inf", float, "k: expected a finite number, got -inf"),
    (float("nan"), int, "k: expected a finite number"),
    (True, int, "k: expected an integer, got True"),
])
def test_coerce_refuses_what_is_not_a_finite_number_of_the_type(value, kind, match):
    with pytest.raises(ConfigError, match=match):
        coerce("k", value, kind)


def test_huge_integers_keep_their_value():
    assert coerce("k", "12345678901234567891", int) == 12345678901234567891  # no float rounding


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="nesterov = true needs momentum > 0"):
        override(Experiment(), momentum=0)
    assert override(Experiment(), momentum=0, nesterov=False).train.momentum == 0.0
    assert override(Experiment(), momentum=0, optimizer="adamw").train.momentum == 0.0  # AdamW has no momentum


def test_set_and_flags_on_top_of_an_experiment_file():
    from bench.cli import load_experiment

    exp = load_experiment(str(EXPERIMENTS / "gn.toml"), None, ("weight_decay=1e-4", "lr=0.3"), lr=0.05, epochs=None)
    assert exp.model.norm == "gn" and exp.model.groups == 4  # from the file
    assert exp.train.weight_decay == 1e-4  # from --set
    assert exp.train.lr == 0.05  # a flag wins over --set
    assert exp.train.epochs == 15  # a flag left out keeps the file's value


def test_find_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # not in ./experiments: falls back to the files beside the package
    assert find_experiment("bn") == EXPERIMENTS / "bn.toml"
    (tmp_path / "experiments").mkdir()
    write(tmp_path / "experiments", "[train]\nlr = 0.3\n", "bn.toml")
    assert find_experiment("bn") == tmp_path / "experiments" / "bn.toml"
    with pytest.raises(ConfigError, match="no experiment file nope.toml.*; pass --experiment FILE$"):
        find_experiment("nope")
    with pytest.raises(ConfigError, match="; run it from the folder holding the study's experiments/$"):
        find_experiment("nope", fix="run it from the folder holding the study's experiments/")
