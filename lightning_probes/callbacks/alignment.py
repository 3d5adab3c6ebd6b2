"""`AlignmentMonitor`: how much of each layer's input variance its units' weight vectors point along."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_probes.budget import format_bytes
from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, FigureSpec
from lightning_probes.callbacks.representation_base import NothingToAnalyseError, RepresentationProbe
from lightning_probes.checks import check_float
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.feature_rows import subsample_columns, token_rows
from lightning_probes.functional.alignment import QUANTILES, AlignmentAccumulator, alignment_summary, layer_features

#: Layers the alignment is defined for (a parametrized one, e.g. ``spectral_norm``, with its effective weight).
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_STATS = ("mean", "std")


class AlignmentMonitor(RepresentationProbe):
    """Per-unit alignment of every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` with the variance of its inputs,
    over training.

    A unit's alignment is ``w^T C w / (w^T w * trace(C))``: the share of the variance of the layer's inputs
    (covariance ``C`` on the probe set) that lies along its weight vector ``w``, in [0, 1] (see
    `lightning_probes.functional.alignment`). A ``Conv2d`` filter's inputs are its receptive-field patches, one
    per sample and output position (with ``groups > 1``, those of its group's channels); a ``Conv1d``'s likewise
    (``C * k`` features). A layer wrapped by a parametrization (``torch.nn.utils.parametrizations.spectral_norm``,
    ``weight_norm``, any ``torch.nn.utils.parametrize`` one) is analysed with its effective weight, the one its
    forward uses (``module.weight``, read in ``eval()``: no power iteration runs). A random direction
    scores ``1 / D`` on average (``D`` input features, recorded as ``chance``): units well above it have turned
    towards the directions in which their inputs vary most.

    On the probe set (see `RepresentationProbe`: at the start of training, labelled epoch 0, and after every
    ``every_n_epochs``-th epoch; global rank 0; ``eval()``, ``no_grad``, forked random state) each selected
    layer's inputs are captured with forward hooks and streamed batch by batch into a float64 covariance
    (`lightning_probes.functional.AlignmentAccumulator`); inputs are never kept beyond one batch.

    Outputs: records per (epoch, layer) in ``<name>.jsonl`` with ``type``, ``units``, ``features`` (``D`` per
    group), ``kept_features``, ``groups``, ``chance``, ``mean``, ``std`` (population), ``q05`` ... ``q95``,
    ``nan_units`` (units with an all-zero weight vector, left out of the statistics) and ``alignment``, the
    per-unit list (``null`` for those units); the scalars ``<name>/mean/<layer>`` and ``<name>/std/<layer>``; the figure
    ``<name>/distributions.png``, one panel per layer with a box per analysed epoch (box: quartiles, whiskers:
    5% and 95% quantiles, triangle: mean, dashed line: chance). The headline ``<name>/mean`` (mean over layers of
    the mean alignment) goes to the loggers and to ``trainer.callback_metrics``.

    Cost and memory: one forward of the probe set, streamed: each layer's inputs are added to its accumulator
    inside its forward hook (a convolution's patches a few samples at a time) and never kept. Per layer a float64
    ``(D, D)`` sum and a float32 buffer of up to ``D`` input rows (``D`` = ``in_features`` of a ``Linear``,
    ``in_channels * kh * kw`` of a ``Conv2d``, ``in_channels * k`` of a ``Conv1d``; ``D / groups`` per group),
    about ``12 * D**2`` bytes, on the model's device, all layers at once. Layers that see no more than ``D`` rows
    in all (e.g. wide ``Linear`` layers on 512 samples) never form the ``(D, D)`` sum. The probe draws on the
    memory budget its Trainer's probes share (`lightning_probes.set_memory_budget`; by default 10% of the model's
    parameter memory, at least 64 MiB, split equally) or on its own ``max_memory_gb``: at the pre-flight a
    selection whose sums do not fit 75% of the share is reduced when ``layers`` is left at its default: the
    widest ``groups == 1`` layers keep a seeded subsample of their input features (the largest common number that
    fits; one warning names them), and their alignment is measured within that subspace (records:
    ``kept_features`` beside ``features``; ``chance`` is ``1 / kept_features``); grouped convolutions, whose
    per-group covariances are not subsampled, are left out, largest first, while even that does not fit (the
    warning names them). With ``layers`` set, it stops
    with an error naming the largest layers and the share. The rest of the share sizes the patch chunks and the
    forward batches (`AnalysisProbe.plan_forward_batch`); the plan is logged once.

    Sequences: a ``Linear`` applied to ``(batch, tokens, D)`` inputs sees ``batch * tokens`` input rows (its
    input covariance is over every token), with ``token_mode="samples"`` (default); ``token_mode="mean"`` uses one
    row per sample, its mean token. Under FSDP2 the weights are gathered (``DTensor.full_tensor()``) on every
    rank.

    Args:
        layers: Names of ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` modules to analyse (as in ``named_modules``);
            default every such layer that the forward pass calls, the classifier included (``out_proj`` of an
            ``nn.MultiheadAttention``, applied through its weight, is not called and is left out).
        num_samples: Size of the probe set (class-balanced where the batches carry labels, seeded, from the first
            validation batches).
        every_n_epochs: Analyse after every n-th epoch.
        batch_size: Probe samples per forward pass.
        max_memory_gb: Memory (GB, 1e9 bytes, > 0) of this probe's analysis, outside the shared budget; ``None``
            (default): its share of the budget.
        seed: Seed of the probe-set choice.
        search_batches: Validation batches searched for the probe set.
        forward_fn: ``forward_fn(pl_module, batch)``: runs the model on one probe batch (several inputs, dict
            batches); default ``pl_module(inputs)``. See `AnalysisProbe`.
        input_key: For dict batches: the key of the input tensor.
        target_key: For dict batches: the key of the class labels that balance the probe set.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``alignment``.
        plot_every_n_epochs: Draw ``distributions.png`` every n completed epochs and at the end of the fit; 0:
            never during training (``lightning-probes plot`` redraws it from the JSONL).
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).
        token_mode: ``"samples"`` (every token of a sequence input is a row) or ``"mean"`` (one row per sample).

    Raises:
        ValueError: On a bad argument; before the first training step (`ProbeConfigurationError`) for named
            ``layers`` that are not ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` or never called, or a selection above
            its memory share with ``layers`` set. A model without such layers (its parameters applied
            functionally) skips the probe with one warning.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[AlignmentMonitor(num_samples=256, every_n_epochs=5)])
    """

    probe_name = "alignment"
    shares_pass = True
    uses_memory_budget = True
    captures_inputs = True
    layout_stats = _STATS
    default_layers = "all"  # every Linear/Conv is kept below; "blocks" would leave only the classifier

    def __init__(
        self,
        layers: Optional[Sequence[str]] = None,
        num_samples: int = 512,
        every_n_epochs: int = 1,
        batch_size: int = 128,
        max_memory_gb: Optional[float] = None,
        seed: int = 0,
        search_batches: int = 100,
        forward_fn: Optional[Callable[[Any, Any], Any]] = None,
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        plot_every_n_epochs: int = 10,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        token_mode: str = "samples",
        on_error: Optional[str] = None,
    ) -> None:
        if token_mode not in ("samples", "mean"):
            raise ValueError(f"Expected `token_mode` to be 'samples' or 'mean' for AlignmentMonitor (a Linear's weight "
                             f"acts on the features of each token), but got {token_mode!r}")
        # max_features=1: the layer check's forward (`RepresentationProbe._prepare`) keeps one output feature.
        super().__init__(layers=layers, num_samples=num_samples, max_features=1, every_n_epochs=every_n_epochs,
                         batch_size=batch_size, seed=seed, search_batches=search_batches, forward_fn=forward_fn,
                         input_key=input_key, target_key=target_key, output_dir=output_dir, name=name,
                         plot_every_n_epochs=plot_every_n_epochs,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, token_mode=token_mode,
                         on_error=on_error)
        if max_memory_gb is not None:
            check_float("max_memory_gb", max_memory_gb, low=0.0, low_open=True)
        self.max_memory_gb = None if max_memory_gb is None else float(max_memory_gb)
        self._cap: Optional[int] = None  # input features kept by the reduced layers, once planned
        self.history: dict[str, Any] = {"epochs": [], "layers": {}}
        self._columns: dict[str, torch.Tensor] = {}

    def hparams(self) -> dict[str, Any]:
        settings = super().hparams()
        settings.pop("max_features", None)  # internal here, not an argument
        return settings

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = state_dict.get("history", {"epochs": [], "layers": {}})

    def minimum_samples(self) -> int:
        return 2  # a covariance of a Linear's inputs needs two samples

    # -- layers -------------------------------------------------------------------------------------
    def reset_run(self) -> None:
        super().reset_run()
        self._columns = {}
        self.history = {"epochs": [], "layers": {}}  # a resumed run loads its own after this

    def _select(self, pl_module: pl.LightningModule) -> None:
        try:
            super()._select(pl_module)
        except NothingToAnalyseError:
            self._modules = {}
        kept = {n: m for n, m in self._modules.items() if isinstance(m, LAYER_TYPES)}
        if self.layers is not None and len(kept) < len(self._modules):
            other = {n: type(m).__name__ for n, m in self._modules.items() if n not in kept}
            raise ProbeConfigurationError(
                f"{type(self).__name__}: Expected `layers` to name nn.Linear, nn.Conv1d or nn.Conv2d layers (the "
                f"alignment of a unit is that of its weight vector with the layer's inputs), but got {other}; choose "
                "such `layers` (or leave `layers` out: every such layer the forward pass calls)")
        if not kept:
            raise NothingToAnalyseError(
                f"{type(pl_module).__name__} has no nn.Linear, nn.Conv1d or nn.Conv2d layer (module) to analyse; "
                "the alignment is defined for the weight vectors of such layers")
        self._modules = kept

    def check_widths(self, widths: dict[str, int]) -> None:
        """Fit the input covariances into 75% of the probe's memory share (with the patch chunks): by default
        the widest layers keep a seeded subsample of their input features (one warning); with ``layers`` set, an
        error."""
        full = {n: _features(m) for n, m in self._modules.items()}
        available = self.available_bytes() - self._chunk_bytes()
        estimate = estimated_bytes(_sum_bytes(m) for m in self._modules.values())
        self._columns, self._cap = {}, None
        if estimate <= available:
            return
        widest = {n: format_bytes(_sum_bytes(m)) for n, m in
                  sorted(self._modules.items(), key=lambda kv: -_sum_bytes(kv[1]))[:8]}
        cap = None if self.layers is not None else _fit_feature_cap(self._modules, available)
        dropped: list[str] = []
        while cap is None and self.layers is None:  # grouped layers cannot be subsampled: leave out the largest
            grouped = [n for n, m in self._modules.items() if full[n][1] > 1]
            if not grouped or len(self._modules) == 1:
                break
            name = max(grouped, key=lambda n: _sum_bytes(self._modules[n]))
            dropped.append(name)
            self._modules = {n: m for n, m in self._modules.items() if n != name}
            widths.pop(name, None)
            cap = _fit_feature_cap(self._modules, available)
        where = (f"the {format_bytes(max(0.0, available))} its sums may take ({self.accumulator_fraction:.0%} of "
                 f"{self.memory_share_text()}, {format_bytes(self._share or 0)}, less the patch chunks)")
        if cap is None:
            hint = ("`layers` is set, so no layer is reduced automatically" if self.layers is not None
                    else "even the smallest subsample of the widest layers does not fit")
            raise ProbeConfigurationError(
                f"{type(self).__name__} would need about {format_bytes(estimate)} for the float64 input covariances "
                f"of {len(self._modules)} layers, above {where} ({hint}). Select fewer `layers`, or raise "
                f"`max_memory_gb` or `lightning_probes.set_memory_budget(...)`. Largest: {widest}")
        reduced = {n: f"{full[n][0]}->{cap}" for n, m in self._modules.items()
                   if full[n][1] == 1 and full[n][0] > cap}
        self._columns = {n: subsample_columns(full[n][0], cap, n) for n in reduced}
        self._cap = cap
        self._reduced = f"{len(reduced)} widest layer(s) keep {cap} input features" + (
            f", {len(dropped)} grouped layer(s) left out" if dropped else "")
        left_out = (f"; {len(dropped)} grouped convolution(s), whose per-group covariances cannot be subsampled, are "
                    f"left out: {', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}") if dropped else ""
        rank_zero_warn(
            f"{type(self).__name__}: the float64 input covariances of {len(self._modules) + len(dropped)} layers "
            f"would need about {format_bytes(estimate)}, above {where}; the {len(reduced)} widest layer(s) keep a "
            f"seeded subsample of {cap} input features (their alignment is within that subspace; records: "
            f"`kept_features`): {', '.join(f'{n} {v}' for n, v in reduced.items())}{left_out}. Set `layers` to "
            "choose.")

    def _chunk_bytes(self) -> int:
        """Bytes set aside for one chunk of convolution patches and its copies (at most 2**24 values; 1/8 of the
        share)."""
        return 16 * self.chunk_elements()

    def chunk_elements(self) -> int:
        """Largest number of patch values unfolded at once (`AlignmentAccumulator.update_layer`)."""
        return int(max(1, min(2**24, (self._share or 2**28) // 8 // 16)))

    def accumulator_bytes(self, widths: Sequence[int]) -> int:
        return estimated_bytes(_sum_bytes(m, self._cap) for m in self._modules.values()) + self._chunk_bytes()

    def held_bytes_per_sample(self) -> float:
        # A Linear's input rows of one sample (shifted, and buffered in the accumulator); patches are chunked.
        batch = max(1, self._check_batch or 1)
        held = 0.0
        for name, module in self._modules.items():
            if isinstance(module, nn.Linear) and name in self._shapes:
                rows = math.prod(self._shapes[name]) / batch / max(1, module.out_features)
                held = max(held, 8.0 * rows * module.in_features)
        return held

    # -- analysis -----------------------------------------------------------------------------------
    def start_session(self) -> AlignmentSession:
        """Fresh accumulators for one analysis (see `AlignmentSession`)."""
        return AlignmentSession(self)

    def _finish(self, trainer: pl.Trainer, epoch: int, accumulators: dict[str, AlignmentAccumulator]
                ) -> dict[str, Any]:
        records = []
        for name, module in self._modules.items():
            accumulator = accumulators.pop(name)  # free each covariance once used
            values = accumulator.compute(full_weight(module.weight)).cpu()
            width = accumulator.num_features // accumulator.groups
            records.append({"epoch": epoch, "step": trainer.global_step, "layer": name, "type": _type_name(module),
                            "units": int(values.numel()), "features": _features(module)[0] // accumulator.groups,
                            "kept_features": width, "groups": accumulator.groups,
                            "chance": 1.0 / width, **alignment_summary(values), "alignment": values.tolist()})
        self._report(trainer, epoch, records)
        means = [r["mean"] for r in records if r["mean"] is not None]
        return {f"{self.name}/mean": float(np.mean(means)) if means else None}

    def _report(self, trainer: pl.Trainer, epoch: int, records: list[dict[str, Any]]) -> None:
        self.write_records(trainer, records)
        step = trainer.global_step
        self.log_scalars(trainer, self.scalars(records, _STATS), step)
        self.history["epochs"].append(epoch)
        for r in records:
            layer = self.history["layers"].setdefault(r["layer"], {"chance": r["chance"], "epochs": [], "boxes": []})
            layer["epochs"].append(epoch)
            layer["boxes"].append([r[k] for k in (*QUANTILES, "mean")])
        layers = {n: {"chance": v["chance"], "epochs": list(v["epochs"]), "boxes": list(v["boxes"])}
                  for n, v in self.history["layers"].items()}
        order = [r["layer"] for r in records]
        self.figure(trainer, "distributions.png", "distributions", step, lambda: distributions_figure(layers, order),
                    epoch)

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """``distributions.png`` from the JSONL records (every analysed epoch)."""
        records = cls.records_of(directory, name)
        if not records:
            return []
        layers: dict[str, dict[str, Any]] = {}
        for r in records:
            layer = layers.setdefault(r["layer"], {"chance": r["chance"], "epochs": [], "boxes": []})
            layer["epochs"].append(r["epoch"])
            layer["boxes"].append([r[k] for k in (*QUANTILES, "mean")])
        key = (records[-1]["epoch"], records[-1]["step"])
        order = [r["layer"] for r in records if (r["epoch"], r["step"]) == key]
        return [("distributions.png", "distributions", lambda: distributions_figure(layers, order))]


class AlignmentSession:
    """One analysis of an `AlignmentMonitor`: one `AlignmentAccumulator` per layer, fed batch by batch with the
    layers' raw inputs (`consume`), then turned into records (`finish`)."""

    def __init__(self, probe: AlignmentMonitor) -> None:
        self.probe = probe
        self.accumulators = {name: AlignmentAccumulator.for_layer(m, probe._columns.get(name))
                             for name, m in probe._modules.items()}

    def consume_layer(self, name: str, value: torch.Tensor, batch: Optional[int] = None) -> None:
        """Add one layer's raw input of this batch to its accumulator (inside the forward hook; not kept)."""
        module = self.probe._modules[name]
        if self.probe.token_mode == "mean" and isinstance(module, nn.Linear) and value.ndim > 2:
            value = token_rows(value, "tokens", "mean", batch)  # one row per sample: its mean token
        self.accumulators[name].update_layer(module, value, chunk_elements=self.probe.chunk_elements())

    def end_batch(self, batch: Optional[int] = None) -> None:
        """Nothing to do: every layer was added in its hook."""

    def consume(self, inputs: dict[str, torch.Tensor], batch: Optional[int] = None) -> None:
        """Add one batch of raw layer inputs ``{layer: input}``."""
        for name, value in inputs.items():
            self.consume_layer(name, value, batch)

    def finish(self, trainer: pl.Trainer, epoch: int) -> dict[str, Any]:
        """Records, scalars and figure of this analysis; returns the headline scalars."""
        return self.probe._finish(trainer, epoch, self.accumulators)


def _type_name(module: nn.Module) -> str:
    """The layer's class name; FSDP2's ``FSDP<Class>`` wrapper class reports the class it wraps."""
    cls = type(module)
    if isinstance(module, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls.__name__


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight: a sharded ``DTensor`` (FSDP2) is gathered with ``full_tensor()``, a collective every rank
    must enter (the analysis runs on every rank under FSDP2)."""
    if isinstance(weight, DTensor):
        return weight.full_tensor()
    return weight


def _features(module: nn.Module) -> tuple[int, int]:
    """``(D, groups)``: the input features of one ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` and its groups."""
    return layer_features(module)


def _sum_bytes(module: nn.Module, cap: Optional[int] = None) -> int:
    """Bytes one layer's accumulator holds at most: float64 ``(G, D/G, D/G)`` sums and a float32 row buffer of
    up to ``D/G`` rows (see `AlignmentAccumulator`); with ``cap``, a ``groups == 1`` layer keeps at most ``cap``
    features."""
    features, groups = _features(module)
    if cap is not None and groups == 1:
        features = min(features, cap)
    return 12 * features * features // groups + 8 * features


def _fit_feature_cap(modules: Mapping[str, nn.Module], budget: float) -> Optional[int]:
    """The largest input-feature cap for ``groups == 1`` layers whose estimate fits ``budget`` bytes, or ``None``."""
    low, high = 1, max(_features(m)[0] for m in modules.values())
    if estimated_bytes(_sum_bytes(m, low) for m in modules.values()) > budget:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if estimated_bytes(_sum_bytes(m, middle) for m in modules.values()) <= budget:
            low = middle
        else:
            high = middle
    return low


def estimated_bytes(layer_bytes: Iterable[int]) -> int:
    """Peak bytes of one analysis: every layer's accumulator at once, plus the temporaries of the largest (its
    products or covariance, about as large again)."""
    sizes = list(layer_bytes)
    return sum(sizes) + max(sizes, default=0)


def distributions_figure(layers: dict[str, dict[str, Any]], order: Sequence[str]) -> Figure:
    """One panel per layer: a box per analysed epoch (quartiles, 5%-95% whiskers, mean), the chance level dashed;
    a logarithmic y axis where a panel's values span more than a factor of 10.

    Args:
        layers: ``{layer: {"chance": float, "epochs": [...], "boxes": [[q05, q25, q50, q75, q95, mean], ...]}}``.
        order: Layers to draw, in panel order.
    """
    columns = min(3, max(1, len(order)))
    rows = max(1, math.ceil(len(order) / columns))
    fig = Figure(figsize=(4.2 * columns, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, order):
        layer = layers[name]
        stats = [{"whislo": b[0], "q1": b[1], "med": b[2], "q3": b[3], "whishi": b[4], "mean": b[5],
                  "label": str(e)} for e, b in zip(layer["epochs"], layer["boxes"]) if None not in b]
        if stats:
            ax.bxp(stats, showfliers=False, showmeans=True, widths=0.6,
                   meanprops={"markersize": 4, "markerfacecolor": "tab:green", "markeredgecolor": "tab:green"})
            step = max(1, math.ceil(len(stats) / 12))
            ax.set_xticks(range(1, len(stats) + 1)[::step], [s["label"] for s in stats][::step], fontsize=7)
        ax.axhline(layer["chance"], color="tab:gray", linestyle="--", linewidth=0.8)
        span = [v for s in stats for v in (s["whislo"], s["whishi"]) if v > 0] + [layer["chance"]]
        if max(span) > 10 * min(span):  # spread over decades: a log scale shows them all
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("epoch", fontsize=8)
    for ax in axes[len(order):]:
        ax.set_visible(False)
    fig.suptitle("Alignment of units with their input variance (dashed: chance 1/D)")
    return fig
