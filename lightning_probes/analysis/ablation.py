"""Unit ablation of a trained network: drop hidden units in order of their alignment, measure the damage.

The engine behind ``lightning-probes ablate``. Works on any ``nn.Module`` classifier whose forward takes a
batch of inputs and returns ``(N, C)`` logits (the project's LightningModules, a torchvision ResNet, ...):

1. `find_sites`: the units are the outputs of every hidden ``nn.Linear`` / ``nn.Conv2d`` (the last one in module
   order, the classifier, is left alone). A unit is dropped where it leaves its block: at the output of the
   first activation module (`ACTIVATIONS`) that follows its layer in module order before the next
   Linear/Conv, or at the layer's own output when none does (for the MLP, ``net.fc1`` is dropped at
   ``net.relu1``, after its batch norm).
2. `measure_alignment`: each unit's alignment (the share of its input variance along its weight vector,
   `lightning_probes.functional.alignment`) on the evaluation data, from the layers' inputs captured with
   forward hooks (convolutions: their input patches).
3. `drop_units`: forward hooks that multiply the drop module's output by a per-unit mask (channel dim 1 for
   convolutions, the last dim for Linear layers). A drop module called more than once in a forward pass (the
   shared ReLU of a ResNet block) is masked only on its first call after its layer ran.
4. `ablate`: ``k = round(fraction * units)`` units dropped in the order ``high`` (most aligned first), ``low``
   (least aligned first) and ``random`` (seeded permutations), in one layer at a time (``by_layer``) or in
   every layer at once (``all_layers``); each damaged network is evaluated on the whole data: accuracy, loss,
   their deviation from the intact network, the confusion matrix with per-cell mean confidence, the confusion
   restricted to confident predictions, and collapse indicators (`lightning_probes.functional.ablation`).
5. `compare_checkpoints`: whether networks damaged at different points of training fall onto the same classes.

Steps 1 and 3 live in `lightning_probes.analysis.ablation_sites` (and are importable from here), step 5, with
finding and loading checkpoints and the console table, in `lightning_probes.analysis.ablation_checkpoints`.

Example:
    >>> batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]  # doctest: +SKIP
    >>> result = ablate(model, batches, AblationSettings(fractions=(0.0, 0.5), random_repeats=2))  # doctest: +SKIP
    >>> result["layers"]["net.fc1"]["high"]["acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_probes.analysis.ablation_sites import ACTIVATIONS, UnitSite, drop_units, find_sites
from lightning_probes.capture import ActivationCapture
from lightning_probes.functional.ablation import (
    RESCALES,
    class_agreement,
    collapse_indicators,
    masked_mean_confidence,
    random_orders,
    ranked_order,
    unit_mask,
    units_to_drop,
)
from lightning_probes.functional.calibration import confusion_confidence, thresholded_confusion
from lightning_probes.functional.statistics import seed_mean_std

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "AblationSettings",
    "UnitSite",
    "ablate",
    "drop_units",
    "evaluate",
    "find_sites",
    "measure_alignment",
]

Mode = Literal["by_layer", "all_layers"]
MODES = ("by_layer", "all_layers")
#: The orders units are dropped in; ``random`` is averaged over seeded permutations.
ORDERS = ("high", "low", "random")
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))
#: Key of the section where every layer is damaged at once.
ALL_LAYERS = "all_layers"


# -- settings --------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AblationSettings:
    """What an ablation run does; checked at construction, so bad values fail before any work.

    Args:
        fractions: Shares of each layer's units to drop, each in [0, 1), without repeats (sorted on use).
        mode: ``"by_layer"`` (damage one layer at a time) or ``"all_layers"`` (the same fraction in every layer
            at once).
        random_repeats: Seeded random permutations averaged for the ``random`` order, >= 1.
        seed: Seed of the random permutations (layer ``i`` uses ``seed + i``).
        rescale: ``"none"``, or ``"inverted"``: kept units are multiplied by ``units / (units - k)``.
        thresholds: Confidence thresholds of the thresholded confusion matrices, each in [0, 1].
        min_count: Fewest predictions a confusion cell needs for its mean confidence to be reported (else
            ``null``), >= 1.

    Raises:
        ValueError: Naming the argument, for any value out of range.
    """

    fractions: Sequence[float] = DEFAULT_FRACTIONS
    mode: Mode = "by_layer"
    random_repeats: int = 5
    seed: int = 0
    rescale: Literal["none", "inverted"] = "none"
    thresholds: Sequence[float] = (0.5, 0.9)
    min_count: int = 5

    def __post_init__(self) -> None:
        fractions = tuple(self.fractions)
        if not fractions:
            raise ValueError("Expected `fractions` to hold at least one fraction in [0, 1), but got none")
        bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1]
        if bad:
            raise ValueError(f"Expected every one of `fractions` to be in [0, 1), but got {bad[0]!r}")
        if len(set(fractions)) != len(fractions):
            raise ValueError(f"Expected `fractions` without repeats, but got {list(fractions)}")
        if self.mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {MODES}, but got {self.mode!r}")
        if not _is_int(self.random_repeats) or self.random_repeats < 1:
            raise ValueError(f"Expected `random_repeats` to be a positive integer, but got {self.random_repeats!r}")
        if not _is_int(self.seed):
            raise ValueError(f"Expected `seed` to be an integer, but got {self.seed!r}")
        if self.rescale not in RESCALES:
            raise ValueError(f"Expected `rescale` to be one of {RESCALES}, but got {self.rescale!r}")
        thresholds = tuple(self.thresholds)
        bad = [t for t in thresholds if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1]
        if bad:
            raise ValueError(f"Expected every one of `thresholds` to be in [0, 1], but got {bad[0]!r}")
        if not _is_int(self.min_count) or self.min_count < 1:
            raise ValueError(f"Expected `min_count` to be a positive integer, but got {self.min_count!r}")
        object.__setattr__(self, "fractions", tuple(sorted(float(f) for f in fractions)))
        object.__setattr__(self, "thresholds", tuple(sorted(float(t) for t in thresholds)))

    def passes(self, num_layers: int) -> int:
        """Forward passes over the data for one checkpoint: alignment, intact, then every damaged network."""
        targets = num_layers if self.mode == "by_layer" else 1
        return 2 + targets * len(self.fractions) * (2 + self.random_repeats)


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


# -- alignment -------------------------------------------------------------------------------------------------
def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    logits = _first_tensor(model(inputs))
    if logits is None or logits.ndim != 2:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(f"Expected {type(model).__name__} to return (N, C) logits, but got shape {shape}")
    return logits


@torch.inference_mode()
def measure_alignment(
    model: nn.Module,
    sites: Sequence[UnitSite],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Alignment of every unit with its layer's inputs, streamed over ``batches`` (one forward pass each).

    Each layer's inputs are captured with a forward hook and streamed into an `AlignmentAccumulator`
    (`AlignmentAccumulator.update_layer`: the input features of a Linear layer, the input patches of a
    convolution, unfolded a few samples at a time, so a channel's alignment is that of its filter with the
    patches it sees; grouped convolutions per group).

    Returns:
        ``{layer name: (units,) float64 alignment}`` on the CPU (``NaN`` for an all-zero weight row).
    """
    from lightning_probes.functional.alignment import AlignmentAccumulator

    capture = ActivationCapture({s.layer: s.layer_module for s in sites}, max_features=None, inputs=True)
    accumulators = {s.layer: AlignmentAccumulator.for_layer(s.layer_module) for s in sites}
    with capture.capturing():
        for inputs, _ in batches:
            _forward(model, inputs.to(device))
            captured = capture.pop()
            for site in sites:
                accumulators[site.layer].update_layer(site.layer_module, captured[site.layer])
    return {s.layer: accumulators[s.layer].compute(s.layer_module.weight.detach()).double().cpu() for s in sites}


