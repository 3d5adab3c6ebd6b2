"""Unit ablation: which units to drop, the mask that drops them, and how predictions collapse afterwards.

Units are ranked by a score (their alignment with the input variance, say): ``high`` drops the highest scores
first, ``low`` the lowest, ``random`` follows seeded permutations. ``k = round(fraction * units)`` units are
dropped (at least one unit is always kept), and a damaged network's predictions are summarised by the
histogram of predicted classes: its normalised entropy, the share of the most-predicted class and which class
that is. Comparing those classes across checkpoints tells whether damaged networks fall onto the same classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lightning_probes.functional.calibration import normalized_entropy

Order = Literal["high", "low"]
Rescale = Literal["none", "inverted"]
ORDERS = ("high", "low", "random")
RESCALES = ("none", "inverted")


def units_to_drop(fraction: float, units: int) -> int:
    """How many of ``units`` units a ``fraction`` drops: ``round(fraction * units)``, at most ``units - 1``.

    Python's ``round`` (half to even) is used, on ``fraction * units`` rounded to 9 decimals first so that
    ``0.1 * 30`` gives 3, not ``round(3.0000000000000004)``. One unit is always kept, so that a layer is never
    removed outright and the ``inverted`` rescaling ``units / (units - k)`` stays finite.

    Args:
        fraction: Share of units to drop, in [0, 1).
        units: Units of the layer, >= 1.

    Returns:
        ``k`` in ``[0, units - 1]``.

    Raises:
        ValueError: If ``fraction`` is outside [0, 1) or ``units`` < 1.

    Example:
        >>> units_to_drop(0.25, 10), units_to_drop(0.9, 4)
        (2, 3)
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"Expected `fraction` to be in [0, 1), but got {fraction!r}")
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ValueError(f"Expected `units` to be a positive integer, but got {units!r}")
    return min(int(round(round(fraction * units, 9))), units - 1)


def ranked_order(scores: torch.Tensor, order: Order) -> torch.Tensor:
    """Unit indices in the order they are dropped: ``high`` (highest score first) or ``low`` (lowest first).

    The sort is stable (ties keep the unit order). A ``NaN`` score (a unit with an all-zero weight has no
    direction, hence no alignment) counts as the lowest: dropped last by ``high``, first by ``low``.

    Args:
        scores: ``(U,)`` score per unit.
        order: ``"high"`` or ``"low"``.

    Returns:
        ``(U,)`` int64 permutation.

    Example:
        >>> ranked_order(torch.tensor([0.2, 0.9, 0.5]), "high").tolist()
        [1, 2, 0]
    """
    if scores.ndim != 1:
        raise ValueError(f"Expected `scores` of shape (U,), but got shape {tuple(scores.shape)}")
    if order not in ("high", "low"):
        raise ValueError(f"Expected `order` to be one of ('high', 'low'), but got {order!r}")
    values = torch.nan_to_num(scores.double(), nan=-torch.inf)
    return torch.sort(values, descending=order == "high", stable=True).indices


