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
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.feature_rows import fit_cap
from lightning_probes.functional.representations import (
    MomentAccumulator,
    cka_from_hsic,
    correlation_from_covariance,
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

    Memory: the float64 ``(F x F)`` covariance over all ``F`` kept features of all layers, with the
    correlation derived from it, needs about ``4 * 8 * F**2`` bytes at its peak. At the first analysis, once
    one forward has shown the layers' widths, a selection above ``max_memory_gb`` is reduced when ``layers`` and
    ``max_features`` were left at their defaults: the widest layers keep fewer features (the largest common cap
    that fits, by adaptive pooling of channel-first outputs, then a seeded subsample of the features), with one
    warning naming each reduced layer and its widths. With ``layers`` or ``max_features`` set, it stops with an
    error naming the estimate and those arguments instead.

    Args:
        cka: ``"linear"`` (full probe set) or ``"minibatch_unbiased"`` (per ``batch_size`` minibatch).
        max_memory_gb: Largest estimated memory (GB, 1e9 bytes) of the covariance pass (> 0).
        **kwargs: `RepresentationProbe` arguments: ``layers``, ``num_samples``, ``max_features``, ``token_mode``,
            ``every_n_epochs``, ``plot_every_n_epochs``, ``batch_size``, ``seed``, ``search_batches``,
            ``forward_fn``, ``input_key``, ``target_key``, ``output_dir``, ``name``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[LayerCorrelationMonitor(layers=["net.fc1", "net.fc2"])])
    """

    probe_name = "layer_correlation"
    shares_pass = True
    layout_stats = ("mean_abs_correlation", "cka")

    def __init__(self, cka: Literal["linear", "minibatch_unbiased"] = "linear", max_memory_gb: float = 2.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("cka", cka, ("linear", "minibatch_unbiased"))
        check_float("max_memory_gb", max_memory_gb, low=0.0, low_open=True)
        if cka == "minibatch_unbiased" and self.batch_size <= 3:
            raise ValueError(f"The unbiased minibatch CKA needs `batch_size` > 3, but got {self.batch_size}")
        self.cka = cka
        self.max_memory_gb = float(max_memory_gb)
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

    def fit_caps(self, widths: dict[str, int]) -> dict[str, int]:
        self._fit_token_rows()
        caps = super().fit_caps(widths)
        kept = {n: r.width(self._shapes[n], self._check_batch)
                for n, r in self.make_reducers(self.token_mode, caps).items()}
        features = sum(kept.values())
        estimate = estimated_bytes(features) / 1e9
        if estimate <= self.max_memory_gb:
            return caps
        explicit = [f"`{a}`" for a, given in (("layers", self.layers is not None),
                                              ("max_features", self.max_features_set)) if given]
        budget = int(math.isqrt(int(self.max_memory_gb * 1e9) // estimated_bytes(1)))
        cap = fit_cap(list(kept.values()), budget)
        if explicit or cap is None:
            raise ProbeConfigurationError(
                f"{type(self).__name__} would need about {estimate:.2f} GB for the float64 ({features} x {features}) "
                f"covariance over the features of {len(kept)} layers, above `max_memory_gb`={self.max_memory_gb:g}. "
                f"Select fewer `layers`, lower `max_features` (now {self.max_features}), or raise `max_memory_gb`"
                f"{' (the set ' + ' and '.join(explicit) + ' are not reduced automatically)' if explicit else ''}. "
                f"Widths: {dict(sorted(kept.items(), key=lambda kv: -kv[1])[:8])}")
        fitted = {n: min(caps[n], cap) for n in caps}
        after = {n: r.width(self._shapes[n], self._check_batch)
                 for n, r in self.make_reducers(self.token_mode, fitted).items()}
        reduced = {n: f"{kept[n]}->{after[n]}" for n in kept if after[n] < kept[n]}
        rank_zero_warn(
            f"{type(self).__name__}: the float64 ({features} x {features}) covariance over {len(kept)} layers would "
            f"need about {estimate:.2f} GB, above `max_memory_gb`={self.max_memory_gb:g}; the {len(reduced)} widest "
            f"layer(s) keep at most {cap} features (adaptive pooling of channel-first outputs, then a seeded "
            f"subsample of the features), {sum(after.values())} features in all: "
            f"{', '.join(f'{n} {v}' for n, v in reduced.items())}. Set `max_features` or `layers` to choose.")
        return fitted

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

    def analyse_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        probe = self.probe_set(trainer)
        session = self.start_session()
        self.for_each_batch(pl_module, probe.chunks(self.batch_size), session.consume, raw=True)
        return session.finish(trainer, epoch)

    def _finish(self, trainer: pl.Trainer, epoch: int, state: dict[str, Any]) -> dict[str, Any]:
        names = list(self._modules)
        cov = state["moments"].covariance()
        corr = correlation_from_covariance(cov).cpu()
        edges = np.cumsum([0, *state["widths"]])
        blocks = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        if self.cka == "linear":
            norms = torch.stack([torch.linalg.matrix_norm(cov[b, b]) for b in blocks])  # ||C_ii||_F, once each
            squares = torch.stack([cov[bi, bj].square().sum() for i, bi in enumerate(blocks)
                                   for bj in blocks[i:]]).cpu()
            cka = torch.zeros(len(names), len(names), dtype=torch.float64)
            index = 0
            for i in range(len(names)):
                for j in range(i, len(names)):
                    denominator = float(norms[i] * norms[j])
                    cka[i, j] = cka[j, i] = squares[index] / denominator if denominator > 0 else 0.0
                    index += 1
        else:
            cka = cka_from_hsic(state["hsic"]).cpu()
        records = []
        for i in range(len(names)):
            for j in range(i, len(names)):
                block = corr[blocks[i], blocks[j]].abs()
                mean_abs = float(block[~block.isnan()].mean()) if (~block.isnan()).any() else None
                records.append({"epoch": epoch, "step": trainer.global_step, "layer_a": names[i], "layer_b": names[j],
                                "mean_abs_correlation": mean_abs, "cka": float(cka[i, j])})
        self._report(trainer, epoch, names, records, corr.numpy(), edges, cka.numpy())
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
        corr16 = corr.astype(np.float16)  # figure-grade: 3 significant digits, half the bytes of float32
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
    """One analysis of a `LayerCorrelationMonitor`: the streamed covariance (and minibatch HSIC terms), fed
    batch by batch with raw layer outputs (`consume`), then turned into records (`finish`)."""

    def __init__(self, probe: LayerCorrelationMonitor) -> None:
        self.probe = probe
        self.state: dict[str, Any] = {"moments": None, "hsic": None, "widths": None}

    def consume(self, outputs: dict[str, torch.Tensor], batch: Optional[int] = None) -> None:
        """Add one batch of raw outputs ``{layer: output}`` (``batch``: its samples; default the probe's)."""
        probe, state = self.probe, self.state
        batch = probe.batch_now if batch is None else batch
        features = [probe._reducers[n](o, batch).float() for n, o in outputs.items()]
        rows = max(f.shape[0] for f in features)
        # A per-sample row is paired with every token row of its sample (token rows are sample-major).
        features = [f if f.shape[0] == rows else f.repeat_interleave(rows // f.shape[0], dim=0) for f in features]
        if state["moments"] is None:
            state["widths"] = [f.shape[1] for f in features]
            state["moments"] = MomentAccumulator(sum(state["widths"]), device=features[0].device,
                                                 dtype=torch.float32)  # agrees with float64 to 1e-5
        state["moments"].update(torch.cat(features, dim=1))  # (rows, all features)
        if probe.cka == "minibatch_unbiased" and features[0].shape[0] > 3:
            grams = [(f @ f.T).double() for f in features]
            hsic = minibatch_hsic_terms(grams)
            state["hsic"] = hsic if state["hsic"] is None else state["hsic"] + hsic

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


def correlation_figure(corr: np.ndarray, edges: Sequence[int], names: Sequence[str], epoch: int) -> Figure:
    """The matrix of cross-correlation matrices: every kept feature of every layer against every other, layer
    blocks separated by lines."""
    edges = np.asarray(edges)
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


def estimated_bytes(features: int) -> int:
    """Peak bytes of the covariance pass over ``features`` features: about four float64 ``(F x F)`` matrices
    (the streamed sums, the covariance, the correlation and a temporary)."""
    return 4 * 8 * features * features
