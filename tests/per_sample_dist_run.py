"""`PerSampleGradientMonitor` under DDP (2 CPU ranks, gloo) against one process on the union batch, and its
refusal of FSDP2 (``ModelParallelStrategy``) in the same two processes.

``python tests/per_sample_dist_run.py OUTPUT_DIR`` starts two rank processes of this file and waits for them. Each
rank fits `ReluNet` under ``strategy="ddp"`` on its half of the data (rank r takes samples r, r + 2, ...) with
batches of 8 and a probe batch of 8 for 2 epochs, into ``OUTPUT_DIR/ddp``; then it fits 1 epoch with a checkpoint
and resumes it for the second into ``OUTPUT_DIR/resumed``: the second epoch runs over the data in reverse order, so
the resumed run's first batches are not the fixed probe batches, which must come back from rank 0's checkpoint (each
rank its own). Then it attempts a fit under ``ModelParallelStrategy(data_parallel_size=2)`` and writes the
refusal's message to ``OUTPUT_DIR/fsdp_rank<r>.txt``. The test fits one process on batches of 16 (the union) with a
probe batch of 16 and compares the records; the resumed run's must equal the uninterrupted DDP run's.
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
from tests.crash import EpochOrder  # noqa: E402
from tests.two_ranks import launch_two_ranks, leave_rank  # noqa: E402

_RANK = "PER_SAMPLE_RUN_RANK"


class ReluNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class Sharded(ReluNet):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, 16, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 4, (48,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        data = TensorDataset(self.x[rank::world], self.y[rank::world])
        return DataLoader(data, batch_size=self.batch_size, sampler=EpochOrder(len(data)))


def _trainer(out: str, strategy, devices: int, probe, precision: str = "64-true", max_epochs: int = 1,
             checkpoint: bool = False) -> pl.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint

    extra = [ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True)] if checkpoint else []
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_epochs=max_epochs,
                      default_root_dir=out, logger=False, enable_checkpointing=checkpoint, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[probe, *extra], num_sanity_val_steps=0,
                      use_distributed_sampler=False, precision=precision)


def fit(out: str, batch_size: int, devices: int, max_epochs: int = 2, checkpoint: bool = False,
        ckpt_path: str | None = None) -> pl.Trainer:
    pl.seed_everything(0)
    model = ReluNet().double()
    probe = lp.PerSampleGradientMonitor(every_n_steps=2, num_samples=batch_size, curvature_samples=3, tic_diag=True,
                                        histograms="both", hist_range_1d=(-0.3, 0.3),
                                        hist_range_2d=((-0.2, 0.2), (-0.5, 0.5)),
                                        max_memory_gb=0.0002, output_dir=out)
    trainer = _trainer(out, "ddp" if devices > 1 else "auto", devices, probe, max_epochs=max_epochs,
                       checkpoint=checkpoint)
    trainer.fit(model, Data(batch_size), ckpt_path=ckpt_path)
    return trainer


def rank_main(out: str) -> None:
    fit(os.path.join(out, "ddp"), 8, 2)
    resumed = os.path.join(out, "resumed")
    fit(resumed, 8, 2, max_epochs=1, checkpoint=True)
    fit(resumed, 8, 2, ckpt_path=os.path.join(resumed, "ckpt", "last.ckpt"))
    from pytorch_lightning.strategies import ModelParallelStrategy

    probe = lp.PerSampleGradientMonitor(output_dir=os.path.join(out, "fsdp"))
    trainer = _trainer(os.path.join(out, "fsdp"), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                       2, probe, "32-true")
    try:
        trainer.fit(Sharded(), Data(8))
        message = "not refused"
    except lp.ProbeConfigurationError as err:
        message = str(err)
    with open(os.path.join(out, f"fsdp_rank{trainer.global_rank}.txt"), "w") as f:
        f.write(message)
    leave_rank()


def launch(out: str) -> int:
    return launch_two_ranks(__file__, out, _RANK)


if __name__ == "__main__":
    if _RANK in os.environ:
        rank_main(sys.argv[1])
    else:
        sys.exit(launch(sys.argv[1]))
