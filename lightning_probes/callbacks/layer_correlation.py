"""`LayerCorrelationMonitor`: cross-correlation and CKA between layers, over training."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.utilities import rank_zero_warn

from lightning_probes.callbacks.base import FigureSpec
from lightning_probes.callbacks.representation_base import RepresentationProbe
from lightning_probes.checks import check_choice, check_float
from lightning_probes.functional.representations import (
    MomentAccumulator,
    blockwise_layer_similarity,
    cka_from_hsic,
    minibatch_hsic_terms,
)
from lightning_probes.plotting import colormapped, heatmap, line_panels


class LayerCorrelationMonitor(RepresentationProbe):
    """How similar the layers are to each other, and how that changes as training goes.

    On the probe set (see `RepresentationProbe`: at the start of training and every ``every_n_epochs``) it
    streams the selected layers' outputs (each reduced to at most ``max_features`` features) into one
    covariance matrix over all their features (float32 sums of centred products, as in `MomentAccumulator`;
    float64 from there on), from which it derives, for every pair of layers ``i <= j``:

    - the Pearson cross-correlation matrix between their features, drawn together as a "matrix of
      correlation matrices" (``<name>/correlation.png``), and its mean absolute value
      (``mean_abs_correlation``; features with zero variance are left out);
    - linear CKA (Kornblith et al. 2019), a similarity in [0, 1], from the covariance blocks; or, with
      ``cka="minibatch_unbiased"``, the unbiased minibatch estimator of Nguyen et al. (2021) averaged over
      batches of ``batch_size`` probe samples (needs ``batch_size > 3``). Drawn as a layer x layer heatmap
      (``<name>/cka.png``).

    Records per (epoch, pair) go to ``<name>.jsonl`` and the scalars ``<name>/<stat>/<a>__<b>``; the headline
    ``<name>/cka_adjacent_mean`` (mean CKA of adjacent layers in the selection's order) goes to the loggers and
    to ``trainer.callback_metrics`` (``EarlyStopping``/``ModelCheckpoint`` can monitor it); with one analysable
    layer it is ``null``, the records hold the layer with itself and ``corr_means.png`` shows that layer's own mean
    absolute correlation over the epochs. In ``<name>/``:
    ``corr_means.json`` holds the pair summaries of every analysed epoch, plotted over epochs in
    ``corr_means.png``; ``correlation.npz`` holds the last analysis's correlation matrix (float16, figure
    grade), layer edges and names and CKA matrix, from which ``lightning-probes plot`` redraws
    ``correlation.png``. Figures are drawn every ``plot_every_n_epochs`` epochs and at the end of the fit; the
    correlation and CKA matrices go to the image loggers as colour-mapped images (``<name>/heatmap/...``) at
    every analysis. The cost of one pass is a ``(features x features)`` product per batch.

    Sequence outputs ``(batch, tokens, features)`` are read by ``token_mode`` (default: every token a sample
    of ``features``; see `lightning_probes.feature_rows`); one covariance needs the same rows from every layer,
    so a layer with one row per sample (e.g. a classifier after pooling) is paired with every token row of its
    sample, and layers with different token counts are read as their mean over tokens (with a warning).

    Memory: the pass streams. Each layer's output is reduced inside its forward hook and only its feature rows
    for the current batch are kept until the batch ends, when they are added to the ``(F x F)`` float32 sums over
    all ``F`` kept features of all layers; the results are then derived one layer's block row at a time
    (`lightning_probes.functional.blockwise_layer_similarity`: a float64 block row and the float16 correlation
    matrix), so the peak is about ``6 F**2 + 16 F w`` bytes (``w`` the widest layer) plus one forward batch. The
    probe draws on the memory budget its Trainer's probes share (`lightning_probes.set_memory_budget`; by default
    10% of the model's parameter memory, at least 64 MiB, split equally) or on its own ``max_memory_gb``: at the
    pre-flight, once one forward has shown the layers' widths, a selection whose sums do not fit 75% of the share
    is reduced when ``layers`` and ``max_features`` were left at their defaults: the widest layers keep fewer
    features (the largest common cap that fits, by adaptive pooling of channel-first outputs, then a seeded
    subsample of the features), with one warning naming each reduced layer and its widths. With ``layers`` or
    ``max_features`` set, it stops with an error naming the estimate, the share and those arguments instead. The
    rest of the share sizes the forward batches (at most ``batch_size`` samples; see
    `AnalysisProbe.plan_forward_batch`; not with ``cka="minibatch_unbiased"``, whose estimator is defined by
    its batches). The plan is logged once (`lightning_probes.memory_plan`).

    Args:
        cka: ``"linear"`` (full probe set) or ``"minibatch_unbiased"`` (per ``batch_size`` minibatch).
        max_memory_gb: Memory (GB, 1e9 bytes, > 0) of this probe's analysis, outside the shared budget; ``None``
            (default): its share of the budget.
        **kwargs: `RepresentationProbe` arguments: ``layers``, ``num_samples``, ``max_features``, ``token_mode``,
            ``every_n_epochs``, ``plot_every_n_epochs``, ``batch_size``, ``seed``, ``search_batches``,
            ``forward_fn``, ``input_key``, ``target_key``, ``output_dir``, ``name``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[LayerCorrelationMonitor(layers=["net.fc1", "net.fc2"])])
    """

    probe_name = "layer_correlation"
    shares_pass = True
    uses_memory_budget = True
    layout_stats = ("mean_abs_correlation", "cka")

    def __init__(self, cka: Literal["linear", "minibatch_unbiased"] = "linear",
                 max_memory_gb: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("cka", cka, ("linear", "minibatch_unbiased"))
        if max_memory_gb is not None:
            check_float("max_memory_gb", max_memory_gb, low=0.0, low_open=True)
        if cka == "minibatch_unbiased" and self.batch_size <= 3:
            raise ValueError(f"The unbiased minibatch CKA needs `batch_size` > 3, but got {self.batch_size}")
        self.cka = cka
        self.max_memory_gb = None if max_memory_gb is None else float(max_memory_gb)
        self.history: dict[str, Any] = {"epochs": [], "pairs": {}}

    def reset_run(self) -> None:
        super().reset_run()
        self.history = {"epochs": [], "pairs": {}}  # a resumed run loads its own after this

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = state_dict.get("history", {"epochs": [], "pairs": {}})

    def minimum_samples(self) -> int:
        return 4 if self.cka == "minibatch_unbiased" else 2

    @property
    def exact_batch(self) -> bool:  # the minibatch estimator is defined by its batches of `batch_size`
        return self.cka == "minibatch_unbiased"

    def fit_caps(self, widths: dict[str, int]) -> dict[str, int]:
        self._fit_token_rows()
        return self.fit_caps_in_share(super().fit_caps(widths), "the float32 (F x F) sums and the float16 "
                                                                "correlation")

    def accumulator_bytes(self, widths: Sequence[int]) -> int:
        return estimated_bytes(sum(widths), max(widths, default=0))

    def held_bytes_per_sample(self) -> float:
        # One batch's feature rows of every layer: kept, repeated to the token rows, concatenated, shifted.
        rows = max(self.rows_per_sample().values(), default=1)
        return 16.0 * rows * sum(self._widths.values() if self._widths else ())

    def _fit_token_rows(self) -> None:
        """One covariance needs the same rows from every layer: layers with one row per sample are repeated over
        the tokens of the others; token layers with different token counts are read as their mean over tokens."""
        counts = {c for c in self.rows_per_sample().values() if c > 1}
        if len(counts) > 1:
            rank_zero_warn(f"{type(self).__name__}: the layers have different token counts "
                           f"({sorted(counts)}); `token_mode='samples'` cannot pair their rows, so every token output "
                           "is read as its mean over the tokens (`token_mode='mean'`) for this run")
            self.token_mode = "mean"
            self._reducers = self.make_reducers("mean")

    def start_session(self) -> LayerCorrelationSession:
        """Fresh accumulators for one analysis (see `LayerCorrelationSession`)."""
        return LayerCorrelationSession(self)

    def _finish(self, trainer: pl.Trainer, epoch: int, state: dict[str, Any]) -> dict[str, Any]:
        names = list(self._modules)
        edges = np.cumsum([0, *state["widths"]])
        corr, mean_abs, cka = blockwise_layer_similarity(state["moments"], list(state["widths"]),
                                                         cka=self.cka == "linear")
        state["moments"] = None  # the sums are no longer needed: free them before the figures
        if self.cka != "linear":
            cka = cka_from_hsic(state["hsic"]).cpu()
        records = []
        for i in range(len(names)):
            for j in range(i, len(names)):
                value = float(mean_abs[i, j])
                records.append({"epoch": epoch, "step": trainer.global_step, "layer_a": names[i], "layer_b": names[j],
                                "mean_abs_correlation": None if math.isnan(value) else value,
                                "cka": float(cka[i, j])})
        self._report(trainer, epoch, names, records, corr.cpu().numpy(), edges, cka.numpy())
        adjacent = [float(cka[i, i + 1]) for i in range(len(names) - 1)]
        return {f"{self.name}/cka_adjacent_mean": float(np.mean(adjacent)) if adjacent else None}

    def _report(self, trainer: pl.Trainer, epoch: int, names: list[str], records: list[dict[str, Any]],
                corr: np.ndarray, edges: np.ndarray, cka: np.ndarray) -> None:
        self.write_records(trainer, records)
        step = trainer.global_step
        self.log_scalars(trainer, self.scalars([{**r, "pair": f"{r['layer_a']}__{r['layer_b']}"} for r in records],
                                              ("mean_abs_correlation", "cka"), layer_key="pair"), step)
        self.history["layers"] = names
        self.history["epochs"].append(epoch)
        for r in records:
            pair = self.history["pairs"].setdefault(f"{r['layer_a']}|{r['layer_b']}",
                                                    {"mean_abs_correlation": [], "cka": []})
            pair["mean_abs_correlation"].append(r["mean_abs_correlation"])
            pair["cka"].append(r["cka"])
        self.save_json(trainer, self.history, "corr_means.json")
        if not trainer.is_global_zero:
            return
        corr16 = corr.astype(np.float16, copy=False)  # figure-grade: 3 significant digits
        self.save_npz(trainer, "correlation.npz", correlation=corr16, edges=np.asarray(edges), layers=np.array(names),
                      cka=cka, cka_estimator=np.array(self.cka), epoch=np.array(epoch))
        self.log_image(trainer, colormapped(corr16, -1, 1, "RdBu_r", max_size=512), "heatmap/correlation", step)
        self.log_image(trainer, colormapped(cka, 0, 1), "heatmap/cka", step)
        self.figure(trainer, "correlation.png", "correlation", step,
                    lambda: correlation_figure(corr16, edges, names, epoch), epoch)
        self.figure(trainer, "cka.png", "cka", step, lambda: cka_figure(cka, names, self.cka, epoch), epoch)
        if len(self.history["epochs"]) > 1:
            epochs, pairs = list(self.history["epochs"]), {k: {s: list(v) for s, v in p.items()}
                                                           for k, p in self.history["pairs"].items()}
            self.figure(trainer, "corr_means.png", "over_training", step,
                        lambda: adjacent_figure(epochs, names, pairs), epoch)

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """``correlation.png`` from ``<name>/correlation.npz`` (the last analysis), ``cka.png`` and
        ``corr_means.png`` from the JSONL records."""
        specs: list[FigureSpec] = []
        saved = os.path.join(directory, name, "correlation.npz")
        estimator = str(settings.get("cka", "linear"))
        if os.path.exists(saved):
            with np.load(saved) as data:
                corr, edges = data["correlation"], data["edges"]
                layers, epoch = [str(n) for n in data["layers"]], int(data["epoch"])
                estimator = str(data["cka_estimator"])
            specs.append(("correlation.png", "correlation", lambda: correlation_figure(corr, edges, layers, epoch)))
        epochs, names, pairs = history_from_records(cls.records_of(directory, name))
        if not epochs:
            return specs
        last = epochs[-1]
        cka = np.array([[pairs[_pair_key(a, b)]["cka"][-1] if _pair_key(a, b) in pairs
                         else pairs[_pair_key(b, a)]["cka"][-1] for b in names] for a in names], dtype=float)
        specs.append(("cka.png", "cka", lambda: cka_figure(cka, names, estimator, last)))
        if len(epochs) > 1:
            specs.append(("corr_means.png", "over_training", lambda: adjacent_figure(epochs, names, pairs)))
        return specs


class LayerCorrelationSession:
    """One analysis of a `LayerCorrelationMonitor`: the streamed covariance sums (and minibatch HSIC terms), fed
    layer by layer inside the forward hooks (`consume_layer`: the layer's reduced feature rows of this batch are
    kept) and batch by batch (`end_batch`: the rows of every layer are added to the sums and dropped), then turned
    into records (`finish`)."""

    def __init__(self, probe: LayerCorrelationMonitor) -> None:
        self.probe = probe
        self.state: dict[str, Any] = {"moments": None, "hsic": None, "widths": None}
        self._rows: dict[str, torch.Tensor] = {}

    def consume_layer(self, name: str, output: torch.Tensor, batch: Optional[int] = None) -> None:
        """Keep the feature rows of one layer's output (a copy: later in-place operations cannot change it)."""
        batch = self.probe.batch_now if batch is None else batch
        rows = self.probe._reducers[name](output, batch)
        self._rows[name] = rows.to(torch.float32, copy=True)

    def end_batch(self, batch: Optional[int] = None) -> None:
        """Add the kept rows of every layer to the sums (in the layers' order) and drop them."""
        probe, state = self.probe, self.state
        features = [self._rows[n] for n in probe._modules if n in self._rows]
        self._rows = {}
        if not features:
            return
        rows = max(f.shape[0] for f in features)
        # A per-sample row is paired with every token row of its sample (token rows are sample-major).
        features = [f if f.shape[0] == rows else f.repeat_interleave(rows // f.shape[0], dim=0) for f in features]
        if state["moments"] is None:
            state["widths"] = [f.shape[1] for f in features]
            state["moments"] = MomentAccumulator(sum(state["widths"]), device=features[0].device,
                                                 dtype=torch.float32)  # agrees with float64 to 1e-5
        joined = torch.cat(features, dim=1) if len(features) > 1 else features[0]  # (rows, all features)
        state["moments"].update(joined)
        del joined
        if probe.cka == "minibatch_unbiased" and features[0].shape[0] > 3:
            grams = [(f @ f.T).double() for f in features]
            hsic = minibatch_hsic_terms(grams)
            state["hsic"] = hsic if state["hsic"] is None else state["hsic"] + hsic

    def consume(self, outputs: dict[str, torch.Tensor], batch: Optional[int] = None) -> None:
        """Add one batch of raw outputs ``{layer: output}`` at once (`consume_layer` each, then `end_batch`)."""
        for name, output in outputs.items():
            self.consume_layer(name, output, batch)
        self.end_batch(batch)

    def finish(self, trainer: pl.Trainer, epoch: int) -> dict[str, Any]:
        """Records, scalars and figures of this analysis; returns the headline scalars."""
        return self.probe._finish(trainer, epoch, self.state)


def _pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def history_from_records(records: list[dict[str, Any]]) -> tuple[list[int], list[str], dict[str, dict[str, list]]]:
    """``(epochs, layers of the last analysis, {"a|b": {"mean_abs_correlation": [...], "cka": [...]}})`` from the
    JSONL records, as the probe keeps them in ``corr_means.json``: one entry per analysis, in file order."""
    epochs: list[int] = []
    names: list[str] = []
    pairs: dict[str, dict[str, list]] = {}
    last_key = None
    for r in records:
        key = (r["epoch"], r["step"])
        if key != last_key:
            epochs.append(r["epoch"])
            names, last_key = [], key
        if r["layer_a"] not in names:
            names.append(r["layer_a"])
        if r["layer_b"] not in names:
            names.append(r["layer_b"])
        pair = pairs.setdefault(_pair_key(r["layer_a"], r["layer_b"]), {"mean_abs_correlation": [], "cka": []})
        pair["mean_abs_correlation"].append(r["mean_abs_correlation"])
        pair["cka"].append(r["cka"])
    return epochs, names, pairs


#: Most rows (and columns) of the correlation matrix drawn in ``correlation.png``: a larger matrix is drawn every
#: ``ceil(F / FIGURE_CELLS)``-th feature (the ``.npz`` keeps every one).
FIGURE_CELLS = 768


def correlation_figure(corr: np.ndarray, edges: Sequence[int], names: Sequence[str], epoch: int) -> Figure:
    """The matrix of cross-correlation matrices: every kept feature of every layer against every other (every
    ``ceil(F / FIGURE_CELLS)``-th one of a larger matrix), layer blocks separated by lines."""
    edges = np.asarray(edges)
    stride = max(1, -(-corr.shape[0] // FIGURE_CELLS))  # a figure of ~700 pixels shows no more cells
    if stride > 1:
        corr, edges = corr[::stride, ::stride], edges / stride
    fig = Figure(figsize=(9, 8))
    ax = fig.subplots()
    heatmap(corr, f"Cross-correlation of layer features, epoch {epoch}", vmin=-1, vmax=1, cmap="RdBu_r", ax=ax)
    centers = (edges[:-1] + edges[1:]) / 2 - 0.5
    for edge in edges[1:-1]:
        ax.axhline(edge - 0.5, color="k", linewidth=0.5)
        ax.axvline(edge - 0.5, color="k", linewidth=0.5)
    ax.set_xticks(centers, names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(centers, names, fontsize=7)
    return fig


def cka_figure(cka: np.ndarray, names: Sequence[str], estimator: str, epoch: int) -> Figure:
    """The layer x layer CKA heatmap, annotated."""
    fig = Figure(figsize=(1.5 + 0.5 * len(names), 1.0 + 0.45 * len(names)), layout="constrained")
    heatmap(cka, f"{estimator} CKA, epoch {epoch}", names, names, vmin=0, vmax=1, annotate=True, ax=fig.subplots())
    return fig


def adjacent_figure(epochs: Sequence[int], names: Sequence[str], pairs: Mapping[str, Mapping[str, list]]) -> Figure:
    """Mean |correlation| and CKA of (up to six) adjacent layers over the analysed epochs; with one layer (no
    adjacent pair), the mean absolute correlation between its own features (its CKA with itself is 1)."""
    series = {}
    adjacent = list(zip(names[:-1], names[1:]))[:6]
    for key in ("mean_abs_correlation", "cka"):
        for a, b in adjacent:
            series[f"{key}\n{a}|{b}"] = _series(pairs, a, b, key, len(epochs))
    if not adjacent:
        series = {f"mean_abs_correlation\n{a}|{a}": _series(pairs, a, a, "mean_abs_correlation", len(epochs))
                  for a in names[:1]}
    title = "Adjacent layers over training" if adjacent else "Within the layer over training"
    return line_panels(list(epochs), series, "epoch", title)


def _series(pairs: Mapping[str, Mapping[str, list]], a: str, b: str, key: str, length: int) -> list[float]:
    """One statistic of pair ``a|b`` per analysed epoch (NaN where missing), the last ``length`` values."""
    values = [np.nan if v is None else v for v in pairs.get(_pair_key(a, b), {}).get(key, [])]
    return ([np.nan] * (length - len(values)) + values)[-length:] if length else values


def estimated_bytes(features: int, widest: int = 0) -> int:
    """Peak bytes of the streamed analysis over ``features`` features (``widest``: of the widest layer), the
    forward batch aside: the float32 ``(F x F)`` sums, the float16 correlation derived from them and one float64
    block row of the widest layer with its temporary (`lightning_probes.functional.blockwise_layer_similarity`)."""
    return 6 * features * features + 16 * widest * features + 24 * features