# -- evaluation ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    thresholds: Sequence[float] = (),
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """One pass over ``batches``: additive sums from which every reported metric follows.

    Returns:
        CPU tensors: ``n`` (samples), ``loss_sum`` (summed cross-entropy, float64), ``counts`` ``(C, C)`` and
        ``confidence_sums`` ``(C, C)`` (`confusion_confidence`; rows true, columns predicted) and
        ``thresholded`` ``(T, C, C)`` (`thresholded_confusion`).
    """
    totals: dict[str, torch.Tensor] = {}
    for inputs, target in batches:
        inputs, target = inputs.to(device), target.to(device)
        logits = _forward(model, inputs).float()
        probs = logits.softmax(dim=1)
        counts, sums = confusion_confidence(probs, target)
        batch = {"n": torch.tensor(len(target)),
                 "loss_sum": F.cross_entropy(logits, target, reduction="sum").double(),
                 "counts": counts, "confidence_sums": sums,
                 "thresholded": thresholded_confusion(probs, target, thresholds)}
        for key, value in batch.items():
            value = value.cpu()
            totals[key] = totals[key] + value if key in totals else value
    if not totals:
        raise ValueError("Expected at least one batch of evaluation data, but got none")
    return totals


def _metrics(sums: Mapping[str, torch.Tensor], intact: Optional[Mapping[str, float]], settings: AblationSettings
             ) -> dict[str, Any]:
    """Accuracy, loss, deviations, confusion, masked confidence, thresholded confusion and collapse of one pass."""
    n = int(sums["n"])
    counts = sums["counts"]
    acc = float(counts.trace()) / n
    loss = float(sums["loss_sum"]) / n
    histogram = counts.sum(dim=0)  # (C,) predicted classes
    thresholded = []
    for threshold, confusion in zip(settings.thresholds, sums["thresholded"]):
        kept = int(confusion.sum())
        thresholded.append({"threshold": threshold, "coverage": kept / n,
                            "acc": float(confusion.trace()) / kept if kept else math.nan,
                            "confusion": confusion.tolist()})
    out = {"acc": acc, "loss": loss}
    if intact is not None:
        out.update(acc_deviation=acc - intact["acc"], loss_deviation=loss - intact["loss"])
    out.update(confusion=counts.tolist(),
               confidence=masked_mean_confidence(counts, sums["confidence_sums"], settings.min_count).tolist(),
               thresholded=thresholded,
               collapse={**collapse_indicators(histogram), "histogram": histogram.tolist()})
    return out


