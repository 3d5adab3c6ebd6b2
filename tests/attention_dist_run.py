"""`AttentionMonitor` under DDP and then FSDP2 (2 CPU processes, gloo), in one launch of 2 processes.

The model holds an ``nn.MultiheadAttention`` (key padding) and a block that calls SDPA (causal); each rank trains
on its half of every batch. ``tests/callbacks/test_attention.py`` compares the records with one process on the
union of the batches. Lightning's launcher re-executes ``sys.argv``: ``python tests/attention_dist_run.py OUT``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

VOCAB, LENGTH = 12, 5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, length, 8)


class Net(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        self.embed = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.attn, mesh=mesh)
        fully_shard(self.block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # FSDP2 unshards the root's parameters in forward
        h = self.embed(ids) * 3
        a, _ = self.attn(h, h, h, key_padding_mask=ids == 0)
        return self.head(self.block(h + a).mean(1))

    def training_step(self, batch, batch_idx):
        ids, target = batch
        return F.cross_entropy(self(ids), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_model(shard: bool) -> Net:
    pl.seed_everything(0)
    return Net(shard)


def reference_data(batch_size: int, union: bool = False) -> DataLoader:
    """64 sequences of 5 tokens, some padded. ``union``: in the order the 2 ranks' ``DistributedSampler``
    (Lightning's, shuffled with seed 0 in epoch 0) deals them, so that batch ``i`` of ``2 * batch_size`` is the union
    of the ranks' batches ``i``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (64, LENGTH), generator=g)
    ids[torch.arange(64) % 3 == 0, -2:] = 0  # some padded sequences
    if union:
        ids = ids[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    return DataLoader(TensorDataset(ids, ids[:, 0] % 3), batch_size=batch_size)


def probe(out: str):
    from lightning_probes import AttentionMonitor

    return AttentionMonitor(every_n_steps=2, max_queries=None, sdpa_modules=r"^block$", output_dir=out)


def main() -> None:
    from pytorch_lightning.strategies import ModelParallelStrategy

    out = sys.argv[1]
    for kind in ("ddp", "fsdp2"):
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
        model = make_model(shard=kind == "fsdp2")
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, logger=False,
                             default_root_dir=out, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[probe(os.path.join(out, kind))])
        trainer.fit(model, reference_data(batch_size=8))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
