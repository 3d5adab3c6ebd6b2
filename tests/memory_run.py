"""Fit with every probe at every epoch and print the peak resident memory: ``python tests/memory_run.py EPOCHS DIR``."""

from __future__ import annotations

import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402

import lightning_probes as lp  # noqa: E402
from tests.helpers import RandomDataModule, small_mlp  # noqa: E402


def main() -> None:
    epochs, out = int(sys.argv[1]), sys.argv[2]
    probes = [
        lp.GradientStatsMonitor(every_n_steps=1, output_dir=out),
        lp.GradientDynamicsMonitor(every_n_steps=1, output_dir=out),
        lp.ConfidenceMonitor(output_dir=out),
        lp.NoiseRobustnessMonitor(num_samples=16, num_draws=4, output_dir=out),
        lp.LayerCorrelationMonitor(num_samples=32, output_dir=out),
        lp.ActivationStatsMonitor(num_samples=32, output_dir=out),
        lp.AugmentationInvarianceMonitor(num_images=2, num_views=8, output_dir=out),
        lp.AlignmentMonitor(num_samples=32, output_dir=out),
    ]
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=out, logger=pl.loggers.TensorBoardLogger(out),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=probes, limit_train_batches=2, log_every_n_steps=1)
    trainer.fit(small_mlp(), RandomDataModule(n=64, batch_size=16))
    print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")


if __name__ == "__main__":
    main()
