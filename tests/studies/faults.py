"""Callbacks that make chosen trials of a study fail (by killing their own process, or by raising) or run slowly.

The trial's seed (``PL_GLOBAL_SEED``, set by ``seed_everything``) picks the fault, so one override serves a whole
study: at the start of training epoch ``at_epoch`` (after the previous epoch's checkpoint), the trial with seed
``kill_seed`` sends itself ``SIGKILL`` (once: it first writes ``marker``, and a rerun that finds the marker goes on),
and the trial with seed ``raise_seed`` raises ``RuntimeError("boom from the trial's own code")``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl


class Fault(pl.Callback):
    """Kill or raise in the trial whose seed is ``kill_seed`` / ``raise_seed`` (see the module docstring)."""

    def __init__(self, marker: str, kill_seed: Optional[int] = None, raise_seed: Optional[int] = None,
                 at_epoch: int = 1) -> None:
        self.marker = marker
        self.kill_seed = kill_seed
        self.raise_seed = raise_seed
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.at_epoch:
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", "-1"))
        if seed == self.kill_seed and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if seed == self.raise_seed:
            raise RuntimeError("boom from the trial's own code")


class Slow(pl.Callback):
    """Sleep ``seconds`` after every training batch, so that a test can act while a trial is running."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        import time

        time.sleep(self.seconds)
