"""Which hyper-parameters decide a metric across the trials of a study: two estimators for two kinds of study.

- ``variance_shares`` (grid studies): a variance decomposition. Every grid key is a factor with a few levels, every
  grid point is run with the same seeds, so the design is balanced and the classical sums of squares split the
  metric's variance exactly: each key's main effect (the share of the variance its level means explain, eta
  squared), the interactions between keys, and the seeds (within a grid point: the noise floor). Exact, no model.
- ``forest_importance`` (sampled studies): permutation importance of a scikit-learn random forest. Sampled values are
  continuous and unique per trial (no level means to take), effects are non-linear and interact; a forest fits them
  without assumptions, its out-of-bag r2 says how much of the metric the hyper-parameters explain at all, and the
  permutation importance (the drop of held-out r2 when one hyper-parameter's column is shuffled) is computed on
  cross-validation folds the forest did not train on, so it does not reward what the forest memorised. Unlike the
  forest's impurity importance it is not biased toward keys with many distinct values.

Example:
    >>> shares = variance_shares({"lr": [0.1, 0.1, 0.01, 0.01]}, [0.9, 0.8, 0.5, 0.4])
    >>> round(shares["shares"]["lr"], 4), round(shares["seeds"], 4)
    (0.9412, 0.0588)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

__all__ = ["encode_features", "forest_importance", "variance_shares"]


def _target(y: Sequence[float], n: int) -> np.ndarray:
    target = np.asarray(y, dtype=float).reshape(-1)
    if len(target) != n:
        raise ValueError(f"Expected one metric value per trial ({n}), but got {len(target)}")
    if not np.isfinite(target).all():
        raise ValueError("Expected finite metric values; drop the trials without one first")
    return target


def _codes(values: Sequence[Any]) -> np.ndarray:
    """Integer codes of the distinct values (by their text, in sorted order)."""
    labels = [repr(v) if not isinstance(v, str) else v for v in values]
    levels = {label: i for i, label in enumerate(sorted(set(labels)))}
    return np.array([levels[label] for label in labels])


def variance_shares(factors: Mapping[str, Sequence[Any]], y: Sequence[float]) -> dict[str, Any]:
    """Split the variance of ``y`` over the trials of a grid into main effects, interactions and seeds.

    With ``SS_total = sum (y - mean)^2``, ``SS_key = sum over levels n_level (mean_level - mean)^2`` (a key's main
    effect), ``SS_cells`` the same over the grid points (every key at once) and ``SS_seeds = SS_total - SS_cells``
    (within grid points): ``shares[key] = SS_key / SS_total`` (eta squared), ``interactions = (SS_cells - sum
    SS_key) / SS_total`` and ``seeds = SS_seeds / SS_total``. In a balanced grid (every point with the same seeds)
    the main effects are orthogonal and the three parts add up to 1; with missing trials they need not.

    Args:
        factors: Grid key -> its value in each trial (any hashable values: numbers, strings, dicts as text).
        y: The metric of each trial.

    Returns:
        ``{"shares": {key: share}, "interactions": float, "seeds": float,``
        ``"total_variance": float, "n": int, "balanced": bool}``; shares are NaN when ``y`` does not vary.

    Raises:
        ValueError: If ``factors`` is empty or a column's length differs from ``y``'s.
    """
    if not factors:
        raise ValueError("Expected at least one grid key in `factors`, but got none")
    n = len(next(iter(factors.values())))
    target = _target(y, n)
    for key, values in factors.items():
        if len(values) != n:
            raise ValueError(f"Expected {n} values of `{key}` (one per trial), but got {len(values)}")
    codes = {key: _codes(values) for key, values in factors.items()}
    mean = target.mean()
    total = float(((target - mean) ** 2).sum())

    def between(groups: np.ndarray) -> float:
        _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=target) / counts
        return float((counts * (means - mean) ** 2).sum())

    main = {key: between(c) for key, c in codes.items()}
    cells = np.unique(np.stack(list(codes.values()), axis=1), axis=0, return_inverse=True)[1].reshape(-1)
    ss_cells = between(cells)
    _, cell_counts = np.unique(cells, return_counts=True)
    balanced = bool(len(set(cell_counts.tolist())) == 1 and all(
        len(set(np.unique(c, return_counts=True)[1].tolist())) == 1 for c in codes.values()))

    def share(ss: float) -> float:
        return ss / total if total > 0 else math.nan

    return {"shares": {key: share(ss) for key, ss in main.items()},
            "interactions": share(ss_cells - sum(main.values())),
            "seeds": share(total - ss_cells), "total_variance": total / max(n - 1, 1), "n": n,
            "balanced": balanced}


def encode_features(features: Mapping[str, Sequence[Any]]) -> tuple[np.ndarray, dict[str, str]]:
    """Hyper-parameter columns as a float matrix for a forest: numbers as they are, anything else as codes.

    A tree splits on thresholds, so a monotone transform (a log scale) changes nothing and is not needed; a
    categorical key (``relu``/``tanh``, a dict) becomes integer codes, which a forest splits into any grouping given
    enough trees.

    Returns:
        The ``(trials, keys)`` matrix and key -> ``"numeric"`` or ``"categorical"``.
    """
    columns, kinds = [], {}
    for key, values in features.items():
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                      for v in values)
        columns.append(np.asarray(values, dtype=float) if numeric else _codes(values).astype(float))
        kinds[key] = "numeric" if numeric else "categorical"
    return np.stack(columns, axis=1), kinds


def forest_importance(features: Mapping[str, Sequence[Any]], y: Sequence[float], n_estimators: int = 300,
                      n_repeats: int = 10, folds: int = 5, seed: int = 0,
                      min_samples_leaf: int = 2) -> Optional[dict[str, Any]]:
    """Permutation importance of each hyper-parameter for ``y``, from a scikit-learn random forest.

    A ``RandomForestRegressor`` fitted on every trial gives the out-of-bag r2 (how much of ``y`` the hyper-parameters
    explain, estimated on trials each tree did not see). The importance of a key is the drop of held-out r2 when its
    column is shuffled (``sklearn.inspection.permutation_importance``, ``n_repeats`` shuffles), on each of ``folds``
    cross-validation folds with a forest fitted on the other folds; reported as the mean and the std over folds.
    Keys that do not vary are left out.

    Args:
        features: Hyper-parameter key -> its value in each trial.
        y: The metric of each trial.
        n_estimators: Trees per forest.
        n_repeats: Shuffles per key and fold.
        folds: Cross-validation folds (at most the number of trials).
        seed: Seed of the forests, the folds and the shuffles.
        min_samples_leaf: The forest's smallest leaf (2 smooths the seed noise a little).

    Returns:
        ``{"importance": {key: {"mean", "std"}}, "oob_r2", "cv_r2", "n", "kinds", "method"}``, keys by decreasing
        importance; ``None`` with fewer than 8 trials or no varying key (too few to fit anything honest).

    Raises:
        ValueError: If a column's length differs from ``y``'s, or an argument is out of range.
    """
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance
    from sklearn.model_selection import KFold

    for name, value, low in (("n_estimators", n_estimators, 1), ("n_repeats", n_repeats, 1), ("folds", folds, 2),
                             ("min_samples_leaf", min_samples_leaf, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Expected `{name}` to be an integer >= {low}, but got {value!r}")
    n = len(next(iter(features.values()))) if features else 0
    target = _target(y, n)
    for key, values in features.items():
        if len(values) != n:
            raise ValueError(f"Expected {n} values of `{key}` (one per trial), but got {len(values)}")
    varied = {k: v for k, v in features.items() if len({repr(x) for x in v}) > 1}
    if n < 8 or not varied:
        return None
    x, kinds = encode_features(varied)
    keys = list(varied)

    def forest(oob: bool = False) -> Any:
        return RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=min_samples_leaf, oob_score=oob,
                                     random_state=seed, n_jobs=1)

    oob_r2 = float(forest(oob=True).fit(x, target).oob_score_)
    per_fold, fold_r2 = [], []
    for train, test in KFold(n_splits=min(folds, n), shuffle=True, random_state=seed).split(x):
        model = forest().fit(x[train], target[train])
        fold_r2.append(float(model.score(x[test], target[test])))
        result = permutation_importance(model, x[test], target[test], scoring="r2", n_repeats=n_repeats,
                                        random_state=seed, n_jobs=1)
        per_fold.append(result.importances_mean)
    drops = np.stack(per_fold)  # (folds, keys)
    importance = {key: {"mean": float(drops[:, i].mean()), "std": float(drops[:, i].std(ddof=1))}
                  for i, key in enumerate(keys)}
    order = sorted(keys, key=lambda k: -importance[k]["mean"])
    return {"method": "permutation importance (held-out r2 drop) of a random forest, "
                      f"{len(per_fold)}-fold cross-validation",
            "importance": {k: importance[k] for k in order}, "oob_r2": oob_r2, "cv_r2": float(np.mean(fold_r2)),
            "n": n, "kinds": {k: kinds[k] for k in order}, "n_estimators": n_estimators, "n_repeats": n_repeats}
