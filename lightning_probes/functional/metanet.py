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
    "binomial_nll",
    "encode_layer",
    "encoded_width",
    "error_detection_metrics",
    "fpr_at_tpr",
    "r2_ceiling",
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
                          generator: Optional[torch.Generator] = None, num_classes: Optional[int] = None,
                          order: Literal["random", "first"] = "random") -> torch.Tensor:
    """Indices of up to ``per_class`` correctly and ``per_class`` wrongly classified samples of every class.

    Within each class (the true label) and kind, the samples are drawn without replacement in the random order of
    ``generator`` (``order="random"``), or are the first ones in index order (``order="first"``, the original
    meta-network study's choice: on an unshuffled test set the same images recur across models); a class with
    fewer samples of a kind gives all it has.

    Args:
        labels: ``(N,)`` true classes.
        preds: ``(N,)`` predicted classes.
        per_class: Most samples of each kind per class, >= 1.
        generator: Random generator of the draw (seed it for a reproducible choice).
        num_classes: Number of classes (default ``labels.max() + 1``).
        order: ``"random"`` or ``"first"`` (``generator`` is then unused).

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
    if order not in ("random", "first"):
        raise ValueError(f"Expected `order` to be 'random' or 'first', but got {order!r}")
    classes = int(labels.max()) + 1 if num_classes is None and len(labels) else int(num_classes or 0)
    if order == "first":
        order = torch.arange(len(labels))
    else:
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


def binomial_nll(pred: torch.Tensor, ratio: torch.Tensor, num_draws: int | torch.Tensor) -> torch.Tensor:
    """Mean binomial negative log-likelihood per draw of stability ratios ``k / n`` under predicted probabilities.

    The ratio of ``n`` noise draws that keep a prediction is ``k / n`` with ``k ~ Binomial(n, p)``; this loss is
    ``-(k log q + (n - k) log(1 - q)) / n`` averaged over samples (weighted by ``n``): the binomial
    log-likelihood without its constant ``log C(n, k)``, per draw. Unlike the MSE it weighs an error by
    how sure the ``n`` draws make the label (it is the cross-entropy with soft target ``k / n``), and it is
    minimised at ``q = k / n``.

    Args:
        pred: ``(N,)`` predicted probabilities ``q`` (clamped into ``[eps, 1 - eps]``).
        ratio: ``(N,)`` observed ratios ``k / n`` in [0, 1].
        num_draws: ``n``: one integer for every sample, or ``(N,)`` integers; only scales each sample's weight.

    Returns:
        A scalar tensor (differentiable in ``pred``).
    """
    if pred.shape != ratio.shape:
        raise ValueError(f"Expected `pred` and `ratio` of one shape, but got {tuple(pred.shape)} and "
                         f"{tuple(ratio.shape)}")
    n = torch.as_tensor(num_draws, dtype=pred.dtype, device=pred.device)
    if bool((n < 1).any()):
        raise ValueError(f"Expected `num_draws` to be at least 1, but got {num_draws!r}")
    eps = torch.finfo(pred.dtype).eps
    q = pred.clamp(eps, 1 - eps)
    per_draw = -(ratio * q.log() + (1 - ratio) * (1 - q).log())
    weights = n.expand_as(per_draw)
    return (per_draw * weights).sum() / weights.sum()


def r2_ceiling(ratio: torch.Tensor, num_draws: int) -> float:
    """The highest r2 any predictor of a Monte-Carlo stability ratio can expect: ``1 - mean(p(1-p)/n) / Var(p)``.

    Each label ``k / n`` is the true probability ``p`` plus binomial noise of variance ``p (1 - p) / n``; a perfect
    predictor of ``p`` still misses that noise, so its expected r2 against the labels is the share of the labels'
    variance that is not noise. ``p`` is estimated by the labels themselves, with the unbiased noise estimate
    ``r (1 - r) / (n - 1)`` for ``p (1 - p) / n``.

    Args:
        ratio: ``(N,)`` observed ratios ``k / n``.
        num_draws: ``n``, the draws behind each ratio, >= 2.

    Returns:
        The ceiling (``NaN`` when the labels have no variance).

    Example:
        >>> round(r2_ceiling(torch.tensor([0.0, 1.0, 0.0, 1.0]), num_draws=10), 3)  # no binomial noise at 0 or 1
        1.0
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"Expected `num_draws` to be an integer >= 2, but got {num_draws!r}")
    r = ratio.double().flatten()
    var = r.var(unbiased=False)
    if len(r) < 2 or float(var) == 0.0:
        return float("nan")
    noise = (r * (1 - r) / (num_draws - 1)).mean()
    return float(1 - noise / var)
