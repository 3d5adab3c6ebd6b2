"""`ActivationOutlierMonitor` under DDP and then FSDP2, in one pair of processes (2 CPU ranks, gloo).

``python tests/outliers_run.py OUTPUT_DIR`` starts two rank processes of this file (the environment Lightning reads
for processes it did not create: ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...) and waits for them. Each rank
fits `OutlierNet` under ``strategy="ddp"`` (into ``OUTPUT_DIR/ddp``) and then, in the same process group, under
FSDP2 (``ModelParallelStrategy`` with ``fully_shard``, into ``OUTPUT_DIR/fsdp2``). Each rank's batch is 16 of the
32 samples of a one-process batch (`OutlierData`: even samples are 3x larger, so the ranks' own RMS differ from the
global one). The test compares the records with a one-process fit on batches of 32.
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

_RANK = "OUTLIERS_RUN_RANK"


class Block(nn.Module):
    """A residual block whose output is a tuple ``(stream, an integer tensor)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self.act(self.fc(x)), torch.zeros((), dtype=torch.long, device=x.device)


class Tagger(nn.Module):
    """Holds a (frozen) parameter and returns indices only (a dict without a floating-point tensor)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width), requires_grad=False)  # frozen: DDP ignores it

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"index": (x * self.scale).argmax(-1)}


class Body(nn.Module):
    """Conv (channel first), a token projection with a massive channel, layer norm, two blocks, a classifier."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.embed = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.tagger = Tagger(8)
        self.head = nn.Linear(8, 10)
        with torch.no_grad():
            self.embed.bias[3] = 20.0  # channel 3 of the projection: a massive activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x))  # (N, 4, 8, 8); in place on the conv output with inplace=True
        h = self.embed(h.flatten(2).transpose(1, 2))  # (N, 64, 8)
        h = self.norm(h) + h  # the massive channel survives in the stream
        for block in self.blocks:
            h, _ = block(h)
        self.tagger(h)
        return self.head(h.mean(1))  # (N, 10)


class OutlierNet(pl.LightningModule):
    def __init__(self, inplace: bool = False, shard: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        self.shard, self.lr = shard, lr
        self.net = Body(inplace)

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.net.embed, self.net.blocks[0], self.net.blocks[1], self.net.head):
            fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class OutlierData(pl.LightningDataModule):
    """96 images (1, 8, 8); the even samples 3x larger (rank 0's under a 2-rank DistributedSampler)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(96, 1, 8, 8, generator=g)
        self.x[::2] *= 3.0
        self.y = torch.randint(0, 10, (96,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        # Rank r of W takes samples r, r + W, ... (no sampler of Lightning's, which would shuffle): its batch j is
        # the rank's part of the one-process batch j of W * batch_size samples.
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(TensorDataset(self.x[rank::world], self.y[rank::world]), batch_size=self.batch_size,
                          shuffle=False)


def probes(out: str) -> list:
    return [lp.ActivationOutlierMonitor(every_n_steps=2, k=3.0, output_dir=out),
            lp.ActivationOutlierMonitor(every_n_steps=2, k=3.0, exceed_rms="local", name="outliers_local",
                                        output_dir=out)]


def fit(out: str, kind: str, batch_size: int, devices: int) -> pl.Trainer:
    from pytorch_lightning.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    model = OutlierNet(shard=kind == "fsdp2")
    strategy = {"ddp": "ddp", "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                "single": "auto"}[kind]
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_epochs=2, default_root_dir=out, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=probes(out),
        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(model, OutlierData(batch_size))
    return trainer


def rank_main(out: str) -> None:
    for kind in ("ddp", "fsdp2"):
        trainer = fit(os.path.join(out, kind), kind, 16, 2)
        if trainer.is_global_zero:
            held = max(p.last_held_bytes for p in trainer.callbacks if isinstance(p, lp.ActivationOutlierMonitor))
            with open(os.path.join(out, kind, "held_bytes.txt"), "w") as f:
                f.write(str(held))
    leave_rank()


def launch(out: str) -> int:
    return launch_two_ranks(__file__, out, _RANK)


if __name__ == "__main__":
    if _RANK in os.environ:
        rank_main(sys.argv[1])
    else:
        sys.exit(launch(sys.argv[1]))
