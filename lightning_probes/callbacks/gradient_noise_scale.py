"""`GradientNoiseScaleMonitor`: the gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` during training."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.hooks import RemovableHandle

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS
from lightning_probes.callbacks.guard import handle_failure
from lightning_probes.callbacks.parameter_probe import ParameterProbe
from lightning_probes.checks import check_float, check_positive_int
from lightning_probes.functional.noise_scale import TERMS, ema_update, noise_scale_terms, simple_noise_scale
from lightning_probes.naming import Patterns
from lightning_probes.sharding import all_reduce_sum, is_dtensor

log = logging.getLogger(__name__)

__all__ = ["GradientNoiseScaleMonitor"]

#: Scalars sent to the loggers (``<name>/<key>``).
_LOGGED = ("b_simple_ema", "grad_sq_ema", "trace_sigma_ema", "b_simple", "grad_sq", "trace_sigma", "small_sq",
           "big_sq", "b_small", "b_big")
#: Columns of the on-device sums between records: the `TERMS`, then usable, rejected and failed measurements.
_ACC = len(TERMS) + 3


def _batch_size(batch: Any) -> Optional[int]:
    """Length of the first tensor with a batch dimension in ``batch`` (depth first through mappings and sequences)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    items = batch.values() if isinstance(batch, Mapping) else batch \
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) else ()
    for item in items:
        found = _batch_size(item)
        if found is not None:
            return found
    return None


