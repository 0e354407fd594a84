"""What a user meets in MLflow's own tools: experiments that open on the runs table, a logged model
that takes raw images (and the README's snippet that uses it), MLflow's chatter in the log instead
of the terminal, per-run system metrics, and optuna-dashboard on the project's store."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bench import config, inference, servers, tracking
from bench.tracking import mlflow_log
from bench.cli import cli
from bench.data import CLASSES, CIFAR10, Split, normalize
from bench.models import depthwise
from bench.models.depthwise import DepthwiseConv2d
from bench.run import train_tracked
from bench.train import resolve_runtime
from bench.tune import TuneOptions
from bench.tune.study import prepare_study

REPO = Path(__file__).resolve().parents[1]


def random_cifar(folder: Path) -> CIFAR10:
    """Random images (120 train, 40 val, 40 test): enough to train and log a model in a second."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)

    return CIFAR10(split(120), split(40), split(40), source=f"bin:{folder}", digest="random")


def tiny_run(root: Path, registered_name: str | None = None, experiment: str = "bn.toml", **settings) -> str:
    """One tracked 1-epoch training run (of the seed BN model unless told); returns its run id."""
    exp = config.override(config.load(REPO / "experiments" / experiment), epochs=1, batch_size=40, eval_batch_size=40,
                          val_size=40, **settings)
    rt = resolve_runtime(exp.train, "bn", torch.device("cpu"))
    tracking.setup()
    with tracking.run("train", "tiny", "train") as active:
        train_tracked(exp, random_cifar(root), rt, registered_name=registered_name)
    return active.info.run_id


def model_uri(run_id: str) -> str:
    return mlflow.get_run(run_id).data.tags["bench.model_uri"]


# ---------------------------------------------------------------- experiments open on the runs table


def test_experiments_bench_creates_or_opens_are_tagged_as_model_training(isolated_mlruns):
    tracking.setup()
    new = tracking.experiment_id("fresh")
    old = mlflow.create_experiment("made-before")  # as bench used to create them: no kind
    assert tracking.EXPERIMENT_KIND_TAG not in mlflow.get_experiment(old).tags
    assert tracking.experiment_id("made-before") == old
    for exp_id in (new, old):
        assert mlflow.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    other = mlflow.create_experiment("never-trained-into")
    listed = tracking.tag_experiments()  # what `bench ui` does before serving
    assert mlflow.get_experiment(other).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert sorted(listed) == sorted([(new, "fresh"), (old, "made-before"), (other, "never-trained-into")])  # not the empty Default


