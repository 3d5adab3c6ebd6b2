"""Reading a run back: its probe histories as one tidy table, its epoch and test metrics from the CSV logs.

Metrics come from the run's ``CSVLogger`` files, read with pandas: ``metrics.csv`` (plus the ``metrics.part<k>.csv``
of earlier, interrupted attempts a study keeps, in order, a later attempt's value of an epoch winning) for the
epoch metrics (``train/*`` and ``val/*``, one value per epoch), ``test/metrics.csv`` for ``test/*``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from typing import Optional, Union

import pandas as pd

from lightning_probes.io import read_jsonl

__all__ = ["final_values", "probe_files", "probes_dir", "read_epoch_metrics", "read_probes", "read_test_metrics"]

EPOCH_PREFIXES = ("train/", "val/")
TEST_PREFIX = "test/"

# Files moved aside by a fresh run that found an earlier history (`name.<YYYYmmdd-HHMMSS>.jsonl`).
_ASIDE = re.compile(r"\.\d{8}-\d{6}$")


def probes_dir(run_dir: Union[str, os.PathLike]) -> str:
    """The probes directory of a run: ``<run_dir>/probes``, or ``run_dir`` itself when it holds probe JSONL.

    Raises:
        FileNotFoundError: ``run_dir`` holds neither.
    """
    run_dir = os.fspath(run_dir)
    candidate = os.path.join(run_dir, "probes")
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(run_dir) and any(f.endswith(".jsonl") for f in os.listdir(run_dir)):
        return run_dir
    raise FileNotFoundError(f"Expected `run_dir` to be a run directory holding `probes/` (e.g. "
                            f"runs/quickstart/version_0) or a probes directory, but {run_dir!r} holds neither")


def probe_files(run_dir: Union[str, os.PathLike]) -> dict[str, str]:
    """``{probe name: path of its .jsonl}`` in a run (files moved aside by a later fresh run are left out)."""
    directory = probes_dir(run_dir)
    files = {}
    for filename in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(filename)
        if ext == ".jsonl" and not _ASIDE.search(stem):
            files[stem] = os.path.join(directory, filename)
    return files


def read_probes(run_dir: Union[str, os.PathLike], probe: Optional[str] = None) -> pd.DataFrame:
    """One tidy table of a run's probe records: one row per record, nested fields flattened.

    A resumed run's probe files hold the whole history (see the README), so the table covers the run from its
    first step. Nested objects become dotted columns (``reliability.count``); lists (confusion matrices,
    per-class values) stay lists in their cells. A torn last line, left by a crash, is skipped.

    Args:
        run_dir: A run directory holding ``probes/`` (such as ``runs/quickstart/version_0``), or the probes
            directory itself.
        probe: The probe's ``name`` (its file stem, e.g. ``"gradient_stats"``); ``None`` reads every probe and
            adds a ``probe`` column.

    Returns:
        A ``pandas.DataFrame``; empty when the probe has written nothing yet.

    Raises:
        FileNotFoundError: ``run_dir`` holds no probe output.
        ValueError: ``probe`` is not a probe of this run (the message lists those that are).

    Example:
        >>> df = read_probes("runs/quickstart/version_0", "gradient_stats")  # doctest: +SKIP
        >>> df[df.layer == "__total__"].plot(x="step", y="grad_norm")  # doctest: +SKIP
    """
    files = probe_files(run_dir)
    if probe is not None:
        if probe not in files:
            raise ValueError(f"Expected `probe` to be one of {sorted(files)} (the probes of {run_dir}), "
                             f"but got {probe!r}")
        files = {probe: files[probe]}
    frames = []
    for name, path in files.items():
        frame = pd.json_normalize(read_jsonl(path), sep=".")
        if probe is None:
            frame.insert(0, "probe", name)
        frames.append(frame)
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


def _read_csvs(paths: Sequence[str]) -> pd.DataFrame:
    frames = []
    for order, path in enumerate(paths):
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.EmptyDataError):
            continue
        frame = frame.copy()  # consolidate: a wide CSV (every probe scalar) reads into many blocks
        frame["_attempt"] = order
        frames.append(frame)
    return pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()


def _metric_files(directory: str) -> list[str]:
    parts = sorted(glob.glob(os.path.join(directory, "metrics.part*.csv")),
                   key=lambda p: int(re.search(r"part(\d+)\.csv$", p).group(1)))
    current = os.path.join(directory, "metrics.csv")
    return parts + ([current] if os.path.isfile(current) else [])


def read_epoch_metrics(run_dir: str) -> pd.DataFrame:
    """The run's epoch metrics: one row per epoch (index ``epoch``), one column per ``train/*``/``val/*`` metric.

    Args:
        run_dir: The run (or study trial) directory (``CSVLogger`` wrote ``metrics.csv`` there).

    Returns:
        A DataFrame sorted by epoch; empty if nothing was logged. For each epoch and metric, the value of the
        latest attempt (a resumed run logs the epochs after its checkpoint again).
    """
    frame = _read_csvs(_metric_files(run_dir))
    if frame.empty or "epoch" not in frame:
        return pd.DataFrame()
    columns = sorted(c for c in frame.columns if c.startswith(EPOCH_PREFIXES) and not c.endswith("_step"))
    frame = frame.dropna(subset=["epoch"])
    frame = frame[frame[columns].notna().any(axis=1)] if columns else frame.iloc[0:0]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame.assign(epoch=frame["epoch"].astype(int)).sort_values(["epoch", "_attempt"], kind="stable")
    table = frame.groupby("epoch")[columns].last()  # last non-null: the latest attempt wins
    return table.sort_index()


def read_test_metrics(run_dir: str) -> dict[str, float]:
    """The run's ``test/*`` metrics (last logged value of each), from ``<run_dir>/test/metrics.csv``."""
    frame = _read_csvs(_metric_files(os.path.join(run_dir, "test")))
    out: dict[str, float] = {}
    for column in sorted(c for c in frame.columns if c.startswith(TEST_PREFIX)):
        values = frame[column].dropna()
        if len(values):
            out[column] = float(values.iloc[-1])
    return out


def final_values(epochs: pd.DataFrame) -> dict[str, float]:
    """The last logged value of every epoch metric."""
    out = {}
    for column in epochs.columns:
        values = epochs[column].dropna()
        if len(values):
            out[column] = float(values.iloc[-1])
    return out