def _pooled(passes: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: sum(p[key] for p in passes[1:]) + passes[0][key] for key in passes[0]}


def _ranked_section(per_fraction: Sequence[Mapping[str, torch.Tensor]], intact: Mapping[str, float],
                    settings: AblationSettings) -> dict[str, list]:
    """``{"acc": [...], "loss": [...], ...}``: one entry per fraction."""
    rows = [_metrics(sums, intact, settings) for sums in per_fraction]
    return {key: [row[key] for row in rows] for key in rows[0]}


def _random_section(per_repeat: Sequence[Sequence[Mapping[str, torch.Tensor]]], intact: Mapping[str, float],
                    settings: AblationSettings) -> dict[str, list]:
    """Mean and sample std over the repeats per fraction; confusion counts pooled over the repeats."""
    runs = [[_metrics(sums, intact, settings) for sums in fractions] for fractions in per_repeat]  # [repeat][fraction]
    section: dict[str, list] = {}
    for key in ("acc", "loss", "acc_deviation", "loss_deviation"):
        stats = [seed_mean_std([run[i][key] for run in runs]) for i in range(len(settings.fractions))]
        section[f"{key}_mean"] = [mean for mean, _ in stats]
        section[f"{key}_std"] = [std for _, std in stats]
    section["acc"] = [[row["acc"] for row in run] for run in runs]  # [repeat][fraction]
    section["loss"] = [[row["loss"] for row in run] for run in runs]
    collapse = []
    for i in range(len(settings.fractions)):
        rows = [run[i]["collapse"] for run in runs]
        entropy = seed_mean_std([r["entropy"] for r in rows])
        top_share = seed_mean_std([r["top_share"] for r in rows])
        top_classes = [r["top_class"] for r in rows]
        collapse.append({"entropy_mean": entropy[0], "entropy_std": entropy[1], "top_share_mean": top_share[0],
                         "top_share_std": top_share[1], "top_class": class_agreement(top_classes)["modal_class"],
                         "top_classes": top_classes,
                         "histogram": [sum(col) for col in zip(*(r["histogram"] for r in rows))]})
    section["collapse"] = collapse
    pooled = [_metrics(_pooled([fractions[i] for fractions in per_repeat]), None, settings)
              for i in range(len(settings.fractions))]
    for key in ("confusion", "confidence", "thresholded"):
        section[key] = [row[key] for row in pooled]
    return section


def _damage(model: nn.Module, batches: Sequence, sites: Sequence[UnitSite], orders: Mapping[str, torch.Tensor],
            settings: AblationSettings, device: torch.device | str, advance: Callable[[int], Any]
            ) -> list[dict[str, torch.Tensor]]:
    """Evaluate the network with ``units_to_drop(fraction)`` units of each site dropped along ``orders``."""
    results = []
    for fraction in settings.fractions:
        masks = {s.layer: unit_mask(orders[s.layer], units_to_drop(fraction, s.units), settings.rescale)
                 for s in sites}
        with drop_units(model, sites, masks):
            results.append(evaluate(model, batches, settings.thresholds, device))
        advance(1)
    return results


