"""Maths of the meta-network study: picking samples per model, permutation-invariant encodings of layer outputs,
the confidence baselines that need no meta-network, and the error-detection metrics.

A meta-network reads how one sample's signal flows through a classifier (the outputs of a few layers) and predicts
whether the classifier's prediction is correct, or how stable it is under input noise. Unit order is arbitrary from
one trained model to the next, so ``encode_layer`` offers encodings that are the same for any permutation of a
layer's units (``sorted``, ``stats``) beside the ``raw`` outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import torch

__all__ = [
    "ENCODINGS",
    "LAYER_STATS",
    "baseline_scores",
    "best_threshold",
    "encode_layer",
    "encoded_width",
    "error_detection_metrics",
    "fpr_at_tpr",
    "regression_metrics",
    "select_by_correctness",
    "stack_encoded",
]

Encoding = Literal["sorted", "stats", "raw"]
ENCODINGS = ("sorted", "stats", "raw")
#: The per-layer statistics of the ``stats`` encoding, in order.
LAYER_STATS = ("mean", "std", "min", "q10", "q25", "q50", "q75", "q90", "max", "positive")
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def select_by_correctness(labels: torch.Tensor, preds: torch.Tensor, per_class: int,
                          generator: Optional[torch.Generator] = None, num_classes: Optional[int] = None
                          ) -> torch.Tensor:
    """Indices of up to ``per_class`` correctly and ``per_class`` wrongly classified samples of every class.

    Within each class (the true label) and kind, the samples are drawn without replacement in the random order of
    ``generator``; a class with fewer samples of a kind gives all it has.

    Args:
        labels: ``(N,)`` true classes.
        preds: ``(N,)`` predicted classes.
        per_class: Most samples of each kind per class, >= 1.
        generator: Random generator of the draw (seed it for a reproducible choice).
        num_classes: Number of classes (default ``labels.max() + 1``).

    Returns:
        ``(M,)`` sorted int64 indices into ``labels``.

    Example:
        >>> select_by_correctness(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 0, 1]), per_class=1).shape
        torch.Size([3])
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"Expected `per_class` to be a positive integer, but got {per_class!r}")
    if labels.shape != preds.shape or labels.ndim != 1:
        raise ValueError(f"Expected `labels` and `preds` of one shape (N,), but got {tuple(labels.shape)} and "
                         f"{tuple(preds.shape)}")
    classes = int(labels.max()) + 1 if num_classes is None and len(labels) else int(num_classes or 0)
    order = torch.randperm(len(labels), generator=generator)
    labels_o, correct_o = labels[order], (preds == labels)[order]
    chosen = []
    for cls in range(classes):
        for kind in (True, False):
            hits = order[(labels_o == cls) & (correct_o == kind)]
            chosen.append(hits[:per_class])
    if not chosen:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(chosen).sort().values


def encode_layer(values: torch.Tensor, encoding: Encoding = "sorted", softmax: bool = False) -> torch.Tensor:
    """One layer's outputs ``(N, units)`` as the meta-network reads them.

    - ``sorted``: the units' values sorted in descending order (the same for any permutation of the units);
    - ``stats``: ``LAYER_STATS``: mean, std (``ddof=0``), min, the 10/25/50/75/90% quantiles (linear
      interpolation, as ``numpy.quantile``), max and the share of positive values;
    - ``raw``: the values as they are (unit order matters: they do not transfer across models).

    Args:
        values: ``(N, units)`` layer outputs (flattened).
        encoding: ``"sorted"``, ``"stats"`` or ``"raw"``.
        softmax: Take the softmax over the units first (for the logits layer: ``sorted`` gives the sorted class
            probabilities).

    Returns:
        ``(N, encoded_width(units, encoding))`` float tensor.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"Expected `encoding` to be one of {ENCODINGS}, but got {encoding!r}")
    x = values.flatten(1).float()
    if softmax:
        x = x.softmax(dim=1)
    if encoding == "raw":
        return x
    ordered = x.sort(dim=1, descending=True).values
    if encoding == "sorted":
        return ordered
    quantiles = torch.quantile(x, torch.tensor(_QUANTILES, dtype=x.dtype, device=x.device), dim=1).T
    return torch.cat([x.mean(1, keepdim=True), x.std(1, correction=0, keepdim=True), ordered[:, -1:], quantiles,
                      ordered[:, :1], (x > 0).float().mean(1, keepdim=True)], dim=1)


def encoded_width(units: int, encoding: Encoding) -> int:
    """Features per sample of ``encode_layer`` on a layer of ``units`` units."""
    if encoding not in ENCODINGS:
        raise ValueError(f"Expected `encoding` to be one of {ENCODINGS}, but got {encoding!r}")
    return len(LAYER_STATS) if encoding == "stats" else units


def baseline_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Confidence scores read from the logits alone, each larger for a more trustworthy prediction.

    - ``max_softmax``: the top class probability;
    - ``entropy``: minus the entropy of the softmax (natural log);
    - ``margin``: top-1 minus top-2 probability;
    - ``doctor``: minus DOCTOR's ``1 - sum p^2`` (Granese et al. 2021), i.e. ``sum p^2 - 1``.

    Args:
        logits: ``(N, C)`` logits, ``C >= 2``.

    Returns:
        Name -> ``(N,)`` float64 scores.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"Expected `logits` of shape (N, C) with C >= 2, but got {tuple(logits.shape)}")
    log_p = logits.double().log_softmax(dim=1)
    p = log_p.exp()
    top2 = p.topk(2, dim=1).values
    return {
        "max_softmax": top2[:, 0],
        "entropy": (p * log_p).nan_to_num().sum(dim=1),
        "margin": top2[:, 0] - top2[:, 1],
        "doctor": p.square().sum(dim=1) - 1.0,
    }


def fpr_at_tpr(scores: torch.Tensor, positives: torch.Tensor, tpr: float = 0.95) -> torch.Tensor:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    Positives are ``positives == 1`` (for error detection: the correct predictions, scored by confidence). Uses
    ``torchmetrics``' ROC curve; ``NaN`` when either class is missing.
    """
    from torchmetrics.functional.classification import binary_roc

    positives = positives.long()
    if positives.sum() == 0 or positives.sum() == len(positives):
        return torch.tensor(float("nan"), dtype=torch.float64)
    fpr, tprs, _ = binary_roc(scores.double(), positives)
    reached = tprs >= tpr - 1e-12
    return fpr[reached].min().double()


