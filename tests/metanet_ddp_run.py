"""Fit and test a small `MetaNet` under DDP (2 CPU processes, gloo): ``python tests/metanet_ddp_run.py DATA OUT``.

Lightning's DDP launcher re-executes ``sys.argv``, so the test starts this file in a subprocess.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl  # noqa: E402

from lightning_probes.datamodules import ZooDataModule  # noqa: E402
from lightning_probes.models import MetaNet  # noqa: E402


def main() -> None:
    data, out = sys.argv[1], sys.argv[2]
    pl.seed_everything(0)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, default_root_dir=out,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    dm = ZooDataModule(data, split_seed=1, val_fraction=0.25, test_fraction=0.25, batch_size=16)
    model = MetaNet(encoder="lstm", layer_dims=[24, 12, 8, 10], d_model=16)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(os.path.join(out, "model.ckpt"))
    results = trainer.test(model, datamodule=dm, verbose=False)[0]
    if trainer.global_rank == 0:
        with open(os.path.join(out, "results.json"), "w") as handle:
            json.dump({k: float(v) for k, v in results.items()}, handle)


if __name__ == "__main__":
    main()
