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

Example:
    >>> batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]  # doctest: +SKIP
    >>> result = ablate(model, batches, AblationSettings(fractions=(0.0, 0.5), random_repeats=2))  # doctest: +SKIP
    >>> result["layers"]["net.fc1"]["high"]["acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_probes.capture import ACTIVATIONS as _PROBE_ACTIVATIONS
from lightning_probes.capture import ActivationCapture
from lightning_probes.functional.ablation import (
    RESCALES,
    class_agreement,
    collapse_indicators,
    histogram_overlap,
    masked_mean_confidence,
    random_orders,
    ranked_order,
    unit_mask,
    units_to_drop,
)
from lightning_probes.functional.calibration import confusion_confidence, thresholded_confusion
from lightning_probes.functional.statistics import seed_mean_std
from lightning_probes.io import read_checkpoint
from lightning_probes.naming import clean_name

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "AblationSettings",
    "UnitSite",
    "ablate",
    "accuracy_table",
    "check_checkpoint",
    "compare_checkpoints",
    "drop_units",
    "evaluate",
    "find_checkpoints",
    "find_sites",
    "load_weights",
    "measure_alignment",
]

Mode = Literal["by_layer", "all_layers"]
MODES = ("by_layer", "all_layers")
#: The orders units are dropped in; ``random`` is averaged over seeded permutations.
ORDERS = ("high", "low", "random")
#: Layers whose outputs are the units.
LAYERS = (nn.Linear, nn.Conv2d)
#: Element-wise activation modules a unit is dropped after (softmax-like modules normalise across units: not
#: drop points).
ACTIVATIONS = tuple(a for a in _PROBE_ACTIVATIONS if a is not nn.Softmax) + (
    nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.Threshold, nn.RReLU)
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


# -- units and drop points -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitSite:
    """A hidden layer whose output units are dropped, and where.

    Attributes:
        layer: Name of the ``nn.Linear`` / ``nn.Conv2d`` (as in ``model.named_modules()``, wrapper prefixes
            removed), e.g. ``"net.fc1"``.
        drop_at: Name of the module whose output is masked, e.g. ``"net.relu1"`` (``layer`` itself when no
            activation follows it).
        units: Output features / channels of the layer.
        kind: ``"linear"`` or ``"conv2d"``.
        layer_module: The layer.
        drop_module: The module masked.
    """

    layer: str
    drop_at: str
    units: int
    kind: Literal["linear", "conv2d"]
    layer_module: nn.Module = field(compare=False, repr=False)
    drop_module: nn.Module = field(compare=False, repr=False)


def find_sites(model: nn.Module) -> list[UnitSite]:
    """The hidden ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` in module order, each with its drop point.

    The last Linear/Conv in module order (the classifier) is excluded. A layer's drop point is the first
    activation module (`ACTIVATIONS`) registered after it and before the next Linear/Conv; the layer itself
    when there is none.

    Raises:
        ValueError: If the model has no hidden Linear/Conv2d layer.

    Example:
        >>> from lightning_probes.models.components import MLPNet
        >>> [(s.layer, s.drop_at, s.units) for s in find_sites(MLPNet(16, 3, (8, 6, 4)))][0]
        ('fc1', 'relu1', 8)
    """
    named = [(clean_name(name), module) for name, module in model.named_modules() if name]
    layer_positions = [i for i, (_, module) in enumerate(named) if isinstance(module, LAYERS)]
    if len(layer_positions) < 2:
        raise ValueError(f"Expected {type(model).__name__} to have hidden nn.Linear / nn.Conv2d layers besides its "
                         f"final classifier, but found {len(layer_positions)} Linear/Conv2d layer(s)")
    sites = []
    for start, stop in zip(layer_positions[:-1], layer_positions[1:]):
        name, layer = named[start]
        drop_name, drop = next(((n, m) for n, m in named[start + 1:stop] if isinstance(m, ACTIVATIONS)), (name, layer))
        linear = isinstance(layer, nn.Linear)
        sites.append(UnitSite(layer=name, drop_at=drop_name, units=layer.out_features if linear else layer.out_channels,
                              kind="linear" if linear else "conv2d", layer_module=layer, drop_module=drop))
    return sites


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _masker(site: UnitSite, mask: torch.Tensor, armed: list[bool]) -> Callable:
    unit_dim = 1 if site.kind == "conv2d" else -1

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not armed[0]:
            return None
        armed[0] = site.drop_module is site.layer_module  # an activation waits for its layer again
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Expected the drop point {site.drop_at!r} of {site.layer!r} to output a tensor, but it "
                            f"gave {type(output).__name__}")
        if output.ndim < 2 or output.shape[unit_dim] != mask.numel():
            raise ValueError(f"Expected the output of {site.drop_at!r} to have {mask.numel()} units (those of "
                             f"{site.layer!r}) along dim {unit_dim}, but got shape {tuple(output.shape)}")
        shape = [1] * output.ndim
        shape[unit_dim] = mask.numel()
        return output * mask.to(device=output.device, dtype=output.dtype).view(shape)

    return hook


