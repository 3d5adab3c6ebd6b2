"""`StabilityMonitor`: loss and gradient-norm spikes against rolling windows, the spike score, and what to do."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS
from lightning_probes.callbacks.guard import handle_failure
from lightning_probes.callbacks.parameter_probe import ParameterProbe
from lightning_probes.checks import check_choice, check_float, check_positive_int
from lightning_probes.functional.stability import SPIKE_RULES, ring_push, spike_flags, window_moments
from lightning_probes.naming import Patterns
from lightning_probes.sharding import all_reduce_sum, local_tensor

log = logging.getLogger(__name__)

__all__ = ["StabilityMonitor"]

#: The series, in the order of every (2,) state tensor.
SERIES = ("loss", "grad_norm")
POLICIES = ("warn", "skip", "stop")
#: Columns of a step's row in the on-device buffer (`_row`).
_COLUMNS = ("loss", "grad_norm", "loss_z", "grad_norm_z", "loss_mean", "grad_norm_mean", "loss_std",
            "grad_norm_std", "loss_n", "grad_norm_n", "loss_spike", "grad_norm_spike", "loss_present",
            "grad_norm_present", "spike", "nonfinite", "amp_overflow")
_COL = {c: i for i, c in enumerate(_COLUMNS)}
#: Running totals on the device: [loss spikes, grad-norm spikes, spike steps, non-finite steps, AMP overflows].
_TOTALS = ("loss_spikes_total", "grad_norm_spikes_total", "spikes_total", "nonfinite_total", "amp_overflow_total")


class StabilityMonitor(ParameterProbe):
    """Flags loss and gradient-norm spikes against rolling windows, logs the spike score, and warns, skips or stops.

    At every optimiser step (automatic optimisation) the probe takes two numbers, on the device:

    - ``loss``: the training loss of the step, read in ``on_before_backward`` (the closure loss, which Lightning
      divides by ``accumulate_grad_batches``: summed over the micro-batches it is their mean; divided by the
      ``GradScaler``'s scale under ``16-mixed``); under DDP/FSDP2 the mean over the ranks' losses (one all-reduce);
    - ``grad_norm``: the global 2-norm of the tracked parameters' gradients in ``on_before_optimizer_step``
      (accumulated, unscaled, not yet clipped), ``sqrt(sum_p ||g_p||^2)``; under FSDP2 the sum of squares of every
      rank's local shards, all-reduced (the same all-reduce as the loss).

    Each is compared with a rolling window of its last ``window`` values (a ring buffer on the device; see
    `lightning_probes.functional.stability`): with ``rule="zscore"`` (default, OLMo-core's spike score) a value is a
    spike when ``z = (x - mean) / std > threshold``; with ``rule="relative"`` (Lightning Fabric's ``SpikeDetection``)
    when it is worse than the last accepted value and ``|x - mean| >= |rtol * mean|`` (and ``>= |atol|``). A
    non-finite loss or gradient norm is always a spike, except a gradient overflow under an AMP ``GradScaler``
    (``amp_overflow``: the scaler skips that step and lowers its scale itself). A step is a spike step when one of
    the ``watch``-ed series spiked. The rule flags only after ``warmup`` steps; non-finite values from the first.
    Non-finite values never enter a window; spikes do unless ``exclude_spikes``.

    What a spike step does (``on_spike``, the same decision on every rank, since every rank holds the same reduced
    values and windows):

    - ``"warn"`` (default): one ``rank_zero_warn`` at the next logged step naming the new spike steps. No host
      synchronisation on a step that is not logged.
    - ``"skip"``: the optimiser step is not applied: parameters and optimiser state (Adam's moments, its step count)
      stay exactly as they were, as when a ``GradScaler`` skips a step; the step still counts in
      ``trainer.global_step`` and the LR scheduler still steps (as with the scaler). The probe wraps each optimiser's
      ``step`` for the fit (restored at teardown); deciding costs one 1-element device-to-host read per step, as the
      ``GradScaler`` reads ``found_inf``.
    - ``"stop"``: the spike step is not applied either (so the weights stay finite and pre-spike), and
      ``trainer.should_stop`` is set: Lightning ends the fit through its normal path (validation when due,
      ``ModelCheckpoint``'s end-of-epoch save, ``on_train_end``), once ``min_epochs``/``min_steps`` allow. Same cost
      as ``"skip"``.

    Records (``stability.jsonl``, global rank 0): at every ``every_n_steps``-th optimiser step (``global_step %
    every_n_steps == 0``) one ``{"kind": "step"}`` record with ``loss``, ``grad_norm``, their z-scores
    ``loss_z``/``grad_norm_z``, the window ``loss_mean``/``loss_std``/``loss_n`` (same for ``grad_norm``), ``spike``
    (this step), ``spikes`` and ``spike_score`` (spike steps among the last ``min(steps, window)`` steps, and their
    share), ``spike_score_total`` (spike steps / steps since the start), the running totals ``spikes_total``,
    ``loss_spikes_total``, ``grad_norm_spikes_total``, ``nonfinite_total``, ``amp_overflow_total``,
    ``skipped_total``; and one ``{"kind": "spike"}`` record per spike step since the last logged step (its values,
    which series spiked, ``nonfinite``, ``action``). They are kept on the device and read in one transfer at the
    logged step (and at the end of the fit). The same scalars go to the loggers as ``<name>/<stat>`` (at most once
    per ``log_every_n_steps``); ``<name>/spike_score`` and ``<name>/skipped_total`` to ``trainer.callback_metrics``
    at every train epoch end.

    Pre-flight (``fit``): skipped with one warning under manual optimisation (the probe pairs one loss with one
    automatic optimiser step) and for ``LBFGS`` (its closure runs several times per step). Outside ``fit`` idle.
    DeepSpeed, FSDP1 and tensor parallelism are refused at ``setup`` (as the gradient probes).

    Args:
        every_n_steps: Write a step record (and read the device buffer) at every n-th optimiser step.
        window: Values in each rolling window (and steps in the spike score's window). Default 128, OLMo-core's.
        threshold: ``rule="zscore"``: the z-score of a spike (> 0). Default 6, OLMo-core's.
        on_spike: ``"warn"``, ``"skip"`` or ``"stop"`` (see above).
        rule: ``"zscore"`` or ``"relative"``.
        atol: ``rule="relative"``: the absolute distance from the window mean a spike needs (``None``: any).
        rtol: ``rule="relative"``: the distance relative to the window mean a spike needs (``None``: any).
        mode: ``"min"``: rising values are spikes (a loss); ``"max"``: dropping ones.
        warmup: Optimiser steps before the rule may flag (non-finite values count from the first step); default
            ``window`` (a full window, as OLMo-core).
        exclude_spikes: Keep spike values out of the windows (Fabric) instead of letting them in (OLMo-core,
            default: a lasting change of level becomes the new normal instead of flagging every later step).
        watch: The series that can make a spike step: ``("loss", "grad_norm")`` (default), ``("loss",)`` (Fabric's
            ``SpikeDetection``) or ``("grad_norm",)``. Both are recorded either way.
        include: Regular expression(s); only parameters whose name matches one enter the gradient norm.
        exclude: Regular expression(s); parameters whose name matches one do not.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``stability``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[StabilityMonitor(on_spike="skip")])
    """

    probe_name = "stability"
    layout_stats = ("loss", "grad_norm", "loss_z", "grad_norm_z", "spike_score")

    def __init__(
        self,
        every_n_steps: int = 50,
        window: int = 128,
        threshold: float = 6.0,
        on_spike: Literal["warn", "skip", "stop"] = "warn",
        rule: Literal["zscore", "relative"] = "zscore",
        atol: Optional[float] = None,
        rtol: Optional[float] = 2.0,
        mode: Literal["min", "max"] = "min",
        warmup: Optional[int] = None,
        exclude_spikes: bool = False,
        watch: Sequence[str] = SERIES,
        include: Patterns = None,
        exclude: Patterns = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(every_n_steps, include, exclude, output_dir, name,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, on_error=on_error)
        check_positive_int("window", window)
        check_float("threshold", threshold, low=0.0, low_open=True)
        check_choice("on_spike", on_spike, POLICIES)
        check_choice("rule", rule, SPIKE_RULES)
        check_choice("mode", mode, ("min", "max"))
        if atol is not None:
            check_float("atol", atol)
        if rtol is not None:
            check_float("rtol", rtol)
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
            raise ValueError(f"Expected `warmup` to be None or an integer >= 0, but got {warmup!r}")
        if not isinstance(exclude_spikes, bool):
            raise ValueError(f"Expected `exclude_spikes` to be True or False, but got {exclude_spikes!r}")
        if isinstance(watch, str) or not watch or any(s not in SERIES for s in watch) or len(set(watch)) < len(watch):
            raise ValueError(f"Expected `watch` to be a non-empty list of distinct names from {list(SERIES)}, but got "
                             f"{watch!r}")
        self.window, self.threshold, self.on_spike = window, float(threshold), on_spike
        self.rule, self.atol, self.rtol, self.mode = rule, atol, rtol, mode
        self.warmup = window if warmup is None else warmup
        self.exclude_spikes = exclude_spikes
        self.watch = tuple(watch)
        self._wrapped: list[tuple[torch.optim.Optimizer, Any, bool, Any]] = []
        self._trainer: Optional[pl.Trainer] = None
        self._init_state()

    def _init_state(self) -> None:
        self._state: Optional[dict[str, torch.Tensor]] = None  # on the device, see `_state_on`
        self._steps_seen = 0
        self._row_steps: list[Optional[int]] = [None] * self.every_n_steps
        self._last_read = -1  # the last step whose rows were read
        self._skipped: list[int] = []
        self._stopped_at: Optional[int] = None
        self._loss_acc: Optional[torch.Tensor] = None
        self._pending: Optional[torch.Tensor] = None
        self._pending_step: Optional[int] = None
        self._read_due: Optional[int] = None
        self._constants: dict[tuple, torch.Tensor] = {}
        self._headline: dict[str, Optional[float]] = {}
        self._last_step_record: Optional[dict[str, Any]] = None
        #: Device-to-host reads of the decision flag so far ("skip"/"stop": one per optimiser step; "warn": none).
        self.decision_reads = 0

    def reset_run(self) -> None:
        """Forget the previous run: windows, totals, the buffer, the wrappers (a resumed fit restores its state)."""
        super().reset_run()
        self._unwrap()
        self._init_state()

    # -- state ----------------------------------------------------------------------------------------
    def _state_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The windows, totals and row buffer on ``device`` (allocated at the first step; restored state moved)."""
        state = self._state
        if state is None:
            state = {"values": torch.zeros(2, self.window, dtype=torch.float64),
                     "count": torch.zeros(2, dtype=torch.int64),
                     "last": torch.zeros(2, dtype=torch.float64),
                     "flags": torch.zeros(self.window, dtype=torch.float64),
                     "totals": torch.zeros(len(_TOTALS), dtype=torch.float64),
                     "rows": torch.full((self.every_n_steps, len(_COLUMNS)), math.nan, dtype=torch.float64)}
        if any(t.device != device for t in state.values()):
            state = {k: v.to(device) for k, v in state.items()}
        self._state = state
        return state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["stability"] = {
            "tensors": None if self._state is None else {k: v.detach().cpu() for k, v in self._state.items()},
            "steps_seen": self._steps_seen, "row_steps": list(self._row_steps), "last_read": self._last_read,
            "skipped": list(self._skipped), "window": self.window, "every_n_steps": self.every_n_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("stability")
        if not saved or saved.get("window") != self.window or saved.get("every_n_steps") != self.every_n_steps:
            if saved:
                rank_zero_warn(f"{type(self).__name__} {self.name!r}: the checkpoint's windows were made with other "
                               f"settings (window, every_n_steps); they start empty.")
            return
        self._state = saved.get("tensors")  # CPU tensors: moved at their first use
        self._steps_seen = int(saved.get("steps_seen", 0))
        self._row_steps = list(saved.get("row_steps", [None] * self.every_n_steps))
        self._last_read = int(saved.get("last_read", -1))
        self._skipped = [int(s) for s in saved.get("skipped", [])]

    def _constant(self, values: tuple, device: torch.device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """A tensor of host ``values`` on ``device``, copied there once."""
        key = (values, str(device), dtype)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=dtype, device=device)
        return self._constants[key]

    # -- pre-flight and the optimiser wrappers ---------------------------------------------------------
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """``fit`` only: skip under manual optimisation and for LBFGS (see the class docstring)."""
        reason = super().preflight(trainer, pl_module)
        if reason is not None or trainer.state.fn != TrainerFn.FITTING:
            return reason
        if not pl_module.automatic_optimization:
            return ("manual optimisation: the probe pairs the loss of a training step with its one automatic "
                    "optimiser step (and on_spike='skip'/'stop' wrap that step)")
        if any(isinstance(opt, torch.optim.LBFGS) for opt in trainer.optimizers):
            return "LBFGS evaluates its closure several times per step: there is no single loss and gradient norm"
        return None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._trainer = trainer
        if self.on_spike != "warn":
            for optimizer in trainer.optimizers:
                self._wrap(optimizer)

    def _wrap(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace ``optimizer.step`` (an instance attribute, over whatever was there) by `_step`."""
        had_own = "step" in optimizer.__dict__
        previous = optimizer.__dict__.get("step")
        inner = optimizer.step

        @functools.wraps(inner)
        def step(*args: Any, **kwargs: Any) -> Any:
            return self._step(inner, *args, **kwargs)

        step._stability_probe = self  # type: ignore[attr-defined]
        optimizer.step = step  # type: ignore[method-assign]
        self._wrapped.append((optimizer, step, had_own, previous))

    def _unwrap(self) -> None:
        """Give every wrapped optimiser its ``step`` back (unless someone wrapped it again after us)."""
        for optimizer, step, had_own, previous in reversed(self._wrapped):
            if optimizer.__dict__.get("step") is step:
                if had_own:
                    optimizer.step = previous  # type: ignore[method-assign]
                else:
                    del optimizer.step
        self._wrapped = []

    def _step(self, inner: Any, *args: Any, closure: Any = None, **kwargs: Any) -> Any:
        """The wrapped ``optimizer.step``: run the closure (which reaches ``on_before_optimizer_step``), then apply
        the step unless the probe flagged it."""
        if args:  # step(closure) given positionally
            closure, args = args[0], args[1:]
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        spike = False
        if self.active and self._pending is not None:
            try:
                spike = self._decide()
            except Exception as err:  # noqa: BLE001 - the optimiser step must go on (on_error="raise" re-raises)
                handle_failure(self, self._trainer, "optimizer.step", err)
                spike = False
        if spike:
            return result
        if closure is not None:
            return inner(*args, closure=lambda: result, **kwargs)
        return inner(*args, **kwargs)

    def _decide(self) -> bool:
        """Read this step's flag (the one host read of "skip"/"stop") and act on it."""
        flag, step = self._pending, self._pending_step
        self._pending = self._pending_step = None
        self.decision_reads += 1
        if not bool(flag):
            return False
        self._skipped.append(step)
        trainer = self._trainer
        if self.on_spike == "stop" and self._stopped_at is None:
            self._stopped_at = step
            trainer.should_stop = True
            rank_zero_warn(f"{type(self).__name__} {self.name!r}: spike at step {step}; its update is not applied "
                           f"and training stops (on_spike='stop').")
        return True

    # -- every step -----------------------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().double().sum()
        inverse = self._loss_scale_inverse(trainer)
        if inverse is not None:  # the GradScaler scaled the loss before the hook
            value = value * inverse
        self._loss_acc = value if self._loss_acc is None else self._loss_acc + value

    @staticmethod
    def _loss_scale_inverse(trainer: pl.Trainer) -> Optional[torch.Tensor]:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return None
        scale = getattr(scaler, "_scale", None)
        return None if scale is None else scale.double().reciprocal()

    def _grad_square(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer,
                     device: torch.device) -> tuple[torch.Tensor, bool]:
        """This rank's part of ``sum ||g||^2`` (float64 on ``device``) and whether any tracked gradient exists."""
        _, tracked = self._tracked_for(trainer, optimizer)
        present = False
        grads = []
        for i in tracked:
            grad = self._params[i].grad
            if grad is None:
                continue
            present = True
            if self._layouts[i].owner:  # a shard, or rank 0's copy of a replicated (DDP) gradient
                grads.append(local_tensor(grad))
        if not grads:
            return self._constant((0.0,), device, torch.float64)[0], present
        if all(g.is_floating_point() for g in grads):  # per-tensor norms in at least float32 (no narrowing)
            wide = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
            norms = torch._foreach_norm(grads, 2.0, dtype=wide)
        else:
            norms = [torch.linalg.vector_norm(g).double() for g in grads]
        square = torch.stack([n.to(device) for n in norms]).double().square().sum()
        inverse = self.loss_scale_inverse(trainer, optimizer)  # fused optimizers: still scaled here
        if inverse is not None:
            square = square * inverse.to(device).square()
        return square, present

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._ensure_layout(trainer, pl_module)
        step = trainer.global_step
        loss, self._loss_acc = self._loss_acc, None
        device = loss.device if loss is not None else trainer.strategy.root_device
        state = self._state_on(device)
        square, grads_present = self._grad_square(trainer, optimizer, device)
        zero = self._constant((0.0,), device, torch.float64)[0]
        one = self._constant((1.0,), device, torch.float64)[0]
        # One all-reduce per step: [sum of the ranks' losses, ranks with a loss, sum of squared gradient entries].
        packed = torch.stack([zero if loss is None else loss, zero if loss is None else one, square])
        if trainer.world_size > 1:
            all_reduce_sum(packed)
        x = torch.stack([packed[0] / packed[1], packed[2].sqrt()])  # (2,): loss (nan without any), grad norm
        present = torch.stack([packed[1] > 0, self._constant((grads_present,), device)[0]])
        scaler = self._loss_scale_inverse(trainer) is not None
        mean, std, n = window_moments(state["values"], state["count"])
        flags, z = spike_flags(x, mean, std, n, state["last"], rule=self.rule, threshold=self.threshold,
                               atol=self.atol, rtol=self.rtol, mode=self.mode, armed=self._steps_seen >= self.warmup,
                               countable=self._constant((True, not scaler), device))
        watched = self._constant(tuple(s in self.watch for s in SERIES), device)
        flags = flags & present & watched
        finite = torch.isfinite(x)
        accept = present & finite & ~flags if self.exclude_spikes else present & finite
        state["values"], state["count"] = ring_push(state["values"], state["count"], x, accept)
        state["last"] = torch.where(accept, x, state["last"])
        spike = flags.any()
        nonfinite = (present & ~finite & self._constant((True, not scaler), device)).any()
        overflow = present[1] & ~finite[1] & scaler
        events = torch.stack([flags[0], flags[1], spike, nonfinite, overflow]).double()
        state["totals"] = state["totals"] + events
        state["flags"][self._steps_seen % self.window] = events[2]
        slot = step % self.every_n_steps
        state["rows"][slot] = torch.cat([x, z, mean, std, n, flags.double(), present.double(), events[2:]])
        self._row_steps[slot] = step
        self._steps_seen += 1
        if self.on_spike != "warn":
            self._pending, self._pending_step = spike, step
        if step % self.every_n_steps == 0:
            self._read_due = step  # read after the optimiser step, once "skip"/"stop" have decided

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pending = self._pending_step = None  # a step the GradScaler skipped never reached `_step`
        if self._read_due is not None:
            step, self._read_due = self._read_due, None
            self._read(trainer, step, step_record=True)

    # -- reading the buffer: one transfer -------------------------------------------------------------
    def _read(self, trainer: pl.Trainer, step: int, step_record: bool) -> None:
        """Move the buffer and totals to the host (one copy), write the step record (``step_record``) and one
        record per spike step since the last read; warn once for the new spikes."""
        state = self._state
        if state is None:
            return
        seen = min(self._steps_seen, self.window)
        block = torch.cat([state["rows"].flatten(), state["totals"], state["flags"][:seen].sum().view(1)]).cpu()
        width = self.every_n_steps * len(_COLUMNS)
        rows = block[:width].view(self.every_n_steps, len(_COLUMNS)).tolist()
        totals = dict(zip(_TOTALS, block[width:width + len(_TOTALS)].tolist()))
        in_window = block[-1].item()
        new = sorted((s, rows[i]) for i, s in enumerate(self._row_steps)
                     if s is not None and self._last_read < s <= step)
        self._last_read = max(self._last_read, step)
        epoch = trainer.current_epoch
        records = []
        spikes = []
        for s, row in new:
            if row[_COL["spike"]] > 0:
                spikes.append(s)
                records.append({"kind": "spike", "step": s, "epoch": epoch, **self._values(row),
                                "loss_spike": row[_COL["loss_spike"]] > 0,
                                "grad_norm_spike": row[_COL["grad_norm_spike"]] > 0,
                                "nonfinite": row[_COL["nonfinite"]] > 0, "action": self._action(s)})
        if step_record and new and new[-1][0] == step:
            row = new[-1][1]
            record = {"kind": "step", "step": step, "epoch": epoch, **self._values(row),
                      "loss_mean": _finite(row[_COL["loss_mean"]]), "loss_std": _finite(row[_COL["loss_std"]]),
                      "loss_n": int(row[_COL["loss_n"]]), "grad_norm_mean": _finite(row[_COL["grad_norm_mean"]]),
                      "grad_norm_std": _finite(row[_COL["grad_norm_std"]]),
                      "grad_norm_n": int(row[_COL["grad_norm_n"]]), "spike": row[_COL["spike"]] > 0,
                      "spikes": int(in_window), "spike_score": in_window / seen if seen else None,
                      "spike_score_total": totals["spikes_total"] / self._steps_seen,
                      **{k: int(v) for k, v in totals.items()}, "skipped_total": len(self._skipped)}
            records.insert(0, record)
            self._last_step_record = record
            if trainer.is_global_zero and self.logger_due(trainer, step):
                keys = ("loss", "grad_norm", "loss_z", "grad_norm_z", "loss_mean", "loss_std", "grad_norm_mean",
                        "grad_norm_std", "spike_score", "spike_score_total", "spikes_total", "skipped_total")
                self.log_scalars(trainer, {f"{self.name}/{k}": record[k] for k in keys}, step)
        self._headline = {f"{self.name}/spike_score": (self._last_step_record or {}).get("spike_score"),
                          f"{self.name}/skipped_total": float(len(self._skipped))}
        self.write_records(trainer, records)
        if spikes and self.on_spike != "stop":
            shown = ", ".join(map(str, spikes[:10])) + (f" and {len(spikes) - 10} more" if len(spikes) > 10 else "")
            what = "their updates were not applied" if self.on_spike == "skip" else "training goes on"
            rank_zero_warn(f"{type(self).__name__} {self.name!r}: {len(spikes)} spike step(s) of the loss or gradient "
                           f"norm at step(s) {shown}; {what} (see {self.name}.jsonl).")

    def _action(self, step: int) -> str:
        if step == self._stopped_at:
            return "stopped"
        if step in self._skipped:
            return "skipped"
        return "warned"

    @staticmethod
    def _values(row: list[float]) -> dict[str, Optional[float]]:
        return {"loss": _finite(row[_COL["loss"]]) if row[_COL["loss_present"]] > 0 else None,
                "grad_norm": _finite(row[_COL["grad_norm"]]) if row[_COL["grad_norm_present"]] > 0 else None,
                "loss_z": _finite(row[_COL["loss_z"]]), "grad_norm_z": _finite(row[_COL["grad_norm_z"]])}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The spike steps since the last logged step (a stop, the end of the fit): every rank reads.
        self._read(trainer, trainer.global_step, step_record=False)
        self._unwrap()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish(trainer, self._headline)  # every rank holds the same values: no broadcast

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()

    def on_disable(self, trainer: pl.Trainer) -> None:
        self._unwrap()
        self._pending = None

    @property
    def skipped_steps(self) -> list[int]:
        """The optimiser steps whose update the probe did not apply (``on_spike="skip"``/``"stop"``)."""
        return list(self._skipped)


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None
