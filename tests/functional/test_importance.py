"""Hyper-parameter importance: the grid's variance decomposition against least-squares fits (scikit-learn) and a
hand example, the forest's permutation importance on a hand case where one key decides the metric and another is
noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import OneHotEncoder

from lightning_probes.functional import forest_importance, variance_shares


def _joint_levels(*columns) -> float:
    """The joint level of the given columns in each trial, as one text column."""
    joint = np.array(["|".join(map(str, row)) for row in zip(*columns)]).reshape(-1, 1)
    return joint


def _r2(columns, y) -> float:
    x = OneHotEncoder().fit_transform(_joint_levels(*columns)).toarray()
    return LinearRegression().fit(x, y).score(x, y)


def test_variance_shares_hand_example():
    out = variance_shares({"lr": [0.1, 0.1, 0.01, 0.01]}, [0.9, 0.8, 0.5, 0.4])
    # mean 0.65; SS_total = 0.17; level means 0.85 and 0.45 -> SS_lr = 4 * 0.2^2 = 0.16; within = 0.01
    assert out["shares"]["lr"] == pytest.approx(0.16 / 0.17)
    assert out["seeds"] == pytest.approx(0.01 / 0.17)
    assert out["interactions"] == pytest.approx(0.0, abs=1e-12)
    assert out["total_variance"] == pytest.approx(np.var([0.9, 0.8, 0.5, 0.4], ddof=1))
    assert out["balanced"] and out["n"] == 4


def test_variance_shares_match_least_squares_on_a_balanced_grid():
    rng = np.random.default_rng(0)
    grid = list(itertools.product([0.1, 0.03, 0.01], ["relu", "tanh"], [1, 2, 3, 4]))  # lr x activation x seed
    lr, act, seed = (list(c) for c in zip(*grid))
    y = np.array([np.log10(a) * 0.3 + (0.05 if b == "relu" else 0.0) + 0.1 * (a == 0.1) * (b == "tanh")
                  for a, b in zip(lr, act)]) + rng.normal(0, 0.02, len(grid))
    out = variance_shares({"lr": lr, "activation": act}, y)
    assert out["shares"]["lr"] == pytest.approx(_r2([lr], y))
    assert out["shares"]["activation"] == pytest.approx(_r2([act], y))
    cells = _r2([lr, act], y)
    assert out["interactions"] == pytest.approx(cells - _r2([lr], y) - _r2([act], y))
    assert out["seeds"] == pytest.approx(1 - cells)
    assert sum(out["shares"].values()) + out["interactions"] + out["seeds"] == pytest.approx(1.0)


def test_variance_shares_one_key_decides_the_other_is_noise():
    grid = list(itertools.product([1, 2, 3], ["a", "b"], [1, 2]))
    decides, noise, seed = (list(c) for c in zip(*grid))
    y = [float(d) for d in decides]  # the metric is `decides` itself: nothing else moves it
    out = variance_shares({"decides": decides, "noise": noise}, y)
    assert out["shares"] == {"decides": pytest.approx(1.0), "noise": pytest.approx(0.0, abs=1e-12)}
    assert out["seeds"] == pytest.approx(0.0, abs=1e-12)
    unbalanced = variance_shares({"decides": decides[:-1], "noise": noise[:-1]}, y[:-1])
    assert not unbalanced["balanced"]


def test_forest_importance_finds_the_deciding_key_and_not_the_noise():
    rng = np.random.default_rng(1)
    n = 160
    decides = rng.uniform(0, 1, n)
    noise = rng.uniform(0, 1, n)
    activation = rng.choice(["relu", "tanh"], n).tolist()
    y = 2 * np.sin(3 * decides) + 0.5 * (np.array(activation) == "relu") + rng.normal(0, 0.02, n)
    out = forest_importance({"decides": decides.tolist(), "noise": noise.tolist(), "activation": activation,
                             "constant": [7] * n}, y, n_estimators=100, n_repeats=5)
    assert list(out["importance"]) == ["decides", "activation", "noise"]  # the constant key is left out
    assert out["kinds"]["activation"] == "categorical" and out["kinds"]["decides"] == "numeric"
    assert out["importance"]["decides"]["mean"] > 0.5
    assert out["importance"]["activation"]["mean"] > 0.1
    assert abs(out["importance"]["noise"]["mean"]) < 0.05
    assert out["oob_r2"] > 0.8 and out["cv_r2"] > 0.8 and out["n"] == n


def test_forest_importance_refuses_too_few_trials_and_bad_input():
    assert forest_importance({"lr": [0.1, 0.2, 0.3]}, [1.0, 2.0, 3.0]) is None
    assert forest_importance({"lr": [0.1] * 10}, list(range(10))) is None  # nothing varies
    with pytest.raises(ValueError, match="Expected 3 values of `b`"):
        forest_importance({"a": [1, 2, 3], "b": [1, 2]}, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="Expected `folds` to be an integer >= 2, but got 1"):
        forest_importance({"a": list(range(10))}, list(range(10)), folds=1)
    with pytest.raises(ValueError, match="Expected finite metric values"):
        variance_shares({"a": [1, 2]}, [1.0, float("nan")])
    with pytest.raises(ValueError, match="Expected at least one grid key"):
        variance_shares({}, [])
