"""Finding finished runs on disk and reading what they left: checkpoints, epoch metrics, test metrics, probes.

A *run directory* is what ``lightning fit`` leaves in a logger's folder (``runs/quickstart/version_0``): some of
``checkpoints/``, TensorBoard event files or ``metrics.csv`` (``CSVLogger``), ``probes/`` and ``config.yaml``.
A *study output* (``lightning-probes study``) holds ``trials/<trial_id>/``, each a run directory; its finished
trials (``status.json`` says ``finished``) are its runs, in the order of its ``trials.csv``. A folder holding
only ``version_<n>/`` run directories (a logger's ``name`` folder, ``runs/quickstart``) stands for all of them.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from lightning_probes.reading import read_epoch_metrics, read_test_metrics

log = logging.getLogger(__name__)

__all__ = ["RunInfo", "checkpoint_order", "discover_runs", "read_curves", "read_tensorboard_scalars"]

_VERSION = re.compile(r"^version_(\d+)$")


@dataclass
class RunInfo:
    """One finished run, as found on disk.

    Attributes:
        name: The run's name in tables and figures.
        path: Its directory.
        checkpoints: Its checkpoint files (``checkpoints/*.ckpt``), in training order (see `checkpoint_order`).
        last_checkpoint: ``last.ckpt`` when present, else the latest of ``checkpoints``; ``None`` without any.
        probes: Its ``probes/`` directory, or ``None``.
        config: Its ``config.yaml`` (saved by LightningCLI), or ``None``.
        study: The study output it belongs to, or ``None`` for a single run.
    """

    name: str
    path: str
    checkpoints: list[str] = field(default_factory=list)
    last_checkpoint: Optional[str] = None
    probes: Optional[str] = None
    config: Optional[str] = None
    study: Optional[str] = None


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def checkpoint_order(path: str) -> tuple:
    """Sort key of a checkpoint file by the ``epoch=<e>`` and ``step=<s>`` in its name (Lightning's default
    names), ``last*.ckpt`` after every other; other names in natural order."""
    name = os.path.basename(path)
    epoch = re.search(r"epoch=(\d+)", name)
    step = re.search(r"step=(\d+)", name)
    return (name.startswith("last"), int(epoch.group(1)) if epoch else -1, int(step.group(1)) if step else -1,
            _natural(name))


def _is_run(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    return bool({"checkpoints", "probes", "metrics.csv", "hparams.yaml"} & names
                or any(n.startswith("events.out.tfevents") for n in names))


def _run_info(path: str, name: str, study: Optional[str] = None) -> RunInfo:
    checkpoints = sorted(glob.glob(os.path.join(path, "checkpoints", "*.ckpt")), key=checkpoint_order)
    named_last = [c for c in checkpoints if os.path.basename(c) == "last.ckpt"]
    last = named_last[0] if named_last else checkpoints[-1] if checkpoints else None
    probes = os.path.join(path, "probes")
    config = os.path.join(path, "config.yaml")
    return RunInfo(name=name, path=path, checkpoints=checkpoints, last_checkpoint=last,
                   probes=probes if os.path.isdir(probes) else None,
                   config=config if os.path.isfile(config) else None, study=study)


def _trial_order(path: str) -> dict[str, int]:
    """Position of each trial id in the study's ``trials.csv`` (the study file's grid order), when present."""
    try:
        ids = pd.read_csv(os.path.join(path, "trials.csv"), usecols=["trial_id"])["trial_id"].astype(str).tolist()
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return {}
    return {trial: i for i, trial in enumerate(ids)}


def _study_runs(path: str, skipped: list[dict[str, str]]) -> list[RunInfo]:
    runs = []
    order = _trial_order(path)
    trials = glob.glob(os.path.join(path, "trials", "*"))
    for trial in sorted(trials, key=lambda t: (order.get(os.path.basename(t), len(order)), _natural(t))):
        if not os.path.isdir(trial):
            continue
        status_file = os.path.join(trial, "status.json")
        status = None
        if os.path.isfile(status_file):
            try:
                with open(status_file) as handle:
                    status = json.load(handle).get("status")
            except (OSError, ValueError):
                status = "unreadable status.json"
        if status != "finished":
            skipped.append({"run": trial, "reason": f"trial not finished (status: {status or 'none'})"})
            continue
        runs.append(_run_info(trial, os.path.basename(trial), study=path))
    return runs


def _run_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    if _VERSION.match(base):
        return f"{os.path.basename(os.path.dirname(os.path.normpath(path)))}/{base}"
    return base


def _make_unique(runs: list[RunInfo]) -> None:
    """Prefix clashing names with the folder that holds the study (or the run): ``quick/lr=0.1-seed=1``; the
    position in the list as a last resort."""
    def clashing() -> set[str]:
        counts = pd.Series([r.name for r in runs]).value_counts()
        return set(counts[counts > 1].index)

    clash = clashing()
    for run in runs:
        if run.name in clash:
            holder = run.study if run.study is not None else os.path.dirname(os.path.normpath(run.path))
            run.name = f"{os.path.basename(os.path.normpath(holder))}/{run.name}"
    clash = clashing()
    for i, run in enumerate(runs):
        if run.name in clash:
            run.name = f"{i}:{run.name}"


def discover_runs(paths: list[str], names: Optional[list[str]] = None) -> tuple[list[RunInfo], list[dict[str, str]]]:
    """The runs behind the ``RUN`` arguments of ``lightning-probes analyze``.

    Args:
        paths: Run directories, study outputs, or folders of ``version_<n>`` run directories.
        names: One name per run found (in order), replacing the default names: the trial id for a study's
            trials, the folder name for a run (``<parent>/version_<n>`` for a logger's version folder).

    Returns:
        The runs (names made unique by the parent folder where two clash) and the runs left out, each with its
        reason (unfinished trials).

    Raises:
        FileNotFoundError: Naming ``RUN``, for a path that is not a directory or holds no run.
        ValueError: For ``names`` whose count differs from the runs found, or repeated names.
    """
    runs: list[RunInfo] = []
    skipped: list[dict[str, str]] = []
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Expected each RUN to be a run directory or a study output, but {path!r} is not "
                                    "a directory")
        if os.path.isdir(os.path.join(path, "trials")):
            found = _study_runs(path, skipped)
        elif _is_run(path):
            found = [_run_info(path, _run_name(path))]
        else:
            versions = sorted((p for p in glob.glob(os.path.join(path, "version_*")) if _is_run(p)), key=_natural)
            found = [_run_info(p, _run_name(p)) for p in versions]
            if not found:
                raise FileNotFoundError(
                    f"Expected each RUN to be a run directory (with checkpoints/, TensorBoard events or metrics.csv, "
                    f"or probes/), a study output (with trials/) or a folder of version_<n> runs, but {path!r} is "
                    "none of these")
        runs.extend(found)
    if not runs:
        raise FileNotFoundError(f"Expected RUN arguments {paths} to hold at least one finished run, but found none ("
                                + "; ".join(f"{s['run']}: {s['reason']}" for s in skipped[:3]) + ")")
    if names is not None:
        if len(names) != len(runs):
            raise ValueError(f"Expected `names` to give one name per run found ({len(runs)}: "
                             f"{', '.join(r.name for r in runs[:8])}{' ...' if len(runs) > 8 else ''}), but got "
                             f"{len(names)} names")
        if len(set(names)) != len(names):
            raise ValueError(f"Expected `names` to be distinct, but got {names}")
        for run, name in zip(runs, names):
            run.name = name
    else:
        _make_unique(runs)
    return runs, skipped


def read_tensorboard_scalars(path: str) -> dict[str, pd.DataFrame]:
    """Every scalar of the TensorBoard event files directly in ``path``: ``{tag: DataFrame(step, value)}``
    (a step logged twice, as after a resume, keeps its latest value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    files = sorted(glob.glob(os.path.join(path, "events.out.tfevents*")), key=os.path.getmtime)
    for file in files:
        accumulator = EventAccumulator(file, size_guidance={"scalars": 0})
        try:
            accumulator.Reload()
        except Exception as err:  # a torn file of a killed run: read what can be read, say so
            log.warning("analyze: could not read all of %s (%s)", file, err)
            continue
        for tag in accumulator.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag))
    frames = {}
    for tag, rows in out.items():
        frame = pd.DataFrame(rows, columns=["step", "wall_time", "value"]).sort_values(["step", "wall_time"],
                                                                                       kind="stable")
        frames[tag] = frame.drop_duplicates("step", keep="last")[["step", "value"]].reset_index(drop=True)
    return frames


def _curves_from_tensorboard(path: str) -> tuple[pd.DataFrame, dict[str, float]]:
    scalars = read_tensorboard_scalars(path)
    if "epoch" not in scalars:
        return pd.DataFrame(), {}
    epoch_at = scalars["epoch"].set_index("step")["value"]
    columns = {}
    for tag, frame in scalars.items():
        if tag.startswith(("train/", "val/")) and not tag.endswith("_step"):
            epochs = frame["step"].map(epoch_at)
            valid = epochs.notna()
            series = pd.Series(frame["value"][valid].to_numpy(), index=epochs[valid].astype(int).to_numpy())
            columns[tag] = series.groupby(level=0).last()
    test = {tag: float(frame["value"].iloc[-1]) for tag, frame in scalars.items() if tag.startswith("test/")}
    table = pd.DataFrame(columns).sort_index() if columns else pd.DataFrame()
    table.index.name = "epoch"
    return table, test


def read_curves(run: RunInfo) -> tuple[pd.DataFrame, dict[str, float], str]:
    """A run's epoch metrics (index ``epoch``, a column per ``train/*`` / ``val/*`` metric) and its ``test/*``
    metrics.

    ``metrics.csv`` (``CSVLogger``, with the ``metrics.part<k>.csv`` of interrupted attempts) is read when
    present, else the TensorBoard event files (the epoch of each value from Lightning's ``epoch`` scalar logged
    at the same step). Test metrics come from ``test/metrics.csv`` (a study's trials), else from the same logs.

    Returns:
        ``(epochs, test, source)``; ``source`` is ``"metrics.csv"``, ``"tensorboard"`` or ``"none"``.
    """
    epochs, test, source = pd.DataFrame(), {}, "none"
    if os.path.isfile(os.path.join(run.path, "metrics.csv")):
        epochs, source = read_epoch_metrics(run.path), "metrics.csv"
        frame = pd.read_csv(os.path.join(run.path, "metrics.csv"))
        test = {c: float(frame[c].dropna().iloc[-1]) for c in frame.columns
                if c.startswith("test/") and frame[c].notna().any()}
    if epochs.empty and glob.glob(os.path.join(run.path, "events.out.tfevents*")):
        epochs, tb_test = _curves_from_tensorboard(run.path)
        source = "tensorboard" if not epochs.empty else source
        test = test or tb_test
    test = read_test_metrics(run.path) or test
    return epochs, test, source