@contextmanager
def drop_units(model: nn.Module, sites: Sequence[UnitSite], masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply the drop point of each layer in ``masks`` by its mask for the duration of the block.

    Args:
        model: The network (only used for its modules' hooks).
        sites: The sites (`find_sites`).
        masks: ``{layer name: (units,) multiplier}`` (`lightning_probes.functional.unit_mask`); layers not in
            it are left intact.

    The hooks are removed on exit, exceptions included. A hook registered on a drop module inside the block, after
    this one, sees the masked output.
    """
    handles = []
    unknown = sorted(set(masks) - {s.layer for s in sites})
    if unknown:
        raise ValueError(f"Expected `masks` for layers among the sites, but got {unknown}")
    try:
        for site in sites:
            if site.layer not in masks:
                continue
            mask = masks[site.layer]
            if mask.shape != (site.units,):
                raise ValueError(f"Expected the mask of {site.layer!r} of shape ({site.units},), but got "
                                 f"{tuple(mask.shape)}")
            armed = [site.drop_module is site.layer_module]
            if site.drop_module is not site.layer_module:
                def arm(module: nn.Module, args: Any, output: Any, armed: list[bool] = armed) -> None:
                    armed[0] = True

                handles.append(site.layer_module.register_forward_hook(arm))
            handles.append(site.drop_module.register_forward_hook(_masker(site, mask, armed)))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


# -- checkpoints -----------------------------------------------------------------------------------------------
def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def find_checkpoints(path: str, pattern: str = "*.ckpt") -> list[str]:
    """The checkpoint file ``path``, or the files in directory ``path`` matching ``pattern``, in natural order.

    In a directory, ``last*.ckpt`` (a copy of the newest checkpoint that ``ModelCheckpoint(save_last=True)``
    writes) is left out when other checkpoints match; pass it as a file to analyse it.

    Raises:
        FileNotFoundError: If ``path`` does not exist or the directory holds no matching file; the message
            names ``ckpt_path``.

    Example:
        >>> find_checkpoints("runs/mlp/version_0/checkpoints")  # doctest: +SKIP
        ['.../epoch=0-step=23.ckpt', '.../epoch=1-step=46.ckpt', ..., '.../epoch=10-step=253.ckpt']
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Expected `ckpt_path` to be a checkpoint file or a directory of checkpoints, but "
                                f"{path!r} does not exist (looked for {os.path.abspath(path)!r})")
    found = sorted((os.path.join(path, name) for name in os.listdir(path)
                    if fnmatch.fnmatch(name, pattern) and os.path.isfile(os.path.join(path, name))), key=_natural_key)
    others = [f for f in found if not os.path.basename(f).startswith("last")]
    found = others or found
    if not found:
        raise FileNotFoundError(f"Expected `ckpt_path` to be a checkpoint file or a directory of checkpoints, but "
                                f"{path!r} holds no file matching {pattern!r}")
    return found


def check_checkpoint(model: nn.Module, path: str, trust: bool = False) -> dict[str, Any]:
    """Read the Lightning checkpoint ``path`` and check that its ``state_dict`` fits ``model`` exactly.

    Returns:
        The checkpoint (``state_dict``, ``epoch``, ``global_step``, ...).

    Raises:
        ValueError: If it cannot be read or its keys or shapes differ from the model's (the message lists them).
    """
    checkpoint = read_checkpoint(path, "ckpt_path", trust=trust)
    state, own = checkpoint["state_dict"], model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
    if missing or unexpected or resized:
        problems = "; ".join(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" for label, keys in
                             (("missing", missing), ("unexpected", unexpected), ("other shape", resized)) if keys)
        raise ValueError(f"Expected `ckpt_path` {path!r} to hold the weights of the {type(model).__name__} of "
                         f"`config`, but it does not match: {problems}")
    return checkpoint


def load_weights(model: nn.Module, path: str, trust: bool = False) -> dict[str, Any]:
    """Load the checkpoint's weights into ``model`` (strictly); return ``{"checkpoint", "epoch", "global_step"}``.

    ``trust`` reads checkpoints holding pickled objects (see `lightning_probes.io.read_checkpoint`)."""
    checkpoint = check_checkpoint(model, path, trust)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return {"checkpoint": path, "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}


# -- across checkpoints ----------------------------------------------------------------------------------------
def targets_of(analysis: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The damaged-network sections of one analysis: ``{layer or "all_layers": {"high", "low", "random"}}``."""
    targets = {name: layer for name, layer in analysis["layers"].items() if "high" in layer}
    if ALL_LAYERS in analysis:
        targets[ALL_LAYERS] = analysis[ALL_LAYERS]
    return targets


def _collapse_row(section: Mapping[str, Any], order: str, key: str) -> list:
    """Per fraction: ``top_class``/``top_share``/``entropy``/``histogram`` of an order (random: over repeats)."""
    if order == "random" and key in ("top_share", "entropy"):
        key = f"{key}_mean"
    return [c[key] for c in section[order]["collapse"]]


def compare_checkpoints(analyses: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Do networks damaged at different points of training collapse onto the same classes, or scatter?

    Args:
        analyses: `ablate` results of several checkpoints of one model, with the same settings.
        names: A name per checkpoint (its file stem).

    Returns:
        ``{"checkpoints": names, "fractions", "targets": {target: {order: {"top_class", "top_share",
        "entropy"`` (each ``[checkpoint][fraction]``), ``"modal_class", "agreement"`` (per fraction: the class
        most checkpoints collapse onto and the share of checkpoints that do, `class_agreement`) and
        ``"overlap"`` (per fraction: mean pairwise overlap of the checkpoints' predicted-class distributions,
        `histogram_overlap`; 1 identical, 0 disjoint)}}}``.
    """
    if len(analyses) != len(names) or not analyses:
        raise ValueError(f"Expected one name per analysis, but got {len(names)} names for {len(analyses)} analyses")
    fractions = analyses[0]["fractions"]
    if any(a["fractions"] != fractions for a in analyses):
        raise ValueError("Expected analyses run with the same `fractions`")
    per_checkpoint = [targets_of(a) for a in analyses]
    comparison: dict[str, Any] = {}
    for target in per_checkpoint[0]:
        comparison[target] = {}
        for order in ORDERS:
            sections = [t[target] for t in per_checkpoint]
            top_class = [_collapse_row(s, order, "top_class") for s in sections]
            histograms = [_collapse_row(s, order, "histogram") for s in sections]
            agreement = [class_agreement([row[i] for row in top_class]) for i in range(len(fractions))]
            overlap = []
            for i in range(len(fractions)):
                matrix = histogram_overlap(torch.tensor([h[i] for h in histograms]))
                off_diagonal = matrix[~torch.eye(len(names), dtype=torch.bool)]
                overlap.append(float(off_diagonal.mean()) if off_diagonal.numel() else math.nan)
            comparison[target][order] = {
                "top_class": top_class, "top_share": [_collapse_row(s, order, "top_share") for s in sections],
                "entropy": [_collapse_row(s, order, "entropy") for s in sections],
                "modal_class": [a["modal_class"] for a in agreement], "agreement": [a["agreement"] for a in agreement],
                "overlap": overlap}
    return {"checkpoints": list(names), "fractions": list(fractions), "targets": comparison}


# -- console ---------------------------------------------------------------------------------------------------
def accuracy_table(analysis: Mapping[str, Any], title: Optional[str] = None) -> str:
    """Accuracy per target, order and fraction as a fixed-width text table (random: mean +- std)."""
    fractions = analysis["fractions"]
    header = ["layer", "order"] + [f"{f:g}" for f in fractions]
    rows = [["(intact)", "", *([f"{analysis['intact']['acc']:.3f}"] * len(fractions))]]
    for target, section in targets_of(analysis).items():
        for order in ("high", "low"):
            rows.append([target, order, *(f"{a:.3f}" for a in section[order]["acc"])])
        means, stds = section["random"]["acc_mean"], section["random"]["acc_std"]
        rows.append([target, "random", *(f"{m:.3f}" + (f"±{s:.3f}" if s == s else "") for m, s in zip(means, stds))])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    if title:
        lines.insert(0, title)
    return "\n".join(lines)
