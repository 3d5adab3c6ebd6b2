"""One finished tiny study (digits, 2 learning rates x 2 seeds, 2 short epochs, tested), shared by the study tests.

It is built once per test session, even under pytest-xdist: the first worker builds it in the session's shared
temporary directory under a file lock, the others find it finished (each trial is a subprocess costing ~10 s of
imports, so it is the expensive part of these tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

BASE = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
OVERRIDES = {
    "trainer.max_epochs": 2,
    "trainer.limit_train_batches": 3,
    "trainer.limit_val_batches": 2,
    "trainer.limit_test_batches": 2,
    "trainer.callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True}}],
}


def write_study(path: Path, **fields) -> Path:
    """A study file over ``configs/quickstart.yaml`` with the tiny overrides; ``fields`` replace the defaults."""
    study = {"name": "tiny", "base": str(BASE), "overrides": dict(OVERRIDES),
             "grid": {"model.init_args.lr": [0.05, 0.2]}, "seeds": [1, 2], "monitor": "val/acc", "smoothing": 2,
             "test": True}
    study.update(fields)
    study = {k: v for k, v in study.items() if v is not None}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _study_once(tmp_path_factory, name: str, write: Callable[[Path], Path]) -> Path:
    """Run the study that ``write(root)`` writes once per test session, in ``<session tmp>/<name>/out``.

    Under xdist every worker has its own basetemp inside the session's one, so the first worker runs the study
    under a file lock and the others find it finished (without xdist ``parent`` would be shared with earlier
    sessions). The study runs with ``root`` as its working directory.
    """
    from filelock import FileLock

    from lightning_probes.commands.study import study

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    with FileLock(str(root / "lock")):
        output = root / "out"
        if not (output / "summary.json").exists():
            config = write(root)
            cwd = os.getcwd()
            os.chdir(root)
            try:
                assert study(str(config), output=str(output), progress=False) == 0
            finally:
                os.chdir(cwd)
    return output


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory) -> Path:
    """The output directory of the shared tiny study, run to the end with the sequential engine."""
    return _study_once(tmp_path_factory, "shared_study", lambda root: write_study(root / "tiny.yaml"))


ZOO_BASE = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "log_every_n_steps": 5},
    "model": {"class_path": "lightning_probes.models.LeNet5", "init_args": {"lr": 0.05, "momentum": 0.9}},
    "data": {"class_path": "lightning_probes.datamodules.DigitsDataModule", "init_args": {"batch_size": 32}},
}


def write_zoo_study(root: Path, num_samples: int = 3) -> Path:
    """A sampled study of LeNet5s on the digits: lr, activation, dropout, train_size and the seed drawn."""
    (root / "base.yaml").write_text(yaml.safe_dump(ZOO_BASE, sort_keys=False))
    study = {
        "name": "tiny_zoo", "base": "base.yaml",
        "overrides": {"trainer.callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True}}]},
        "sample": {"model.init_args.lr": {"loguniform": [0.03, 0.1]},
                   "model.init_args.activation": {"choice": ["relu", "tanh"]},
                   "model.init_args.dropout": {"uniform": [0.0, 0.3]},
                   "data.init_args.train_size": {"lograndint": [600, 1100]},
                   "seed": {"randint": [0, 1000]}},
        "num_samples": num_samples, "test": False,
    }
    path = root / "zoo.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The output directory of a finished 3-model sampled study of LeNet5s on the digits (built once per session)."""
    return _study_once(tmp_path_factory, "shared_zoo", write_zoo_study)