def test_bench_ui_lists_each_experiments_runs_table(isolated_mlruns, monkeypatch):
    tracking.setup()
    exp_id = mlflow.create_experiment("bn")
    started = []

    class ServerThatExits:
        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", ServerThatExits)
    monkeypatch.setattr(servers, "stop_process_group", lambda proc: None)  # tests/test_ui.py stops a real one
    result = CliRunner().invoke(cli, ["ui", "--port", "5099"])
    assert result.exit_code == 0, result.output
    assert f"bn: http://127.0.0.1:5099/#/experiments/{exp_id}/runs?workflowType=machine_learning" in result.output
    assert started[0][1:4] == ["-m", "mlflow", "server"] and "5099" in started[0]
    assert mlflow.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_an_experiment_kind_the_user_chose_is_kept(isolated_mlruns):
    tracking.setup()
    exp_id = mlflow.create_experiment("mine", tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"})
    tracking.experiment_id("mine")
    tracking.tag_experiments()
    assert mlflow.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


# ---------------------------------------------------------------- the logged model takes raw images


def test_logged_model_takes_raw_images_and_names_its_classes(isolated_mlruns):
    uri = model_uri(tiny_run(isolated_mlruns))
    info = mlflow.models.get_model_info(uri)
    (spec,) = info.signature.inputs.inputs
    assert spec.type == np.dtype("uint8") and spec.shape == (-1, 3, 32, 32)
    assert info.metadata["classes"] == list(CLASSES) and "uint8" in info.metadata["input"]

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    pyfunc_logits = mlflow.pyfunc.load_model(uri).predict(images.numpy())
    raw_model = mlflow.pytorch.load_model(uri).eval()
    net = tracking.load_model(uri).eval()  # what bench rescore evaluates: normalised batches in
    with torch.inference_mode():
        expected = net(normalize(images)).numpy()
        from_float = raw_model(images.float() / 255).numpy()
    assert pyfunc_logits.shape == (5, 10)
    np.testing.assert_allclose(pyfunc_logits, expected, atol=1e-4)
    np.testing.assert_allclose(from_float, expected, atol=1e-4)


def test_load_model_unwraps_only_the_raw_image_wrapper():
    net = torch.nn.Conv2d(3, 10, 1)
    assert inference.unwrap(inference.RawImageModel(net)) is net
    assert inference.unwrap(net) is net  # a model logged before the wrapper


def log_as_older_code_did(run_id: str, monkeypatch) -> None:
    """Re-log the run's model as code from before ``DepthwiseConv2d.fused_weight_grad`` pickled it: the
    attribute is in neither the instances nor (as with any attribute added without a class default) the class."""
    packaged = mlflow.pytorch.load_model(model_uri(run_id))
    for conv in (m for m in packaged.modules() if isinstance(m, DepthwiseConv2d)):
        del conv.__dict__["fused_weight_grad"]
    monkeypatch.delattr(DepthwiseConv2d, "fused_weight_grad")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(packaged, name="older", serialization_format="pickle")
        mlflow.set_tag("bench.model_uri", info.model_uri)


def test_a_model_logged_by_older_code_is_rebuilt_from_its_run_and_runs(isolated_mlruns, monkeypatch):
    run_id = tiny_run(isolated_mlruns, experiment="gated_bn.toml", compile=False)
    images = normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        expected = tracking.load_model(model_uri(run_id)).eval()(images)
    log_as_older_code_did(run_id, monkeypatch)

    as_pickled = tracking.load_model(model_uri(run_id)).eval()
    monkeypatch.setattr(depthwise, "FUSED_WEIGHT_GRAD_WINS", True)  # an AVX-512 CPU reads the attribute in every forward
    with pytest.raises(AttributeError, match="fused_weight_grad"), torch.inference_mode():
        as_pickled(images)  # what a teacher or `bench rescore` loaded before
    rebuilt = tracking.load_run_model(mlflow.get_run(run_id))
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(images), expected)


