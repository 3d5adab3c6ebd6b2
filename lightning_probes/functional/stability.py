"""Spike detection over rolling windows: the maths behind `lightning_probes.StabilityMonitor`.

A *series* is one scalar per optimiser step (the training loss, the global gradient norm). Each series keeps a ring
buffer of its last ``W`` accepted values (``values``: ``(S, W)`` for ``S`` series) and the number ``count`` of values
accepted so far (``(S,)``); the window holds the last ``min(count, W)`` of them. A step's value ``x`` is compared
with the window *before* it is added:

- ``rule="zscore"`` (OLMo-core's spike score): ``z = (x - mean) / std`` over the window (population std); a spike
  when ``z > threshold`` (``mode="min"``, values that rise are bad) or ``z < -threshold`` (``mode="max"``). ``z``
  is ``nan`` (no spike by the rule) while the window holds fewer than 2 values or its std is 0.
- ``rule="relative"`` (Lightning Fabric's ``SpikeDetection``): a spike when the value is not an improvement on the
  last accepted value (``x - last > 0`` for ``mode="min"``, ``< 0`` for ``"max"``; ``last`` starts at 0), and
  ``|x - mean| >= |atol|`` (when ``atol`` is set) and ``|x - mean| >= |rtol * mean|`` (when ``rtol`` is set),
  ``mean`` being the window's running mean; never while the window is empty.

A non-finite value is always a spike (unless the caller masks it, see ``countable``) and never enters the window.
The functions work on NumPy arrays (float64): the callback runs them on the host, on the values it moved there in
one transfer (see `lightning_probes.StabilityMonitor`), so they cost no device kernel at all. `detect_spikes` runs
them over a whole series.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional, Union

import numpy as np

__all__ = ["SPIKE_RULES", "SpikeRule", "detect_spikes", "ring_push", "spike_flags", "spike_score",
           "window_moments", "window_zscores"]

#: The rules of `spike_flags`.
SPIKE_RULES = ("zscore", "relative")
SpikeRule = Literal["zscore", "relative"]


def window_moments(values: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, population standard deviation and size of each series' window.

    Args:
        values: ``(S, W)`` ring buffers.
        count: ``(S,)`` values accepted so far; the window holds the last ``min(count, W)``, which are the first
            ``min(count, W)`` slots of the ring.

    Returns:
        ``(mean, std, n)``, each ``(S,)`` float64; ``mean`` and ``std`` are ``nan`` where the window is empty.
    """
    values = np.asarray(values, dtype=np.float64)
    width = values.shape[-1]
    n = np.minimum(np.asarray(count, dtype=np.float64), float(width))  # (S,)
    valid = np.arange(width) < n[..., None]  # (S, W)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, values, 0.0).sum(-1) / n  # nan where n == 0
        centred = np.where(valid, values - mean[..., None], 0.0)
        std = np.sqrt(np.square(centred).sum(-1) / n)
    return mean, std, n


