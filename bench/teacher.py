"""Distillation from finished runs: the soft labels an ensemble of trained models gives the training images.

``teacher = "gated_bn"`` names the MLflow experiment (study) whose finished ``bench confirm`` runs teach
(or ``"<run id>+<run id>..."`` names the runs); ``distill`` is the weight of their soft labels in the loss
and ``distill_temperature`` how much both sides are softened (Hinton et al., 2015; the loss is
``train.distill_loss``). The teachers' class probabilities of every training image, averaged over the
teachers and the image's mirror, are computed once before the first epoch and kept beside the store (``mlruns/teachers/``): a step then costs what an
undistilled one does, the price being that a random crop sees the label of the uncropped image.
Teachers are runs trained from labels alone (not themselves distilled) on the same CIFAR-10 split.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Split
from .errors import ConfigError
from .runtime import Runtime
from .train import predict

TAG_TEACHERS = "bench.teacher_runs"  # the run ids a distilled run learnt from, resolved at its start


def teacher_dir() -> Path:
    return Path(os.environ.get("BENCH_TEACHER_DIR") or "mlruns/teachers")


def resolve(spec: str, data_digest: str) -> list[str]:
    """The run ids of ``spec``: a study's finished, undistilled confirm runs with a model, or ``id+id...``."""
    import mlflow

    from . import tracking

    client = mlflow.MlflowClient()
    if "+" in spec or (len(spec) == 32 and all(c in "0123456789abcdef" for c in spec)):
        runs = [fetch_run(client, run_id) for run_id in spec.split("+")]
    else:
        experiment = client.get_experiment_by_name(spec)
        if experiment is None:
            raise ConfigError(f"teacher = {spec!r}: no MLflow experiment of that name; name a study with finished "
                              f"`bench confirm` runs, or runs as ID+ID")
        query = f"attributes.status = 'FINISHED' and tags.`{tracking.TAG_KIND}` = 'confirm'"
        runs = [r for r in client.search_runs([experiment.experiment_id], query, max_results=1000)
                if not r.data.params.get("teacher")]
    runs = [r for r in runs if r.data.tags.get("bench.model_uri")]
    if not runs:
        raise ConfigError(f"teacher = {spec!r}: no finished run with a logged model to learn from; run `bench confirm` first")
    for run in runs:
        if run.data.tags.get("bench.data_digest", data_digest) != data_digest:
            raise ConfigError(f"teacher run {run.info.run_id} was trained on other data (digest "
                              f"{run.data.tags['bench.data_digest'][:12]}, here {data_digest[:12]}); pick teachers of this CIFAR-10 copy")
    return sorted(r.info.run_id for r in runs)


def fetch_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"teacher run {run_id!r} not found in this tracking store") from None


def soft_labels(run_ids: list[str], split: Split, rt: Runtime, temperature: float, say=print) -> torch.Tensor:
    """[N, classes] probabilities of ``split``'s images at ``temperature``: the mean over the runs' models
    and each image's mirror. Read from the cache when these runs labelled these images before."""
    key = hashlib.sha256("+".join(run_ids).encode() + f"|{temperature:g}|".encode()
                         + hashlib.sha256(split.images.numpy().tobytes()).digest()).hexdigest()[:24]
    path = teacher_dir() / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    from .tracking.reading import load_run_model
    import mlflow

    start, total = time.perf_counter(), torch.zeros(len(split), 10)
    for number, run_id in enumerate(run_ids, 1):
        say(f"teacher {number}/{len(run_ids)}: labelling {len(split):,} training images with run {run_id}")
        try:
            model = load_run_model(mlflow.MlflowClient().get_run(run_id)).to(rt.device, memory_format=rt.memory_format).eval()
            total += ensemble_member_probs(model, split, rt, temperature)
        except Exception as err:  # a model logged by older code, a missing artifact: name the run, not a traceback
            raise ConfigError(f"teacher run {run_id}: its logged model could not label the images ({type(err).__name__}: {err}); "
                              f"leave it out by naming the other runs, teacher=ID+ID") from None
    probs = total / len(run_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(probs, partial)
    partial.replace(path)
    say(f"teachers' labels computed in {time.perf_counter() - start:.0f} s, kept in {path} for the next run with these teachers")
    return probs


def ensemble_member_probs(model: torch.nn.Module, split: Split, rt: Runtime, temperature: float) -> torch.Tensor:
    """One teacher's probabilities at ``temperature``, the mean over each image and its mirror."""
    mirrored = Split(split.images.flip(3), split.labels)
    return (F.softmax(predict(model, split, rt) / temperature, 1) + F.softmax(predict(model, mirrored, rt) / temperature, 1)) / 2
