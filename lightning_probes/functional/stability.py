"""Spike detection over rolling windows: the maths behind `lightning_probes.StabilityMonitor`.

A *series* is one scalar per optimiser step (the training loss, the global gradient norm). Each series keeps a ring
buffer of its last ``W`` accepted values (``values``: ``(S, W)`` for ``S`` series, on any device) and the number
``count`` of values accepted so far (``(S,)``); the window holds the last ``min(count, W)`` of them. A step's value
``x`` is compared with the window *before* it is added:

- ``rule="zscore"`` (OLMo-core's spike score): ``z = (x - mean) / std`` over the window (population std); a spike
  when ``z > threshold`` (``mode="min"``, values that rise are bad) or ``z < -threshold`` (``mode="max"``). ``z``
  is ``nan`` (no spike by the rule) while the window holds fewer than 2 values or its std is 0.
- ``rule="relative"`` (Lightning Fabric's ``SpikeDetection``): a spike when the value is not an improvement on the
  last accepted value (``x - last > 0`` for ``mode="min"``, ``< 0`` for ``"max"``; ``last`` starts at 0), and
  ``|x - mean| >= |atol|`` (when ``atol`` is set) and ``|x - mean| >= |rtol * mean|`` (when ``rtol`` is set),
  ``mean`` being the window's running mean; never while the window is empty.

A non-finite value is always a spike (unless the caller masks it, see ``countable``) and never enters the window.
Every function is made of a constant number of tensor operations and never reads a value on the host, so a
caller can run them on every step without synchronising a GPU. `detect_spikes` runs them over a whole series.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional, Union

import numpy as np
import torch

__all__ = ["SPIKE_RULES", "SpikeRule", "detect_spikes", "ring_push", "spike_flags", "spike_score", "window_moments",
           "window_zscores"]

#: The rules of `spike_flags`.
SPIKE_RULES = ("zscore", "relative")
SpikeRule = Literal["zscore", "relative"]


def window_moments(values: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, population standard deviation and size of each series' window.

    Args:
        values: ``(S, W)`` ring buffers (float64 recommended).
        count: ``(S,)`` values accepted so far (integer or float); the window holds the last ``min(count, W)``,
            which are the first ``min(count, W)`` slots of the ring.

    Returns:
        ``(mean, std, n)``, each ``(S,)`` in the dtype of ``values``; ``mean`` and ``std`` are ``nan`` where the
        window is empty (``n == 0``).
    """
    width = values.shape[-1]
    n = count.to(values.dtype).clamp(max=float(width))  # (S,)
    valid = torch.arange(width, device=values.device, dtype=values.dtype) < n.unsqueeze(-1)  # (S, W)
    kept = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    mean = kept.sum(-1) / n  # nan where n == 0
    centred = torch.where(valid, values - mean.unsqueeze(-1), torch.zeros((), dtype=values.dtype,
                                                                          device=values.device))
    std = (centred.square().sum(-1) / n).sqrt()
    return mean, std, n


