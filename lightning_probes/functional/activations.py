"""Activation statistics streamed over batches: mean, std, sparsity, dead units, saturation."""

from __future__ import annotations

from typing import Optional

import torch


class ActivationAccumulator:
    """Float64 running sums over batches of one layer's outputs ``(batch, units, *spatial)``.

    A unit is a channel for outputs with spatial dimensions and a feature otherwise. Saturation counts
    entries within ``tolerance * (high - low)`` of either bound, for activations with a bounded range.

    Args:
        bounds: ``(low, high)`` range of a bounded activation, or ``None``.
        tolerance: Relative distance to a bound that counts as saturated.
    """

    def __init__(self, bounds: Optional[tuple[float, float]] = None, tolerance: float = 0.01) -> None:
        self.bounds, self.tolerance = bounds, tolerance
        self.count = 0
        self.sums = torch.zeros(5, dtype=torch.float64)  # sum, sum of squares, zeros, positives, saturated
        self.alive: Optional[torch.Tensor] = None

    def update(self, output: torch.Tensor) -> None:
        x = output.detach()
        units = x.reshape(x.shape[0], x.shape[1], -1) if x.ndim > 2 else x.reshape(x.shape[0], -1, 1)
        xd = x.double()
        saturated = torch.zeros((), dtype=torch.float64, device=x.device)
        if self.bounds is not None:
            low, high = self.bounds
            margin = self.tolerance * (high - low)
            saturated = ((x <= low + margin) | (x >= high - margin)).sum().double()
        sums = torch.stack([xd.sum(), xd.square().sum(), (x == 0).sum().double(), (x > 0).sum().double(),
                            saturated]).cpu()
        self.sums += sums
        self.count += x.numel()
        alive = (units != 0).any(dim=2).any(dim=0).cpu()  # (units,)
        self.alive = alive if self.alive is None else self.alive | alive

    def compute(self) -> dict[str, Optional[float]]:
        """``mean``, ``std`` (population), ``sparsity``, ``positive_ratio``, ``dead_units``,
        ``dead_fraction``, ``saturation`` (``None`` for unbounded activations)."""
        n = max(1, self.count)
        mean = float(self.sums[0] / n)
        var = max(0.0, float(self.sums[1] / n) - mean**2)
        dead = int((~self.alive).sum()) if self.alive is not None else 0
        return {
            "mean": mean,
            "std": var**0.5,
            "sparsity": float(self.sums[2] / n),
            "positive_ratio": float(self.sums[3] / n),
            "dead_units": dead,
            "dead_fraction": dead / max(1, 0 if self.alive is None else len(self.alive)),
            "saturation": float(self.sums[4] / n) if self.bounds is not None else None,
        }
