"""A probe that fails on one rank only, under DDP (2 CPU processes, gloo), with ``on_error="warn"``.

``python tests/guard_ddp_run.py OUTPUT_DIR``: ConfidenceMonitor's targets are out of range on global rank 1 only
(it raises there, in ``on_validation_batch_end``, after the first epoch), and NoiseRobustnessMonitor's
``logits_fn`` raises on global rank 0 (the only rank that analyses) from the second analysis on. Both probes
must be disabled on both ranks and training must finish: no rank may be left waiting in a collective (the metric
sync at the epoch end, the broadcast of the headline). Each rank writes ``rank<R>.json``.
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


class RankOneBadTargets(type(small_mlp())):
    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        if self.global_rank == 1 and self.current_epoch >= 1:
            out = {**out, "target": out["target"] + 100}  # no such class
        return out


def failing_logits(module, x):
    if module.current_epoch >= 1:
        raise RuntimeError("logits_fn failed on this rank")
    return module(x)


def main() -> None:
    if os.environ.get("GUARD_DEBUG"):
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["GUARD_DEBUG"]), exit=True)
    out = sys.argv[1]
    pl.seed_everything(0)
    confidence = lp.ConfidenceMonitor(output_dir=out, on_error="warn")
    noise = lp.NoiseRobustnessMonitor(num_samples=16, num_draws=2, logits_fn=failing_logits, output_dir=out,
                                      on_error="warn")
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, default_root_dir=out,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[confidence, noise], num_sanity_val_steps=0)
    model = RankOneBadTargets(hidden=(16, 12, 8), input_size=8)
    trainer.fit(model, RandomDataModule(n=96, batch_size=16))
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"global_step": trainer.global_step, "confidence": confidence.disabled,
                   "noise": noise.disabled}, f)
    # Close the process group before the interpreter exits: gloo's threads torn down by the exit itself have
    # aborted a child ("terminate called without an active exception") once on a loaded machine.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
