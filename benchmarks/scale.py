"""Every probe at its shipped defaults on models of the size people train: torchvision's ``resnet50`` (25.6M
parameters, 161 tensors) and a GPT-style decoder built from ``torch.nn`` (12 layers, width 768, ~86M parameters),
on random data, against the same model bare (issue 21 item 6).

What it measures, per model:

- **per-step cost**: ``(fit(long) - fit(short)) / (long - short)`` with every probe against the same without,
  in this one process, interleaved over ``--repeats`` in a shuffled order, medians; wall and CPU time
  (``time.process_time``: with ``--threads 1`` the measure a shared machine's noise disturbs least). The default
  span of 50 steps holds exactly one logged step of the gradient probes (``every_n_steps=50``) and the snapshot
  step before it, so the ratio is the amortised cost at the default cadence. Validation is off in these fits
  (the analyses are timed apart); ``one-off s`` is what the short fit with probes has on top of its steps;
- **peak memory**: peak resident memory (``ru_maxrss``) of a separate process per variant that trains
  ``--memory-steps`` steps (past the first logged step after a snapshot) and runs one validation epoch with every
  analysis (``--probe-samples`` validation samples), with and without the probes;
- **analysis seconds**: in the probes' process, the seconds spent in each probe's epoch-end hooks (the
  representation and prediction analyses of one epoch) and in its per-batch validation hooks.

A probe that refuses the model at its defaults (an error during the run) is reported with its message and left
out of a second attempt. Targets (issue 21): per-step cost <= 1.05x and peak memory <= 1.10x on both models.

    python benchmarks/scale.py --threads 1                  # both models (minutes on a CPU)
    python benchmarks/scale.py --smoke                      # tiny models, seconds: that the benchmark runs
    python benchmarks/scale.py --device cuda --threads 4    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from _common import add_output_argument, add_threads_argument, output_dir, quiet, set_threads
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes as lp

HERE = os.path.dirname(os.path.abspath(__file__))
PROBES = ("GradientStatsMonitor", "GradientDynamicsMonitor", "ConfidenceMonitor", "NoiseRobustnessMonitor",
          "LayerCorrelationMonitor", "ActivationStatsMonitor", "AugmentationInvarianceMonitor", "AlignmentMonitor")
TARGET_STEP, TARGET_MEMORY = 1.05, 1.10


@dataclass
class Spec:
    """One model and the shape of its data."""

    name: str
    batch: int
    shape: tuple[int, ...]  # one input sample
    classes: int  # of an image, or the vocabulary of the tokens
    optimizer: str


def specs(smoke: bool, batch: Optional[int] = None, size: Optional[int] = None) -> dict[str, Spec]:
    """The models' data: ``batch`` samples of ``size`` x ``size`` images or ``size`` tokens (defaults: CPU steps
    of a fraction of a second on one thread)."""
    if smoke:
        return {"resnet50": Spec("resnet50", batch or 4, (3, size or 32, size or 32), 10, "sgd"),
                "gpt": Spec("gpt", batch or 2, (size or 8,), 64, "adamw")}
    return {"resnet50": Spec("resnet50", batch or 4, (3, size or 64, size or 64), 1000, "sgd"),
            "gpt": Spec("gpt", batch or 1, (size or 64,), 1024, "adamw")}


class GPT(nn.Module):
    """A GPT-style decoder from ``torch.nn``: token and position embeddings, pre-norm causal self-attention blocks
    (``nn.TransformerEncoderLayer`` with a causal mask), a final norm and a head tied to the token embedding."""

    def __init__(self, vocab: int, context: int, width: int = 768, layers: int = 12, heads: int = 12) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (batch, tokens) -> (batch, tokens, vocab)
        t = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(torch.arange(t, device=tokens.device))
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.norm(x) @ self.tokens.weight.T


def build_net(spec: Spec, smoke: bool) -> nn.Module:
    torch.manual_seed(0)
    if spec.name == "resnet50":
        from torchvision.models import resnet50
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=spec.classes) if smoke else resnet50()
    if smoke:
        return GPT(spec.classes, spec.shape[0], width=32, layers=2, heads=2)
    return GPT(spec.classes, spec.shape[0])


class Model(pl.LightningModule):
    """Cross-entropy training of an image classifier or a next-token model; ``validation_step`` returns the logits
    and targets ConfidenceMonitor reads (tokens: ``(N, vocab, tokens)`` against ``(N, tokens)``)."""

    def __init__(self, net: nn.Module, spec: Spec) -> None:
        super().__init__()
        self.net, self.spec = net, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _logits(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.net(x)
        if logits.ndim == 3:  # (batch, tokens, vocab) -> (batch, vocab, tokens), as cross_entropy takes it
            logits = logits.transpose(1, 2)
        return logits, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits, y = self._logits(batch)
        return nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        logits, y = self._logits(batch)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits, "target": y}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.spec.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def loader(spec: Spec, n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    if spec.name == "gpt":  # random tokens; the target of each is the next one
        tokens = torch.randint(0, spec.classes, (n, spec.shape[0] + 1), generator=g)
        data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    else:
        data = TensorDataset(torch.randn(n, *spec.shape, generator=g), torch.randint(0, spec.classes, (n,),
                                                                                     generator=g))
    return DataLoader(data, batch_size=spec.batch)


def make_probes(root: str, skip: set[str]) -> list[lp.ProbeCallback]:
    """Every probe at its defaults, writing under ``root`` (one directory per fit: no file moved aside)."""
    return [getattr(lp, name)(output_dir=root) for name in PROBES if name not in skip]


def trainer(device: str, callbacks: list, steps: int, val_batches: int, root: str) -> pl.Trainer:
    return pl.Trainer(accelerator=device, devices=1, max_steps=steps, max_epochs=1, limit_train_batches=steps,
                      limit_val_batches=val_batches, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, default_root_dir=root)


class ProbeFailedError(Exception):
    def __init__(self, probe: str, error: BaseException) -> None:
        super().__init__(f"{probe}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        self.probe = probe


_TIMED = ("on_train_epoch_end", "on_validation_epoch_end", "on_validation_batch_end", "on_validation_epoch_start",
          "on_before_optimizer_step", "on_train_batch_start", "on_train_batch_end", "setup", "on_train_start")


def instrument(probe: lp.ProbeCallback, seconds: dict[str, float]) -> None:
    """Time the probe's hooks into ``seconds[<probe>/<hook>]`` and name the probe in any error it raises."""
    label = type(probe).__name__
    for hook in _TIMED:
        original = getattr(probe, hook)

        def wrapper(*args: Any, _original: Any = original, _key: str = f"{label}/{hook}", **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            except Exception as err:
                raise ProbeFailedError(label, err) from err
            finally:
                seconds[_key] = seconds.get(_key, 0.0) + time.perf_counter() - start

        setattr(probe, hook, wrapper)


# -- one process per variant: peak memory and the analyses ---------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """Train ``--memory-steps`` steps and one validation epoch; print one JSON line (peak RSS, hook seconds)."""
    spec = specs(args.smoke, args.batch, args.size)[args.model]
    module = Model(build_net(spec, args.smoke), spec)
    val_batches = max(1, math.ceil(args.probe_samples / spec.batch))
    skip = set(args.skip or [])
    result: dict[str, Any] = {"model": args.model, "variant": args.variant, "failures": [],
                              "parameters": sum(p.numel() for p in module.parameters()),
                              "tensors": sum(1 for _ in module.parameters())}
    steps = 1 if args.discover else args.memory_steps  # discovery: which probes fail, one step per attempt
    for attempt in range(len(PROBES) + 1):  # a probe that fails is left out of the next attempt
        seconds: dict[str, float] = {}
        callbacks = []
        if args.variant == "probes":
            callbacks = make_probes(os.path.join(args.root, f"{args.model}_memory_{attempt}"), skip)
            for probe in callbacks:
                instrument(probe, seconds)
        start = time.perf_counter()
        try:
            trainer(args.device, callbacks, steps, val_batches, args.root).fit(
                module, loader(spec, steps * spec.batch, 1), loader(spec, val_batches * spec.batch, 2))
            break
        except ProbeFailedError as err:
            result["failures"].append({"probe": err.probe, "error": str(err).split(": ", 1)[1][:300]})
            skip.add(err.probe)
        except Exception as err:  # noqa: BLE001 (reported, not raised: a probe may fail outside its hooks)
            result["failures"].append({"probe": None, "error": f"{type(err).__name__}: {err}"[:300],
                                       "where": traceback.format_exc(limit=-3)[-600:]})
            break
    result["skipped"] = sorted(skip)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["hook_seconds"] = seconds
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args: argparse.Namespace, model: str, variant: str, skip: set[str], discover: bool = False,
              steps: Optional[int] = None, tree: Optional[str] = None) -> dict[str, Any]:
    """One memory process; ``tree``: import ``lightning_probes`` from that checkout (e.g. the version before)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--variant", variant,
               "--device", args.device, "--memory-steps", str(steps or args.memory_steps), "--probe-samples",
               str(args.probe_samples), "--root", args.root]
    if args.smoke:
        command.append("--smoke")
    for key in ("batch", "size"):
        if getattr(args, key) is not None:
            command += [f"--{key}", str(getattr(args, key))]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if skip:
        command += ["--skip", *sorted(skip)]
    if discover:
        command.append("--discover")
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def memory_and_analyses(args: argparse.Namespace, model: str) -> tuple[dict, dict, list[dict]]:
    """The bare and the probes process. A first process finds the probes that fail at their defaults (one
    training step and the analyses per attempt, each failing probe left out of the next), so that the probes
    process measures the memory of the probes that work, without the failed attempts'."""
    bare = run_child(args, model, "bare", set())
    if args.no_discover:  # one process; a failing probe is retried without in it (its memory counts too)
        probes = run_child(args, model, "probes", set())
        return bare, probes, probes["failures"]
    found = run_child(args, model, "probes", set(), discover=True)
    probes = run_child(args, model, "probes", set(found["skipped"]))
    return bare, probes, found["failures"] + probes["failures"]


