"""Reading a run's probe histories back as one tidy table."""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import pandas as pd

from lightning_probes.io import read_jsonl

__all__ = ["probe_files", "probes_dir", "read_probes"]

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
