"""Meta-networks against the baselines that need none: encoder x task x split seed, on a zoo data set.

Each run is ``lightning fit`` + ``lightning test`` of a shipped ``configs/metanet/<encoder>_<task>.yaml``, in this
process (LightningCLI, no logger, only a ``ModelCheckpoint`` on ``val/loss``: the probes are left out to keep 60+
runs short), tested on the best-``val/loss`` checkpoint. Rows go to ``<output>/runs.csv`` as they finish (a rerun
skips the rows already there); ``<output>/table.md`` holds mean +- sample std over split seeds of every metric,
meta-net and baselines side by side.

    python benchmarks/metanet_study.py --data_dir runs/zoo_dataset --output runs/metanet_study \
        [--encoders rnn,lstm,transformer] [--tasks classification,regression] [--seeds 0,1,2,3,4] \
        [--split_by model] [--max_models 0] [--epochs 20] [--encoding sorted] [--inputs layers,all] \
        [--layer_dims 400,120,84,10] [--loss mse]

``--inputs`` names the input sets of the ablation (`INPUT_SETS`): ``layers`` (the sorted layer outputs alone) and
the layers plus class-aligned inputs of a data set built with ``zoo-dataset --features
boundary,context,probes,noise_profile``: ``boundary`` (log linearised distances to the decision boundary), ``probes``
(the linear probes' class scores and margins), ``context`` (the model's confidence profile), ``noise_profile`` (the
model's own stability under the label's noise on its training images), ``probes+boundary+context``, ``all``.
``--split_by`` takes several protocols (``model,model_and_image,pair``). ``--layer_dims`` must match the zoo's
LeNet5 (``256,120,84,10`` without padding).

``--smoke`` runs one encoder, task and seed for one epoch on a tiny random zoo data set it writes under
``--output`` (seconds; the numbers mean nothing). Every run's own files (checkpoints, the config LightningCLI saves)
go to a temporary directory.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_smoke_argument, apply_smoke, output_dir

ROOT = Path(__file__).resolve().parents[1]
#: The ablation's input sets: ZooDataModule ``aligned`` arrays and their widths (MetaNet ``aligned_dims``).
INPUT_SETS: dict[str, list[tuple[str, int]]] = {
    "layers": [],
    "boundary": [("boundary_distance", 10)],
    "probes": [("probe_pool2", 10), ("probe_fc1", 10), ("probe_fc2", 10), ("probe_margin", 3)],
    "context": [("context", 8)],
    "noise_profile": [("noise_profile", 5)],
    "probes+boundary+context": [("boundary_distance", 10), ("probe_pool2", 10), ("probe_fc1", 10), ("probe_fc2", 10),
                                ("probe_margin", 3), ("context", 8)],
    "all": [("boundary_distance", 10), ("probe_pool2", 10), ("probe_fc1", 10), ("probe_fc2", 10),
            ("probe_margin", 3), ("context", 8), ("noise_profile", 5)],
}
HEADLINE = {"classification": ["accuracy", "auroc", "aupr_err", "fpr_at_95tpr"],
            "regression": ["r2", "spearman", "mse", "r2_correct", "r2_wrong"]}


def input_args(inputs: str) -> list[str]:
    """LightningCLI arguments of one input set (`INPUT_SETS`)."""
    if inputs not in INPUT_SETS:
        raise SystemExit(f"error: unknown input set {inputs!r}; valid: {', '.join(INPUT_SETS)}")
    names = [name for name, _ in INPUT_SETS[inputs]]
    dims = [dim for _, dim in INPUT_SETS[inputs]]
    return ["--data.aligned", "[" + ",".join(names) + "]", "--model.init_args.aligned_dims",
            "[" + ",".join(map(str, dims)) + "]"]


def run_one(config: str, data_dir: str, seed: int, split_by: str, max_models: int, epochs: int, encoding: str,
            extra: list[str]) -> dict[str, float]:
    from lightning_probes.cli import build_cli

    with tempfile.TemporaryDirectory() as tmp:
        callbacks = ('[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"dirpath": "'
                     + tmp + '", "monitor": "val/loss", "mode": "min", "save_last": false}}]')
        args = ["fit", "--config", config, "--trainer.default_root_dir", tmp,
                "--data.data_dir", data_dir, "--data.split_seed", str(seed),
                "--data.split_by", split_by, "--seed_everything", str(seed), "--trainer.logger", "false",
                "--trainer.callbacks", callbacks, "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.max_epochs", str(epochs),
                "--model.init_args.encoding", encoding, *extra]
        if max_models:
            args += ["--data.max_models", str(max_models)]
        argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads `args`, not this script's own arguments
        try:
            cli = build_cli(args, run=True)
        finally:
            sys.argv = argv
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
        results["n_train_models"] = len(cli.datamodule.splits["train"])
        results["n_test_samples"] = len(cli.datamodule.arrays["test"]["model_id"])
        results["epochs_run"] = cli.trainer.current_epoch
    return {k: float(v) for k, v in results.items()}


SMOKE_DIMS = (8, 6, 5, 10)  # pool2, fc1, fc2, fc3 of the tiny random zoo data set


def write_smoke_dataset(directory: Path, models: int = 12, per_model: int = 20) -> str:
    """A tiny zoo data set of random activations in the shards' format (``lightning-probes zoo-dataset``)."""
    from lightning_probes.io import atomic_save_npz

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = models * per_model
    logits = rng.normal(0, 2, (n, SMOKE_DIMS[-1])).astype(np.float32)
    arrays = {"model_id": np.repeat(np.arange(models), per_model),
              "sample_index": np.tile(np.arange(per_model), models),
              "label": rng.integers(0, 10, n), "pred": logits.argmax(1), "correct": rng.integers(0, 2, n),
              "ratio": rng.random(n).astype(np.float32), "fc3": logits}
    for name, width in zip(("pool2", "fc1", "fc2"), SMOKE_DIMS[:3]):
        arrays[name] = rng.normal(0, 1, (n, width)).astype(np.float32)
    atomic_save_npz(str(directory / "shard_0000.npz"), **arrays)
    return str(directory)


