"""Server-side data of the Probes tab: the probe runs under a logdir and views of their files, small enough to send.

A *run* is a directory under the logdir holding ``probes/<name>.jsonl`` (what every probe writes); its name is its
path relative to the logdir (``quickstart/version_0``). Records are read with the same rules as
`lightning_probes.read_probes` (complete lines only: a torn last line is left for the next read), cached per file
by size and modification time and read on from the last complete line when a running training appends, so a
reload costs only the new records. Views are bounded: a layer x step heatmap bins its steps into at most
``max_columns`` columns (the mean of each bin), the sign map keeps every ``k``-th column.
"""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Optional

import numpy as np

__all__ = ["ProbeRuns", "bin_columns"]

#: Record keys that are coordinates or bookkeeping, not fields to draw.
_NOT_FIELDS = {"step", "epoch", "layer", "layer_a", "layer_b", "dataloader_idx", "sampled_entries", "skipped",
               "has_previous", "units", "features", "kept_features", "groups"}
_MAX_RUNS_DEPTH = 6


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class _JsonlFile:
    """The complete records of one JSON Lines file, read on incrementally as it grows."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._stamp: tuple[int, int, int] = (-1, -1, -1)
        self._lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        try:
            stat = os.stat(self.path)
        except OSError:
            return []
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if stamp == self._stamp:
                return self.records
            if stat.st_ino != self._stamp[0] or stat.st_size < self._offset:  # replaced or rewritten: start over
                self.records, self._offset = [], 0
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1  # only complete lines; a torn tail waits for the next read
            for line in data[:end].splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # a torn line in the middle (a crash, then a resume): as read_jsonl,
                    break  # stop at it
            self._offset += end
            self._stamp = stamp
            return self.records


def bin_columns(steps: np.ndarray, values: np.ndarray, max_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin the step columns of a ``(rows, steps)`` matrix into at most ``max_columns`` columns.

    Columns are grouped ``k = ceil(steps / max_columns)`` at a time, in order; a bin's value is the mean of its
    finite values (NaN where it has none) and its step the first step of the bin.

    Returns:
        ``(bin_steps, binned)`` with ``binned`` of shape ``(rows, ceil(steps / k))``.
    """
    n = len(steps)
    k = max(1, -(-n // max_columns))
    if k == 1:
        return steps, values
    bins = -(-n // k)
    pad = bins * k - n
    padded = np.pad(values, ((0, 0), (0, pad)), constant_values=np.nan).reshape(values.shape[0], bins, k)
    finite = np.isfinite(padded)
    counts = finite.sum(axis=2)
    sums = np.where(finite, padded, 0.0).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        binned = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return steps[::k], binned


def _listed(matrix: np.ndarray) -> list[list[Optional[float]]]:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(matrix, dtype=float)]


class ProbeRuns:
    """The probe runs under a logdir and the views the tab draws.

    Args:
        logdir: TensorBoard's ``--logdir``.

    Example:
        >>> runs = ProbeRuns("runs")  # doctest: +SKIP
        >>> runs.heatmap("quickstart/version_0", "gradient_stats", "grad_norm")["layers"]  # doctest: +SKIP
    """

    def __init__(self, logdir: Optional[str]):
        self.logdir = os.path.abspath(logdir) if logdir else None
        self._files: dict[str, _JsonlFile] = {}
        self._lock = threading.Lock()

    # -- runs and files ------------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Names (paths relative to the logdir, ``/``-separated) of the directories holding ``probes/*.jsonl``."""
        if not self.logdir or not os.path.isdir(self.logdir):
            return []
        found = []
        for directory, subdirs, _ in os.walk(self.logdir):
            depth = os.path.relpath(directory, self.logdir).count(os.sep)
            if "probes" in subdirs and self._has_jsonl(os.path.join(directory, "probes")):
                rel = os.path.relpath(directory, self.logdir)
                found.append("." if rel == "." else rel.replace(os.sep, "/"))
            subdirs[:] = sorted(d for d in subdirs if d not in ("probes", "checkpoints") and not d.startswith("."))
            if depth >= _MAX_RUNS_DEPTH:
                subdirs[:] = []
        return sorted(found)

    @staticmethod
    def _has_jsonl(directory: str) -> bool:
        try:
            return any(f.endswith(".jsonl") for f in os.listdir(directory))
        except OSError:
            return False

    def _probes_dir(self, run: str) -> str:
        if run not in self.runs():
            raise KeyError(f"unknown run {run!r}")
        return os.path.join(self.logdir, *run.split("/"), "probes")

    def probe_names(self, run: str) -> list[str]:
        """The probes of a run (as `lightning_probes.reading.probe_files` lists them)."""
        from lightning_probes.reading import probe_files

        return sorted(probe_files(self._probes_dir(run)))

    def records(self, run: str, probe: str) -> list[dict[str, Any]]:
        """The complete records of ``<run>/probes/<probe>.jsonl``, cached by file size and modification time."""
        if probe not in self.probe_names(run):
            raise KeyError(f"unknown probe {probe!r} of run {run!r}")
        path = os.path.join(self._probes_dir(run), probe + ".jsonl")
        with self._lock:
            file = self._files.setdefault(path, _JsonlFile(path))
        return file.read()

    # -- what each probe offers ----------------------------------------------------------------------
    def fields(self, run: str) -> dict[str, dict[str, Any]]:
        """``{probe: {"kind": ..., "fields": [...]}}``: ``layer`` probes (records with a ``layer``: heatmaps of their
        numeric fields), ``pairs`` (records with ``layer_a``/``layer_b``: matrices per epoch), ``confidence``
        (records with a ``reliability``), ``scalar`` (anything else: one row)."""
        out = {}
        for probe in self.probe_names(run):
            records = self.records(run, probe)
            kind = "scalar"
            if any("layer" in r for r in records):
                kind = "layer"
            elif any("layer_a" in r for r in records):
                kind = "pairs"
            elif any("reliability" in r for r in records):
                kind = "confidence"
            names = dict.fromkeys(k for r in records for k in r if k not in _NOT_FIELDS)
            fields = [f for f in names if any(_number(r.get(f)) is not None for r in records)]
            entry: dict[str, Any] = {"kind": kind, "fields": fields, "records": len(records)}
            if kind == "confidence":
                entry["stages"] = sorted({str(r.get("stage")) for r in records})
            entry["sign_map"] = os.path.exists(os.path.join(self._probes_dir(run), probe, "sign_map.npz"))
            out[probe] = entry
        return out

    # -- views ---------------------------------------------------------------------------------------
    def heatmap(self, run: str, probe: str, field: str, max_columns: int = 1000) -> dict[str, Any]:
        """Layer x step matrix of ``field``: rows the layers in the order they first appear, columns the logged
        steps (binned to at most ``max_columns``; a repeated (layer, step), e.g. after a resume, keeps the last)."""
        records = self.records(run, probe)
        layers: dict[str, int] = {}
        steps: dict[int, None] = {}
        cells: dict[tuple[str, int], float] = {}
        for record in records:
            layer, step = record.get("layer"), record.get("step")
            if layer is None or step is None:
                continue
            layers.setdefault(str(layer), len(layers))
            steps.setdefault(int(step), None)
            value = _number(record.get(field))
            cells[(str(layer), int(step))] = np.nan if value is None else value
        step_axis = np.array(sorted(steps), dtype=np.int64)
        column = {s: i for i, s in enumerate(step_axis.tolist())}
        matrix = np.full((len(layers), len(step_axis)), np.nan)
        for (layer, step), value in cells.items():
            matrix[layers[layer], column[step]] = value
        bin_steps, binned = bin_columns(step_axis, matrix, max(1, int(max_columns)))
        finite = binned[np.isfinite(binned)]
        return {"run": run, "probe": probe, "field": field, "layers": list(layers), "steps": bin_steps.tolist(),
                "total_steps": len(step_axis), "bin": max(1, -(-len(step_axis) // max(1, int(max_columns)))),
                "values": _listed(binned),
                "min": float(finite.min()) if finite.size else None,
                "max": float(finite.max()) if finite.size else None,
                "min_positive": float(finite[finite > 0].min()) if (finite > 0).any() else None}

    def matrix(self, run: str, probe: str, field: str, epoch: Optional[int] = None) -> dict[str, Any]:
        """Layer x layer matrix of a pairs probe's ``field`` (``cka``, ``mean_abs_correlation``) at ``epoch``
        (default the last), filled symmetrically; with the epochs there are."""
        records = [r for r in self.records(run, probe) if "layer_a" in r]
        epochs = sorted({int(r["epoch"]) for r in records if r.get("epoch") is not None})
        if not epochs:
            return {"run": run, "probe": probe, "field": field, "epochs": [], "epoch": None, "layers": [],
                    "values": []}
        chosen = epochs[-1] if epoch is None or int(epoch) not in epochs else int(epoch)
        at = [r for r in records if r.get("epoch") == chosen]
        layers = list(dict.fromkeys([str(r["layer_a"]) for r in at] + [str(r["layer_b"]) for r in at]))
        index = {name: i for i, name in enumerate(layers)}
        matrix = np.full((len(layers), len(layers)), np.nan)
        for r in at:
            value = _number(r.get(field))
            value = np.nan if value is None else value
            matrix[index[str(r["layer_a"])], index[str(r["layer_b"])]] = value
            matrix[index[str(r["layer_b"])], index[str(r["layer_a"])]] = value
        return {"run": run, "probe": probe, "field": field, "epochs": epochs, "epoch": chosen, "layers": layers,
                "values": _listed(matrix)}

    def sign_map(self, run: str, probe: str = "gradient_dynamics", max_columns: int = 2000) -> dict[str, Any]:
        """The gradient-sign map rows of ``<probe>/sign_map.npz`` (epochs x sampled entries; categories 0 |g| >
        threshold, 1 small negative, 2 small positive, 3 zero), every ``k``-th column kept."""
        path = os.path.join(self._probes_dir(run), probe, "sign_map.npz")
        if not os.path.exists(path):
            return {"run": run, "probe": probe, "epochs": [], "rows": [], "columns": 0, "stride": 1}
        with np.load(path, allow_pickle=False) as data:
            rows, epochs = np.asarray(data["rows"]), np.asarray(data["epochs"])
        stride = max(1, -(-rows.shape[1] // max(1, int(max_columns)))) if rows.ndim == 2 and rows.size else 1
        shown = rows[:, ::stride] if rows.ndim == 2 else rows.reshape(0, 0)
        return {"run": run, "probe": probe, "epochs": epochs.tolist(), "rows": shown.astype(int).tolist(),
                "columns": int(rows.shape[1]) if rows.ndim == 2 else 0, "stride": stride}

    def confidence(self, run: str, probe: str = "confidence", stage: str = "val",
                   epoch: Optional[int] = None) -> dict[str, Any]:
        """Reliability diagram (per bin: count, mean confidence, accuracy) and confusion matrix of one
        ``stage``'s record at ``epoch`` (default the last; the first dataloader)."""
        records = [r for r in self.records(run, probe)
                   if str(r.get("stage")) == stage and int(r.get("dataloader_idx") or 0) == 0 and "reliability" in r]
        epochs = sorted({int(r["epoch"]) for r in records})
        if not epochs:
            return {"run": run, "probe": probe, "stage": stage, "epochs": [], "epoch": None}
        chosen = epochs[-1] if epoch is None or int(epoch) not in epochs else int(epoch)
        record = [r for r in records if int(r["epoch"]) == chosen][-1]
        rel = record["reliability"]
        count = np.asarray(rel["count"], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(count > 0, np.asarray(rel["confidence_sum"], dtype=float) / count, np.nan)
            accuracy = np.where(count > 0, np.asarray(rel["correct_sum"], dtype=float) / count, np.nan)
        confusion = record.get("confusion_matrix")
        return {"run": run, "probe": probe, "stage": stage, "epochs": epochs, "epoch": chosen,
                "ece": _number(record.get("ece")), "accuracy": _number(record.get("accuracy")),
                "bins": len(count), "count": count.tolist(), "confidence": _listed([confidence])[0],
                "accuracy_per_bin": _listed([accuracy])[0],
                "confusion": confusion if confusion is not None else None,
                "confusion_format": record.get("confusion_format", "dense")}

