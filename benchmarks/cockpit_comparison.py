"""Side by side with Cockpit (issue 33): the per-step cost of its quantities and of ours, in one process, on the
same model and data.

Models: the MNIST MLP (784-512-256-128-10 with ReLU, the widths of `lightning_probes.models.MLP` without its
batch norm, which BackPACK's second-order extensions do not take) on 1x28x28 inputs, and torchvision's resnet18
(10 classes) on 3x32x32 (CIFAR-10 shapes; BackPACK's converter for its residual additions).

Configurations (each run is ``--steps`` optimiser steps of SGD on random data of the real shapes, the same
initial weights every time):

- ``plain``: a bare plain PyTorch loop (forward, backward, ``step``), Lightning-free; Cockpit's reference;
- ``cockpit economy``: Cockpit's ``configuration("economy")`` (Alpha, Distance, GradHist1d, GradNorm, InnerTest,
  Loss, NormTest, OrthoTest, UpdateSize) at every step in its plain loop (BackPACK ``extend``, the
  ``with cockpit(...)`` block around ``backward``);
- ``cockpit curvature``: Cockpit's ``HessMaxEV``, ``HessTrace`` and ``Alpha`` at every step (the quantities
  `CurvatureMonitor` computes);
- ``lightning``: a bare Lightning fit of the same model; our probes' reference;
- ``ours economy``: our probes computing the economy's quantities at ``every_n_steps=1`` on the training batch
  (`CurvatureMonitor` with alpha only, ``lanczos_iters=0, trace_samples=0``; `PerSampleGradientMonitor` with
  1-D histograms and no curvature samples, when this version has it; Distance and UpdateSize left out: two norms);
- ``ours curvature``: `CurvatureMonitor` at ``every_n_steps=1`` on the training batch's samples (10 Lanczos
  steps, 10 Rademacher vectors, alpha; Cockpit's HessMaxEV iterates the power method to its tolerance, up to 100
  products, and HessTrace is BackPACK's exact diagonal);
- ``ours curvature-defaults@1``: `CurvatureMonitor` at its default settings (64 probe samples) but every step;
- ``ours defaults@1`` / ``ours defaults``: both probes at their default settings, every step / at their default
  cadence.

Each repeat runs every configuration once, in a shuffled order; a run's per-step time is the median of its steps
after the first ``--warmup``, and its ratio is against the bare run of its kind (plain loop or Lightning) of the
same repeat; the table shows medians over repeats. A probe at its default cadence (2000 steps for
`CurvatureMonitor`, 5000 for `PerSampleGradientMonitor`) analyses at step 0 only within a short run, so
``ours defaults`` is reported as measured
(the steps between analyses) and amortised: ``(t_between + sum of each probe's analysis time / its every) /
t_lightning``,
one analysis's cost spread over its cadence (`CurvatureMonitor`'s share, from ``curvature-defaults@1``, over its
cadence, the rest over `PerSampleGradientMonitor`'s). ``extra/step`` is the time added to a bare step; ``ours cheaper``
is Cockpit's extra time over ours for the same quantities (issue 33's target: at least 10x at every step; and
the default cadence <= 1.05x). The machine may be shared: read the ratios as medians of interleaved repeats.

    nice -n 10 python benchmarks/cockpit_comparison.py --threads 1 --model mlp resnet18 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from _common import (
    add_output_argument,
    add_smoke_argument,
    add_threads_argument,
    apply_smoke,
    output_dir,
    quiet,
    set_threads,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes


def _import_cockpit() -> Any:
    if "pkg_resources" not in sys.modules:  # cockpit 1.0.2 imports it; setuptools >= 81 no longer ships it
        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = type("DistributionNotFound", (Exception,), {})
        shim.get_distribution = lambda name: (_ for _ in ()).throw(shim.DistributionNotFound())
        sys.modules["pkg_resources"] = shim
    import cockpit

    return cockpit


# -- models and data ------------------------------------------------------------------------------------------
def build(model: str, seed: int = 0, hidden: Optional[int] = None) -> nn.Module:
    """``hidden``: the MLP's hidden layers all this wide (the smoke run's tiny model)."""
    torch.manual_seed(seed)
    if model == "mlp":  # the project's MNIST MLP widths (`lightning_probes.models.MLP`) without its batch norm
        a, b, c = (512, 256, 128) if hidden is None else (hidden,) * 3
        return nn.Sequential(nn.Flatten(), nn.Linear(784, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(),
                             nn.Linear(b, c), nn.ReLU(), nn.Linear(c, 10))
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def shapes(model: str) -> tuple[int, ...]:
    return (1, 28, 28) if model == "mlp" else (3, 32, 32)


def data(model: str, steps: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * batch_size, *shapes(model), generator=g)
    return x, torch.randint(0, 10, (len(x),), generator=g)


# -- the plain loops ------------------------------------------------------------------------------------------
def plain_loop(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float,
               cockpit_quantities: Optional[Callable[[], list]] = None) -> list[float]:
    """Seconds of every step of a plain loop, with Cockpit around ``backward`` when quantities are given."""
    loss_fn = nn.CrossEntropyLoss()
    pit = None
    if cockpit_quantities is not None:
        from backpack import extend

        cockpit = _import_cockpit()
        net = extend(net, use_converter=not isinstance(net, nn.Sequential))
        loss_fn = extend(loss_fn)
        pit = cockpit.Cockpit(list(net.parameters()), quantities=cockpit_quantities())
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    times = []
    for step in range(len(x) // batch_size):
        xb, yb = x[step * batch_size:(step + 1) * batch_size], y[step * batch_size:(step + 1) * batch_size]
        start = time.perf_counter()
        opt.zero_grad()
        out = net(xb)
        loss = loss_fn(out, yb)
        if pit is None:
            loss.backward()
        else:
            losses = nn.functional.cross_entropy(out, yb, reduction="none")
            with pit(step, info={"batch_size": len(xb), "individual_losses": losses, "loss": loss,
                                 "optimizer": opt}):
                loss.backward(create_graph=pit.create_graph(step))
        opt.step()
        times.append(time.perf_counter() - start)
    return times


# -- Lightning ------------------------------------------------------------------------------------------------
class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class StepTimer(pl.Callback):
    """Seconds between consecutive training-batch starts (the whole step: the probes' hooks included)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def our_probes(kind: str, batch_size: int, out: str, memory_gb: Optional[float] = None) -> list[pl.Callback]:
    """Our probes for a set of Cockpit's quantities.

    ``economy``: Cockpit's economy set at every step (alpha from `CurvatureMonitor` without products, the
    gradient tests, norms and 1-D histograms of `PerSampleGradientMonitor` on the training batch);
    ``curvature``: `CurvatureMonitor` at every step on the training batch's samples (10 Lanczos steps, 10
    Rademacher vectors, alpha); ``curvature-defaults@1``: `CurvatureMonitor` at its defaults but every step;
    ``defaults``: both probes at their defaults, ``defaults@1`` the same at every step.
    """
    curvature, per_sample = lightning_probes.CurvatureMonitor, getattr(lightning_probes, "PerSampleGradientMonitor",
                                                                        None)
    if kind == "economy":
        probes = [curvature(every_n_steps=1, num_samples=batch_size, lanczos_iters=0, trace_samples=0, output_dir=out)]
        if per_sample is not None:
            probes.append(per_sample(every_n_steps=1, num_samples=batch_size, probe_batch="current",
                                     curvature_samples=0, histograms="1d", max_memory_gb=memory_gb, output_dir=out))
        return probes
    if kind == "curvature":
        return [curvature(every_n_steps=1, num_samples=batch_size, output_dir=out)]
    if kind == "curvature-defaults@1":
        return [curvature(every_n_steps=1, output_dir=out)]
    every = {"every_n_steps": 1} if kind == "defaults@1" else {}
    probes = [curvature(output_dir=out, **every)]
    if per_sample is not None:
        probes.append(per_sample(output_dir=out, **every))
    return probes


def lightning_run(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float,
                  probes: list[pl.Callback], root: str) -> list[float]:
    timer = StepTimer()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=root, callbacks=[timer, *probes], log_every_n_steps=50)
    trainer.fit(Module(net, lr), DataLoader(TensorDataset(x, y), batch_size=batch_size))
    return timer.times


