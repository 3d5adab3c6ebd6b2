"""Run a study from Python: write a study file, prepare it, run its trials, summarise.

The same steps as ``lightning-probes study --config FILE``, through ``lightning_probes.studies``: every trial is
an ordinary ``lightning fit`` subprocess of the base config with the grid's values; ``summary.md`` compares the
settings over seeds. Run ``python examples/study_from_python.py`` (two learning rates x one seed, one short epoch
each: about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os

import yaml

from lightning_probes.studies import prepare_study, run_sequential, write_study_summary

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def main(output: str = "runs/examples/study", seeds: tuple[int, ...] = (1,), limit_batches: int = 10) -> dict:
    """Run a two-setting study on the bundled digits; return its summary."""
    os.makedirs(output, exist_ok=True)
    spec = {
        "name": "example",
        "base": os.path.join(ROOT, "configs", "quickstart.yaml"),
        "overrides": {"trainer.max_epochs": 1, "trainer.limit_train_batches": limit_batches,
                      "trainer.limit_val_batches": 2,
                      "trainer.callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                             "init_args": {"save_last": True}},
                                            {"class_path": "lightning_probes.GradientStatsMonitor",
                                             "init_args": {"every_n_steps": 5}}]},
        "grid": {"model.init_args.lr": [0.1, 0.02]},
        "seeds": list(seeds),
        "monitor": "val/acc",
        "test": False,
        "output": os.path.abspath(output),
    }
    path = os.path.join(output, "study.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    study = prepare_study(path)
    statuses = run_sequential(study.jobs, progress=False)
    print([s["status"] for s in statuses])
    summary = write_study_summary(study)
    print(json.dumps(summary["best"], indent=1, default=str))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/examples/study")
    parser.add_argument("--limit_batches", type=int, default=10)
    args = parser.parse_args()
    main(args.output, limit_batches=args.limit_batches)
