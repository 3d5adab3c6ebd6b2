"""One forward pass over the probe set for every representation probe that analyses at the same moment.

`LayerCorrelationMonitor`, `ActivationStatsMonitor` and `AlignmentMonitor` each stream a pass over the probe set
into accumulators ("sessions": ``start_session()``, ``session.consume(outputs, batch)``, ``session.finish()``).
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

from typing import Any, Optional

import pytorch_lightning as pl

from lightning_probes.capture import ActivationCapture, uncompiled
from lightning_probes.probe_data import batch_size as samples_in


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
    """One pass over the first probe's probe set feeding every probe's new session; returns the sessions."""
    first = probes[0]
    probe_set = first.probe_set(trainer)
    for probe in probes[1:]:
        if probe._probe is None:
            probe._probe = probe_set  # the same samples: the key matched
        probe._prepare(trainer, pl_module)
    sessions = [p.start_session() for p in probes]
    outputs_of = {n: m for p in probes if not p.captures_inputs for n, m in p._modules.items()}
    inputs_of = {n: m for p in probes if p.captures_inputs for n, m in p._modules.items()}
    outputs, inputs = ActivationCapture(outputs_of, None), ActivationCapture(inputs_of, None, inputs=True)
    with outputs.capturing(), inputs.capturing(), uncompiled(pl_module):
        for batch in probe_set.chunks(first.batch_size):
            size = samples_in(batch)
            first.forward(pl_module, batch)
            seen, seen_inputs = outputs.pop(), inputs.pop()
            for probe, session in zip(probes, sessions):
                found = seen_inputs if probe.captures_inputs else seen
                session.consume({n: found[n] for n in probe._modules}, size)
    return sessions


class SharedSessions:
    """Sessions fed by another probe's pass, waiting for their probe's own hook: ``{(epoch, step): session}``."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[int, int], Any] = {}

    def put(self, epoch: int, step: int, session: Any) -> None:
        self.waiting = {(epoch, step): session}  # only the latest: an older one was never finished

    def take(self, epoch: int, step: int) -> Optional[Any]:
        return self.waiting.pop((epoch, step), None)
