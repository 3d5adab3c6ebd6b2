"""Reading a study's trials back: each trial's status, epoch and test metrics and gradient flow.

The status comes from the trial's ``status.json`` (``lightning_probes.studies.runner``), the metrics from its
``CSVLogger`` files (``lightning_probes.reading``), the gradient flow from its ``GradientStatsMonitor``'s
``gradient_flow.json`` (``lightning_probes.studies.gradient_flow``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd

from lightning_probes.reading import final_values, read_epoch_metrics, read_test_metrics
from lightning_probes.studies.gradient_flow import find_gradient_flow, read_gradient_flow
from lightning_probes.studies.runner import read_status

__all__ = ["TrialResult", "collect_results"]


@dataclass
class TrialResult:
    """One trial read back.

    Args:
        trial_id: Its name.
        params: Grid key -> value.
        seed: Its seed.
        status: ``finished``, ``failed`` or ``pending`` (never ended).
        epochs: Epoch metrics (``read_epoch_metrics``).
        test: ``test/*`` metrics.
        error: The failure's error line, if any.
        gradient_flow: Its ``GradientStatsMonitor``'s ``gradient_flow.json`` (``read_gradient_flow``), if any.
    """

    trial_id: str
    params: dict[str, Any]
    seed: int
    status: str
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)
    test: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    gradient_flow: Optional[dict[str, Any]] = None

    @property
    def final(self) -> dict[str, float]:
        """Final value of every epoch metric."""
        return final_values(self.epochs)


def collect_results(trials: Sequence[Any], trials_root: str, cwd: Optional[str] = None) -> list[TrialResult]:
    """Read every trial of the study back (status from ``status.json``, metrics from the CSV logs, the gradient
    flow from ``GradientStatsMonitor``'s ``gradient_flow.json`` where there is one).

    Args:
        trials: The study's ``Trial`` objects (``trial_id``, ``params``, ``seed``).
        trials_root: ``<output>/trials``.
        cwd: Working directory the trials ran in (for a probe's relative ``output_dir``; default: the current one).
    """
    results = []
    for trial in trials:
        trial_dir = os.path.join(trials_root, trial.trial_id)
        status = read_status(trial_dir) or {}
        state = status.get("status", "pending")
        result = TrialResult(trial.trial_id, dict(trial.params), trial.seed, state, error=status.get("error"))
        if state == "finished":
            result.epochs = read_epoch_metrics(trial_dir)
            result.test = read_test_metrics(trial_dir)
            path = find_gradient_flow(trial_dir, cwd)
            result.gradient_flow = read_gradient_flow(path) if path else None
        results.append(result)
    return results
