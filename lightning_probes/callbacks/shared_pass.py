"""One forward pass over the probe set for every representation probe that analyses at the same moment.

`LayerCorrelationMonitor`, `ActivationStatsMonitor` and `AlignmentMonitor` each stream a pass over the probe set
into accumulators ("sessions": ``start_session()``, ``session.consume_layer(name, tensor, batch)`` inside each
layer's forward hook, ``session.end_batch(batch)`` after each forward, ``session.finish()``).
When several of them analyse at the same hook and epoch, the first one (in callback order) runs ONE pass for all:
it hooks the union of their layers (outputs, and the inputs AlignmentMonitor needs), feeds each probe's session
with its own layers from the same forward, and leaves the fed sessions with the other probes, which finish them
(records, scalars, figures) at their own hook as before. A probe alone runs its own pass.

Probes share a pass only when everything that decides the pass matches (`pass_key`): the probe set (``num_samples``,
``seed``, ``search_batches``, ``target_key``), the forward (``forward_fn``, ``input_key``) and ``batch_size``;
probes with other settings or another schedule run their own pass. `AugmentationInvarianceMonitor` runs its own
passes (its inputs are augmented views, not the probe set).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from lightning_probes.capture import _WARNED_REPEAT, uncompiled
from lightning_probes.probe_data import LayerOutputError
from lightning_probes.probe_data import batch_size as samples_in

log = logging.getLogger(__name__)


def pass_key(probe: Any) -> tuple:
    """What decides a probe's pass: probes with equal keys see the same batches through the same forward."""
    return (probe.num_samples, probe.seed, probe.search_batches, probe.target_key, probe.input_key,
            id(probe.forward_fn) if probe.forward_fn is not None else None, probe.batch_size)


def partners(trainer: pl.Trainer, probe: Any, epoch: int) -> list[Any]:
    """The probes after ``probe`` in ``trainer.callbacks`` that analyse this ``epoch`` with the same `pass_key` and
    have passed their layer check (a probe waiting for lazy modules runs its own pass after its check)."""
    callbacks = list(trainer.callbacks)
    if probe not in callbacks:
        return []
    key = pass_key(probe)
    later = callbacks[callbacks.index(probe) + 1:]
    return [p for p in later if getattr(p, "shares_pass", False) and p.active and p.due(epoch)
            and not getattr(p, "_deferred", False) and pass_key(p) == key]  # deferred: its layer check is to come


def run_shared_pass(trainer: pl.Trainer, pl_module: pl.LightningModule, probes: list[Any]) -> list[Any]:
    """One pass over the first probe's probe set feeding every probe's new session; returns the sessions.

    The pass streams: each hooked layer's output (or input) is handed to the sessions that read it inside its
    forward hook (``session.consume_layer(name, tensor, batch)``), before the next layer runs, and is neither
    cloned nor kept; after each forward ``session.end_batch(batch)``. So the pass holds one batch's activations
    (the model's own) and what the sessions accumulate. The batches have the smallest ``forward_batch`` that the
    probes planned inside their memory shares (`AnalysisProbe.plan_forward_batch`), else their ``batch_size``.
    """
    first = probes[0]
    probe_set = first.probe_set(trainer)
    for probe in probes[1:]:
        if probe._probe is None:
            probe._probe = probe_set  # the same samples: the key matched
        probe._prepare(trainer, pl_module)
    sessions = [p.start_session() for p in probes]
    feeds: dict[tuple[str, bool], list[Any]] = {}
    modules: dict[tuple[str, bool], Any] = {}
    for probe, session in zip(probes, sessions):
        for name, module in probe._modules.items():
            key = (name, bool(probe.captures_inputs))
            feeds.setdefault(key, []).append(session)
            modules[key] = module
    size = min(p.forward_batch or p.batch_size for p in probes)
    stream = StreamingCapture(modules, feeds)
    with stream.capturing(), uncompiled(pl_module):
        for batch in probe_set.chunks(size):
            stream.batch_size = samples_in(batch)
            for probe in probes:
                probe.batch_now = stream.batch_size
            first.forward(pl_module, batch)
            stream.end_batch()
    return sessions


class StreamingCapture:
    """Forward hooks that hand each layer's output (``inputs``: its first positional input) to the sessions that
    read it, inside the hook: ``session.consume_layer(name, tensor, batch_size)``; `end_batch` closes a forward
    pass (every layer must have been called: else ``ValueError``) with ``session.end_batch(batch_size)``.

    A layer called several times in one forward pass contributes its first call (a warning, once per module), a
    tuple or list its first tensor, a value without a tensor raises `LayerOutputError`. The tensor is the layer's
    own (detached): a session that keeps something past the hook keeps a copy (an in-place operation later in
    the network would change it).

    Args:
        modules: ``{(name, inputs): module}``.
        feeds: ``{(name, inputs): [session, ...]}``.
    """

    def __init__(self, modules: dict[tuple[str, bool], Any], feeds: dict[tuple[str, bool], list[Any]]) -> None:
        self.modules, self.feeds = modules, feeds
        self.batch_size: Optional[int] = None
        self._seen: set[tuple[str, bool]] = set()
        self._sessions = list({id(s): s for sessions in feeds.values() for s in sessions}.values())

    def _hook(self, key: tuple[str, bool]):
        name, inputs = key

        def hook(module: Any, args: Any, output: Any) -> None:
            if key in self._seen:
                if module not in _WARNED_REPEAT:
                    _WARNED_REPEAT.add(module)
                    log.warning("Layer %r was called more than once in one forward pass; its first call is used",
                                name)
                return
            value = args if inputs else output
            tensor = value
            if isinstance(value, (tuple, list)):
                tensor = next((o for o in value if isinstance(o, torch.Tensor)), None)
            if not isinstance(tensor, torch.Tensor):
                what = "received" if inputs else "produced"
                raise LayerOutputError(f"Layer {name!r} ({type(module).__name__}) {what} {type(value).__name__}, "
                                       "which holds no tensor; choose other `layers`")
            self._seen.add(key)
            tensor = tensor.detach()
            for session in self.feeds[key]:
                session.consume_layer(name, tensor, self.batch_size)

        return hook

    @contextmanager
    def capturing(self) -> Iterator[StreamingCapture]:
        """Register the hooks for the duration of the block; they are removed on exit, exceptions included."""
        handles = []
        try:
            for key, module in self.modules.items():
                handles.append(module.register_forward_hook(self._hook(key)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def end_batch(self) -> None:
        """After one forward pass: check that every layer was called, then ``session.end_batch(batch_size)``."""
        missing = sorted({name for name, inputs in self.modules if (name, inputs) not in self._seen})
        self._seen = set()
        if missing:
            raise ValueError(f"Layer(s) {missing} produced no output in the forward pass; are they used?")
        for session in self._sessions:
            session.end_batch(self.batch_size)


class SharedSessions:
    """Sessions fed by another probe's pass, waiting for their probe's own hook: ``{(epoch, step): session}``."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[int, int], Any] = {}

    def put(self, epoch: int, step: int, session: Any) -> None:
        self.waiting = {(epoch, step): session}  # only the latest: an older one was never finished

    def take(self, epoch: int, step: int) -> Optional[Any]:
        return self.waiting.pop((epoch, step), None)
