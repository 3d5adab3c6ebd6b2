"""Activation statistics streamed over batches: mean, std, sparsity, dead units, saturation."""

from __future__ import annotations

from typing import Optional

import torch


class ActivationAccumulator:
    """Float64 running sums over batches of one layer's outputs ``(batch, units, *spatial)`` (float32 squares).

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
        if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        saturated = torch.zeros((), dtype=torch.float64, device=x.device)
        if self.bounds is not None:
            low, high = self.bounds
            margin = self.tolerance * (high - low)
            saturated = ((x <= low + margin) | (x >= high - margin)).sum().double()
        nonzero = x != 0
        # Sums in float64 without a float64 copy of the batch; squares formed in the batch's dtype.
        sums = torch.stack([x.sum(dtype=torch.float64), x.square().sum(dtype=torch.float64),
                            (x.numel() - nonzero.sum()).double(), (x > 0).sum().double(), saturated]).cpu()
        self.sums += sums
        self.count += x.numel()
        if x.ndim > 2:  # a unit is a channel: non-zero anywhere in the batch and its positions
            alive = nonzero.transpose(0, 1).reshape(x.shape[1], -1).any(dim=1)
        else:
            alive = nonzero.reshape(x.shape[0], -1).any(dim=0)
        alive = alive.cpu()  # (units,)
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
