"""The directory of a run's own files (saved config, probe outputs), whatever logger the Trainer has."""

from __future__ import annotations

import os

import pytorch_lightning as pl


def run_directory(trainer: pl.Trainer) -> str:
    """Where a run keeps its files: ``trainer.log_dir``, or a directory named after the run when that is ``None``.

    ``trainer.log_dir`` is the logger's directory (TensorBoard, CSV: ``<save_dir>/<name>/version_<n>``; other
    loggers: their ``save_dir``), or ``trainer.default_root_dir`` without a logger. A logger that stores its data
    elsewhere has none (MLflow with a ``sqlite:///`` or server ``tracking_uri``): then the run's files go where
    Lightning's ``ModelCheckpoint`` puts its checkpoints for that logger, ``<default_root_dir>/<name>/<version>``
    (MLflow: ``<experiment id>/<run id>``), so each run gets its own directory beside its checkpoints.

    Call it on every rank: it broadcasts global rank 0's answer (a logger's ``version`` is known on rank 0 only).

    Args:
        trainer: The Trainer, after its strategy is set up (from a callback's ``setup`` on).

    Returns:
        The directory (not created).
    """
    log_dir = trainer.log_dir
    if log_dir is not None:
        return log_dir
    logger = trainer.loggers[0]
    name, version = logger.name, logger.version
    if not name and version in (None, ""):  # `fast_dev_run`'s DummyLogger: nothing names the run
        directory = trainer.default_root_dir
    else:
        version = version if isinstance(version, str) else f"version_{version}"
        directory = os.path.join(trainer.default_root_dir, str(name), version)
    # Every rank gets here (`trainer.log_dir` is rank 0's, broadcast); MLflow knows its run on rank 0 only.
    return trainer.strategy.broadcast(directory)
