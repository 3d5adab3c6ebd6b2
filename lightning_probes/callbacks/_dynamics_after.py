"""What `GradientDynamicsMonitor` does after the optimiser step: its step post-hooks (registered, removed, and
their failures sent through the probe's ``on_error`` policy), the weight-side statistics and the state kept for
the next step, and the steps the AMP GradScaler skipped."""

from __future__ import annotations

import functools
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from lightning_probes.callbacks._dynamics_init import followed_flat
from lightning_probes.callbacks._dynamics_step import Previous
from lightning_probes.callbacks._entries import EntrySelection
from lightning_probes.functional.gradients import l2_norms
from lightning_probes.sharding import local_tensor

#: The name a failure of the post-step hook is reported under (the guard's "hook").
POST_HOOK = "optimizer step post-hook (_after_step)"


class AfterStep:
    """Mixin of `GradientDynamicsMonitor`: the optimiser step post-hooks and what they compute.

    The post-hooks run inside ``optimizer.step``, outside Lightning's hook dispatch and so outside the guard of
    `lightning_probes.callbacks.guard`: `_after_step_hook` sends a failure through the same policy (``on_error``:
    disable the probe with one warning and a record, or re-raise with a note naming the probe). Torch iterates
    over the hooks while it calls them, so a hook is never removed from inside one: a probe disabled there stops
    acting at once and its hooks go at ``teardown``.

    It uses the probe's ``_hooks``, ``_pending``, ``_previous``, ``_params``, ``_passes``, ``_tracked_for``,
    ``_selection_for``, ``_whole_squares``, ``_owned``, ``_initial_squares``, ``_write``, ``active`` and
    ``_hook_failed``.
    """

    _in_after_step = False

    def _register_hooks(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(functools.partial(self._after_step_hook, trainer)))

    def _remove_hooks(self) -> None:
        if self._in_after_step:  # torch is iterating over the hooks: removing one now breaks its loop
            return
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _after_step_hook(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, args: Any,
                         kwargs: Any) -> None:
        """Optimizer post-step hook: `_after_step`, with a failure handled as in a guarded Lightning hook."""
        if not self.active or not self._pending:
            return
        self._in_after_step = True
        try:
            self._after_step(trainer, optimizer)
        except Exception as err:  # noqa: BLE001 - outside the guard: the same policy, by hand
            self._hook_failed(trainer, POST_HOOK, err)  # disabled: `on_disable` leaves the hooks to teardown
        finally:
            self._in_after_step = False

    def _after_step(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """The step happened (a GradScaler-skipped step never calls it): update norms, the next step's state."""
        opt_index, _ = self._tracked_for(trainer, optimizer)
        pending = self._pending.pop(opt_index, None)
        if pending is None:
            return
        params = [local_tensor(self._params[i]).detach() for i in pending.tracked]
        buffers, pending.buffers = pending.buffers, None
        device = buffers.state.device
        selection = self._selection_for(pending.tracked, device)
        updates, squares = self._passes.after(params, selection, buffers, pending.snapshot, pending.log,
                                              pending.whole)  # one pass: norms and the new state, in place
        state = buffers.state if pending.snapshot else None
        del buffers  # the weights' compact copy goes now; the state buffer lives on as `Previous.state`
        if pending.log:
            pending.update_norm = updates.to(device)
            pending.weight_norm = self._whole_squares(params, squares, pending.tracked, selection, device)
            pending.followed_weight = self._followed_squares(params, squares, pending.tracked, selection, device,
                                                             pending.weight_norm)
            pending.initial = self._initial_squares(params, selection.local_index, pending.tracked, device)
        if pending.snapshot:
            self._previous[opt_index] = Previous(state=state, finite=pending.finite, count=pending.count,
                                                  tracked=pending.tracked)
        if pending.log:
            self._write(trainer, opt_index, pending, skipped=False)

    def _followed_squares(self, params: list[torch.Tensor], squares: Optional[torch.Tensor], tracked: list[int],
                          selection: EntrySelection, device: torch.device, whole: torch.Tensor) -> torch.Tensor:
        """``(P,)`` float64 ``||w_after||**2`` over the followed entries (``update_ratio``'s denominator, over the
        entries ``update_norm`` is over): ``whole`` when every entry is followed."""
        if all(index is None for index in selection.local_index):
            return whole
        if squares is None:
            squares = l2_norms([followed_flat(p, index) for p, index in zip(params, selection.local_index)])
            squares = squares.double().square()
        return self._owned(squares.to(device), tracked, device)

    def _resolve_skipped(self, trainer: pl.Trainer, opt_index: Optional[int] = None) -> None:
        """A pending step whose post-step hook never ran was skipped (AMP found non-finite gradients)."""
        for index in [opt_index] if opt_index is not None else sorted(self._pending):
            pending = self._pending.pop(index, None)
            if pending is None:
                continue
            self._previous.pop(index, None)
            if pending.log:
                self._write(trainer, index, pending, skipped=True)