def window_zscores(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std``; ``nan`` where the window holds fewer than 2 values or its std is 0 (or ``x`` is not
    finite)."""
    ok = (n >= 2) & (std > 0) & torch.isfinite(x)
    return torch.where(ok, (x - mean) / torch.where(ok, std, torch.ones_like(std)), torch.full_like(x, float("nan")))


def spike_flags(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    n: torch.Tensor,
    last: torch.Tensor,
    *,
    rule: SpikeRule = "zscore",
    threshold: float = 6.0,
    atol: Optional[float] = None,
    rtol: Optional[float] = 2.0,
    mode: Literal["min", "max"] = "min",
    armed: Union[bool, torch.Tensor] = True,
    countable: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which values are spikes against their windows (see the module docstring for the rules).

    Args:
        x: ``(S,)`` this step's values.
        mean: ``(S,)`` window means (`window_moments`).
        std: ``(S,)`` window standard deviations.
        n: ``(S,)`` window sizes.
        last: ``(S,)`` the last accepted value of each series (0 before the first), for ``rule="relative"``.
        rule: ``"zscore"`` or ``"relative"``.
        threshold: The z-score above which (``mode="min"``) a value is a spike.
        atol: ``rule="relative"``: the absolute distance from the mean a spike needs at least (``None``: any).
        rtol: ``rule="relative"``: the distance a spike needs at least, relative to the mean (``None``: any).
        mode: ``"min"``: rises are spikes; ``"max"``: drops are.
        armed: Whether the rule may flag at all (a bool or an ``(S,)`` bool tensor; the warm-up): when false only
            non-finite values are spikes.
        countable: ``(S,)`` bool: where false, a non-finite value is not a spike (e.g. a gradient overflow that an
            AMP ``GradScaler`` handles itself). Default: every non-finite value is a spike.

    Returns:
        ``(flags, z)``: ``(S,)`` bool spikes and ``(S,)`` z-scores (`window_zscores`, whatever the rule).
    """
    z = window_zscores(x, mean, std, n)
    if rule == "zscore":
        by_rule = z > threshold if mode == "min" else z < -threshold
    elif rule == "relative":
        worse = (x - last) > 0 if mode == "min" else (x - last) < 0
        distance = (x - mean).abs()  # nan while the window is empty: no spike by the rule
        by_rule = worse & (n > 0)
        if atol is not None:
            by_rule = by_rule & (distance >= abs(atol))
        if rtol is not None:
            by_rule = by_rule & (distance >= (rtol * mean).abs())
    else:
        raise ValueError(f"Expected `rule` to be one of {list(SPIKE_RULES)}, but got {rule!r}")
    if isinstance(armed, bool):
        by_rule = by_rule if armed else torch.zeros_like(by_rule)
    else:
        by_rule = by_rule & armed
    nonfinite = ~torch.isfinite(x)
    if countable is not None:
        nonfinite = nonfinite & countable
    return by_rule | nonfinite, z


def ring_push(values: torch.Tensor, count: torch.Tensor, x: torch.Tensor,
              accept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add ``x[s]`` to series ``s``'s ring where ``accept[s]`` (the oldest value leaves a full window).

    Args:
        values: ``(S, W)`` ring buffers.
        count: ``(S,)`` integer values accepted so far.
        x: ``(S,)`` the values.
        accept: ``(S,)`` bool: which series take their value.

    Returns:
        The new ``(values, count)`` (new tensors; the inputs are not changed).
    """
    width = values.shape[-1]
    slot = torch.remainder(count, width)  # (S,)
    here = (torch.arange(width, device=values.device) == slot.unsqueeze(-1)) & accept.unsqueeze(-1)  # (S, W)
    return torch.where(here, x.to(values.dtype).unsqueeze(-1), values), count + accept.to(count.dtype)


def spike_score(flags: torch.Tensor, steps: int) -> torch.Tensor:
    """The share of the last ``min(steps, len(flags))`` steps that were spikes (``nan`` before the first step).

    Args:
        flags: ``(R,)`` ring of per-step spike flags (0/1), the first ``min(steps, R)`` slots filled.
        steps: Steps seen so far (a host integer).
    """
    n = min(steps, flags.shape[-1])
    if n == 0:
        return torch.full((), float("nan"), dtype=torch.float64, device=flags.device)
    return flags[..., :n].double().sum(-1) / n


def detect_spikes(
    series: Union[Sequence[float], np.ndarray, torch.Tensor],
    window: int = 128,
    *,
    rule: SpikeRule = "zscore",
    threshold: float = 6.0,
    atol: Optional[float] = None,
    rtol: Optional[float] = 2.0,
    mode: Literal["min", "max"] = "min",
    warmup: Optional[int] = None,
    exclude_spikes: bool = False,
) -> dict[str, np.ndarray]:
    """Run the spike rule over whole series, step by step, as `lightning_probes.StabilityMonitor` does.

    Args:
        series: ``(T,)`` or ``(T, S)`` values, one row per step.
        window: Values in each rolling window.
        rule: ``"zscore"`` or ``"relative"`` (see `spike_flags`).
        threshold: ``rule="zscore"``: the z-score of a spike.
        atol: ``rule="relative"``: absolute tolerance (``None``: none).
        rtol: ``rule="relative"``: relative tolerance (``None``: none).
        mode: ``"min"`` (rises are spikes) or ``"max"`` (drops are).
        warmup: Steps (all of them, spikes included) before the rule may flag; non-finite values are spikes from the
            first step. Default ``window``.
        exclude_spikes: Keep spikes out of the window (Fabric), or let them in (OLMo-core; the default). Non-finite
            values never enter it.

    Returns:
        ``{"spike", "z", "mean", "std", "n"}``: arrays of the series' shape (``spike`` bool); ``mean``, ``std`` and
        ``n`` describe the window each value was compared with.
    """
    data = torch.as_tensor(np.asarray(series, dtype=np.float64))
    squeeze = data.ndim == 1
    data = data.reshape(data.shape[0], -1)  # (T, S)
    steps, width = data.shape
    warmup = window if warmup is None else warmup
    values = torch.zeros(width, window, dtype=torch.float64)
    count = torch.zeros(width, dtype=torch.int64)
    last = torch.zeros(width, dtype=torch.float64)
    out = {key: np.zeros((steps, width)) for key in ("z", "mean", "std", "n")}
    out["spike"] = np.zeros((steps, width), dtype=bool)
    for t in range(steps):
        x = data[t]
        mean, std, n = window_moments(values, count)
        flags, z = spike_flags(x, mean, std, n, last, rule=rule, threshold=threshold, atol=atol, rtol=rtol,
                               mode=mode, armed=t >= warmup)
        accept = torch.isfinite(x) & ~flags if exclude_spikes else torch.isfinite(x)
        values, count = ring_push(values, count, x, accept)
        last = torch.where(accept, x, last)
        for key, value in (("z", z), ("mean", mean), ("std", std), ("n", n), ("spike", flags)):
            out[key][t] = value.numpy()
    return {k: v[:, 0] if squeeze else v for k, v in out.items()}
