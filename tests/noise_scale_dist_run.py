"""`GradientNoiseScaleMonitor` under DDP (without and with gradient accumulation) and FSDP2, in one pair of processes.

``python tests/noise_scale_dist_run.py OUTPUT_DIR`` starts two rank processes of this file (2 CPU ranks, gloo; the
environment Lightning reads for processes it did not create) and waits for them. Each rank fits `NoiseNet` under
``strategy="ddp"`` with ``accumulate_grad_batches=1`` (into ``OUTPUT_DIR/ddp``) and ``2`` (``OUTPUT_DIR/ddp_k2``),
then under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``, ``OUTPUT_DIR/fsdp2``), where the probe must skip
itself at its pre-flight. Rank ``r`` trains on the samples ``r, r + 2, ...`` (`NoiseData`); the test compares the
DDP records with one process that accumulates the same micro-batches (`union_indices`).
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_probes as lp  # noqa: E402
from tests.two_ranks import launch_two_ranks, leave_rank  # noqa: E402

_RANK = "NOISE_SCALE_RUN_RANK"
#: Samples per micro-batch and rank, samples in all (every rank's epoch: 8 micro-batches).
BATCH, SAMPLES = 4, 64


class NoiseNet(pl.LightningModule):
    """``Linear(6, 5) -> tanh -> Linear(5, 3)``, mean squared error, SGD."""

    def __init__(self, lr: float = 0.1, shard: bool = False) -> None:
        super().__init__()
        self.lr, self.shard = lr, shard
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.net[0], self.net[2]):
            fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)  # the mean over the micro-batch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 6, generator=g)
    y = torch.tanh(x[:, :3] * 2.0) + 0.5 * torch.randn(SAMPLES, 3, generator=g)
    return x, y


def union_indices(world: int, accumulate: int, batch: int = BATCH, samples: int = SAMPLES) -> list[int]:
    """The sample order of one process that accumulates ``world * accumulate`` micro-batches per step, step by step
    the micro-batches of every rank (rank ``r``'s ``k``-th sample is ``world * k + r``)."""
    per_rank = samples // world
    order = []
    for step in range(per_rank // (batch * accumulate)):
        for rank in range(world):
            for micro in range(accumulate):
                first = (step * accumulate + micro) * batch
                order += [world * k + rank for k in range(first, first + batch)]
    return order


class NoiseData(pl.LightningDataModule):
    """Rank ``r`` of ``W`` takes samples ``r, r + W, ...`` in order; ``order`` gives one process's own order."""

    def __init__(self, order: list[int] | None = None, batch_size: int = BATCH) -> None:
        super().__init__()
        self.x, self.y = tensors()
        self.order, self.batch_size = order, batch_size

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.order is not None:
            x, y = self.x[self.order], self.y[self.order]
        else:
            x, y = self.x[rank::world], self.y[rank::world]
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=False)


def probe(out: str) -> lp.GradientNoiseScaleMonitor:
    return lp.GradientNoiseScaleMonitor(every_n_steps=1, log_every_n_steps=2, ema_decay=0.5, output_dir=out)


def fit(out: str, kind: str, accumulate: int, devices: int, order: list[int] | None = None) -> pl.Trainer:
    from pytorch_lightning.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    strategy = {"ddp": "ddp", "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                "single": "auto"}[kind]
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_epochs=2, default_root_dir=out, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe(out)],
        num_sanity_val_steps=0, use_distributed_sampler=False, accumulate_grad_batches=accumulate)
    trainer.fit(NoiseNet(shard=kind == "fsdp2"), NoiseData(order))
    return trainer


def rank_main(out: str) -> None:
    for kind, accumulate, sub in (("ddp", 1, "ddp"), ("ddp", 2, "ddp_k2"), ("fsdp2", 1, "fsdp2")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = fit(os.path.join(out, sub), kind, accumulate, 2)
        if trainer.is_global_zero:
            skipped = [str(w.message) for w in caught if issubclass(w.category, lp.ProbeSkippedWarning)]
            with open(os.path.join(out, sub, "skip_warnings.txt"), "w") as f:
                f.write("\n".join(skipped))
    leave_rank()


def launch(out: str) -> int:
    return launch_two_ranks(__file__, out, _RANK)


if __name__ == "__main__":
    if _RANK in os.environ:
        rank_main(sys.argv[1])
    else:
        sys.exit(launch(sys.argv[1]))
