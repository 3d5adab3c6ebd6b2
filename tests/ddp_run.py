"""Run a small fit under DDP (2 CPU processes, gloo) with the probes named on the command line.

Lightning's DDP launcher re-executes ``sys.argv``, so tests start this file in a subprocess:
``python tests/ddp_run.py OUTPUT_DIR probe_name[,probe_name...]``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

import lightning_probes as lp  # noqa: E402
from tests.helpers import RandomDataModule, small_mlp  # noqa: E402

PROBES = {
    "gradient_stats": lambda out: lp.GradientStatsMonitor(every_n_steps=1, output_dir=out),
    "gradient_dynamics": lambda out: lp.GradientDynamicsMonitor(every_n_steps=1, output_dir=out),
    "confidence": lambda out: lp.ConfidenceMonitor(output_dir=out),
    "noise_robustness": lambda out: lp.NoiseRobustnessMonitor(num_samples=16, num_draws=4, output_dir=out),
    "layer_correlation": lambda out: lp.LayerCorrelationMonitor(num_samples=16, output_dir=out),
    "activation_stats": lambda out: lp.ActivationStatsMonitor(num_samples=16, output_dir=out),
    "alignment": lambda out: lp.AlignmentMonitor(num_samples=16, output_dir=out),
    "augmentation_invariance": lambda out: lp.AugmentationInvarianceMonitor(num_images=2, num_views=4, output_dir=out),
}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2].split(",")
    pl.seed_everything(0)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, default_root_dir=out, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PROBES[name](out) for name in names], num_sanity_val_steps=0,
    )
    trainer.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    # Headline scalars every rank holds (the analysis probes broadcast rank 0's values).
    with open(os.path.join(out, f"callback_metrics_rank{trainer.global_rank}.json"), "w") as f:
        json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, f)
    # Close the process group before the interpreter exits: gloo's threads torn down by the exit itself have
    # aborted a child ("terminate called without an active exception") once on a loaded machine.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown (see tests/fsdp_run.py: gloo's threads once aborted a child there).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