# -- the comparison -------------------------------------------------------------------------------------------
CONFIGS = ("plain", "cockpit economy", "cockpit curvature", "lightning", "ours economy", "ours curvature",
           "ours curvature-defaults@1", "ours defaults@1", "ours defaults")
#: What a configuration had to leave out, by name (printed under the table).
NOTES: dict[str, str] = {}
#: Which of ours computes the quantities of which of Cockpit's.
SAME = {"ours economy": "cockpit economy", "ours curvature": "cockpit curvature"}


def run_config(name: str, model: str, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float,
               root: str, hidden: Optional[int] = None, memory_gb: Optional[float] = None) -> list[float]:
    net = build(model, hidden=hidden)
    if name == "plain":
        return plain_loop(net, x, y, batch_size, lr)
    if name.startswith("cockpit"):
        cockpit = _import_cockpit()
        from cockpit.utils.configuration import configuration
        from cockpit.utils.schedules import linear

        def quantities(trace: bool = True) -> list:
            if name == "cockpit economy":
                return configuration("economy")
            q = cockpit.quantities
            return [q.HessMaxEV(linear(1)), q.Alpha(linear(1))] + ([q.HessTrace(linear(1))] if trace else [])

        try:
            return plain_loop(net, x, y, batch_size, lr, quantities)
        except AttributeError as err:  # BackPACK's DiagHessian (HessTrace) does not cover the model (resnet18)
            if name != "cockpit curvature" or "diag_h" not in str(err):
                raise
            NOTES[name] = "HessMaxEV + Alpha only: HessTrace failed (BackPACK has no DiagHessian here: no diag_h)"
            return plain_loop(build(model, hidden=hidden), x, y, batch_size, lr, lambda: quantities(trace=False))
    probes = [] if name == "lightning" else our_probes(name.split(" ", 1)[1], batch_size, root, memory_gb)
    return lightning_run(net, x, y, batch_size, lr, probes, root)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["mlp", "resnet18"], choices=["mlp", "resnet18"])
    parser.add_argument("--steps", type=int, default=None, help="steps a run (default 40 MLP, 8 resnet18)")
    parser.add_argument("--cockpit-steps", type=int, default=None,
                        help="steps of Cockpit's runs (default 10 MLP, 3 resnet18: seconds a step)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 MLP, 32 resnet18")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--verbose", action="store_true", help="print every run's time as it ends")
    parser.add_argument("--configs", default=None,
                        help="comma-separated subset of the configurations (plain and lightning always run)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="PerSampleGradientMonitor's max_memory_gb in the economy configuration (default: its "
                             "share of the probes' budget, which runs resnet18's per-sample gradients a few samples "
                             "at a time; Cockpit holds a whole layer's at once)")
    parser.add_argument("--hidden", type=int, default=None, help=argparse.SUPPRESS)  # the smoke run's tiny MLP
    add_threads_argument(parser)
    add_output_argument(parser)
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    args = apply_smoke(args, model=["mlp"], steps=3, cockpit_steps=2, warmup=1, repeats=1, batch_size=4, hidden=8)
    set_threads(args.threads)
    quiet()
    every = lightning_probes.CurvatureMonitor().every_n_steps
    per_sample_cls = getattr(lightning_probes, "PerSampleGradientMonitor", None)
    every_ps = per_sample_cls().every_n_steps if per_sample_cls is not None else every
    chosen = CONFIGS if args.configs is None else tuple(
        c for c in CONFIGS if c in ("plain", "lightning") or c in args.configs.split(","))
    rows = []
    with output_dir(args.output) as out:
        for model in args.model:
            steps = args.steps or (40 if model == "mlp" else 8)
            cockpit_steps = min(steps, args.cockpit_steps or (10 if model == "mlp" else 3))
            batch_size = args.batch_size or (128 if model == "mlp" else 32)
            x, y = data(model, steps, batch_size)
            per: dict[str, list[float]] = {c: [] for c in CONFIGS}
            failed: dict[str, str] = {}
            ratios: dict[str, list[float]] = {c: [] for c in CONFIGS}
            for repeat in range(args.repeats):
                order = list(chosen)
                random.Random(repeat).shuffle(order)
                got = {}
                for name in order:
                    root = f"{out}/{model}/r{repeat}/{name.replace(' ', '_')}"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        n = (cockpit_steps if name.startswith("cockpit") else steps) * batch_size
                        try:
                            times = run_config(name, model, x[:n], y[:n], batch_size, args.lr, root, args.hidden,
                                               args.memory_gb)
                        except Exception as err:  # noqa: BLE001 - e.g. a BackPACK extension missing for a layer
                            if not name.startswith("cockpit"):
                                raise
                            failed[name] = f"{type(err).__name__}: {str(err)[:200]}"
                            times = [math.nan]
                    got[name] = statistics.median(times[min(args.warmup, len(times) - 1):])
                    if args.verbose:
                        print(f"{model} repeat {repeat} {name}: {got[name] * 1e3:.2f} ms/step", flush=True)
                for name in chosen:
                    base = got["plain"] if name in ("plain", "cockpit economy", "cockpit curvature") \
                        else got["lightning"]
                    per[name].append(got[name])
                    ratios[name].append(got[name] / base)
            med = {c: statistics.median(per[c]) for c in chosen}
            ratio = {c: statistics.median(ratios[c]) for c in chosen}
            extra = {c: med[c] - (med["plain"] if c.startswith(("plain", "cockpit")) else med["lightning"])
                     for c in chosen}
            nan = math.nan
            curv_extra = extra.get("ours curvature-defaults@1", nan)
            other_extra = extra.get("ours defaults@1", nan) - curv_extra  # the per-sample probe's analyses
            amortised = (med.get("ours defaults", nan) + curv_extra / every + other_extra / every_ps) / med["lightning"]
            alone = (med["lightning"] + extra.get("ours curvature-defaults@1", nan) / every) / med["lightning"]
            for c in chosen:
                cheaper = ""
                if c in failed:
                    rows.append(f"| {model} | {c} | failed: {failed[c]} | | | |")
                    continue
                if c in SAME and SAME[c] in extra:
                    cheaper = f"{extra[SAME[c]] / extra[c]:.1f}x" if extra[c] > 0 and SAME[c] not in failed else "-"
                note = (f" (amortised, every {every} / {every_ps} steps: {amortised:.3f}x)" if c == "ours defaults"
                        else "")
                if c in NOTES:
                    note += f" ({NOTES[c]})"
                if c == "ours curvature-defaults@1":
                    note = f" (CurvatureMonitor alone amortised over {every} steps: {alone:.3f}x)"
                rows.append(f"| {model} | {c} | {med[c] * 1e3:.2f} | {ratio[c]:.2f}x{note} | "
                            f"{extra[c] * 1e3:+.2f} | {cheaper} |")
    per_sample = "PerSampleGradientMonitor" if hasattr(lightning_probes, "PerSampleGradientMonitor") else \
        "(no PerSampleGradientMonitor in this version)"
    print(f"ours: CurvatureMonitor + {per_sample}; default cadence every {every} steps; --threads {args.threads}")
    print("| model | configuration | ms/step (median) | ratio to bare | extra ms/step | ours cheaper than Cockpit |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
