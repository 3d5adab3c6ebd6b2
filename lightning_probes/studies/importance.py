"""What mattered across the trials: the ``importance`` section of a study's ``summary.json`` and ``summary.md``.

The metric is each finished trial's final value of the study's ``monitor``. A grid study gets the exact variance
decomposition of ``lightning_probes.functional.variance_shares`` (each grid key's main effect, the interactions, the
seeds); a sampled study gets ``forest_importance`` (permutation importance of a random forest, with its out-of-bag r2),
its drawn ``seed`` included as one more column: a key that scores no better than the seed explains nothing. Why each:
see ``lightning_probes.functional.importance``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from lightning_probes.functional.importance import forest_importance, variance_shares

__all__ = ["importance_markdown", "importance_summary", "trial_points"]


def trial_points(results: Sequence[Any], keys: Sequence[str], monitor: str,
                 with_seed: bool = False) -> tuple[dict[str, list[Any]], list[float]]:
    """The finished trials with a finite final ``monitor``: key -> values (``seed`` too if asked), and the metric."""
    columns: dict[str, list[Any]] = {k: [] for k in keys}
    if with_seed:
        columns["seed"] = []
    metric = []
    for r in results:
        value = r.final.get(monitor) if r.status == "finished" else None
        if value is None or not math.isfinite(value):
            continue
        for k in keys:
            columns[k].append(r.params.get(k))
        if with_seed:
            columns["seed"].append(r.seed)
        metric.append(float(value))
    return columns, metric


def importance_summary(results: Sequence[Any], keys: Sequence[str], monitor: str,
                       sampled: bool) -> Optional[dict[str, Any]]:
    """The ``importance`` section, or ``None`` when nothing varies or too few trials finished.

    Args:
        results: The study's ``TrialResult`` objects.
        keys: The grid (or drawn) keys.
        monitor: The metric (final epoch value of each trial).
        sampled: The study draws its trials (``sample:``) rather than walking a grid.
    """
    columns, metric = trial_points(results, keys, monitor, with_seed=sampled)
    if len(metric) < 2:
        return None
    if sampled:
        out = forest_importance(columns, metric)
        if out is None:
            return None
    else:
        varied = {k: v for k, v in columns.items() if len({repr(x) for x in v}) > 1}
        if not varied:
            return None
        out = variance_shares(varied, metric)
        out["method"] = "variance decomposition of the grid (main effects, interactions, seeds)"
    out["monitor"] = monitor
    out["keys"] = list(out["importance"] if sampled else out["shares"])
    return out


def importance_markdown(section: Mapping[str, Any]) -> list[str]:
    """The ``summary.md`` lines of the ``importance`` section."""
    monitor = section["monitor"]
    lines = [f"## What mattered: `{monitor}` across {section['n']} finished trials", ""]
    if "importance" in section:
        lines += [f"Permutation importance: the drop of held-out r2 when a key's values are shuffled, mean ± std "
                  f"over cross-validation folds, of a random forest ({section['n_estimators']} trees) fitted on the "
                  f"trials. The forest's out-of-bag r2 is {section['oob_r2']:.3f} (cross-validated r2 "
                  f"{section['cv_r2']:.3f}): the share of `{monitor}`'s variance the keys explain together. The "
                  f"drawn `seed` is a column too: a key no more important than it explains nothing.", "",
                  "| key | importance (r2 drop) |", "|---|---|"]
        for key, value in section["importance"].items():
            lines.append(f"| {key} | {value['mean']:.4f} ± {value['std']:.4f} |")
    else:
        lines += [f"Variance decomposition: the share of `{monitor}`'s variance over the trials explained by each "
                  f"key's main effect (its level means, eta squared), by the interactions between keys, and left "
                  f"between the seeds of one grid point."
                  + ("" if section["balanced"] else " The grid is unbalanced (failed trials): the parts need not add "
                                                    "up to 1."), "",
                  "| part | share of variance |", "|---|---|"]
        for key, share in sorted(section["shares"].items(), key=lambda kv: -_orderable(kv[1])):
            lines.append(f"| {key} | {_share(share)} |")
        lines.append(f"| interactions | {_share(section['interactions'])} |")
        lines.append(f"| seeds | {_share(section['seeds'])} |")
    return lines


def _orderable(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _share(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}"