def _orders_section(model: nn.Module, batches: Sequence, sites: Sequence[UnitSite],
                    orders: Mapping[str, Mapping[str, torch.Tensor]], intact: Mapping[str, float],
                    settings: AblationSettings, device: torch.device | str, advance: Callable[[int], Any]
                    ) -> dict[str, Any]:
    section = {}
    for order in ("high", "low"):
        per_fraction = _damage(model, batches, sites, {s.layer: orders[s.layer][order] for s in sites}, settings,
                               device, advance)
        section[order] = _ranked_section(per_fraction, intact, settings)
    per_repeat = [_damage(model, batches, sites, {s.layer: orders[s.layer]["random"][r] for s in sites}, settings,
                          device, advance) for r in range(settings.random_repeats)]
    section["random"] = _random_section(per_repeat, intact, settings)
    return section


def ablate(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    settings: AblationSettings = AblationSettings(),
    device: torch.device | str = "cpu",
    advance: Optional[Callable[[int], Any]] = None,
) -> dict[str, Any]:
    """Measure alignment, then drop units in every order and fraction and evaluate each damaged network.

    The model is put in eval mode and evaluated under ``torch.inference_mode``; its weights are not changed.

    Args:
        model: The classifier, already on ``device``.
        batches: The evaluation data as ``(inputs, target)`` pairs (a list: it is traversed once per network).
        settings: Fractions, mode, orders and reporting options.
        device: Where the batches are moved.
        advance: Called with 1 after every forward pass over the data (``settings.passes(len(sites))`` in all),
            e.g. a progress bar's ``update``.

    Returns:
        ``{"intact": {"acc", "loss", ...}, "fractions", "mode", ..., "layers": {layer: {"units", "drop_at",
        "alignment", "orders", "dropped", and in ``by_layer`` mode "high", "low", "random"}}, and in
        ``all_layers`` mode "all_layers": {"units", "dropped", "high", "low", "random"}}``. ``high``/``low`` hold
        one entry per fraction under ``acc``, ``loss``, ``acc_deviation``, ``loss_deviation``, ``confusion``,
        ``confidence`` (mean top-label confidence per cell, ``NaN`` under ``min_count``), ``thresholded`` and
        ``collapse``; ``random`` holds ``acc_mean``, ``acc_std``, ``loss_mean``, ``loss_std`` (and the
        deviations'), the per-repeat ``acc``/``loss``, ``collapse`` summarised over the repeats and pooled
        confusion counts.
    """
    advance = advance or (lambda n: None)
    sites = find_sites(model)
    model.eval()
    alignment = measure_alignment(model, sites, batches, device)
    advance(1)
    intact_sums = evaluate(model, batches, settings.thresholds, device)
    advance(1)
    intact = _metrics(intact_sums, None, settings)
    orders = {s.layer: {"high": ranked_order(alignment[s.layer], "high"),
                        "low": ranked_order(alignment[s.layer], "low"),
                        "random": random_orders(s.units, settings.random_repeats, settings.seed + i)}
              for i, s in enumerate(sites)}
    layers: dict[str, dict[str, Any]] = {}
    for site in sites:
        layers[site.layer] = {"units": site.units, "kind": site.kind, "drop_at": site.drop_at,
                              "alignment": alignment[site.layer].tolist(),
                              "orders": {k: v.tolist() for k, v in orders[site.layer].items()},
                              "dropped": [units_to_drop(f, site.units) for f in settings.fractions]}
    result: dict[str, Any] = {"num_samples": int(intact_sums["n"]), "mode": settings.mode,
                              "rescale": settings.rescale, "seed": settings.seed,
                              "random_repeats": settings.random_repeats, "thresholds": list(settings.thresholds),
                              "min_count": settings.min_count, "intact": intact,
                              "fractions": list(settings.fractions), "layers": layers}
    if settings.mode == "by_layer":
        for site in sites:
            layers[site.layer].update(_orders_section(model, batches, [site], orders, intact, settings, device,
                                                      advance))
    else:
        dropped = [sum(units_to_drop(f, s.units) for s in sites) for f in settings.fractions]
        result[ALL_LAYERS] = {"units": sum(s.units for s in sites), "dropped": dropped,
                              **_orders_section(model, batches, sites, orders, intact, settings, device, advance)}
    return result
