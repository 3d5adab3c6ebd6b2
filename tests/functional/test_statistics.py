"""`lightning_probes.functional.statistics` against NumPy/SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lightning_probes.functional.statistics import (
    moving_average,
    per_epoch_mean_std,
    seed_mean_std,
    student_t_interval,
    welch_t_test,
)


@pytest.mark.parametrize("values", [[0.9, 0.92, 0.95], [1.0, 3.0], [0.1, 0.2, 0.4, 0.8, 1.6]])
def test_mean_std_interval_against_scipy(values):
    mean, std = seed_mean_std(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    low, high = student_t_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(ref)


def test_undefined_statistics_are_nan():
    assert math.isnan(seed_mean_std([0.5])[1])
    assert all(math.isnan(v) for v in seed_mean_std([]))
    assert all(math.isnan(v) for v in student_t_interval([0.5]))
    assert student_t_interval([0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in welch_t_test([0.5], [0.1, 0.2]))
    assert all(math.isnan(v) for v in welch_t_test([0.5, 0.5], [0.1, 0.1]))


def test_welch_against_scipy():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.88, 0.9, 0.86]
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert welch_t_test(a, b) == pytest.approx((ref.statistic, ref.pvalue))


def test_per_epoch_mean_std_aligns_ragged_curves():
    means, stds = per_epoch_mean_std([[1.0, 2.0, 3.0], [3.0, 4.0], [2.0, float("nan")]])
    assert means == pytest.approx([2.0, 3.0, 3.0])
    assert stds[0] == pytest.approx(1.0) and stds[1] == pytest.approx(np.std([2.0, 4.0], ddof=1))
    assert math.isnan(stds[2])


def test_moving_average():
    values = np.array([1.0, 2.0, 6.0, 3.0, 8.0])
    out = moving_average(values, 3)
    assert out == pytest.approx([1.0, 1.5, 3.0, 11 / 3, 17 / 3])
    assert moving_average(values, 1) == pytest.approx(values)
    with pytest.raises(ValueError, match="Expected `window` to be a positive integer, but got 0"):
        moving_average(values, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Expected `confidence` to be in"):
        student_t_interval([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="one-dimensional"):
        seed_mean_std([[1.0, 2.0]])