def random_orders(units: int, repeats: int, seed: int) -> torch.Tensor:
    """``repeats`` random permutations of ``units`` units, drawn from a CPU generator seeded with ``seed``.

    The same ``(units, repeats, seed)`` always give the same permutations, on any machine.

    Args:
        units: Units of the layer, >= 1.
        repeats: Number of permutations, >= 1.
        seed: Seed of the generator.

    Returns:
        ``(repeats, units)`` int64, one permutation per row.

    Example:
        >>> bool((random_orders(5, 2, seed=0) == random_orders(5, 2, seed=0)).all())
        True
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"Expected `repeats` to be a positive integer, but got {repeats!r}")
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ValueError(f"Expected `units` to be a positive integer, but got {units!r}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(units, generator=generator) for _ in range(repeats)])


def unit_mask(order: torch.Tensor, dropped: int, rescale: Rescale = "none") -> torch.Tensor:
    """Per-unit multiplier that drops the first ``dropped`` units of ``order``.

    Dropped units get 0; kept units get 1 (``rescale="none"``) or ``U / (U - dropped)`` (``"inverted"``, as
    inverted dropout does, so that the summed activity keeps its scale).

    Args:
        order: ``(U,)`` permutation of the units, first dropped first.
        dropped: Units to drop, in ``[0, U - 1]``.
        rescale: ``"none"`` or ``"inverted"``.

    Returns:
        ``(U,)`` float32 mask.

    Example:
        >>> unit_mask(torch.tensor([2, 0, 1, 3]), 2, rescale="inverted").tolist()
        [0.0, 2.0, 0.0, 2.0]
    """
    units = order.numel()
    if not 0 <= dropped < units:
        raise ValueError(f"Expected `dropped` to be in [0, {units - 1}], but got {dropped!r}")
    if rescale not in RESCALES:
        raise ValueError(f"Expected `rescale` to be one of {RESCALES}, but got {rescale!r}")
    scale = units / (units - dropped) if rescale == "inverted" else 1.0
    mask = torch.full((units,), scale, dtype=torch.float32)
    mask[order[:dropped].long()] = 0.0
    return mask


def collapse_indicators(histogram: torch.Tensor) -> dict[str, float | int]:
    """How much the predictions pile onto few classes, from the ``(C,)`` histogram of predicted classes.

    Args:
        histogram: Number of samples predicted as each class.

    Returns:
        ``entropy``: normalised entropy of the histogram (1 uniform, 0 every sample in one class);
        ``top_share``: share of samples predicted as the most-predicted class; ``top_class``: that class (the
        lowest index among ties). All ``NaN`` / -1 for an empty histogram.

    Example:
        >>> collapse_indicators(torch.tensor([0, 8, 2]))["top_class"]
        1
    """
    if histogram.ndim != 1 or histogram.numel() < 2:
        raise ValueError(f"Expected `histogram` of shape (C,) with C >= 2, but got shape {tuple(histogram.shape)}")
    counts = histogram.double()
    total = float(counts.sum())
    if total <= 0:
        return {"entropy": float("nan"), "top_share": float("nan"), "top_class": -1}
    top_class = int(torch.argmax(counts))
    # `+ 0.0` turns the -0.0 of a one-class histogram into 0.0.
    return {"entropy": float(normalized_entropy(counts)) + 0.0, "top_share": float(counts[top_class]) / total,
            "top_class": top_class}


def masked_mean_confidence(counts: torch.Tensor, confidence_sums: torch.Tensor, min_count: int = 1) -> torch.Tensor:
    """Mean top-label confidence per confusion cell, ``NaN`` where a cell holds fewer than ``min_count`` samples.

    Args:
        counts: ``(..., C, C)`` confusion counts (``confusion_confidence``).
        confidence_sums: Matching sums of the top-label confidences.
        min_count: Fewest samples a cell needs for its mean to be shown, >= 1.

    Returns:
        float64 tensor of the shape of ``counts``.

    Example:
        >>> masked_mean_confidence(torch.tensor([[2, 1]]), torch.tensor([[1.5, 0.9]]), min_count=2).tolist()
        [[0.75, nan]]
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"Expected `min_count` to be a positive integer, but got {min_count!r}")
    if counts.shape != confidence_sums.shape:
        raise ValueError(f"Expected `counts` and `confidence_sums` of one shape, but got {tuple(counts.shape)} and "
                         f"{tuple(confidence_sums.shape)}")
    counts = counts.double()
    mean = confidence_sums.double() / counts.clamp_min(1)
    return torch.where(counts >= min_count, mean, torch.full_like(mean, float("nan")))


def class_agreement(classes: Sequence[int]) -> dict[str, float | int]:
    """Whether several damaged networks collapse onto the same class: the modal class and its share.

    Args:
        classes: The most-predicted class of each network (``-1`` for none, ignored).

    Returns:
        ``modal_class`` (the most frequent class, lowest index among ties; -1 if none) and ``agreement`` (share
        of the networks whose class is the modal one: 1 all agree, ``1 / K`` all differ; ``NaN`` if none).

    Example:
        >>> class_agreement([3, 3, 5])
        {'modal_class': 3, 'agreement': 0.6666666666666666}
    """
    valid = torch.tensor([c for c in classes if c >= 0], dtype=torch.int64)
    if valid.numel() == 0:
        return {"modal_class": -1, "agreement": float("nan")}
    counts = torch.bincount(valid)
    modal = int(torch.argmax(counts))
    return {"modal_class": modal, "agreement": float(counts[modal]) / valid.numel()}


def histogram_overlap(histograms: torch.Tensor) -> torch.Tensor:
    """Pairwise overlap ``sum_c min(p_c, q_c)`` of predicted-class distributions (1 minus total variation).

    Args:
        histograms: ``(K, C)`` predicted-class counts of ``K`` networks.

    Returns:
        ``(K, K)`` float64: 1 for identical distributions, 0 for networks that predict disjoint classes; rows of
        empty histograms are ``NaN``.

    Example:
        >>> histogram_overlap(torch.tensor([[4, 0], [2, 2]])).tolist()
        [[1.0, 0.5], [0.5, 1.0]]
    """
    if histograms.ndim != 2:
        raise ValueError(f"Expected `histograms` of shape (K, C), but got shape {tuple(histograms.shape)}")
    counts = histograms.double()
    totals = counts.sum(dim=1, keepdim=True)
    p = torch.where(totals > 0, counts / totals.clamp_min(1e-300), torch.full_like(counts, float("nan")))
    return torch.minimum(p.unsqueeze(1), p.unsqueeze(0)).sum(dim=2)  # (K, K)