def error_detection_metrics(scores: torch.Tensor, correct: torch.Tensor,
                            threshold: Optional[float] = None) -> dict[str, float]:
    """How well a score separates correct from wrong predictions (a larger score should mean "correct").

    - ``accuracy``: share of samples where ``score >= threshold`` agrees with ``correct`` (when ``threshold`` given);
    - ``auroc``: area under the ROC curve, correct predictions as positives;
    - ``aupr_err``: average precision with the errors as positives, scored by ``-score`` (for a probability ``p``
      this ranks exactly as ``1 - p``);
    - ``fpr_at_95tpr``: ``fpr_at_tpr(scores, correct, 0.95)``.

    Args:
        scores: ``(N,)`` scores.
        correct: ``(N,)`` 0/1 (or bool): whether each prediction is correct.
        threshold: Decision threshold of ``accuracy``.

    Returns:
        Metric name -> float (``NaN`` where a class is missing).
    """
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    correct = correct.long().flatten()
    scores = scores.double().flatten()
    both = 0 < int(correct.sum()) < len(correct)
    nan = float("nan")
    out = {
        "auroc": float(binary_auroc(scores, correct)) if both else nan,
        "aupr_err": float(binary_average_precision(-scores, 1 - correct)) if both else nan,
        "fpr_at_95tpr": float(fpr_at_tpr(scores, correct, 0.95)),
    }
    if threshold is not None:
        out = {"accuracy": float(((scores >= threshold).long() == correct).double().mean()), **out}
    return out


def best_threshold(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """The threshold ``t`` maximising the accuracy of ``score >= t`` as a prediction of ``correct`` (ties: lowest).

    Candidate thresholds are the scores themselves and ``+inf`` (predict "wrong" for every sample).
    """
    scores = scores.double().flatten()
    correct = correct.long().flatten()
    order = scores.argsort(descending=True)
    s, c = scores[order], correct[order]
    # Predicting "correct" for the top k samples: hits = correct among them + wrong among the rest.
    tp = torch.cat([torch.zeros(1, dtype=torch.float64), c.double().cumsum(0)])
    fp = torch.arange(len(s) + 1, dtype=torch.float64) - tp
    hits = tp + ((1 - c).sum() - fp)
    # A threshold can only sit between distinct scores: keep k where s[k-1] > s[k] (or at the ends).
    valid = torch.ones(len(s) + 1, dtype=torch.bool)
    valid[1:-1] = s[:-1] > s[1:]
    k = int(torch.where(valid, hits, torch.full_like(hits, -1.0)).argmax())
    return float("inf") if k == 0 else float(s[k - 1])


def regression_metrics(pred: torch.Tensor, target: torch.Tensor,
                       groups: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """``r2`` (coefficient of determination), ``spearman`` and ``mse`` of predicted ratios (torchmetrics), plus
    ``r2`` within each group (``{"correct": mask, "wrong": mask}`` -> ``r2_correct``, ``r2_wrong``).

    ``NaN`` where a group has fewer than 2 samples or a constant target.
    """
    from torchmetrics.functional import mean_squared_error, r2_score, spearman_corrcoef

    pred, target = pred.double().flatten(), target.double().flatten()

    def r2(p: torch.Tensor, t: torch.Tensor) -> float:
        return float(r2_score(p, t)) if len(t) >= 2 and bool((t != t[0]).any()) else float("nan")

    out = {"r2": r2(pred, target),
           "spearman": float(spearman_corrcoef(pred, target)) if len(target) >= 2 else float("nan"),
           "mse": float(mean_squared_error(pred, target))}
    for name, mask in (groups or {}).items():
        out[f"r2_{name}"] = r2(pred[mask], target[mask])
    return out


def stack_encoded(layers: Sequence[torch.Tensor], encoding: Encoding, softmax_last: bool = True) -> list[torch.Tensor]:
    """``encode_layer`` of each layer (the last one through the softmax when ``softmax_last`` and not ``raw``)."""
    last = len(layers) - 1
    return [encode_layer(x, encoding, softmax=softmax_last and i == last and encoding != "raw")
            for i, x in enumerate(layers)]
