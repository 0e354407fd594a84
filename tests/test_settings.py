"""The BENCH_* environment settings: good values are used, a bad one is one line before any work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bench import settings
from bench.cli import cli
from bench.config import load, override
from bench.errors import ConfigError
from bench.tune import TuneOptions, run_study
from bench.tune.recovery import max_retries
from bench.tune.storage import heartbeat_seconds

from test_cli import EXPERIMENTS, assert_user_error

BAD = [
    ("BENCH_MAX_RETRIES", "two"), ("BENCH_MAX_RETRIES", "-1"), ("BENCH_MAX_RETRIES", "1.5"),
    ("BENCH_HEARTBEAT_SECONDS", "0"), ("BENCH_HEARTBEAT_SECONDS", "nan"),
    ("BENCH_STALE_MINUTES", "0"), ("BENCH_STALE_MINUTES", "inf"),
    ("BENCH_THREADS", "all"), ("BENCH_THREADS", "-2"),
]


@pytest.mark.parametrize("name,bad", BAD)
def test_a_bad_setting_is_one_line_naming_it_and_a_good_value(name, bad):
    result = CliRunner().invoke(cli, ["tune", "--norm", "bn", "--trials", "1"], env={name: bad})
    assert_user_error(result, f"{name}='{bad}'", f"e.g. {name}={settings.SETTINGS[name].example}")


def test_good_settings_are_used_and_unset_ones_keep_their_defaults(monkeypatch):
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert (max_retries(), heartbeat_seconds()) == (2, 20)
    monkeypatch.setenv("BENCH_MAX_RETRIES", "0")
    monkeypatch.setenv("BENCH_HEARTBEAT_SECONDS", " 5 ")
    monkeypatch.setenv("BENCH_STALE_MINUTES", "0.5")
    assert (max_retries(), heartbeat_seconds(), settings.number("BENCH_STALE_MINUTES")) == (0, 5, 0.5)


def test_a_study_with_a_bad_retry_cap_fails_before_its_first_trial(isolated_mlruns, monkeypatch):
    """The cap is read only when a worker dies, hours into a study: the library checks it at the start."""
    monkeypatch.setenv("BENCH_MAX_RETRIES", "many")
    exp = override(load(EXPERIMENTS / "bn.toml"), epochs=1)
    with pytest.raises(ConfigError, match="BENCH_MAX_RETRIES='many'"):
        run_study(exp, TuneOptions(trials=1, epochs=1, threads=1, pruner="none"))
    assert not (isolated_mlruns / "mlruns").exists()  # no store, no journal: nothing started
