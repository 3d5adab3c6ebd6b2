"""`StabilityMonitor` under DDP and then FSDP2, in one pair of processes (2 CPU ranks, gloo).

``python tests/stability_dist_run.py OUTPUT_DIR`` starts two rank processes of this file (the environment Lightning
reads for processes it did not create) and waits for them. Each rank fits `SpikyNet` under ``strategy="ddp"`` (into
``OUTPUT_DIR/ddp``) and then, in the same process group, under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``,
into ``OUTPUT_DIR/fsdp2``). Each rank's batch is 8 of the 16 samples of a one-process batch, so the mean of the
ranks' losses is the one-process loss. The loss is multiplied by 30 at step `SPIKE_STEP` and is NaN on rank 1 only at
step `NAN_STEP` (the one-process run: on its whole batch): every rank must flag both, skip both updates (the same
decision on every rank) and then train on exactly as the one process does. The test compares the records with a
one-process fit on batches of 16.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_probes as lp  # noqa: E402
from tests.two_ranks import launch_two_ranks, leave_rank  # noqa: E402

_RANK = "STABILITY_RUN_RANK"
SPIKE_STEP = 6
NAN_STEP = 9


class SpikyNet(pl.LightningModule):
    """A small regression MLP whose loss is multiplied by ``spikes[step]`` (NaN on ``nan_rank`` only at
    ``nan_step``); ``none_at``: steps whose ``training_step`` returns None (no backward)."""

    def __init__(self, spikes: dict | None = None, nan_step: int | None = None, nan_rank: int | None = None,
                 shard: bool = False, none_at: tuple = (), lr: float = 0.01) -> None:
        super().__init__()
        self.spikes, self.nan_step, self.nan_rank = dict(spikes or {}), nan_step, nan_rank
        self.shard, self.none_at, self.lr = shard, tuple(none_at), lr
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        if self.global_step in self.none_at:
            return None
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) * self.spikes.get(self.global_step, 1.0)
        if self.global_step == self.nan_step and (self.nan_rank is None or self.global_rank == self.nan_rank):
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SpikyData(pl.LightningDataModule):
    """192 samples of a smooth regression target; rank r of W takes samples r, r + W, ... (no shuffling)."""

    def __init__(self, batch_size: int, n: int = 192) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.sin(self.x[:, :3].sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(TensorDataset(self.x[rank::world], self.y[rank::world]), batch_size=self.batch_size,
                          shuffle=False)


def probes(out: str) -> list:
    return [lp.StabilityMonitor(every_n_steps=3, window=4, warmup=4, threshold=4.0, on_spike="skip", output_dir=out),
            lp.StabilityMonitor(every_n_steps=3, window=4, warmup=2, rule="relative", rtol=1.0, watch=("loss",),
                                exclude_spikes=True, name="stability_relative", output_dir=out)]


def fit(out: str, kind: str, batch_size: int, devices: int) -> pl.Trainer:
    from pytorch_lightning.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    model = SpikyNet({SPIKE_STEP: 30.0}, NAN_STEP, nan_rank=1 if devices > 1 else None, shard=kind == "fsdp2")
    strategy = {"ddp": "ddp", "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                "single": "auto"}[kind]
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_steps=13, default_root_dir=out, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=probes(out),
        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(model, SpikyData(batch_size))
    return trainer


def rank_main(out: str) -> None:
    for kind in ("ddp", "fsdp2"):
        trainer = fit(os.path.join(out, kind), kind, 8, 2)
        skipped = trainer.callbacks[0].skipped_steps
        with open(os.path.join(out, kind, f"skipped_rank{trainer.global_rank}.txt"), "w") as f:
            f.write(",".join(map(str, skipped)))
    leave_rank()


def launch(out: str) -> int:
    return launch_two_ranks(__file__, out, _RANK)


if __name__ == "__main__":
    if _RANK in os.environ:
        rank_main(sys.argv[1])
    else:
        sys.exit(launch(sys.argv[1]))
