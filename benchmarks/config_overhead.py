"""Cost of every probe on a shipped config: the config as it is against its probe-free twin (the same config with
every ``lightning_probes`` callback removed; checkpoints and the learning-rate monitor kept).

Each run is a ``lightning fit`` subprocess, timed wall-clock. Both variants run a short fit (``--short`` epochs)
and a long one (``--long`` epochs), interleaved over ``--repeats`` repeats in a shuffled order; the marginal cost
of an epoch is (long - short) / (long - short epochs), medians over repeats, and the one-off seconds (process
start, imports, data, the first analyses and figures) are what the short run has on top of its epochs. The ratio
of the marginal epochs is compared with the target: 1.5x for the quick start, 1.2x for the MNIST/CIFAR configs.

    python benchmarks/config_overhead.py --threads 1                       # the quick start (bundled digits)
    python benchmarks/config_overhead.py --without GradientStatsMonitor GradientDynamicsMonitor   # attribute
    python benchmarks/config_overhead.py --config configs/mnist_lenet5.yaml --fit-args --data.data_dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import yaml
from _common import add_output_argument, add_threads_argument, output_dir, set_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _callbacks(config_path: str, config: dict[str, Any]) -> list:
    """The config's callback list, read from the included file when ``trainer.callbacks`` names one."""
    callbacks = config.get("trainer", {}).get("callbacks") or []
    if isinstance(callbacks, str):
        with open(os.path.join(os.path.dirname(os.path.abspath(config_path)), callbacks)) as f:
            callbacks = yaml.safe_load(f) or []
    return list(callbacks)


def write_variants(config_path: str, root: str, without: Optional[list[str]] = None) -> dict[str, str]:
    """``{"probes": path, "bare": path}``: the config with its callbacks inlined, and without the probes; with
    ``without`` (probe class names) also ``"without"``: the config less those probes."""
    with open(config_path) as f:
        config = yaml.safe_load(f)
    callbacks = _callbacks(config_path, config)
    bare = [c for c in callbacks if not str(c.get("class_path", "")).startswith("lightning_probes")]
    variants = [("probes", callbacks), ("bare", bare)]
    if without:
        variants.append(("without", [c for c in callbacks
                                     if str(c.get("class_path", "")).rpartition(".")[2] not in without]))
    paths = {}
    for variant, chosen in variants:
        trainer = dict(config.get("trainer", {}), callbacks=chosen, enable_progress_bar=False,
                       logger={"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": os.path.join(root, "runs"), "name": variant}})
        paths[variant] = os.path.join(root, f"{variant}.yaml")
        with open(paths[variant], "w") as f:
            yaml.safe_dump({**config, "trainer": trainer}, f, sort_keys=False)
    return paths


def timed_fit(config: str, epochs: int, extra: list[str], root: str) -> float:
    command = [sys.executable, "-m", "lightning_probes.cli", "fit", "--config", config,
               "--trainer.max_epochs", str(epochs), *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    parser.add_argument("--short", type=int, default=1, help="epochs of the short fit")
    parser.add_argument("--long", type=int, default=3, help="epochs of the long fit")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target", type=float, default=None,
                        help="target ratio of the marginal epoch (default 1.5 for the quick start, else 1.2)")
    parser.add_argument("--without", nargs="+", default=None, metavar="CLASS",
                        help="also time the config without these probes (class names), to attribute the cost")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                        help="further `lightning fit` arguments, e.g. --data.data_dir ../shared/data")
    add_output_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    if not 1 <= args.short < args.long:
        parser.error(f"--short and --long must satisfy 1 <= short < long, but got {args.short} and {args.long}")
    config = os.path.abspath(args.config)
    target = args.target if args.target is not None else (1.5 if "quickstart" in os.path.basename(config) else 1.2)
    with output_dir(args.output) as root:
        variants = write_variants(config, root, args.without)
        times: dict[tuple[str, int], list[float]] = {}
        rng = random.Random(0)
        for _ in range(args.repeats):
            runs = [(v, e) for v in variants for e in (args.short, args.long)]
            rng.shuffle(runs)
            for variant, epochs in runs:
                times.setdefault((variant, epochs), []).append(timed_fit(variants[variant], epochs, args.fit_args,
                                                                         root))
    span = args.long - args.short
    print(f"{os.path.relpath(config, ROOT)}: {args.short} vs {args.long} epochs, {args.repeats} repeats, "
          f"wall-clock medians")
    print("| variant | short fit s | long fit s | marginal s per epoch | one-off s |")
    print("|---|---|---|---|---|")
    marginal = {}
    for variant in variants:
        short = statistics.median(times[variant, args.short])
        long = statistics.median(times[variant, args.long])
        marginal[variant] = (long - short) / span
        print(f"| {variant} | {short:.1f} | {long:.1f} | {marginal[variant]:.2f} | "
              f"{short - args.short * marginal[variant]:.1f} |")
    for variant in [v for v in variants if v != "bare"]:
        label = "every probe" if variant == "probes" else f"every probe but {', '.join(args.without)}"
        long_ratio = statistics.median(times[variant, args.long]) / statistics.median(times["bare", args.long])
        if marginal["bare"] > 0:
            ratio = marginal[variant] / marginal["bare"]
            met = "met" if ratio <= target else "missed"
            verdict = f"{ratio:.2f}x the probe-free twin (target <= {target}x: {met})"
        else:  # the bare epoch is shorter than the noise of the fits' wall clock
            verdict = "not measurable (the bare fits' noise exceeds their epochs: raise --long or --repeats)"
        print(f"{label}: marginal epoch {verdict}; whole {args.long}-epoch fit {long_ratio:.2f}x "
              f"(target <= {target}x: {'met' if long_ratio <= target else 'missed'})")


if __name__ == "__main__":
    main()
