"""Shared fixtures: tiny data sets written in the real on-disk formats, and a capturing logger."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))

os.environ.setdefault("PYTHONWARNINGS", "ignore")
# One intra-op thread per test process and per subprocess it starts: `pytest -n 2` on two cores with torch's
# default of one thread per core oversubscribed the machine, and tiny models' kernels spun (a kill -9 test took 51 s
# instead of 21 s). No test depends on the thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite wants a probe's own failures raised, not turned into a warning (`on_error`'s default): tests that
# check the fail-safe path pass `on_error="warn"` explicitly.
os.environ.setdefault("LIGHTNING_PROBES_ON_ERROR", "raise")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in the IDX format MNIST uses (magic 0x08 type, big-endian dims)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_tiny_data(root: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    """MNIST raw IDX files and CIFAR-10 npz archives with a few random images of each class."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    cifar = root / "cifar10"
    cifar.mkdir(exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(cifar / f"cifar10_{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=(np.arange(n) % 10).astype(np.uint8))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("data"))


class CaptureLogger(Logger):
    """A logger that keeps every ``log_metrics`` call, for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []
        self.figures: list[str] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    @property
    @rank_zero_experiment
    def experiment(self):
        return self

    def add_image(self, tag, image, global_step=None, dataformats="CHW") -> None:
        assert image.ndim == 3 and image.shape[2] == 3 and dataformats == "HWC"
        self.figures.append(tag)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def keys(self) -> set[str]:
        return {k for _, m in self.metrics for k in m}
