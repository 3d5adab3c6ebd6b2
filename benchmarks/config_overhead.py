"""Cost of every probe on shipped configs: each config as it is against its probe-free twin (the same config with
every ``lightning_probes`` callback removed; checkpoints and the learning-rate monitor kept).

Each run is a ``lightning fit`` subprocess, timed wall-clock and in CPU time (the child's user + system time,
its data-loader workers included: on a shared machine the measure its noise disturbs least). Both variants run a
short fit (``--short`` epochs) and a long one (``--long`` epochs), interleaved over ``--repeats`` repeats in a
shuffled order; the marginal cost of an epoch is (long - short) / (long - short epochs), medians over repeats, and
the one-off seconds (process start, imports, data, the first analyses) are what the short run has on top of its
epochs. Targets (issue 22): the quick start's whole fit <= 1.30x its twin (its epochs on 1,437 digits are below
the noise of a process start); ``mnist_mlp.yaml`` and ``cifar10_baseline.yaml`` (and any other config) a marginal
epoch <= 1.20x.

    python benchmarks/config_overhead.py --threads 1                       # the quick start (bundled digits)
    python benchmarks/config_overhead.py --threads 1 --config configs/quickstart.yaml configs/mnist_mlp.yaml \
        configs/cifar10_baseline.yaml --data-dir ../shared/data          # the issue 22 table
    python benchmarks/config_overhead.py --without GradientStatsMonitor GradientDynamicsMonitor   # attribute
    python benchmarks/config_overhead.py --compare /tmp/old_checkout     # before/after a change, interleaved
    python benchmarks/config_overhead.py --smoke                         # seconds: that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
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


def importable(code: str, root: str) -> str:
    """A directory that, first on ``PYTHONPATH``, imports ``lightning_probes`` (with the ``models`` and
    ``datamodules`` subpackages the installed package maps from the checkout's top-level folders), ``models`` and
    ``datamodules`` from the checkout ``code``: a copy of its ``lightning_probes`` with links to the two folders."""
    overlay = os.path.join(root, "compare_code")
    if not os.path.isdir(overlay):
        shutil.copytree(os.path.join(code, "lightning_probes"), os.path.join(overlay, "lightning_probes"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("models", "datamodules"):
            os.symlink(os.path.join(code, name), os.path.join(overlay, "lightning_probes", name))
            os.symlink(os.path.join(code, name), os.path.join(overlay, name))
    return overlay


def timed_fit(config: str, epochs: int, extra: list[str], root: str, code: Optional[str] = None
              ) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one ``lightning fit`` subprocess (CPU: its user + system time and its
    waited-for children's, e.g. data-loader workers). With ``code``, ``lightning_probes`` and the project's
    packages are imported from that checkout."""
    command = [sys.executable, "-m", "lightning_probes.cli", "fit", "--config", config,
               "--trainer.max_epochs", str(epochs), *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(config: str, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """Interleaved short and long fits of every variant of one config, with this checkout's code and, with
    ``--compare``, the other checkout's (its own copy of the config); medians, marginal epochs, ratios."""
    name = os.path.splitext(os.path.basename(config))[0]
    quickstart = "quickstart" in name
    target = args.target if args.target is not None else (1.3 if quickstart else 1.2)
    codes = [("this", None, config)]
    if args.compare:
        codes.append(("compare", importable(args.compare, root),
                      os.path.join(args.compare, os.path.relpath(config, ROOT))))
    variants: dict[tuple[str, str], tuple[str, Optional[str]]] = {}
    for label, code, path in codes:
        directory = os.path.join(root, name, label)
        os.makedirs(directory, exist_ok=True)
        for variant, written in write_variants(path, directory, args.without).items():
            variants[label, variant] = (written, code)
    extra = list(args.fit_args)
    if args.data_dir is not None and not quickstart:
        extra += ["--data.data_dir", os.path.abspath(args.data_dir)]
    if args.smoke:
        extra += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2"]
    times: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    rng = random.Random(0)
    for _ in range(args.repeats):
        runs = [(key, e) for key in variants for e in (args.short, args.long)]
        rng.shuffle(runs)
        for (label, variant), epochs in runs:
            path, code = variants[label, variant]
            times.setdefault((label, variant, epochs), []).append(
                timed_fit(path, epochs, extra, os.path.dirname(path), code))
            wall, cpu = times[label, variant, epochs][-1]
            print(f"  {name} {label:7s} {variant:8s} {epochs} epochs: {wall:6.1f} s wall, {cpu:6.1f} s CPU",
                  flush=True)
    span = args.long - args.short
    results = []
    for label, code, _ in codes:
        result: dict[str, Any] = {"config": name, "code": args.compare if code else ROOT, "target": target,
                                  "judged_on": "whole fit" if quickstart else "marginal epoch", "variants": {}}
        for (lab, variant) in variants:
            if lab != label:
                continue
            entry = {}
            for kind, index in (("wall", 0), ("cpu", 1)):
                short = statistics.median(t[index] for t in times[label, variant, args.short])
                long = statistics.median(t[index] for t in times[label, variant, args.long])
                entry[kind] = {"short": short, "long": long, "marginal": (long - short) / span,
                               "one_off": short - args.short * (long - short) / span}
            result["variants"][variant] = entry
        for variant in [v for v in result["variants"] if v != "bare"]:
            for kind in ("wall", "cpu"):
                mine, bare = result["variants"][variant][kind], result["variants"]["bare"][kind]
                mine["whole_ratio"] = mine["long"] / bare["long"]
                # no per-epoch ratio when the bare epoch is within the noise of a fit's timing (~0.5 s)
                mine["marginal_ratio"] = mine["marginal"] / bare["marginal"] if bare["marginal"] > 0.5 else None
        results.append(result)
    return results


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{result['config']}: {args.short} vs {args.long} epochs, {args.repeats} repeats, medians; code "
          f"{result['code']}{' SMOKE' if args.smoke else ''}")
    print("| variant | short fit s wall / CPU | long fit s wall / CPU | marginal epoch s wall / CPU | one-off s wall |")
    print("|---|---|---|---|---|")
    for variant, e in result["variants"].items():
        w, c = e["wall"], e["cpu"]
        print(f"| {variant} | {w['short']:.1f} / {c['short']:.1f} | {w['long']:.1f} / {c['long']:.1f} | "
              f"{w['marginal']:.2f} / {c['marginal']:.2f} | {w['one_off']:.1f} |")
    target = result["target"]
    for variant in [v for v in result["variants"] if v != "bare"]:
        label = "every probe" if variant == "probes" else f"every probe but {', '.join(args.without)}"
        parts = []
        for kind in ("wall", "cpu"):
            e = result["variants"][variant][kind]
            ratio = e["marginal_ratio"]
            epoch = "not measurable (bare epoch below the noise)" if ratio is None else f"{ratio:.2f}x"
            parts.append(f"{kind}: marginal epoch {epoch}, whole {args.long}-epoch fit {e['whole_ratio']:.2f}x")
        # judged on CPU time: on a shared machine the wall clock of a whole process is mostly other work
        judged = result["variants"][variant]["cpu"]["whole_ratio" if result["judged_on"] == "whole fit"
                                                     else "marginal_ratio"]
        met = "not measurable" if judged is None else ("met" if judged <= target else "missed")
        print(f"{label}: {'; '.join(parts)} (target: {result['judged_on']} <= {target}x, CPU time: {met})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=None, metavar="YAML",
                        help="configs to measure, one after the other; relative paths from the checkout (default: "
                             "configs/quickstart.yaml)")
    parser.add_argument("--short", type=int, default=None, help="epochs of the short fit (default 1)")
    parser.add_argument("--long", type=int, default=None, help="epochs of the long fit (default 3; smoke 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; smoke 1)")
    parser.add_argument("--target", type=float, default=None,
                        help="target ratio (default: 1.3 for the quick start's whole fit, 1.2 for a marginal epoch)")
    parser.add_argument("--without", nargs="+", default=None, metavar="CLASS",
                        help="also time the configs without these probes (class names), to attribute the cost")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="--data.data_dir of every config but the quick start (e.g. ../shared/data)")
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="also measure another checkout (its lightning_probes, models, datamodules and its copy "
                             "of each config), interleaved with this one: before/after a change side by side")
    parser.add_argument("--smoke", action="store_true",
                        help="2 batches an epoch, 1 vs 2 epochs, 1 repeat: that it runs (seconds of work)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                        help="further `lightning fit` arguments, e.g. --trainer.limit_train_batches 100")
    add_output_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    args.short = args.short if args.short is not None else 1
    args.long = args.long if args.long is not None else (2 if args.smoke else 3)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 2)
    set_threads(args.threads)
    if not 1 <= args.short < args.long:
        parser.error(f"--short and --long must satisfy 1 <= short < long, but got {args.short} and {args.long}")
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, but got {args.repeats}")
    if args.compare is not None:
        args.compare = os.path.abspath(args.compare)
    configs = [os.path.join(ROOT, c) if not os.path.isabs(c) else c
               for c in (args.config or [os.path.join("configs", "quickstart.yaml")])]
    for config in configs:
        if not os.path.isfile(config):
            parser.error(f"--config {config!r} is not a file")
    results = []
    with output_dir(args.output) as root:
        for config in configs:
            for result in measure(config, args, root):
                report(result, args)
                results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "smoke": args.smoke,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