GRADIENT_PROBES = ("GradientStatsMonitor", "GradientDynamicsMonitor")


def per_probe_memory(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Peak memory of the model bare and with each probe alone, then every probe (one process each): the
    gradient probes train ``--memory-steps`` steps (past a snapshot and a logged step), the others
    ``--analysis-steps`` (the training peak is reached at the first step, their analyses run at the epoch's end);
    the bare run is measured at both lengths. With ``--before DIR`` every variant is measured with that checkout's
    ``lightning_probes`` too, alternating with this one."""
    trees = [("after", None)] + ([("before", args.before)] if args.before else [])
    if args.only:
        trees = [t for t in trees if t[0] == args.only]
    earlier = {}
    if args.before_json:  # the version before, measured by an earlier run (`--only before --json FILE`)
        with open(args.before_json) as f:
            earlier = json.load(f)["models"].get(model, {}).get("per_probe", {})
    variants: list[tuple[str, int, set[str]]] = [("bare", args.memory_steps, set()),
                                                 ("bare", args.analysis_steps, set())]
    for probe in PROBES:
        steps = args.memory_steps if probe in GRADIENT_PROBES else args.analysis_steps
        variants.append((probe, steps, set(PROBES) - {probe}))
    variants.append(("every probe", args.memory_steps, set()))
    out: dict[str, Any] = {}
    for label, steps, skip in variants:
        for tree_label, tree in trees:
            kind = "bare" if label == "bare" else "probes"
            result = run_child(args, model, kind, skip, steps=steps, tree=tree)
            memory = result.get("peak_cuda_mb", result["peak_rss_mb"])
            failed = [f["error"] for f in result["failures"]]
            out.setdefault(f"{label}@{steps}", {})[tree_label] = {"peak_mb": memory, "failures": failed,
                                                                   "seconds": result["seconds"]}
            print(f"  {model} {tree_label:6s} {label:30s} {steps:3d} steps: {memory:8.0f} MB"
                  f"{'  FAILED: ' + failed[0][:120] if failed else ''}", flush=True)
        if key_before := earlier.get(f"{label}@{steps}", {}).get("before"):
            out[f"{label}@{steps}"]["before"] = key_before
    return out


def per_probe_table(model: str, table: dict[str, Any], args: argparse.Namespace) -> None:
    """The per-probe memory table: each probe's peak against the bare run of the same length."""
    trees = [t for t in ("before", "after") if all(t in entry for entry in table.values())]
    print(f"\n{model}: peak {'CUDA' if args.device == 'cuda' else 'RSS'} memory, each probe alone at its defaults")
    print("| probe | " + " | ".join(f"{t}: +MB (x bare)" for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for key, entry in table.items():
        label, steps = key.rsplit("@", 1)
        if label == "bare":
            print(f"| bare, {steps} steps | " + " | ".join(f"{entry[t]['peak_mb']:.0f} MB" for t in trees) + " |")
            continue
        cells = []
        for t in trees:
            bare = table[f"bare@{steps}"][t]["peak_mb"]
            value = entry[t]["peak_mb"]
            note = " (refused)" if entry[t]["failures"] and label != "every probe" else ""
            cells.append(f"{value - bare:+.0f} ({value / bare:.2f}x){note}")
        print(f"| {label} | " + " | ".join(cells) + " |")


# -- per-step cost: one process, interleaved -----------------------------------------------------------------
def step_costs(args: argparse.Namespace, model: str, skip: set[str]) -> dict[str, Any]:
    spec = specs(args.smoke, args.batch, args.size)[model]
    module = Model(build_net(spec, args.smoke), spec)
    train = loader(spec, args.steps * spec.batch, 1)
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    rng = random.Random(0)
    count = 0
    for _ in range(args.repeats):
        runs = [(v, n) for v in ("bare", "probes") for n in (args.short_steps, args.steps)]
        rng.shuffle(runs)
        for variant, steps in runs:
            count += 1
            root = os.path.join(args.root, f"{model}_steps_{count}")
            callbacks = make_probes(root, skip) if variant == "probes" else []
            t = trainer(args.device, callbacks, steps, 0, root)
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            t.fit(module, train)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.setdefault((variant, steps), []).append((time.perf_counter() - wall, time.process_time() - cpu))
            print(f"  {model} {variant:6s} {steps:3d} steps: {times[variant, steps][-1][0]:7.2f} s wall, "
                  f"{times[variant, steps][-1][1]:7.2f} s CPU", flush=True)
    span = args.steps - args.short_steps
    out: dict[str, Any] = {"span": span}
    for kind, index in (("wall", 0), ("cpu", 1)):
        med = {key: statistics.median(v[index] for v in values) for key, values in times.items()}
        marginal = {v: (med[v, args.steps] - med[v, args.short_steps]) / span for v in ("bare", "probes")}
        out[kind] = {"bare_step_s": marginal["bare"], "probes_step_s": marginal["probes"],
                     "ratio": marginal["probes"] / marginal["bare"] if marginal["bare"] > 0 else None,
                     "one_off_s": (med["probes", args.short_steps] - med["bare", args.short_steps]
                                   - args.short_steps * (marginal["probes"] - marginal["bare"]))}
    return out


def verdict(value: Optional[float], target: float) -> str:
    if value is None:
        return "not measurable"
    return f"**{value:.3f}x** ({'met' if value <= target else 'missed'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, choices=["resnet50", "gpt"],
                        help="default both (--smoke: resnet50 only, the suite's time; name gpt to smoke it)")
    parser.add_argument("--steps", type=int, default=None, help="long fit (default 55; smoke 4)")
    parser.add_argument("--short-steps", type=int, default=None, help="short fit (default 5; smoke 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; smoke 1)")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="steps of each memory process (default 52: past a snapshot and a logged step)")
    parser.add_argument("--probe-samples", type=int, default=None,
                        help="validation samples (images or sequences) of the memory processes, from which the "
                             "analyses draw their probe sets (default 512, the probes' default probe set)")
    parser.add_argument("--batch", type=int, default=None, help="samples per batch (default: resnet50 4, gpt 1)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side of resnet50 and tokens of gpt (default 64 each)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="tiny models and runs (seconds): that it works")
    parser.add_argument("--skip-memory", action="store_true", help="per-step cost only")
    parser.add_argument("--skip-steps", action="store_true", help="memory and analyses only")
    parser.add_argument("--no-discover", action="store_true",
                        help="no separate process to find the probes that fail: the memory process retries without "
                             "them (faster; the failed attempts' memory counts in its peak)")
    parser.add_argument("--per-probe", action="store_true",
                        help="the per-probe memory table: bare, each probe alone, every probe (one process each)")
    parser.add_argument("--analysis-steps", type=int, default=3,
                        help="with --per-probe: training steps of the processes of the analysis probes (default 3)")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="with --per-probe: also measure the lightning_probes of this checkout (the version "
                             "before a change), alternating with this one")
    parser.add_argument("--only", choices=["before", "after"], default=None,
                        help="with --per-probe: measure only this version")
    parser.add_argument("--before-json", default=None, metavar="FILE",
                        help="with --per-probe: the before column from an earlier run's --json (`--only before`)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--discover", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    add_output_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    if args.models is None:
        args.models = ["resnet50"] if args.smoke else ["resnet50", "gpt"]
    defaults = dict(steps=(4, 55), short_steps=(2, 5), repeats=(1, 2), memory_steps=(3, 52), probe_samples=(16, 512))
    for key, (smoke, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    for key in (*defaults, "batch", "size"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, but got {getattr(args, key)}")
    if args.short_steps >= args.steps:
        parser.error(f"--short-steps ({args.short_steps}) must be below --steps ({args.steps})")
    set_threads(args.threads)
    quiet()
    if args.child:
        child(args)
        return
    results: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads(), "smoke": args.smoke,
                               "torch": torch.__version__, "models": {},
                               "data": {m: {"batch": s.batch, "sample": list(s.shape), "classes": s.classes}
                                        for m, s in specs(args.smoke, args.batch, args.size).items()}}
    with output_dir(args.output) as root:
        args.root = root
        if args.per_probe:
            for model in args.models:
                print(f"{model}: per-probe memory (separate processes)", flush=True)
                results["models"][model] = {"per_probe": per_probe_memory(args, model)}
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=1)
            for model, entry in results["models"].items():
                per_probe_table(model, entry["per_probe"], args)
            return
        for model in args.models:
            print(f"{model}: memory and analyses (separate processes)", flush=True)
            entry: dict[str, Any] = {}
            skip: set[str] = set()
            if not args.skip_memory:
                bare, probes, failures = memory_and_analyses(args, model)
                skip = set(probes["skipped"])
                entry.update(parameters=bare["parameters"], tensors=bare["tensors"], failures=failures,
                             peak_rss_mb={"bare": bare["peak_rss_mb"], "probes": probes["peak_rss_mb"]},
                             memory_ratio=probes["peak_rss_mb"] / bare["peak_rss_mb"],
                             hook_seconds=probes["hook_seconds"], memory_fit_seconds={"bare": bare["seconds"],
                                                                                      "probes": probes["seconds"]})
                if "peak_cuda_mb" in bare:  # on a GPU the memory that matters is the device's
                    entry["peak_cuda_mb"] = {"bare": bare["peak_cuda_mb"], "probes": probes["peak_cuda_mb"]}
                    entry["memory_ratio"] = probes["peak_cuda_mb"] / bare["peak_cuda_mb"]
            if not args.skip_steps:
                print(f"{model}: per-step cost (interleaved fits in this process)", flush=True)
                entry["steps"] = step_costs(args, model, skip)
            entry["skipped"] = sorted(skip)
            results["models"][model] = entry
            if args.json:  # after every model: a run stopped later keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nscale.py on {results['device']} ({results['threads']} threads, torch {results['torch']})"
          f"{' SMOKE (tiny models)' if results['smoke'] else ''}: {args.short_steps} vs {args.steps} steps, "
          f"{args.repeats} repeats, medians")
    for model in results["models"]:
        data = results["data"][model]
        print(f"{model}: batch {data['batch']} of {'x'.join(map(str, data['sample']))}, {data['classes']} classes")
    print("| model | parameters / tensors | bare step s (wall / CPU) | every probe: per step, wall | per step, CPU "
          f"| one-off s | peak {'CUDA' if results['device'] == 'cuda' else 'RSS'} MB bare / probes | memory |")
    print("|---|---|---|---|---|---|---|---|")
    for model, e in results["models"].items():
        s = e.get("steps") or {k: {"bare_step_s": math.nan, "ratio": None, "one_off_s": math.nan}
                               for k in ("wall", "cpu")}
        rss = e.get("peak_cuda_mb") or e.get("peak_rss_mb")
        memory = (f"{rss['bare']:.0f} / {rss['probes']:.0f}", verdict(e["memory_ratio"], TARGET_MEMORY)) if rss \
            else ("", "")
        size = f"{e['parameters'] / 1e6:.1f}M / {e['tensors']}" if "parameters" in e else ""
        print(f"| {model} | {size} | {s['wall']['bare_step_s']:.3f} / {s['cpu']['bare_step_s']:.3f} | "
              f"{verdict(s['wall']['ratio'], TARGET_STEP)} | {verdict(s['cpu']['ratio'], TARGET_STEP)} | "
              f"{s['wall']['one_off_s']:.1f} | {memory[0]} | {memory[1]} |")
    for model, e in results["models"].items():
        for failure in e.get("failures", []):
            print(f"{model}: {failure['probe'] or 'the run'} failed at its defaults and was left out: "
                  f"{failure['error']}")
        if e.get("skipped"):
            print(f"{model}: the per-step cost and memory are without {', '.join(e['skipped'])}")
        hooks = e.get("hook_seconds")
        if hooks:
            per_probe: dict[str, float] = {}
            analysis: dict[str, float] = {}
            for key, value in hooks.items():
                probe, hook = key.split("/")
                per_probe[probe] = per_probe.get(probe, 0.0) + value
                if hook in ("on_train_epoch_end", "on_validation_epoch_end", "on_validation_batch_end"):
                    analysis[probe] = analysis.get(probe, 0.0) + value
            print(f"{model}: seconds in each probe's epoch-end and validation hooks (one epoch's analyses, "
                  f"{args.probe_samples} validation samples): "
                  + ", ".join(f"{p} {v:.2f}" for p, v in sorted(analysis.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
