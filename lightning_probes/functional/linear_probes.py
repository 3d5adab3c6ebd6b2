"""Class-aligned layer features: a linear probe per layer, fitted on the model's own training images.

Units are in arbitrary order from one trained model to the next, so a meta-network cannot compare a unit of one
model with the same index of another. A linear probe (multinomial logistic regression) fitted on one layer's
outputs maps that layer to the classes, whose order every model shares (Chen et al., "Confidence Scoring Using
Whitebox Meta-models with Linear Classifier Probes", AISTATS 2019). Per sample and layer this gives class
scores, their top-1 minus top-2 margin, and, over the layers, the first one whose probe already agrees with the
model's final prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["fit_linear_probe", "linear_probe_features"]


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, c: float = 1.0,
                     max_iter: int = 200):
    """A standardised multinomial logistic regression (scikit-learn) of ``labels`` on ``features``.

    Args:
        features: ``(N, D)`` layer outputs (flattened).
        labels: ``(N,)`` classes in ``[0, num_classes)``.
        num_classes: Number of classes (the probe scores all of them, seen or not).
        c: Inverse L2 regularisation strength (scikit-learn's ``C``).
        max_iter: Iterations of the L-BFGS solver.

    Returns:
        A fitted ``sklearn.pipeline.Pipeline`` (``StandardScaler`` then ``LogisticRegression``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.reshape(len(features), -1).double().numpy()
    y = labels.numpy()
    if len(np.unique(y)) < 2:
        raise ValueError(f"Expected the probe's training labels to hold at least 2 classes, but got {np.unique(y)}")
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise ValueError(f"Expected labels in [0, {num_classes}), but got {int(y.min())}..{int(y.max())}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    return probe.fit(x, y)


def _class_log_proba(probe, features: torch.Tensor, num_classes: int) -> np.ndarray:
    """``(N, num_classes)`` log-probabilities; classes the probe never saw get ``-inf``."""
    x = features.reshape(len(features), -1).double().numpy()
    seen = probe.predict_log_proba(x)
    out = np.full((len(x), num_classes), -np.inf)
    out[:, probe.classes_.astype(int)] = seen
    return out


def linear_probe_features(probes: Mapping[str, object], features: Mapping[str, torch.Tensor],
                          final_pred: torch.Tensor, num_classes: int,
                          layers: Sequence[str]) -> dict[str, np.ndarray]:
    """Class-aligned features of samples from one fitted probe per layer.

    Args:
        probes: Layer -> probe (`fit_linear_probe`).
        features: Layer -> ``(N, ...)`` outputs of the samples.
        final_pred: ``(N,)`` the model's own predictions.
        num_classes: Number of classes.
        layers: The layers in network order.

    Returns:
        ``probe_<layer>``: ``(N, num_classes)`` float32 log-probabilities of each layer's probe;
        ``probe_margin``: ``(N, L)`` top-1 minus top-2 probability per layer; ``probe_agree``: ``(N,)`` int64, the
        index of the first layer whose probe predicts ``final_pred`` (``L`` when none does).
    """
    out: dict[str, np.ndarray] = {}
    margins, agree = [], []
    pred = final_pred.numpy()
    for name in layers:
        log_p = _class_log_proba(probes[name], features[name], num_classes)
        out[f"probe_{name}"] = log_p.astype(np.float32)
        p = np.exp(log_p)
        top2 = np.sort(p, axis=1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        agree.append(log_p.argmax(axis=1) == pred)
    out["probe_margin"] = np.stack(margins, axis=1).astype(np.float32)
    hits = np.stack(agree, axis=1)
    out["probe_agree"] = np.where(hits.any(axis=1), hits.argmax(axis=1), len(layers)).astype(np.int64)
    return out
