"""`StabilityMonitor`: loss and gradient-norm spikes against rolling windows, the spike score, and what to do."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import numpy as np
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
#: Running totals: [loss spikes, grad-norm spikes, spike steps, non-finite steps, AMP overflows].
_TOTALS = ("loss_spikes_total", "grad_norm_spikes_total", "spikes_total", "nonfinite_total", "amp_overflow_total")


class StabilityMonitor(ParameterProbe):
    """Flags loss and gradient-norm spikes against rolling windows, logs the spike score, and warns, skips or stops.

    At every optimiser step (automatic optimisation) the probe takes two numbers on the device (a handful of
    operations; nothing read on the host):

    - ``loss``: the training loss of the step, read in ``on_before_backward`` (the closure loss, which Lightning
      divides by ``accumulate_grad_batches``: summed over the micro-batches it is their mean; divided by the
      ``GradScaler``'s scale under ``16-mixed``); under DDP/FSDP2 the mean over the ranks' losses (one all-reduce);
    - ``grad_norm``: the global 2-norm of the tracked parameters' gradients in ``on_before_optimizer_step``
      (accumulated, unscaled, not yet clipped), ``sqrt(sum_p ||g_p||^2)``; under FSDP2 the sum of squares of every
      rank's local shards, all-reduced (the same all-reduce as the loss).

    Each is compared with a rolling window of its last ``window`` values (a ring buffer, see
    `lightning_probes.functional.stability`): with ``rule="zscore"`` (default, OLMo-core's spike score) a value is a
    spike when ``z = (x - mean) / std > threshold``; with ``rule="relative"`` (Lightning Fabric's ``SpikeDetection``)
    when it is worse than the last accepted value and ``|x - mean| >= |rtol * mean|`` (and ``>= |atol|``). A
    non-finite loss or gradient norm is always a spike, except a gradient overflow under an AMP ``GradScaler``
    (``amp_overflow``: the scaler skips that step and lowers its scale itself). A step is a spike step when one of
    the ``watch``-ed series spiked. The rule flags only after ``warmup`` steps; non-finite values from the first.
    Non-finite values never enter a window; spikes do unless ``exclude_spikes``.

    Where the rule runs: each step's three raw numbers ``[sum of the ranks' losses, ranks with a loss, sum of
    squared gradient entries]`` wait in a small device buffer (``every_n_steps`` rows); at a logged step the buffer
    goes to the host in one transfer and the rule runs there, step by step, on the windows (NumPy float64). A
    per-step rule on the device would cost some 70 tiny kernels a step (0.32 ms a step on the CPU MLP of
    ``benchmarks/probe_overhead.py``, measured); on the host it costs microseconds per step, once, at the read.

    What a spike step does (``on_spike``, the same decision on every rank, since every rank holds the same reduced
    values and runs the same host arithmetic on them):

    - ``"warn"`` (default): one ``rank_zero_warn`` at the next logged step naming the new spike steps. No host
      synchronisation on a step that is not logged.
    - ``"skip"``: the optimiser step is not applied: parameters and optimiser state (Adam's moments, its step count)
      stay exactly as they were, as when a ``GradScaler`` skips a step; the step still counts in
      ``trainer.global_step`` and the LR scheduler still steps (as with the scaler). The probe wraps each optimiser's
      ``step`` for the fit (restored at teardown); deciding costs one device-to-host read per step (of the step's
      three numbers), as the ``GradScaler`` reads ``found_inf``.
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
    which series spiked, ``nonfinite``, ``action``), written at the logged step after it (or at the end of the
    fit). The same scalars go to the loggers as ``<name>/<stat>`` (at most once
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
        self._watched = np.array([series in self.watch for series in SERIES])
        self._wrapped: list[tuple[torch.optim.Optimizer, Any, bool, Any]] = []
        self._trainer: Optional[pl.Trainer] = None
        self._init_state()

    def _init_state(self) -> None:
        # The windows, on the host (NumPy, float64): the device only accumulates the raw numbers of each step.
        self._values = np.zeros((2, self.window))
        self._count = np.zeros(2, dtype=np.int64)
        self._last = np.zeros(2)
        self._flags = np.zeros(self.window)  # ring of the last `window` steps' spike flags
        self._totals = np.zeros(len(_TOTALS))
        self._steps_seen = 0
        self._rows: list[dict[str, Any]] = []  # processed steps whose records are not written yet
        self._last_read = -1  # the last step whose records were written
        self._skipped: list[int] = []
        self._stopped_at: Optional[int] = None
        # On the device: each step's [sum of the ranks' losses, ranks with a loss, sum of squared gradients].
        self._step_rows: Optional[torch.Tensor] = None
        self._slots: list[Optional[tuple[int, bool]]] = [None] * self.every_n_steps  # (step, gradients present)
        self._loss_acc: Optional[torch.Tensor] = None
        self._pending: Optional[tuple[int, torch.Tensor, bool]] = None  # "skip"/"stop": the step to decide
        self._read_due: Optional[int] = None
        self._constants: dict[tuple, torch.Tensor] = {}
        self._owned_params: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._grad_dtypes: dict[int, tuple[torch.dtype, set[torch.dtype]]] = {}
        self._headline: dict[str, Optional[float]] = {}
        self._scaler = False
        #: Device-to-host reads of a step's numbers so far ("skip"/"stop": one per optimiser step; "warn": none).
        self.decision_reads = 0

    def reset_run(self) -> None:
        """Forget the previous run: windows, totals, the buffer, the wrappers (a resumed fit restores its state)."""
        super().reset_run()
        self._unwrap()
        self._init_state()

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._drain()  # the steps still on the device (a checkpoint between logged steps): one transfer
        state = super().state_dict()
        state["stability"] = {
            "values": self._values.tolist(), "count": self._count.tolist(), "last": self._last.tolist(),
            "flags": self._flags.tolist(), "totals": self._totals.tolist(), "steps_seen": self._steps_seen,
            "rows": [dict(r) for r in self._rows], "last_read": self._last_read, "skipped": list(self._skipped),
            "window": self.window}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("stability")
        if not saved:
            return
        if saved.get("window") != self.window:
            rank_zero_warn(f"{type(self).__name__} {self.name!r}: the checkpoint's windows hold "
                           f"{saved.get('window')} values, this probe {self.window}; they start empty.")
            return
        self._values, self._count = np.array(saved["values"]), np.array(saved["count"], dtype=np.int64)
        self._last, self._flags = np.array(saved["last"]), np.array(saved["flags"])
        self._totals = np.array(saved["totals"])
        self._steps_seen = int(saved["steps_seen"])
        self._rows = [dict(r) for r in saved.get("rows", [])]
        self._last_read = int(saved.get("last_read", -1))
        self._skipped = [int(s) for s in saved.get("skipped", [])]

    def _constant(self, value: float, device: torch.device) -> torch.Tensor:
        """A float64 0-d tensor on ``device``, copied there once."""
        key = (value, device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(value, dtype=torch.float64, device=device)
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
        """Read this step's numbers (the one host read of "skip"/"stop"), run the rule and act on a spike."""
        step, packed, grads_present = self._pending
        self._pending = None
        self.decision_reads += 1
        if not self._process(step, packed.tolist(), grads_present):
            return False
        self._skipped.append(step)
        if self.on_spike == "stop" and self._stopped_at is None:
            self._stopped_at = step
            self._trainer.should_stop = True
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

    def _on_layout(self, trainer: pl.Trainer) -> None:
        self._owned_params, self._grad_dtypes = {}, {}  # a new selection (training starts; lazy modules)

    def _grad_square(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer,
                     device: torch.device) -> tuple[torch.Tensor, bool]:
        """This rank's part of ``sum ||g||^2`` (float64 on ``device``) and whether any tracked gradient exists."""
        key = id(optimizer)
        if key not in self._owned_params:
            _, tracked = self._tracked_for(trainer, optimizer)
            # A shard, or rank 0's copy of a replicated (DDP) gradient, counts; the other ranks' copies do not.
            self._owned_params[key] = ([self._params[i] for i in tracked],
                                       [self._params[i] for i in tracked if self._layouts[i].owner])
        tracked, owned = self._owned_params[key]
        grads = [p.grad for p in owned if p.grad is not None]
        present = bool(grads) or any(p.grad is not None for p in tracked)
        if not grads:
            return self._constant(0.0, device), present
        if self.sharded:
            grads = [local_tensor(g) for g in grads]
        dtypes = self._grad_dtypes.get(key)
        if dtypes is None or dtypes[0] is not grads[0].dtype:  # learnt at the first step (and if it changes)
            dtypes = self._grad_dtypes[key] = (grads[0].dtype, {g.dtype for g in grads})
        kinds = dtypes[1]
        if all(d.is_floating_point for d in kinds):  # per-tensor norms in at least float32 (no narrowing)
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64 if torch.float64 in kinds else torch.float32)
        else:
            norms = [torch.linalg.vector_norm(g).double() for g in grads]
        try:
            stacked = torch.stack(norms)
        except RuntimeError:  # gradients on several devices
            stacked = torch.stack([n.to(device) for n in norms])
        square = stacked.double().square().sum().to(device)
        inverse = self.loss_scale_inverse(trainer, optimizer)  # fused optimizers: still scaled here
        if inverse is not None:
            square = square * inverse.to(device).square()
        return square, present

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """A constant number of device operations, no host read ("warn"): the step's loss and squared gradient norm
        go into the device buffer (one all-reduce with several processes)."""
        self._ensure_layout(trainer, pl_module)
        step = trainer.global_step
        loss, self._loss_acc = self._loss_acc, None
        device = loss.device if loss is not None else trainer.strategy.root_device
        square, grads_present = self._grad_square(trainer, optimizer, device)
        self._scaler = self._loss_scale_inverse(trainer) is not None
        zero = self._constant(0.0, device)
        # [sum of the ranks' losses, ranks with a loss, sum of squared gradient entries]: one all-reduce.
        packed = torch.stack([zero if loss is None else loss, zero if loss is None else self._constant(1.0, device),
                              square])
        if trainer.world_size > 1:
            all_reduce_sum(packed)
        if self.on_spike == "warn":
            slot = step % self.every_n_steps
            if self._slots[slot] is not None:  # a step not read yet would be overwritten (steps out of cadence)
                self._drain()
            if self._step_rows is None or self._step_rows.device != packed.device:
                self._step_rows = torch.zeros(self.every_n_steps, 3, dtype=torch.float64, device=packed.device)
            self._step_rows[slot] = packed
            self._slots[slot] = (step, grads_present)
        else:
            self._pending = (step, packed, grads_present)
        if step % self.every_n_steps == 0:
            self._read_due = step  # read after the optimiser step, once "skip"/"stop" have decided

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending is not None:  # the GradScaler skipped the step (overflow): `_step` never ran
            step, packed, grads_present = self._pending
            self._pending = None
            self._process(step, packed.tolist(), grads_present)
        if self._read_due is not None:
            step, self._read_due = self._read_due, None
            self._write(trainer, step, step_record=True)

    # -- the rule, on the host ------------------------------------------------------------------------
    def _drain(self) -> None:
        """Move the device buffer's unread steps to the host (one transfer) and run the rule over them in order."""
        taken = sorted((entry, slot) for slot, entry in enumerate(self._slots) if entry is not None)
        if not taken:
            return
        block = self._step_rows.cpu().tolist()
        for (step, grads_present), slot in taken:
            self._process(step, block[slot], grads_present)
        self._slots = [None] * self.every_n_steps

    def _process(self, step: int, packed: list[float], grads_present: bool) -> bool:
        """Run the rule on one step's ``[loss sum, ranks with a loss, squared gradient norm]``: update the windows
        and totals, keep the step's row for its records. Returns whether the step is a spike step."""
        loss_sum, ranks, square = packed
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.array([loss_sum / ranks if ranks > 0 else math.nan, math.sqrt(square) if square >= 0 else square])
        present = np.array([ranks > 0, grads_present])
        countable = np.array([True, not self._scaler])
        mean, std, n = window_moments(self._values, self._count)
        flags, z = spike_flags(x, mean, std, n, self._last, rule=self.rule, threshold=self.threshold,
                               atol=self.atol, rtol=self.rtol, mode=self.mode, armed=self._steps_seen >= self.warmup,
                               countable=countable)
        flags = flags & present & self._watched
        finite = np.isfinite(x)
        accept = present & finite & ~flags if self.exclude_spikes else present & finite
        self._values, self._count = ring_push(self._values, self._count, x, accept)
        self._last = np.where(accept, x, self._last)
        spike = bool(flags.any())
        nonfinite = bool((present & ~finite & countable).any())
        overflow = bool(present[1] and not finite[1] and self._scaler)
        self._totals += [flags[0], flags[1], spike, nonfinite, overflow]
        self._flags[self._steps_seen % self.window] = spike
        self._steps_seen += 1
        row: dict[str, Any] = {"step": step}
        for i, series in enumerate(SERIES):
            row[series] = _finite(float(x[i])) if present[i] else None
            row[f"{series}_z"] = _finite(float(z[i]))
            row[f"{series}_mean"], row[f"{series}_std"] = _finite(float(mean[i])), _finite(float(std[i]))
            row[f"{series}_n"] = int(n[i])
            row[f"{series}_spike"] = bool(flags[i])
        row.update(spike=spike, nonfinite=nonfinite, amp_overflow=overflow)
        self._rows.append(row)
        return spike

    # -- records ----------------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, step: int, step_record: bool) -> None:
        """Write the step record of ``step`` (``step_record``) and one record per spike step up to it; warn once for
        the new spikes. Every rank runs it (the same numbers everywhere); global rank 0 writes."""
        self._drain()
        rows = [r for r in self._rows if self._last_read < r["step"] <= step]
        self._rows = [r for r in self._rows if r["step"] > step]
        self._last_read = max(self._last_read, step)
        epoch = trainer.current_epoch
        records: list[dict[str, Any]] = []
        keep = ("loss", "grad_norm", "loss_z", "grad_norm_z", "loss_spike", "grad_norm_spike", "nonfinite")
        spikes = [r for r in rows if r["spike"]]
        if step_record and rows and rows[-1]["step"] == step:
            row = rows[-1]
            seen = min(self._steps_seen, self.window)
            in_window = int(self._flags[:seen].sum())
            record = {"kind": "step", "step": step, "epoch": epoch,
                      **{k: v for k, v in row.items() if k not in ("step", "amp_overflow")},
                      "spikes": in_window, "spike_score": in_window / seen if seen else None,
                      "spike_score_total": float(self._totals[2] / self._steps_seen),
                      **{k: int(v) for k, v in zip(_TOTALS, self._totals)}, "skipped_total": len(self._skipped)}
            for series in SERIES:
                del record[f"{series}_spike"]
            records.append(record)
            self._headline = {f"{self.name}/spike_score": record["spike_score"],
                              f"{self.name}/skipped_total": float(len(self._skipped))}
            if trainer.is_global_zero and self.logger_due(trainer, step):
                keys = ("loss", "grad_norm", "loss_z", "grad_norm_z", "loss_mean", "loss_std", "grad_norm_mean",
                        "grad_norm_std", "spike_score", "spike_score_total", "spikes_total", "skipped_total")
                self.log_scalars(trainer, {f"{self.name}/{k}": record[k] for k in keys}, step)
        records += [{"kind": "spike", "step": r["step"], "epoch": epoch, **{k: r[k] for k in keep},
                     "action": self._action(r["step"])} for r in spikes]
        self.write_records(trainer, records)
        if spikes and self.on_spike != "stop":
            shown = ", ".join(str(r["step"]) for r in spikes[:10])
            shown += f" and {len(spikes) - 10} more" if len(spikes) > 10 else ""
            what = "their updates were not applied" if self.on_spike == "skip" else "training goes on"
            rank_zero_warn(f"{type(self).__name__} {self.name!r}: {len(spikes)} spike step(s) of the loss or gradient "
                           f"norm at step(s) {shown}; {what} (see {self.name}.jsonl).")

    def _action(self, step: int) -> str:
        if step == self._stopped_at:
            return "stopped"
        if step in self._skipped:
            return "skipped"
        return "warned"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The spike steps since the last logged step (a stop, the end of the fit): every rank reads.
        self._write(trainer, trainer.global_step, step_record=False)
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
        self._step_rows = None

    @property
    def skipped_steps(self) -> list[int]:
        """The optimiser steps whose update the probe did not apply (``on_spike="skip"``/``"stop"``)."""
        return list(self._skipped)


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None
