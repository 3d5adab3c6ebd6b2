"""Studies: a grid of configs x seeds run as ordinary LightningCLI trials, then aggregated over seeds.

``spec`` reads and validates study files, ``trials`` expands one into trials (grid x seeds or seeded draws),
``trial_config`` resolves and checks each trial's config, ``runner`` runs trials (engines ``sequential`` and
``ray``), ``results`` reads the trials back, ``aggregate`` builds ``trials.csv``/``summary.json``/``summary.md``,
``gradient_flow`` averages the trials' gradient flows, ``figures`` draws.
``prepare_study``/``write_study_summary`` tie them together for ``lightning-probes study``
(``lightning_probes.commands.study``); ``unfinished_trials`` tells, without resolving any config, whether a study
has any trial left to run (a rerun of a finished study starts no worker).

Example:
    >>> study = prepare_study("configs/studies/quick.yaml")  # doctest: +SKIP
    >>> run_sequential(study.jobs)  # doctest: +SKIP
    >>> write_study_summary(study)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from lightning_probes.io import atomic_write_bytes, atomic_write_json
from lightning_probes.studies.aggregate import build_summary, summary_markdown, trials_table
from lightning_probes.studies.importance import importance_summary
from lightning_probes.studies.results import collect_results
from lightning_probes.studies.runner import TrialJob, is_finished, read_status, run_ray, run_trial
from lightning_probes.studies.spec import StudyError, StudySpec, load_study
from lightning_probes.studies.trial_config import TrialConfigResolver, config_digest
from lightning_probes.studies.trials import Trial, expand_trials, sampled_keys, tune_search_space
from lightning_probes.studies.workers import run_sequential

log = logging.getLogger(__name__)

__all__ = ["PreparedStudy", "StudyError", "StudySpec", "Trial", "TrialJob", "expand_trials", "load_study",
           "prepare_study", "run_ray", "run_sequential", "run_trial", "tune_search_space", "unfinished_trials",
           "write_study_summary"]


@dataclass
class PreparedStudy:
    """A validated study with its trials' configs resolved (and, unless a dry run, written).

    Args:
        spec: The study file.
        trials: Its trials, in order.
        jobs: One ``TrialJob`` per trial.
        configs: ``trial_id`` -> resolved config.
    """

    spec: StudySpec
    trials: list[Trial]
    jobs: list[TrialJob]
    configs: dict[str, dict[str, Any]]

    @property
    def trials_root(self) -> str:
        """``<output>/trials``."""
        return os.path.join(self.spec.output, "trials")


def unfinished_trials(path: str, output: Optional[str] = None, num_samples: Optional[int] = None) -> list[Trial]:
    """The study's trials whose ``status.json`` does not say ``finished``, in order.

    Reads the study file and the trials' ``status.json`` only (milliseconds: no config is resolved, no
    LightningCLI parser is built), so that the command can decide whether to start trial workers at all before
    ``prepare_study`` resolves the configs.

    Args:
        path: The study file.
        output: Output directory overriding the study file's.
        num_samples: Draws of a ``sample:`` study, overriding its file's ``num_samples``.

    Raises:
        StudyError: A bad study file, with one message.
    """
    spec = load_study(path, output, num_samples=num_samples)
    return [trial for trial in expand_trials(spec)
            if not is_finished(os.path.join(spec.output, "trials", trial.trial_id))]


def prepare_study(path: str, output: Optional[str] = None, write: bool = True,
                  cwd: Optional[str] = None, num_samples: Optional[int] = None) -> PreparedStudy:
    """Load and validate a study file and resolve every trial's config before any trial starts.

    Finished trials keep the ``config.yaml`` they ran with; the others get theirs (re)written when ``write``.

    Args:
        path: The study file.
        output: Output directory overriding the study file's.
        write: Write ``trials/<trial_id>/config.yaml`` (``False`` for a dry run).
        cwd: Working directory of the trials' processes (default: the current one).
        num_samples: Draws of a ``sample:`` study, overriding its file's ``num_samples``.

    Raises:
        StudyError: A bad study file, with one message.
    """
    spec = load_study(path, output, num_samples=num_samples)
    trials = expand_trials(spec)
    resolver = TrialConfigResolver(spec)
    cwd = os.path.abspath(cwd or os.getcwd())
    configs, jobs = {}, []
    for trial in trials:
        trial_dir = os.path.join(spec.output, "trials", trial.trial_id)
        config = resolver.resolve(trial, trial_dir)
        configs[trial.trial_id] = config
        digest = config_digest(config)
        jobs.append(TrialJob(trial.trial_id, trial_dir, dict(trial.params), trial.seed, spec.test, cwd,
                             config_digest=digest))
        if not write:
            continue
        if is_finished(trial_dir):
            previous = (read_status(trial_dir) or {}).get("config_digest")
            if previous and previous != digest:
                log.warning("trial %s finished with a different config than the study file gives now; it is "
                            "kept as it is (delete %s to run it again)", trial.trial_id, trial_dir)
            continue
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
        atomic_write_bytes(os.path.join(trial_dir, "config.yaml"), text.encode())
    return PreparedStudy(spec, trials, jobs, configs)


def write_study_summary(study: PreparedStudy, figures: bool = True) -> dict[str, Any]:
    """Rebuild ``trials.csv``, ``summary.json``, ``summary.md`` and the figures from every finished trial.

    Trials that ran a ``GradientStatsMonitor`` add a ``gradient_flow`` section to ``summary.json`` and the figure
    ``figures/gradient_flow.png``. When a key varies, the ``importance`` section
    (``lightning_probes.studies.importance``) says which keys decided the monitor, with the figures
    ``figures/parallel_coordinates.png`` and ``figures/importance.png``.

    Returns:
        The summary (as in ``summary.json``).
    """
    spec = study.spec
    cwd = study.jobs[0].cwd if study.jobs else None
    results = collect_results(study.trials, study.trials_root, cwd=cwd)
    grid_keys = sampled_keys(spec)
    table = trials_table(results, grid_keys)
    atomic_write_bytes(os.path.join(spec.output, "trials.csv"), table.to_csv(index=False).encode())
    summary = build_summary(results, grid_keys, spec.monitor, spec.mode, name=spec.name)
    summary["study_file"] = spec.path
    try:
        importance = importance_summary(results, grid_keys, spec.monitor, sampled=bool(spec.sample))
    except Exception as err:  # a view of the trials: never lose the tables for it
        log.warning("could not compute the hyper-parameter importance: %s", err)
        importance = None
    if importance is not None:
        summary["importance"] = importance
    atomic_write_json(os.path.join(spec.output, "summary.json"), summary)
    atomic_write_bytes(os.path.join(spec.output, "summary.md"), summary_markdown(summary).encode())
    if figures:
        from lightning_probes.studies.figures import write_figures

        try:
            write_figures(spec.output, summary, results, spec.smoothing, sampled=bool(spec.sample))
        except Exception as err:  # figures are a view of summary.json: never lose the tables for them
            log.warning("could not draw the study's figures: %s", err)
    return summary