def _fmt(values: list[float]) -> str:
    a = np.array(values, dtype=float)
    if len(a) == 0 or np.all(np.isnan(a)):
        return "n/a"
    return f"{np.nanmean(a):.3f} ± {np.nanstd(a, ddof=1):.3f}" if len(a) > 1 else f"{a[0]:.3f}"


def table(rows: list[dict[str, str]]) -> str:
    """Markdown: per (split_by, max_models, encoding, task) one table, rows = meta-net encoder x input set, then the
    baselines."""
    lines = []
    for r in rows:
        r.setdefault("inputs", "layers")
    groups = sorted({(r["split_by"], int(r["max_models"]), r["encoding"], r["task"]) for r in rows})
    for split_by, max_models, encoding, task in groups:
        chosen = [r for r in rows if (r["split_by"], int(r["max_models"]), r["encoding"], r["task"])
                  == (split_by, max_models, encoding, task)]
        metrics = HEADLINE[task]
        seeds = sorted({int(r["seed"]) for r in chosen})
        models = "all models" if not max_models else f"first {max_models} models"
        lines += [f"### {task}, split by {split_by}, {models}, encoding {encoding} (seeds {seeds})", "",
                  "| predictor | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        if task == "regression":
            metrics = [*metrics, "r2_ceiling"]
        lines[-2:] = ["| predictor | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        losses = sorted({r.get("loss", "") for r in chosen})
        for encoder, inputs, loss in itertools.product(("rnn", "lstm", "transformer"), INPUT_SETS, losses):
            mine = [r for r in chosen
                    if (r["encoder"], r["inputs"], r.get("loss", "")) == (encoder, inputs, loss)]
            if mine:
                cells = [_fmt([float(r[f"test/{m}"]) for r in mine if r.get(f"test/{m}", "") != ""])
                         for m in metrics]
                label = f"{inputs}, {loss} loss" if loss else inputs
                lines.append(f"| MetaNet {encoder}, {label} (n={len(mine)}) | " + " | ".join(cells) + " |")
        names = sorted({k.split("/")[2] for r in chosen for k, v in r.items()
                        if k.startswith("test/baseline/") and v not in ("", None)})
        # Baselines depend on the split only: one value per seed (the first run of that seed).
        per_seed = {int(r["seed"]): r for r in chosen}
        for name in names:
            cells = [_fmt([float(r[f"test/baseline/{name}/{m}"]) for r in per_seed.values()
                           if r.get(f"test/baseline/{name}/{m}", "") not in ("", None)]) for m in metrics]
            lines.append(f"| baseline {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="the zoo data set (required unless --smoke)")
    parser.add_argument("--output", default=None, help="where runs.csv and table.md go (required unless --smoke: "
                                                       "then a temporary directory by default)")
    parser.add_argument("--encoders", default="rnn,lstm,transformer")
    parser.add_argument("--tasks", default="classification,regression")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--split_by", default="model")
    parser.add_argument("--max_models", default="0", help="Comma-separated; 0 = all models.")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--encoding", default="sorted")
    parser.add_argument("--inputs", default="layers", help=f"Comma-separated input sets: {', '.join(INPUT_SETS)}")
    parser.add_argument("--layer_dims", default=None, help="Comma-separated MetaNet layer_dims (default: the "
                                                           "config's)")
    parser.add_argument("--loss", default=None, help="Regression loss, mse or binomial (default: the config's)")
    parser.add_argument("--extra", default="", help="Further LightningCLI arguments, space-separated.")
    add_smoke_argument(parser)
    args = parser.parse_args()
    if not args.smoke and (args.data_dir is None or args.output is None):
        parser.error("--data_dir and --output are required (or --smoke)")
    with output_dir(args.output) as output:
        if args.smoke:
            dims = "[" + ",".join(map(str, SMOKE_DIMS)) + "]"
            apply_smoke(args, data_dir=write_smoke_dataset(Path(output) / "smoke_zoo_dataset"), encoders="rnn",
                        tasks="classification", seeds="0", max_models="0", epochs=1,
                        extra=f"{args.extra} --model.init_args.layer_dims {dims}".strip())
        args.output = output
        study(args)


def study(args: argparse.Namespace) -> None:
    """Run every (split, max_models, seed, task, input set, encoder) with this encoding and loss not yet in
    ``<output>/runs.csv``; write the table."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.makedirs(args.output, exist_ok=True)
    path = Path(args.output) / "runs.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    done = {(r["encoder"], r["task"], r["seed"], r["split_by"], r["max_models"], r["encoding"],
             r.get("inputs", "layers"), r.get("loss", "")) for r in rows}
    extra = args.extra.split()
    if args.layer_dims:
        extra += ["--model.init_args.layer_dims", f"[{args.layer_dims}]"]
    # Seeds outside tasks, input sets and encoders: a study stopped early has every row for its first seeds.
    for split_by, max_models, seed, task, inputs, encoder in itertools.product(
            args.split_by.split(","), [int(m) for m in args.max_models.split(",")],
            [int(s) for s in args.seeds.split(",")], args.tasks.split(","), args.inputs.split(","),
            args.encoders.split(",")):
            loss_name = args.loss if args.loss and task == "regression" else ""
            key = (encoder, task, str(seed), split_by, str(max_models), args.encoding, inputs, loss_name)
            if key in done:
                continue
            started = time.time()
            config = str(ROOT / "configs" / "metanet" / f"{encoder}_{task}.yaml")
            loss = ["--model.init_args.loss", args.loss] if args.loss and task == "regression" else []
            result = run_one(config, args.data_dir, seed, split_by, max_models, args.epochs,
                             args.encoding, [*extra, *input_args(inputs), *loss])
            row = {"encoder": encoder, "task": task, "seed": seed, "split_by": split_by,
                   "max_models": max_models, "encoding": args.encoding, "inputs": inputs, "loss": loss_name,
                   "wall_s": round(time.time() - started, 1), **result}
            rows.append({k: str(v) for k, v in row.items()})
            columns = list(dict.fromkeys(k for r in rows for k in r))
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            main_metric = "test/auroc" if task == "classification" else "test/r2"
            sys.stdout.write(f"{encoder} {task} {inputs} seed={seed} {split_by} max_models={max_models}: "
                             f"{main_metric}={result.get(main_metric, float('nan')):.4f} "
                             f"({row['wall_s']} s)\n")
            sys.stdout.flush()
    (Path(args.output) / "table.md").write_text(table(rows))
    sys.stdout.write(table(rows) + "\n")


if __name__ == "__main__":
    main()