def test_a_run_whose_settings_do_not_build_its_weights_keeps_the_pickled_model(isolated_mlruns):
    run = mlflow.get_run(tiny_run(isolated_mlruns))
    other_shape = SimpleNamespace(data=SimpleNamespace(tags=run.data.tags, params={**run.data.params, "width": "2.0"}))
    images = normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        torch.testing.assert_close(tracking.load_run_model(other_shape)(images),
                                   tracking.load_run_model(run)(images))


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use the model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_classifies_a_png_with_the_champion(isolated_mlruns, capsys):
    run_id = tiny_run(isolated_mlruns, registered_name="cifar10-bn")
    mlflow.MlflowClient().set_registered_model_alias("cifar10-bn", "champion", "1")  # as a study sets it
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(isolated_mlruns / "cat.png")
    capsys.readouterr()

    exec(compile(readme_snippet(), "README.md", "exec"), {})

    printed = capsys.readouterr().out.strip().splitlines()[-1]
    with torch.inference_mode():
        logits = mlflow.pytorch.load_model(f"runs:/{run_id}/model")(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    assert printed == CLASSES[int(logits.argmax())]


# ---------------------------------------------------------------- MLflow's chatter goes to the log


def test_registry_messages_go_to_the_log_not_the_terminal(isolated_mlruns, capsys):
    tiny_run(isolated_mlruns, registered_name="cifar10-chatter")
    tiny_run(isolated_mlruns, registered_name="cifar10-chatter")  # "already exists. Creating a new version"
    captured = capsys.readouterr()
    terminal = captured.out + captured.err
    for message in ("Successfully registered model", "Created version", "already exists"):
        assert message not in terminal
    log = (isolated_mlruns / "mlruns" / mlflow_log.LOG_FILE).read_text()
    assert "Successfully registered model 'cifar10-chatter'" in log
    assert "Created version '2' of model 'cifar10-chatter'" in log
    assert re.search(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow: Created version '1'", log, re.M)


def test_log_file_is_beside_a_sqlite_store_else_under_mlruns(tmp_path):
    assert mlflow_log.log_path(f"sqlite:///{tmp_path}/store/x.db") == tmp_path / "store" / "bench.log"
    assert mlflow_log.log_path("http://127.0.0.1:5000") == Path("mlruns") / "bench.log"


# ---------------------------------------------------------------- system metrics


def system_metrics(run_id: str) -> set[str]:
    return {k for k in mlflow.get_run(run_id).data.metrics if k.startswith("system/")}


def test_training_runs_record_system_metrics_unless_turned_off(isolated_mlruns, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")  # the fixture turns them off
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    tracking.setup()
    ids = {}
    for kind in ("train", "report"):
        with tracking.run("sys", kind, kind) as active:
            time.sleep(0.6)
        ids[kind] = active.info.run_id
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system_metrics(ids["train"])
    assert not system_metrics(ids["report"])  # not a training run

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with tracking.run("sys", "off", "train") as active:
        time.sleep(0.6)
    assert not system_metrics(active.info.run_id)


# ---------------------------------------------------------------- optuna-dashboard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_with_its_named_objective(isolated_mlruns):
    pytest.importorskip("optuna_dashboard")
    exp = config.load(REPO / "experiments" / "bn.toml")
    prepare_study(exp, TuneOptions())
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.cli", "dashboard", "--port", str(port)], cwd=isolated_mlruns,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2))
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("optuna-dashboard did not answer")
        (summary,) = studies["study_summaries"]
        assert summary["study_name"] == "bn"
        detail = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=5))
        assert detail["objective_names"] == ["val_acc"]  # not "Objective 0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_dashboard_without_a_journal_is_a_one_line_error(isolated_mlruns):
    result = CliRunner().invoke(cli, ["dashboard"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: no Optuna journal at mlruns/optuna.journal; run `bench tune` here first, or pass --storage URL"
    assert not (isolated_mlruns / "mlruns" / "optuna.journal").exists()  # not created by looking


def test_dashboard_without_the_package_names_the_extra(isolated_mlruns, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna_dashboard" else real(name, *a))
    result = CliRunner().invoke(cli, ["dashboard"])
    assert result.exit_code == 2 and "pip install 'bench[dashboard]'" in result.output


def test_a_sibling_parent_landing_late_with_an_earlier_start_time_is_joined(isolated_mlruns, monkeypatch):
    """A run's start time is the client's: a sibling's create can land after our search yet be older.
    Every worker must end on the oldest parent (CI saw two workers each keep their own)."""
    sibling = []

    def sibling_lands_while_we_wait(seconds):
        if seconds and not sibling:
            run = mlflow.MlflowClient().create_run(tracking.experiment_id("s"), start_time=1,
                                                   tags={tracking.TAG_KIND: "study", tracking.TAG_STUDY: "s"})
            sibling.append(run.info.run_id)

    monkeypatch.setattr("bench.tracking.runs.time.sleep", sibling_lands_while_we_wait)
    run_id, joined = tracking.open_parent("s", "s", "s-mine", {})
    assert joined and run_id == sibling[0]
    mine = [r for r in mlflow.search_runs(experiment_names=["s"], output_format="list") if r.info.run_name == "s-mine"]
    assert not mine  # deleted: the UI shows one parent
