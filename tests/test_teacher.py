"""Distillation from finished runs (bench/teacher.py, train.distill_loss): the loss, the checks, and a distilled run end to end."""

from __future__ import annotations

import mlflow
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from bench import config, teacher, tracking
from bench.cli import cli
from bench.config import TrainConfig
from bench.errors import ConfigError
from bench.run import train_tracked
from bench.train import distill_loss, resolve_runtime

from test_cli import assert_user_error
from test_mlflow import REPO, random_cifar, tiny_run


def test_the_loss_is_cross_entropy_without_teachers_and_zero_soft_part_when_the_student_agrees():
    logits, labels = torch.randn(8, 10), torch.arange(8)
    cfg = TrainConfig(teacher="t", distill=0.0, distill_temperature=4.0)
    assert torch.allclose(distill_loss(logits, labels, torch.full((8, 10), 0.1), cfg), F.cross_entropy(logits, labels))
    agreeing = F.softmax(logits / 4.0, 1)  # the teacher's probabilities at T equal the student's: KL 0
    cfg = TrainConfig(teacher="t", distill=0.25, distill_temperature=4.0)
    assert torch.allclose(distill_loss(logits, labels, agreeing, cfg), 0.75 * F.cross_entropy(logits, labels), atol=1e-6)


def test_the_soft_part_pulls_the_student_toward_the_teacher():
    logits = torch.randn(4, 10, requires_grad=True)
    target = F.one_hot(torch.tensor([3, 3, 3, 3]), 10).float() * 0.9 + 0.01  # a confident teacher: 0.91 on class 3
    for t in (1.0, 4.0):
        logits.grad = None
        cfg = TrainConfig(teacher="t", distill=1.0, distill_temperature=t)
        distill_loss(logits, torch.zeros(4, dtype=torch.long), target, cfg).backward()  # the hard labels (0) weigh nothing
        # d/ds of T^2 KL(p || softmax(s/T)), averaged over the batch: T (softmax(s/T) - p) / B
        expected = t * (F.softmax(logits.detach() / t, 1) - target) / 4
        assert torch.allclose(logits.grad, expected, atol=1e-6)
        assert (logits.grad[:, 3] < 0).all()  # a step down the gradient raises the teacher's class


@pytest.mark.parametrize("assignments,needle", [
    (["distill=0.5"], "distill and teacher go together"),
    (["teacher=gated_bn"], "distill and teacher go together"),
    (["teacher=gated_bn", "distill=0.5", "mixup=0.2"], "distill with mixup/cutmix"),
    (["teacher=gated_bn", "distill=1.5"], "distill must be in [0, 1]"),
    (["teacher=gated_bn", "distill=0.5", "distill_temperature=0"], "distill_temperature must be > 0"),
])
def test_bad_distillation_settings_are_one_line(assignments, needle):
    args = ["train", "--norm", "bn", "--epochs", "1", *[a for item in assignments for a in ("--set", item)]]
    assert_user_error(CliRunner().invoke(cli, args, env={"COLUMNS": "200"}), needle)


def test_teachers_that_do_not_exist_or_saw_other_data_are_refused(isolated_mlruns):
    tracking.setup()
    with pytest.raises(ConfigError, match="no MLflow experiment of that name"):
        teacher.resolve("no_such_study", "random")
    with pytest.raises(ConfigError, match="not found in this tracking store"):
        teacher.resolve("0" * 32, "random")
    run_id = tiny_run(isolated_mlruns)
    with pytest.raises(ConfigError, match="no finished run with a logged model"):
        teacher.resolve("train", "random")  # an experiment, but no confirm runs in it
    with pytest.raises(ConfigError, match=f"teacher run {run_id} was trained on other data"):
        teacher.resolve(run_id, "another copy")
    assert teacher.resolve(f"{run_id}+{run_id}", "random") == [run_id, run_id]


def test_a_distilled_run_learns_from_its_teachers_soft_labels_cached_once(isolated_mlruns, monkeypatch):
    first, second = tiny_run(isolated_mlruns), tiny_run(isolated_mlruns)
    exp = config.override(config.load(REPO / "experiments" / "bn.toml"), epochs=1, batch_size=40, eval_batch_size=40, val_size=40,
                          teacher=f"{first}+{second}", distill=0.5)
    rt = resolve_runtime(exp.train, "bn", torch.device("cpu"))
    data = random_cifar(isolated_mlruns)
    with tracking.run("train", "student", "train") as active:
        _, result = train_tracked(exp, data, rt)
    assert result.history[0]["train_loss"] > 0 and 0 <= result.test_acc <= 1
    assert mlflow.get_run(active.info.run_id).data.tags[teacher.TAG_TEACHERS] == "+".join(sorted([first, second]))
    [cached] = list((isolated_mlruns / "mlruns" / "teachers").glob("*.pt"))
    soft = torch.load(cached)
    assert soft.shape == (len(data.train), 10) and torch.allclose(soft.sum(1), torch.ones(len(data.train)))

    def no_models(run):
        raise AssertionError("the teachers' labels should come from the cache")

    monkeypatch.setattr("bench.tracking.reading.load_run_model", no_models)
    with tracking.run("train", "student-again", "train"):
        train_tracked(exp, data, rt)  # same teachers, same images: read, not recomputed


def test_a_teacher_whose_model_cannot_label_is_named_not_a_traceback(isolated_mlruns, monkeypatch):
    run_id = tiny_run(isolated_mlruns)

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise AttributeError("'DepthwiseConv2d' object has no attribute 'fused_weight_grad'")

    monkeypatch.setattr("bench.tracking.reading.load_run_model", lambda run: Broken())
    data = random_cifar(isolated_mlruns)
    rt = resolve_runtime(TrainConfig(), "bn", torch.device("cpu"))
    with pytest.raises(ConfigError, match=f"teacher run {run_id}: its logged model could not label the images .AttributeError"):
        teacher.soft_labels([run_id], data.train, rt, 4.0)
    assert not list((isolated_mlruns / "mlruns").glob("teachers/*.pt"))  # nothing half-made is cached
