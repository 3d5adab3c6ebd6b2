"""Train one small MLP under DDP or FSDP2 (2 CPU processes, gloo) with the probes named on the command line.

FSDP2 is Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard``
in ``configure_model``. The model, its initial weights and the data are the same under both strategies, so the
gradients are the same up to float rounding and so must be every record of the gradient probes. Lightning's
launcher re-executes ``sys.argv``, so tests start this file in a subprocess:
``python tests/fsdp_run.py OUTPUT_DIR ddp|fsdp2 probe_name[,probe_name...]``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402

import lightning_probes as lp  # noqa: E402
from tests.helpers import RandomDataModule  # noqa: E402

PROBES = {
    "gradient_stats": lambda out: lp.GradientStatsMonitor(every_n_steps=1, window=2, output_dir=out),
    "gradient_dynamics": lambda out: lp.GradientDynamicsMonitor(every_n_steps=1, max_columns=50,
                                                                output_dir=out, init_distance=True),
    "gradient_dynamics_sampled": lambda out: lp.GradientDynamicsMonitor(
        every_n_steps=2, max_entries=7, name="gradient_dynamics_sampled", output_dir=out, init_distance=True),
    "gradient_stats_every_3": lambda out: lp.GradientStatsMonitor(every_n_steps=3, name="gradient_stats_every_3",
                                                                 output_dir=out),
    "confidence": lambda out: lp.ConfidenceMonitor(output_dir=out),
    "noise_robustness": lambda out: lp.NoiseRobustnessMonitor(num_samples=16, num_draws=4, output_dir=out),
    "layer_correlation": lambda out: lp.LayerCorrelationMonitor(num_samples=16, output_dir=out),
    "activation_stats": lambda out: lp.ActivationStatsMonitor(num_samples=16, output_dir=out),
    "alignment": lambda out: lp.AlignmentMonitor(num_samples=16, output_dir=out),
    "augmentation_invariance": lambda out: lp.AugmentationInvarianceMonitor(num_images=2, num_views=4,
                                                                            output_dir=out),
}


class ShardableMLP(pl.LightningModule):
    """A 3-layer MLP whose layers FSDP2 shards on dim 0 (unevenly: 33 and 9 rows over 2 ranks)."""

    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 9), nn.ReLU(),
                                 nn.Linear(9, 10))

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits, "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def main() -> None:
    out, kind, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    pl.seed_everything(0)
    model = ShardableMLP(shard=kind == "fsdp2")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_epochs=2, default_root_dir=out, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PROBES[name](out) for name in names], num_sanity_val_steps=0, use_distributed_sampler=True,
    )
    trainer.fit(model, RandomDataModule(n=96, batch_size=16))
    with open(os.path.join(out, f"callback_metrics_rank{trainer.global_rank}.json"), "w") as f:
        json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, f)
    # Close the process group before the interpreter exits: gloo's threads torn down by the exit itself have
    # aborted a child ("terminate called without an active exception") once on a loaded machine.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: gloo's threads destroyed by it have still aborted a child once
    # under load after every record was written ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
