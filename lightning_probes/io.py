"""Durable output: JSON Lines flushed per write, and summary files written atomically (temp file + rename)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any, Optional

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """Make NumPy/torch scalars JSON-friendly; non-finite floats become ``null`` (JSON has no NaN)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _dumps(record: Mapping[str, Any]) -> str:
    """One JSON line; the slow conversion runs only for records holding NaN/inf or NumPy/torch values."""
    try:
        return json.dumps(record, allow_nan=False)
    except (ValueError, TypeError):
        return json.dumps(_jsonable(record))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, json.dumps(_jsonable(obj), indent=2).encode())


def render_png(fig: Any, dpi: int = 90) -> bytes:
    """Render a matplotlib figure to PNG bytes (one draw)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def decode_png(png: bytes) -> Any:
    """PNG bytes to an ``(H, W, 3)`` uint8 array, for image loggers."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def atomic_save_npz(path: str, **arrays: Any) -> None:
    """Save NumPy arrays to an ``.npz`` file, atomically."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Read the complete records of a JSON Lines file (a torn last line, from a crash, is skipped)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class JsonlWriter:
    """Append-only JSON Lines file; every ``write`` ends in a flush, so a crash loses no finished record.

    The file opens lazily on the first write. On a fresh start an existing non-empty file is renamed aside
    (``name.<timestamp>.jsonl``), never overwritten; a writer closed and reopened (fit, then test) appends. On
    resume, ``keep_first(n)`` cuts the file back to the ``n`` records that existed when the checkpoint was
    taken, so replayed steps are not duplicated.

    Args:
        path: Path of the ``.jsonl`` file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle: Optional[io.TextIOWrapper] = None
        self.records_written = 0
        self._resume_count: Optional[int] = None
        self._started = False  # after the first open, reopening (a later stage) appends

    def keep_first(self, count: int) -> None:
        """On the next open, keep only the first ``count`` records of the existing file (resume)."""
        self._resume_count = int(count)

    def _open(self) -> io.TextIOWrapper:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self._resume_count is not None:
            records = read_jsonl(self.path)
            if len(records) < self._resume_count:
                log.warning("%s holds %d records, fewer than the %d the checkpoint expects; appending after them",
                            self.path, len(records), self._resume_count)
            kept = records[: self._resume_count]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            self.records_written = self._resume_count
            self._resume_count = None
        elif not self._started and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            root, ext = os.path.splitext(self.path)
            aside = f"{root}.{time.strftime('%Y%m%d-%H%M%S')}{ext}"
            os.replace(self.path, aside)
            log.warning("%s existed from an earlier run; moved it to %s", self.path, aside)
        self._started = True
        return open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records (one JSON object per line) and flush."""
        lines = [_dumps(r) + "\n" for r in records]
        if not lines:
            return
        if self._handle is None:
            self._handle = self._open()
        self._handle.write("".join(lines))
        self._handle.flush()
        self.records_written += len(lines)

    def close(self) -> None:
        """Close the file; a later ``write`` reopens it in append mode."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._resume_count = None