class GradientNoiseScaleMonitor(ParameterProbe):
    """The gradient noise scale of McCandlish et al. (2018) from two batch sizes the training already has.

    ``B_simple = tr(Sigma) / |G|^2`` (``G`` the true gradient, ``Sigma`` the per-sample gradient covariance)
    predicts the critical batch size: below it a larger batch trains nearly proportionally faster, above it
    little. The two terms come from squared gradient norms at a small and a big batch size
    (`lightning_probes.functional.noise_scale`, the paper's appendix A.1), without any extra forward or backward:

    - **small**: each micro-batch's own mean gradient on each rank, read by a tensor hook on every tracked
      parameter during the backward (it runs before the gradient is accumulated into ``.grad`` and before DDP
      averages it across ranks). Lightning divides the loss by ``accumulate_grad_batches`` ``K``, so the micro-batch
      mean gradient is ``K`` times what the hook sees. ``|G_small|^2`` is the mean over the ``M = world_size * m``
      micro-batches of the step (``m`` per rank) of their squared norms;
    - **big**: ``.grad`` in ``on_before_optimizer_step`` (accumulated, all-reduced by DDP, not yet clipped), the
      mean of the ``M`` micro-batch gradients (rescaled by ``K / m`` when an epoch's last step has fewer
      micro-batches).

    With micro-batch sizes ``b_i``, ``B_small = M / sum(1 / b_i)`` (their harmonic mean) and ``B_big = M *
    B_small`` (`lightning_probes.functional.batch_sizes`). The sources: DDP with ``N`` processes (``B_big = N * K *
    B_small``), or one process with ``accumulate_grad_batches = K >= 2`` (``B_big = K * B_small``).

    Every ``every_n_steps``-th optimiser step is measured: the hooks exist from ``on_before_backward`` to
    ``on_after_backward`` of its micro-batches only (one vector norm per parameter and micro-batch, kept on the
    device), then one norm per parameter of ``.grad``; on any other step nothing runs. Under DDP a measured step
    ends with one all-reduce of three numbers (the sum of the micro-batches' squared norms, ``M``, ``sum(1 / b_i)``),
    so that every rank holds the same estimates and EMAs (and a checkpoint saved by rank 0 holds the global state).
    The per-step estimates ``|G|^2`` and ``tr(Sigma)`` update EMAs (``ema_decay`` per measurement, bias-corrected as
    Adam's) on the device and are summed between records; no host synchronisation on any step but a recorded one.

    Records (``gradient_noise_scale.jsonl``, global rank 0), one per ``log_every_n_steps`` optimiser steps (and one
    at the end of training for measurements not yet recorded): ``step`` (the last measured step), ``epoch``,
    ``measurements`` (usable measured steps since the last record), ``rejected`` (measured steps left out: a
    non-finite gradient, or a step of one micro-batch only, where the two sizes are equal), the means over the
    usable measurements of ``small_sq`` (``|G_small|^2``), ``big_sq`` (``|G_big|^2``), ``b_small``, ``b_big``,
    ``grad_sq`` (the estimate of ``|G|^2``) and ``trace_sigma`` (of ``tr(Sigma)``), ``b_simple =
    trace_sigma / grad_sq`` of those means, the EMAs ``grad_sq_ema`` and ``trace_sigma_ema`` and their ratio
    ``b_simple_ema`` (the number to read), ``world_size`` and ``accumulate_grad_batches``. A ratio whose
    denominator is not positive (too few measurements for a noisy ``|G|^2``) is ``null``, as is every mean of a
    record without a usable measurement. The same go to the loggers as ``<name>/<key>`` (at most once per
    ``log_every_n_steps`` of the Trainer), and ``<name>/b_simple_ema`` to ``trainer.callback_metrics`` at every
    train epoch end.

    Pre-flight (``fit``): skipped with one warning (and a skip record) for manual optimisation (no Lightning loss
    scaling, optimiser steps of its own), FSDP2 (the gradients are reduce-scattered into shards: no rank sees a local
    full gradient), an fp16 ``GradScaler`` (the hooks would see scaled gradients), a multi-process strategy other
    than DDP, and one process without gradient accumulation (one batch size only: set ``accumulate_grad_batches >=
    2``, or train with DDP on several processes). Outside ``fit`` it stays idle. DeepSpeed, FSDP1 and tensor
    parallelism are refused at ``setup`` as for the other gradient probes.

    Assumptions (see the docs page): the loss of a micro-batch is the mean of per-sample losses (a summed loss, or
    batch statistics such as batch norm's that couple the samples, bias the estimates), and ``.grad`` is zero at the
    start of each optimiser step (Lightning's default ``zero_grad``).

    Args:
        every_n_steps: Measure at every n-th optimiser step (``global_step % every_n_steps == 0``).
        log_every_n_steps: Write a record every this many optimiser steps, a multiple of ``every_n_steps``.
            Default ``None``: the Trainer's ``log_every_n_steps`` rounded up to a multiple of ``every_n_steps``.
        ema_decay: Decay of the EMAs per measurement, in ``[0, 1)``; ``0`` keeps the last measurement only.
        batch_size: Samples per micro-batch and rank; default ``None``: the length of the first tensor of each batch
            (depth first through tuples, lists and dicts).
        include: Regular expression(s); only parameters whose name matches one are measured.
        exclude: Regular expression(s); parameters whose name matches one are not measured.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``gradient_noise_scale``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe (its gradient hooks
            included) into one warning, a ``{"disabled": true}`` record and a disabled probe while training goes on;
            ``"raise"`` re-raises. ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(accumulate_grad_batches=4, callbacks=[GradientNoiseScaleMonitor(every_n_steps=10)])
    """

    probe_name = "gradient_noise_scale"

    def __init__(
        self,
        every_n_steps: int = 10,
        log_every_n_steps: Optional[int] = None,
        ema_decay: float = 0.95,
        batch_size: Optional[int] = None,
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
        check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        if log_every_n_steps is not None and log_every_n_steps % every_n_steps:
            raise ValueError(f"Expected `log_every_n_steps` to be a multiple of `every_n_steps` ({every_n_steps}) "
                             f"or None, but got {log_every_n_steps}")
        check_float("ema_decay", ema_decay, low=0.0, high=1.0, high_open=True)
        check_positive_int("batch_size", batch_size, allow_none=True)
        self.log_every_n_steps = log_every_n_steps
        self.ema_decay = float(ema_decay)
        self.batch_size = batch_size
        #: Gradient-hook calls so far (tracked parameters x micro-batches of the measured steps; 0 elsewhere).
        self.hook_calls = 0
        self._log_every = log_every_n_steps or every_n_steps
        self._hooked: list[torch.nn.Parameter] = []
        self._norm_dtype = torch.float32
        self._handles: list[RemovableHandle] = []
        self._constants: dict[tuple, torch.Tensor] = {}
        self._reset_state()

    def _reset_state(self) -> None:
        self._reset_step(None)
        self._ema: Optional[torch.Tensor] = None  # (3,): EMA of grad_sq, of trace_sigma, their weight 1 - d**k
        self._acc: Optional[torch.Tensor] = None  # (_ACC,): sums since the last record
        self._pending = 0  # measured steps since the last record
        self._last_measured: Optional[int] = None
        self._last_epoch = 0  # the epoch of the last measurement (the train-end record's)
        self._headline: Optional[float] = None

    def _reset_step(self, step: Optional[int]) -> None:
        """Start the measurement of optimiser step ``step`` (``None``: none)."""
        self._measuring: Optional[int] = step
        self._size: Optional[int] = None
        self._norms: list[torch.Tensor] = []  # one micro-batch: per parameter ||hook gradient||
        self._micro: list[torch.Tensor] = []  # per micro-batch: sum over parameters of ||hook gradient||^2
        self._inverse_sizes = 0.0
        self._hook_error: Optional[BaseException] = None

    def reset_run(self) -> None:
        """Forget the previous run: hooks, EMAs, sums, the selection (a resumed fit restores the state after)."""
        super().reset_run()
        self._remove_hooks()
        self._hooked = []
        self._constants = {}
        self._reset_state()

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ema"] = None if self._ema is None else self._ema.detach().cpu()
        state["sums"] = None if self._acc is None else self._acc.detach().cpu()
        state["pending"] = self._pending
        state["last_measured"] = self._last_measured
        state["last_epoch"] = self._last_epoch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._ema = state_dict.get("ema")  # CPU tensors: moved at their first use
        self._acc = state_dict.get("sums")
        self._pending = int(state_dict.get("pending", 0))
        self._last_measured = state_dict.get("last_measured")
        self._last_epoch = int(state_dict.get("last_epoch", 0))

    def _state_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ema is None or self._ema.shape != (3,):
            self._ema = torch.zeros(3, dtype=torch.float64, device=device)
        if self._acc is None or self._acc.shape != (_ACC,):
            self._acc = torch.zeros(_ACC, dtype=torch.float64, device=device)
        self._ema = self._ema.to(device=device, dtype=torch.float64)
        self._acc = self._acc.to(device=device, dtype=torch.float64)
        return self._ema, self._acc

    def _constant(self, values: tuple, device: torch.device) -> torch.Tensor:
        """A float64 tensor of host ``values`` on ``device``, copied there once per distinct value."""
        key = (values, str(device))
        if key not in self._constants:
            if len(self._constants) > 64:
                self._constants = {}
            self._constants[key] = torch.tensor(values, dtype=torch.float64, device=device)
        return self._constants[key]

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.log_every_n_steps is None:
            every = max(1, trainer.log_every_n_steps)
            self._log_every = math.ceil(every / self.every_n_steps) * self.every_n_steps

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """``fit`` only: skip where no two batch sizes are visible or the hooks would read the wrong gradients."""
        reason = super().preflight(trainer, pl_module)
        if reason is not None or trainer.state.fn != TrainerFn.FITTING:
            return reason
        from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

        strategy = trainer.strategy
        if not pl_module.automatic_optimization:
            return ("manual optimisation: the probe needs Lightning's automatic loop (one backward per micro-batch, "
                    "the loss divided by accumulate_grad_batches, one optimiser step)")
        if isinstance(strategy, ModelParallelStrategy) or any(is_dtensor(p) for p in pl_module.parameters()):
            return ("FSDP2 (ModelParallelStrategy / fully_shard) reduce-scatters the gradients into shards, so no "
                    "rank sees its local full gradient; use strategy='ddp' to measure the noise scale")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return ("an fp16 GradScaler scales the gradients the hooks see; use precision='bf16-mixed' or 32 to "
                    "measure the noise scale")
        if trainer.world_size > 1 and not isinstance(strategy, DDPStrategy):
            return (f"{type(strategy).__name__} with {trainer.world_size} processes: the probe reads the local "
                    f"gradient against DDP's all-reduced one; use strategy='ddp'")
        if trainer.world_size == 1 and trainer.accumulate_grad_batches < 2:
            return ("one process without gradient accumulation sees one batch size only; set "
                    "accumulate_grad_batches >= 2 (the micro-batches are the small batch) or train with DDP on 2 or "
                    "more processes")
        return None

    def _on_layout(self, trainer: pl.Trainer) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        indices = self._tracked_for(trainer, optimizer)[1] if optimizer is not None else range(len(self._params))
        self._hooked = [self._params[i] for i in indices]
        self._norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._hooked) else torch.float32

    # -- the hooks ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        if step != self._measuring:
            self._reset_step(step)
        size = self.batch_size if self.batch_size is not None else _batch_size(batch)
        if size is None or size <= 0:
            raise ValueError(f"{type(self).__name__} {self.name!r} found no tensor with a batch dimension in the batch "
                             f"({type(batch).__name__}); pass `batch_size`")
        self._size = size

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._measuring != trainer.global_step or self._size is None or not self._hooked:
            return
        self._remove_hooks()
        self._norms = []
        self._handles = [p.register_hook(self._hook) for p in self._hooked]

    def _hook(self, grad: torch.Tensor) -> None:
        """One parameter's gradient of this micro-batch (before accumulation, before DDP's all-reduce)."""
        self.hook_calls += 1
        if self._hook_error is not None:
            return
        try:
            self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=self._norm_dtype))
        except Exception as err:  # noqa: BLE001 - never into the backward: every rank decides at the record
            self._hook_error = err

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        if self._norms:
            self._micro.append(torch.stack(self._norms).double().square().sum())
        else:  # no tracked parameter in this micro-batch's graph: its gradient is zero
            self._micro.append(self._constant((0.0,), self._hooked[0].device)[0])
        self._norms = []
        self._inverse_sizes += 1.0 / self._size
        self._size = None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the measurement ------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._ensure_layout(trainer, pl_module)
        step = trainer.global_step
        if self._measuring != step or not self._hooked:
            return
        try:
            self._measure(trainer, step)
        finally:
            self._reset_step(None)

    def _measure(self, trainer: pl.Trainer, step: int) -> None:
        """Every rank, on a measured step: one all-reduce (several processes), the estimates, the EMAs, the sums."""
        device = self._hooked[0].device
        accumulate, world = max(1, trainer.accumulate_grad_batches), trainer.world_size
        micro = len(self._micro)
        if micro:
            small = torch.stack([s.to(device) for s in self._micro]).sum() * float(accumulate) ** 2
        else:
            small = self._constant((0.0,), device)[0]
        meta = self._constant((float(micro), self._inverse_sizes, float(self._hook_error is not None)), device)
        reduced = torch.cat([small.double().view(1), meta])  # (4,): sum ||g_i||^2, M, sum 1/b_i, failed ranks
        if world > 1:
            all_reduce_sum(reduced)
        grads = [p.grad.detach() for p in self._hooked if p.grad is not None]
        if grads:
            big = torch.stack(torch._foreach_norm(grads, 2, dtype=self._norm_dtype)).double().square().sum()
        else:
            big = self._constant((0.0,), device)[0]
        # .grad is (1 / world) sum_ranks (1 / K) sum_i g_i: the mean of the M micro-batch gradients times m / K.
        big = big * (float(accumulate * world) / reduced[1].clamp_min(1.0)).square()
        terms, usable = noise_scale_terms(reduced[0], reduced[1], reduced[2], big)
        usable = usable & (reduced[3] == 0)
        terms = torch.where(usable, terms, torch.zeros_like(terms))
        ema, acc = self._state_on(device)
        ema_update(ema, terms[4:6], self.ema_decay, usable)
        flags = torch.stack([usable, ~usable, reduced[3] > 0]).double()
        acc += torch.cat([terms, flags])
        self._pending += 1
        self._last_measured, self._last_epoch = step, trainer.current_epoch
        if step % self._log_every == 0:
            self._record(trainer, step)

    def _record(self, trainer: pl.Trainer, step: int) -> None:
        """Write the sums since the last record and the EMAs (every rank reads the one block: a failed hook on any
        rank disables the probe on all of them at the same step)."""
        block = torch.cat([self._acc, self._ema]).cpu()  # the one transfer of a recorded step
        self._acc.zero_()
        self._pending = 0
        values = block.tolist()
        if values[_ACC - 1] > 0:
            if self._hook_error is not None:
                handle_failure(self, trainer, "gradient hook", self._hook_error)
            else:
                self.disable(trainer, "a gradient hook failed on another rank", "gradient hook")
            return
        if not trainer.is_global_zero:
            return
        record = self._make_record(trainer, step, values)
        self._headline = record["b_simple_ema"]
        self.write_records(trainer, [record])
        if self.logger_due(trainer, step):
            self.log_scalars(trainer, {f"{self.name}/{k}": record[k] for k in _LOGGED}, step)

    def _make_record(self, trainer: pl.Trainer, step: int, values: list[float]) -> dict[str, Any]:
        n = int(values[len(TERMS)])
        means = [v / n if n else None for v in values[:len(TERMS)]]
        record: dict[str, Any] = {"step": step, "epoch": self._last_epoch, "measurements": n,
                                  "rejected": int(values[len(TERMS) + 1])}
        record.update(zip(TERMS, means))
        record["b_simple"] = None if not n else simple_noise_scale(record["trace_sigma"], record["grad_sq"])
        grad_ema, trace_ema, weight = values[_ACC:]
        record["grad_sq_ema"] = grad_ema / weight if weight > 0 else None
        record["trace_sigma_ema"] = trace_ema / weight if weight > 0 else None
        record["b_simple_ema"] = (simple_noise_scale(record["trace_sigma_ema"], record["grad_sq_ema"])
                                  if weight > 0 else None)
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        record["world_size"] = trainer.world_size
        record["accumulate_grad_batches"] = trainer.accumulate_grad_batches
        return record

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending and self._last_measured is not None and self._acc is not None:
            self._record(trainer, self._last_measured)  # measurements since the last record (every rank alike)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish(trainer, {f"{self.name}/b_simple_ema": self._headline}, from_rank_zero=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_disable(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        self._reset_step(None)
