"""Shared fixtures: a generated CIFAR-format data set (session-wide), real CIFAR-10 where it exists,
small slices, tiny fake data sets in both on-disk layouts, and an isolated MLflow/Optuna working directory.

The training, tuning and report paths run on ``fixture_data_dir()``: files in the official binary
layout (``data_batch_1..5.bin``, ``test_batch.bin``, 10,000 records of 3,073 bytes each) holding
generated, learnable images, written once per session. Tests of the real data set itself look for
it in ``$BENCH_DATA_DIR``, then ``/work/shared/data/cifar10``, then ``../shared/data/cifar10``
beside the repository; they are skipped when none is found, unless ``BENCH_REQUIRE_DATA=1`` (CI),
where a missing data set fails them instead.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import pickle
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# The machine has few cores and may be training in the background: keep the suite to one thread.
torch.set_num_threads(1)
os.environ.setdefault("BENCH_THREADS", "1")
# A suite started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and so would
# every `bench` process the tests start; the Ctrl-C tests need the terminal's default.
signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = [Path("/work/shared/data/cifar10"), REPO.parent / "shared" / "data" / "cifar10"]


def real_data_dir() -> Path | None:
    """The first folder that holds CIFAR-10 in either layout, or None."""
    from bench.data import _find_layout

    candidates = [Path(p) for p in [os.environ.get("BENCH_DATA_DIR")] if p] + DATA_CANDIDATES
    for path in candidates:
        if path.is_dir() and _find_layout(path) is not None:
            return path
    return None


def _skip_or_fail(reason: str):
    if os.environ.get("BENCH_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason} (BENCH_REQUIRE_DATA=1, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_data_dir() -> Path:
    """The real CIFAR-10 folder; skips the test without it (fails it under BENCH_REQUIRE_DATA=1)."""
    path = real_data_dir()
    if path is None:
        _skip_or_fail("real CIFAR-10 not found: set BENCH_DATA_DIR or place it in ../shared/data/cifar10")
    return path


# ---------------------------------------------------------------- the generated CIFAR-format data set

FIXTURE_RECORDS = 10_000  # per file, as in the real data set (the loader checks the count)
FIXTURE_LABEL_NOISE = 0.25  # images that show another class's pattern: accuracy stays well below 100%


def write_fixture_cifar(folder: Path, records: int = FIXTURE_RECORDS, seed: int = 0) -> Path:
    """CIFAR-10's binary layout with generated images a small CNN learns in one epoch: each class is
    a blocky colour pattern (mirror-symmetric, so flips keep it), plus per-pixel noise; a quarter of
    the images show a random class's pattern. Labels are balanced: records / 10 per class per file."""
    from bench.data import TEST_BIN, TRAIN_BIN

    rng = np.random.default_rng(seed)
    half = rng.integers(0, 160, size=(10, 3, 4, 2), dtype=np.uint8)
    patterns = np.concatenate([half, half[..., ::-1]], axis=3).repeat(8, axis=2).repeat(8, axis=3)
    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_BIN + [TEST_BIN]:
        labels = rng.permutation(np.arange(records) % 10).astype(np.uint8)
        shown = np.where(rng.random(records) < FIXTURE_LABEL_NOISE, rng.integers(0, 10, records), labels)
        images = patterns[shown] + rng.integers(0, 96, size=(records, 3, 32, 32), dtype=np.uint8)  # < 256: no overflow
        write_bin_file(folder / name, images.reshape(records, -1), labels)
    return folder


_fixture_dir: Path | None = None


