"""Models: logging a trained model (it takes raw images), its test predictions, the registry and its
champion alias.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def log_model(model: torch.nn.Module, registered_name: str | None = None) -> str:
    """Log ``model`` (fp32, CPU, eval mode) as a model of raw images (``inference.RawImageModel``),
    with a signature, an input example and the class names in its metadata; returns its model URI."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    import bench

    from .. import inference

    net = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    packaged = inference.RawImageModel(net).eval()
    example = inference.input_example()
    with torch.inference_mode():
        output = packaged(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        packaged,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        metadata=inference.metadata(),
        code_paths=[str(Path(bench.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        registered_model_name=registered_name,
        serialization_format="pickle",  # a plain nn.Module; torch.export would fix the batch size to 1
    )
    mlflow.set_tag("bench.model_uri", info.model_uri)
    return info.model_uri


def log_predictions(predicted: torch.Tensor, test, n_examples: int = 10) -> None:
    """Test-set predictions as ``predictions/test.npz``: predicted and true labels for every image,
    plus the first ``n_examples`` misclassified images, so reports need nothing but MLflow."""
    import mlflow

    predicted = predicted.numpy().astype(np.int8)
    labels = test.labels.numpy().astype(np.int8)
    wrong = np.flatnonzero(predicted != labels)[:n_examples]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.npz"
        np.savez_compressed(path, predicted=predicted, labels=labels, wrong_index=wrong,
                            wrong_images=test.images[torch.from_numpy(wrong)].numpy())
        mlflow.log_artifact(str(path), "predictions")


CHAMPION = "champion"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def champion(name: str):
    """The model version registered model ``name``'s champion alias points at, or None."""
    import mlflow

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no such model, or no alias yet
        return None


def promote_champion(model_uri: str, name: str, val_acc: float, tags: dict[str, Any]) -> str | None:
    """Register ``model_uri`` as a new version of ``name`` and point the champion alias at it, if its
    validation accuracy beats the current champion's; returns the new version, or None. Validation,
    never test, decides: the test set chooses nothing."""
    import mlflow

    current = champion(name)
    if current is not None and val_acc <= float(current.tags.get("val_acc", "-inf")):
        return None
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()}).version
    client = mlflow.MlflowClient()
    latest = champion(name)  # another worker may have promoted a better model meanwhile
    if latest is None or val_acc > float(latest.tags.get("val_acc", "-inf")):
        client.set_registered_model_alias(name, CHAMPION, version)
        return version
    client.set_model_version_tag(name, version, "superseded_by", latest.version)
    return None


def active_model_uri() -> str | None:
    """The model URI ``log_model`` recorded on the active run."""
    import mlflow

    return mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("bench.model_uri")


def load_model(model_uri: str) -> torch.nn.Module:
    """The trained network of a logged model, which takes normalised batches as bench's evaluation
    feeds them (``data.normalize``); users load the model itself, which takes raw images."""
    import mlflow.pytorch

    from ..inference import unwrap

    return unwrap(mlflow.pytorch.load_model(model_uri, map_location="cpu"))
