"""A callback that stops a ``lightning fit`` subprocess at a chosen batch, so that a test can ``kill -9`` it there.

``LP_PAUSE_AT="<epoch>:<batch>"`` and ``LP_PAUSE_MARKER=<path>`` in the environment: at that training batch the
callback writes the marker file and sleeps until the test kills the process. Without them it does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl


class PauseAt(pl.Callback):
    """Write a marker and sleep at the training batch given by ``LP_PAUSE_AT`` (``epoch:batch``)."""

    def __init__(self) -> None:
        spec = os.environ.get("LP_PAUSE_AT")
        self.at = tuple(int(v) for v in spec.split(":")) if spec else None
        self.marker = os.environ.get("LP_PAUSE_MARKER")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.at == (trainer.current_epoch, batch_idx) and self.marker:
            Path(self.marker).write_text(str(os.getpid()))
            while True:  # the test sends SIGKILL
                time.sleep(1)
