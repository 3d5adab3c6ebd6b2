"""Statistics over seeds: mean, sample standard deviation, Student-t intervals, Welch's t-test, moving averages.

Pure functions on sequences of numbers (NumPy in, Python floats out), used by ``lightning_probes.studies`` to
aggregate the runs of a study and tested against NumPy/SciPy directly. ``NaN`` marks a value that is not
defined (the spread of one seed, the test of two settings that have fewer than two seeds each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np

Numbers = Union[Sequence[float], np.ndarray]


def _as_array(values: Numbers, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"Expected `{name}` to be one-dimensional, but got shape {array.shape}")
    return array


def seed_mean_std(values: Numbers) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of one value per seed.

    Args:
        values: One number per seed.

    Returns:
        ``(mean, std)``; ``std`` is ``NaN`` for a single seed and both are ``NaN`` for none.

    Example:
        >>> seed_mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    array = _as_array(values)
    if array.size == 0:
        return math.nan, math.nan
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return mean, std


def student_t_interval(values: Numbers, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``values`` (``scipy.stats.t.interval``).

    Args:
        values: One number per seed.
        confidence: Confidence level, in (0, 1).

    Returns:
        ``(low, high)``; ``(NaN, NaN)`` with fewer than two values, ``(mean, mean)`` when all values are equal.

    Raises:
        ValueError: If ``confidence`` is not in (0, 1).

    Example:
        >>> low, high = student_t_interval([1.0, 2.0, 3.0])
        >>> round(low, 3), round(high, 3)
        (-0.484, 4.484)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Expected `confidence` to be in (0, 1), but got {confidence!r}")
    array = _as_array(values)
    if array.size < 2:
        return math.nan, math.nan
    from scipy import stats

    mean = float(array.mean())
    sem = float(array.std(ddof=1)) / math.sqrt(array.size)
    if sem == 0.0:
        return mean, mean
    low, high = stats.t.interval(confidence, df=array.size - 1, loc=mean, scale=sem)
    return float(low), float(high)


def welch_t_test(a: Numbers, b: Numbers) -> tuple[float, float]:
    """Welch's two-sample t-test (unequal variances), ``scipy.stats.ttest_ind(a, b, equal_var=False)``.

    Args:
        a: One number per seed of the first setting.
        b: One number per seed of the second setting.

    Returns:
        ``(t statistic, two-sided p-value)``; ``(NaN, NaN)`` when either sample has fewer than two values or
        both have zero variance (the test is not defined).

    Example:
        >>> t, p = welch_t_test([0.9, 0.91, 0.92], [0.8, 0.82, 0.81])
        >>> round(p, 5)
        0.00026
    """
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.size < 2 or y.size < 2 or (x.var(ddof=1) == 0.0 and y.var(ddof=1) == 0.0):
        return math.nan, math.nan
    from scipy import stats

    result = stats.ttest_ind(x, y, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def per_epoch_mean_std(curves: Sequence[Numbers]) -> tuple[list[float], list[float]]:
    """Mean and sample standard deviation over seeds at every epoch.

    Curves of different lengths (a seed that ran fewer epochs) are aligned at epoch 0; each epoch uses the seeds
    that reached it; ``NaN`` entries (a metric missing at an epoch) are left out.

    Args:
        curves: One sequence per seed, one value per epoch.

    Returns:
        ``(means, stds)``, as long as the longest curve; ``std`` is ``NaN`` where fewer than two seeds count.

    Example:
        >>> per_epoch_mean_std([[1.0, 2.0], [3.0, 4.0]])
        ([2.0, 3.0], [1.4142135623730951, 1.4142135623730951])
    """
    arrays = [_as_array(curve, "curves") for curve in curves]
    length = max((len(array) for array in arrays), default=0)
    means, stds = [], []
    for epoch in range(length):
        column = [array[epoch] for array in arrays if epoch < len(array) and not math.isnan(array[epoch])]
        mean, std = seed_mean_std(column)
        means.append(mean)
        stds.append(std)
    return means, stds


def moving_average(values: Numbers, window: int) -> np.ndarray:
    """Trailing moving average: entry ``i`` is the mean of ``values[max(0, i - window + 1) : i + 1]``.

    The first ``window - 1`` entries average what exists so far, so the result is as long as the input and
    starts at the first value. ``NaN`` entries are left out of each mean.

    Args:
        values: A curve, one value per epoch.
        window: Window length, a positive integer (1 returns the curve).

    Returns:
        The smoothed curve, ``float64``.

    Raises:
        ValueError: If ``window`` is not a positive integer.

    Example:
        >>> moving_average([1.0, 3.0, 5.0, 7.0], 2).tolist()
        [1.0, 2.0, 4.0, 6.0]
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"Expected `window` to be a positive integer, but got {window!r}")
    array = _as_array(values)
    out = np.full(array.shape, np.nan)
    for i in range(array.size):
        chunk = array[max(0, i - window + 1) : i + 1]
        chunk = chunk[~np.isnan(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out
