"""Comparing finished runs: training-dynamics summaries, the Pareto front, a 2-D map of runs and CKA between runs.

Example:
    >>> pareto_front([0.9, 0.8, 0.95], [0.1, 0.05, 0.3]).tolist()
    [True, True, True]
    >>> pareto_front([0.9, 0.8], [0.1, 0.2]).tolist()
    [True, False]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from lightning_probes.functional.representations import linear_cka

__all__ = ["cka_matrix", "convergence_epoch", "overfitting_start", "pareto_front", "pca_map", "stability_window",
           "training_dynamics"]


def _curve(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    return array


def convergence_epoch(epochs: Sequence[int], val_acc: Sequence[float], share: float = 0.95) -> Optional[int]:
    """The first epoch whose ``val_acc`` reaches ``share`` times its maximum (NaN values skipped); ``None``
    when there is no finite value."""
    acc = _curve(val_acc)
    finite = np.isfinite(acc)
    if not finite.any():
        return None
    first = int(np.argmax(finite & (acc >= share * np.nanmax(acc))))
    return int(epochs[first])


def overfitting_start(n: int) -> int:
    """Index of the first epoch of the "last third" of ``n`` epochs: ``max(int(0.67 * n), 1)`` (0 when ``n == 1``)."""
    return min(max(int(0.67 * n), 1), max(n - 1, 0))


def stability_window(n: int, window: int = 10) -> int:
    """How many of the last values enter the stability std: ``min(window, n)``."""
    return min(window, n)


def training_dynamics(
    epochs: Sequence[int],
    train_loss: Sequence[float],
    val_loss: Sequence[float],
    val_acc: Sequence[float],
    window: int = 10,
) -> dict[str, Any]:
    """Summaries of one run's epoch curves (aligned by epoch; NaN where an epoch lacks a value).

    - ``epochs_to_convergence``: the first epoch whose val/acc >= 0.95 x its maximum;
    - ``overfitting_index``: mean of ``val_loss - train_loss`` over the epochs from index
      ``max(int(0.67 n), 1)`` on (the last third; all epochs when there is only one), NaN pairs skipped;
    - ``stability``: population std of the last ``min(window, n)`` val/loss values (``stability_epochs`` says how
      many; fewer than ``window`` when the run is shorter);
    - ``peak_val_acc`` and ``peak_epoch`` (the first epoch reaching it);
    - ``final_gap``: last val/loss minus last train/loss (the last epoch where both exist).

    Returns:
        The numbers above (NaN / ``None`` when a curve is missing) and ``epochs`` (how many).
    """
    epochs = [int(e) for e in epochs]
    train, val, acc = _curve(train_loss), _curve(val_loss), _curve(val_acc)
    if not (len(epochs) == len(train) == len(val) == len(acc)):
        raise ValueError(f"Expected `epochs`, `train_loss`, `val_loss` and `val_acc` of one length, but got "
                         f"{len(epochs)}, {len(train)}, {len(val)} and {len(acc)}")
    n = len(epochs)
    gap = val - train
    start = overfitting_start(n)
    tail = gap[start:]
    tail = tail[np.isfinite(tail)]
    finite_val = val[np.isfinite(val)]
    k = stability_window(len(finite_val), window)
    both = np.flatnonzero(np.isfinite(gap))
    has_acc = bool(np.isfinite(acc).any())
    peak = int(np.nanargmax(acc)) if has_acc else None
    return {
        "epochs": n,
        "epochs_to_convergence": convergence_epoch(epochs, acc),
        "overfitting_index": float(tail.mean()) if tail.size else math.nan,
        "overfitting_from_epoch": epochs[start] if n else None,
        "stability": float(finite_val[-k:].std()) if k else math.nan,
        "stability_epochs": k,
        "peak_val_acc": float(acc[peak]) if peak is not None else math.nan,
        "peak_epoch": epochs[peak] if peak is not None else None,
        "final_gap": float(gap[both[-1]]) if both.size else math.nan,
    }


def pareto_front(maximize: Sequence[float], minimize: Sequence[float]) -> np.ndarray:
    """Which points are on the Pareto front of (``maximize`` up, ``minimize`` down).

    A point is on the front when no other point is at least as good on both and strictly better on one. Points
    with a NaN coordinate are never on the front and dominate nothing. Equal points are all on the front.

    Returns:
        A boolean array, one entry per point.
    """
    up, down = np.asarray(maximize, dtype=float), np.asarray(minimize, dtype=float)
    if up.shape != down.shape or up.ndim != 1:
        raise ValueError(f"Expected `maximize` and `minimize` to be 1-D of one length, but got shapes {up.shape} "
                         f"and {down.shape}")
    valid = np.isfinite(up) & np.isfinite(down)
    on_front = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid & (np.arange(len(up)) != i)
        dominated = others & (up >= up[i]) & (down <= down[i]) & ((up > up[i]) | (down < down[i]))
        on_front[i] = not dominated.any()
    return on_front


def pca_map(features: np.ndarray, standardize: bool = True) -> dict[str, Any]:
    """A 2-D map of runs: scikit-learn's PCA of their feature vectors (one row per run).

    Columns that are constant or hold a NaN are left out; with ``standardize`` the rest are z-scored first
    (``StandardScaler``), so statistics of different units weigh alike.

    Returns:
        ``coords`` (``(runs, 2)``; a second column of zeros when only one component exists), ``explained``
        (explained variance ratio of each component), ``columns`` (indices of the columns used).

    Raises:
        ValueError: Fewer than 2 runs, or no usable column.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Expected `features` of shape (runs >= 2, columns), but got {x.shape}")
    usable = np.flatnonzero(np.isfinite(x).all(axis=0) & (np.ptp(np.where(np.isfinite(x), x, 0), axis=0) > 0))
    if usable.size == 0:
        raise ValueError("Expected `features` to have a column that varies between runs and holds no NaN, but "
                         "none does")
    x = x[:, usable]
    if standardize:
        x = StandardScaler().fit_transform(x)
    n_components = min(2, x.shape[0], x.shape[1])
    pca = PCA(n_components=n_components, svd_solver="full")
    coords = pca.fit_transform(x)
    if n_components < 2:
        coords = np.column_stack([coords, np.zeros(len(coords))])
    return {"coords": coords, "explained": pca.explained_variance_ratio_.tolist(), "columns": usable.tolist()}


def cka_matrix(features: Sequence[torch.Tensor]) -> np.ndarray:
    """Linear CKA between every pair of runs' features on the same samples (``(samples, features_i)`` each).

    Returns:
        A symmetric ``(runs, runs)`` float64 array with ones on the diagonal (NaN for a run whose features are
        constant).
    """
    n = len(features)
    if n and len({int(f.shape[0]) for f in features}) != 1:
        raise ValueError(f"Expected every run's features on the same samples, but got sample counts "
                         f"{[int(f.shape[0]) for f in features]}")
    out = np.full((n, n), math.nan)
    for i in range(n):
        for j in range(i, n):
            value = float(linear_cka(features[i].double(), features[j].double()))
            out[i, j] = out[j, i] = value
    return out