def window_zscores(x: np.ndarray, mean: np.ndarray, std: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``(x - mean) / std``; ``nan`` where the window holds fewer than 2 values or its std is 0 (or ``x`` is not
    finite)."""
    x = np.asarray(x, dtype=np.float64)
    ok = (n >= 2) & (std > 0) & np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (x - mean) / np.where(ok, std, 1.0), np.nan)


def spike_flags(
    x: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    n: np.ndarray,
    last: np.ndarray,
    *,
    rule: SpikeRule = "zscore",
    threshold: float = 6.0,
    atol: Optional[float] = None,
    rtol: Optional[float] = 2.0,
    mode: Literal["min", "max"] = "min",
    armed: Union[bool, np.ndarray] = True,
    countable: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
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
        armed: Whether the rule may flag at all (a bool or an ``(S,)`` bool array; the warm-up): when false only
            non-finite values are spikes.
        countable: ``(S,)`` bool: where false, a non-finite value is not a spike (e.g. a gradient overflow that an
            AMP ``GradScaler`` handles itself). Default: every non-finite value is a spike.

    Returns:
        ``(flags, z)``: ``(S,)`` bool spikes and ``(S,)`` z-scores (`window_zscores`, whatever the rule).
    """
    x = np.asarray(x, dtype=np.float64)
    z = window_zscores(x, mean, std, n)
    with np.errstate(invalid="ignore"):
        if rule == "zscore":
            by_rule = z > threshold if mode == "min" else z < -threshold
        elif rule == "relative":
            worse = (x - last) > 0 if mode == "min" else (x - last) < 0
            distance = np.abs(x - mean)  # nan while the window is empty: no spike by the rule
            by_rule = worse & (n > 0)
            if atol is not None:
                by_rule = by_rule & (distance >= abs(atol))
            if rtol is not None:
                by_rule = by_rule & (distance >= np.abs(rtol * mean))
        else:
            raise ValueError(f"Expected `rule` to be one of {list(SPIKE_RULES)}, but got {rule!r}")
    by_rule = by_rule & np.asarray(armed, dtype=bool)
    nonfinite = ~np.isfinite(x)
    if countable is not None:
        nonfinite = nonfinite & countable
    return by_rule | nonfinite, z


def ring_push(values: np.ndarray, count: np.ndarray, x: np.ndarray,
              accept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add ``x[s]`` to series ``s``'s ring where ``accept[s]`` (the oldest value leaves a full window).

    Args:
        values: ``(S, W)`` ring buffers.
        count: ``(S,)`` integer values accepted so far.
        x: ``(S,)`` the values.
        accept: ``(S,)`` bool: which series take their value.

    Returns:
        The new ``(values, count)`` (new arrays; the inputs are not changed).
    """
    values, count = np.array(values, dtype=np.float64), np.array(count, dtype=np.int64)
    rows = np.flatnonzero(accept)
    values[rows, count[rows] % values.shape[-1]] = np.asarray(x, dtype=np.float64)[rows]
    count[rows] += 1
    return values, count


def spike_score(flags: np.ndarray, steps: int) -> float:
    """The share of the last ``min(steps, len(flags))`` steps that were spikes (``nan`` before the first step).

    Args:
        flags: ``(R,)`` ring of per-step spike flags (0/1), the first ``min(steps, R)`` slots filled.
        steps: Steps seen so far.
    """
    n = min(steps, len(flags))
    return float(np.asarray(flags[:n], dtype=np.float64).sum() / n) if n else float("nan")


def detect_spikes(
    series: Union[Sequence[float], np.ndarray],
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

    Example:
        >>> detect_spikes([1.0, 1.1, 0.9, 1.0, 9.0], window=4, threshold=3.0, warmup=2)["spike"].tolist()
        [False, False, False, False, True]
    """
    data = np.asarray(series, dtype=np.float64)
    squeeze = data.ndim == 1
    data = data.reshape(data.shape[0], -1)  # (T, S)
    steps, width = data.shape
    warmup = window if warmup is None else warmup
    values = np.zeros((width, window))
    count = np.zeros(width, dtype=np.int64)
    last = np.zeros(width)
    out = {key: np.zeros((steps, width)) for key in ("z", "mean", "std", "n")}
    out["spike"] = np.zeros((steps, width), dtype=bool)
    for t in range(steps):
        x = data[t]
        mean, std, n = window_moments(values, count)
        flags, z = spike_flags(x, mean, std, n, last, rule=rule, threshold=threshold, atol=atol, rtol=rtol,
                               mode=mode, armed=t >= warmup)
        accept = np.isfinite(x) & ~flags if exclude_spikes else np.isfinite(x)
        values, count = ring_push(values, count, x, accept)
        last = np.where(accept, x, last)
        for key, value in (("z", z), ("mean", mean), ("std", std), ("n", n), ("spike", flags)):
            out[key][t] = value
    return {k: v[:, 0] if squeeze else v for k, v in out.items()}