def fixture_data_dir() -> Path:
    """The generated CIFAR-format folder (written on first use, removed when the session ends)."""
    global _fixture_dir
    if _fixture_dir is None:
        root = Path(tempfile.mkdtemp(prefix="bench-cifar-fixture-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _fixture_dir = write_fixture_cifar(root / "cifar-10-batches-bin")
    return _fixture_dir


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The generated data set's folder, for commands given ``--data-dir``."""
    return fixture_data_dir()


@pytest.fixture(scope="session")
def cifar(cifar_dir):
    """The generated data set, read once by the real loader: 45,000 train / 5,000 val / 10,000 test."""
    from bench.data import load_cifar10

    return load_cifar10(cifar_dir, val_size=5000, seed=0)


@pytest.fixture(scope="session")
def small_cifar(cifar):
    """A small slice (2,000 train / 500 val / 1,000 test) for fast training tests."""
    return take(cifar, 2000, 500, 1000)


def take(data, n_train: int, n_val: int, n_test: int):
    from bench.data import CIFAR10

    return CIFAR10(train=data.train.take(n_train), val=data.val.take(n_val), test=data.test.take(n_test),
                   source=data.source + " (slice)", digest=data.digest)


# ---------------------------------------------------------------- real CIFAR-10, where it exists


@pytest.fixture(scope="session")
def real_cifar_dir() -> Path:
    return require_data_dir()


@pytest.fixture(scope="session")
def real_cifar(real_cifar_dir):
    """The whole real data set, read once: 45,000 train / 5,000 val / 10,000 test."""
    from bench.data import load_cifar10

    return load_cifar10(real_cifar_dir, val_size=5000, seed=0)


# ---------------------------------------------------------------- tiny fake data sets


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images (uint8 [n, 3072], planar RGB) and labels 0..9 (each class present)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    labels = (np.arange(n) + seed) % 10
    return images, labels.astype(np.uint8)


def write_bin_file(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    records = np.concatenate([labels.reshape(-1, 1).astype(np.uint8), images], axis=1)
    assert records.shape[1] == 3073
    path.write_bytes(records.tobytes())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class FakeCIFAR:
    """Tiny CIFAR-10 files written by the test, and the arrays they hold, to compare with what is read."""

    TRAIN_NAMES = [f"data_batch_{i}" for i in range(1, 6)]

    def __init__(self, root: Path, monkeypatch, per_batch: int = 20, n_test: int = 30):
        self.root = root
        self.monkeypatch = monkeypatch
        self.per_batch = per_batch
        self.n_test = n_test
        self.train = [fake_split(per_batch, seed=i) for i in range(1, 6)]
        self.test = fake_split(n_test, seed=99)

    write_records = staticmethod(write_bin_file)  # (path, images [n, 3072], labels [n]) -> one *.bin file

    @property
    def train_images(self) -> np.ndarray:
        return np.concatenate([imgs for imgs, _ in self.train])

    @property
    def train_labels(self) -> np.ndarray:
        return np.concatenate([labels for _, labels in self.train])

    def write_bin(self, folder: Path | None = None) -> Path:
        """The binary layout: data_batch_1..5.bin + test_batch.bin, 3,073-byte records."""
        folder = folder or self.root / "cifar-10-batches-bin"
        folder.mkdir(parents=True, exist_ok=True)
        for name, (images, labels) in zip(self.TRAIN_NAMES, self.train):
            write_bin_file(folder / f"{name}.bin", images, labels)
        write_bin_file(folder / "test_batch.bin", *self.test)
        return folder

    def write_py(self, folder: Path | None = None, patch_md5: bool = True) -> Path:
        """torchvision's layout: pickled dicts in cifar-10-batches-py, plus batches.meta.

        torchvision checks every file against the md5 of the official release; these files are
        not it, so their own md5s are patched into ``torchvision.datasets.CIFAR10``'s file lists
        (the integrity check itself still runs on every read)."""
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        folder = folder or self.root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        entries = list(zip(self.TRAIN_NAMES, self.train)) + [("test_batch", self.test)]
        for name, (images, labels) in entries:
            with open(folder / name, "wb") as f:
                pickle.dump({"batch_label": name, "labels": [int(x) for x in labels], "data": images,
                             "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}, f)
        from bench.data import CLASSES

        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"num_cases_per_batch": self.per_batch, "label_names": list(CLASSES), "num_vis": 3072}, f)
        if patch_md5:
            self.monkeypatch.setattr(TorchvisionCIFAR10, "train_list", [[n, md5(folder / n)] for n in self.TRAIN_NAMES])
            self.monkeypatch.setattr(TorchvisionCIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
            meta = dict(TorchvisionCIFAR10.meta, md5=md5(folder / "batches.meta"))
            self.monkeypatch.setattr(TorchvisionCIFAR10, "meta", meta)
        return folder


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch) -> FakeCIFAR:
    """Tiny fake CIFAR-10 (5 x 20 train, 30 test images); call ``.write_bin()`` / ``.write_py()``."""
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    return FakeCIFAR(root, monkeypatch)


# ---------------------------------------------------------------- MLflow / Optuna isolation


@pytest.fixture
def isolated_mlruns(tmp_path, monkeypatch) -> Path:
    """Run in a fresh working directory whose MLflow store is ``<tmp>/mlruns/mlflow.db``.

    Optuna's default journal (``mlruns/optuna.journal``) and MLflow artifacts land under the
    same temporary folder. Yields the folder; MLflow's global tracking URI and any run left
    active are reset afterwards."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    previous = None
    if "mlflow" in sys.modules:  # an earlier test pointed MLflow somewhere: point it here
        import mlflow
        from mlflow.tracking._tracking_service import utils as tracking_utils

        previous = tracking_utils._tracking_uri
        mlflow.set_tracking_uri(uri)
    yield tmp_path
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)  # None: back to "unset" (monkeypatch then restores the env)


@contextlib.contextmanager
def module_store(root: Path, data, modules):
    """For module-scoped fixtures: work in ``root`` with its own MLflow store and one torch thread,
    every ``module.load_data`` returning ``data``; MLflow's process-wide URI is restored afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_uri = tracking_utils._tracking_uri
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        uri = f"sqlite:///{root}/mlruns/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        torch.set_num_threads(1)
        for module in modules:
            mp.setattr(module, "load_data", lambda *args, **kwargs: data)
        yield root
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture
def servers() -> tuple[str, str]:
    """(PostgreSQL URL, `mlflow server` URL) started by .ci/services.sh; skipped where it did not run,
    failed where CI requires it (BENCH_REQUIRE_SERVICES=1)."""
    postgres, mlflow_server = os.environ.get("BENCH_TEST_POSTGRES_URL"), os.environ.get("BENCH_TEST_MLFLOW_URL")
    if not (postgres and mlflow_server):
        reason = "BENCH_TEST_POSTGRES_URL / BENCH_TEST_MLFLOW_URL not set: run .ci/services.sh start and source its env file"
        if os.environ.get("BENCH_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} (BENCH_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(reason)
    return postgres, mlflow_server
