"""Records held in memory and written to a probe's JSON Lines file in bulk (`RecordBuffer`).

Writing every record as it comes (one ``write`` and one flush per logged step and probe) costs more than many
statistics do. A `RecordBuffer` keeps the records of a probe in order, plain records and deferred ones (a callable
that makes its records at flush time, optionally from a tensor block moved to the host then), and writes them in
one append when its oldest record is ``flush_every_n_steps`` optimiser steps or ``flush_secs`` seconds old, or when
asked (`ProbeCallback` asks before every checkpoint, at epoch ends, on an exception, at teardown and at exit).

Example:
    >>> import os, tempfile
    >>> from lightning_probes.io import JsonlWriter, read_jsonl
    >>> path = os.path.join(tempfile.mkdtemp(), "probe.jsonl")
    >>> buffer = RecordBuffer(JsonlWriter(path), flush_every_n_steps=3, flush_secs=None)
    >>> buffer.add([{"step": 0}], step=0)
    False
    >>> buffer.add([{"step": 2}], step=2)  # the buffer now spans 3 steps: written
    True
    >>> [r["step"] for r in read_jsonl(path)]
    [0, 2]
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch

from lightning_probes.io import JsonlWriter

log = logging.getLogger(__name__)

__all__ = ["Produce", "RecordBuffer"]

#: A deferred producer: ``produce()`` or, with a block, ``produce(block_on_host)``; returns the records.
Produce = Callable[..., Iterable[Mapping[str, Any]]]
_Entry = Union[list, tuple]  # a list of records, or (produce, block or None)


class RecordBuffer:
    """An ordered buffer of one probe's records in front of its `JsonlWriter`.

    Args:
        writer: The file the records go to.
        flush_every_n_steps: Write once the buffered records span this many optimiser steps (their oldest record's
            step to the newest's, inclusive): 1 writes every record as it comes. ``None``: no step limit.
        flush_secs: Write once the oldest buffered record is this many seconds old (checked when a record comes).
            ``None``: no time limit.
    """

    def __init__(self, writer: JsonlWriter, flush_every_n_steps: Optional[int], flush_secs: Optional[float]) -> None:
        self.writer = writer
        self.flush_every_n_steps = flush_every_n_steps
        self.flush_secs = flush_secs
        self._entries: list[_Entry] = []
        self._oldest_step: Optional[int] = None
        self._oldest_time = 0.0
        _LIVE.add(self)

    def __len__(self) -> int:
        """Buffered entries (a deferred producer counts as one)."""
        return len(self._entries)

    def add(self, records: Iterable[Mapping[str, Any]], step: int) -> bool:
        """Buffer plain records of optimiser step ``step``; returns whether this wrote the buffer."""
        records = list(records)
        if not records:
            return False
        self._entries.append(records)
        return self._after_add(step)

    def defer(self, produce: Produce, step: int, block: Optional[torch.Tensor] = None) -> bool:
        """Buffer a producer called at the flush (see `ProbeCallback.defer_records`); returns whether this wrote."""
        self._entries.append((produce, None if block is None else block.detach()))
        return self._after_add(step)

    def _after_add(self, step: int) -> bool:
        if self._oldest_step is None:
            self._oldest_step, self._oldest_time = step, time.monotonic()
        if self.due(step):
            self.flush()
            return True
        return False

    def due(self, step: int) -> bool:
        """Whether the buffer should be written now that a record of ``step`` came."""
        if not self._entries:
            return False
        n = self.flush_every_n_steps
        if n is not None and step - self._oldest_step >= n - 1:
            return True
        return self.flush_secs is not None and time.monotonic() - self._oldest_time >= self.flush_secs

    def flush(self) -> int:
        """Make the deferred records, write everything buffered in one append, and empty the buffer.

        Returns:
            The number of records written.
        """
        if not self._entries:
            return 0
        entries, self._entries = self._entries, []
        self._oldest_step = None
        hosts = _to_host([entry[1] for entry in entries if isinstance(entry, tuple) and entry[1] is not None])
        records: list[Mapping[str, Any]] = []
        for entry in entries:
            if isinstance(entry, list):
                records.extend(entry)
            elif entry[1] is None:
                records.extend(entry[0]())
            else:
                records.extend(entry[0](next(hosts)))
        self.writer.write(records)
        return len(records)

    def discard(self) -> None:
        """Drop the buffered records unwritten."""
        self._entries, self._oldest_step = [], None


def _to_host(blocks: list[torch.Tensor]) -> Iterable[torch.Tensor]:
    """The blocks on the CPU, in order: one device-to-host copy per (device, dtype) group, not one per block."""
    out: list[Optional[torch.Tensor]] = [None] * len(blocks)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, block in enumerate(blocks):
        if block.device.type == "cpu":
            out[i] = block
        else:
            groups.setdefault((block.device, block.dtype), []).append(i)
    for indices in groups.values():
        flat = torch.cat([blocks[i].reshape(-1) for i in indices]).cpu()  # the one transfer of the group
        for i, part in zip(indices, flat.split([blocks[i].numel() for i in indices])):
            out[i] = part.view(blocks[i].shape)
    return iter(out)


#: Buffers of this process that may hold records, weakly referenced: written at interpreter exit.
_LIVE: weakref.WeakSet[RecordBuffer] = weakref.WeakSet()


@atexit.register
def flush_all_at_exit() -> None:
    """Write every live buffer (a run that ends without teardown, e.g. an interactive session that exits)."""
    for buffer in list(_LIVE):
        try:
            buffer.flush()
            buffer.writer.close()
        except Exception as err:  # noqa: BLE001 (at exit, a failing producer must not hide the others' records)
            log.warning("Could not write the buffered records of %s at exit: %s", buffer.writer.path, err)
