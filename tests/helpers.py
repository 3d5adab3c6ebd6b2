"""Small models, data and reference callbacks shared by the probe tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes.models import MLP
from lightning_probes.naming import clean_name


class RandomDataModule(pl.LightningDataModule):
    """Random images with labels that depend on the pixels (so a model can learn something)."""

    def __init__(self, n: int = 96, batch_size: int = 16, shape=(1, 8, 8), num_classes: int = 10, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=g)
        self.y = (self.x.flatten(1)[:, :num_classes].argmax(1)) % num_classes
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=self.batch_size)


def small_mlp(**kwargs: Any) -> MLP:
    return MLP(hidden=(16, 12, 8), input_size=8, **kwargs)


def trainer(tmp_path: Path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    defaults = dict(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False,
                    enable_model_summary=False, logger=False, enable_checkpointing=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


class GradRecorder(pl.Callback):
    """Independent reference: full copies of every gradient and of the weights before and after each step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_start(self, trainer, pl_module):
        self._module = pl_module
        self._handles = [opt.register_step_post_hook(self._after) for opt in trainer.optimizers]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "grads": {clean_name(n): p.grad.detach().double().clone() for n, p in pl_module.named_parameters()
                      if p.grad is not None},
            "before": {clean_name(n): p.detach().double().clone() for n, p in pl_module.named_parameters()},
            "after": None,
        })

    def _after(self, optimizer, args, kwargs):
        self.steps[-1]["after"] = {clean_name(n): p.detach().double().clone()
                                   for n, p in self._module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()

    def by_step(self) -> dict[int, dict[str, Any]]:
        return {s["step"]: s for s in self.steps}


def approx(expected: Any, **tolerances: Any) -> Any:
    """``pytest.approx`` for numbers, recursively through lists, tuples and dicts; ``None``, strings and bools are
    compared exactly (pytest >= 9.1 refuses ``approx(None)`` and ``approx("text")``)."""
    import pytest

    if expected is None or isinstance(expected, (str, bool)):
        return expected
    if isinstance(expected, dict):
        return {k: approx(v, **tolerances) for k, v in expected.items()}
    if isinstance(expected, (list, tuple)):
        return type(expected)(approx(v, **tolerances) for v in expected)
    return pytest.approx(expected, **tolerances)


def run_in_new_session(args: list[str], timeout: float, what: str, env: dict | None = None) -> str:
    """Run ``args`` from the repository root in a new session; on timeout kill its whole process group (DDP
    workers included) and fail the test. Returns the output; a non-zero exit fails the test with its tail."""
    import os
    import signal
    import subprocess

    import pytest

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.Popen(args, cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s (a collective some rank never entered?):\n"
                    f"{output[-3000:]}")
    assert proc.returncode == 0, output[-5000:]
    return output

