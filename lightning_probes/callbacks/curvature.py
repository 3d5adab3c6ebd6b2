"""`CurvatureMonitor`: the largest Hessian eigenvalue, the Hessian trace and Cockpit's alpha on a fixed probe batch,
beside 2 / lr."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.nn.parameter import is_lazy
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, ProbeCallback
from lightning_probes.checks import check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.curvature import (
    alpha_sums,
    directional_samples,
    hutchinson_trace,
    hvp_operator,
    lanczos,
    step_alpha,
)
from lightning_probes.functional.per_sample import (
    PerSampleLoss,
    cross_entropy_loss,
    eval_mode,
    sample_count,
    slice_samples,
)
from lightning_probes.sharding import all_reduce_sum, is_dtensor

log = logging.getLogger(__name__)

__all__ = ["CurvatureMonitor"]

_FIELDS = ("lambda_max", "lambda_min", "lambda_max_residual", "trace", "trace_stderr", "loss")
_ALPHA_FIELDS = ("alpha", "step_length", "loss_end", "slope_start", "slope_end")


class CurvatureMonitor(ProbeCallback):
    """Largest Hessian eigenvalue (Lanczos), Hessian trace (Hutchinson) and Cockpit's alpha on a fixed probe batch.

    The probe batch is the first ``num_samples`` samples of the first training batch of the fit, kept (detached)
    on the device for the whole run and saved in the checkpoint, so a resumed run analyses the same samples: a
    fixed batch makes the curves over training describe the model, not the sampling noise of changing batches.
    Every ``every_n_steps`` optimiser steps (at the first micro-batch of the step, before its forward: the
    parameters the step starts from) it builds the gradient of the mean probe loss with ``create_graph=True``
    once (`lightning_probes.functional.curvature.hvp_operator`, a ``functional_call`` of the LightningModule in
    eval mode: batch norm on its running statistics, nothing of the model changed, its ``.grad`` untouched) and
    then takes ``lanczos_iters + trace_samples`` Hessian-vector products:

    - ``lambda_max``/``lambda_min``: the extreme Ritz values of ``lanczos_iters`` Lanczos steps (full
      re-orthogonalisation); ``lambda_max_residual`` bounds the error of ``lambda_max``;
    - ``trace`` = mean of ``v^T H v`` over ``trace_samples`` Rademacher vectors, ``trace_stderr`` its standard error;
    - ``lr`` (the first parameter group's), ``two_over_lr`` = 2 / lr and ``sharpness_ratio`` = lambda_max * lr / 2:
      plain gradient descent is stable along the top eigenvector while it is below 1 (the edge of stability at 1).
      For adaptive optimisers (Adam) the relevant sharpness is that of the preconditioned Hessian: read the ratio
      as a relative trend there;
    - with ``alpha``: after the step's optimiser step, Cockpit's ``alpha`` (where the step landed on the quadratic
      fitted along it to the probe loss and its directional derivative at both ends, with their per-sample
      variances; `lightning_probes.functional.curvature.step_alpha`), ``step_length`` = ``||theta_1 - theta_0||``,
      ``loss_end`` and the directional derivatives ``slope_start``/``slope_end`` along the unit step.

    Records (``curvature.jsonl``, rank 0, written once the step is taken): ``step``, ``epoch``, the fields above,
    ``num_samples`` (over all ranks), ``hvps``. No host synchronisation: the values stay on the device until the
    records are written.

    DDP: each rank keeps the first ``num_samples`` samples of its own first batch; every product is all-reduced as
    ``sum_r n_r H_r v / sum_r n_r``, which is the product of the one-process Hessian of the union batch; the random
    vectors come from the same seeded generator on every rank, so the ranks run the same iteration; alpha's
    per-sample sums are all-reduced in one tensor. Every rank's probe batch is gathered once (at the first batch)
    into rank 0's checkpoint state. FSDP2 and tensor parallelism (``ModelParallelStrategy``, DTensor parameters)
    are refused at setup: the products need the full parameters in every process.

    Args:
        every_n_steps: Analyse every n-th optimiser step. Default 5000: one analysis at the defaults costs about as
            much as 19 training steps of an MNIST MLP (784-128-10, batch 128, one CPU thread), 31 of a
            784-512-256-128-10 MLP and 112 of resnet18 at 32x32, batch 32 (``benchmarks/cockpit_comparison.py``),
            so every 5000 steps adds about 0.4%, 0.6% and 2.3% (the target: at most 5%; every 2000 measured 5.6% on
            that resnet18). For an edge-of-stability curve over a short run, analyse more often (every 50-500
            steps) and accept the cost.
        num_samples: Samples of the probe batch (per rank).
        lanczos_iters: Lanczos steps (Hessian-vector products) for the eigenvalues; 0: no eigenvalues.
        trace_samples: Rademacher vectors for the trace (>= 2 for a standard error); 0: no trace. With both 0 the
            probe computes alpha only (no Hessian-vector product).
        alpha: Also record Cockpit's alpha of the analysed steps (holds one copy of the trainable parameters during
            the step; two per-sample passes over the probe batch after it).
        seed: Seeds the Lanczos start vector and the Rademacher vectors (with the step).
        loss_fn: ``loss_fn(module_call, batch) -> scalar``, the mean loss of a batch (default cross entropy of
            ``module(x)`` against ``y`` for ``(x, y)`` batches of class indices; the probe is skipped, with one
            warning, when the default does not apply to the batches; see `lightning_probes.functional.per_sample`).
            Alpha calls it on batches of one sample.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``curvature``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: ``"warn"`` (default) or ``"raise"`` (see `ProbeCallback`).

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[CurvatureMonitor(every_n_steps=5000, num_samples=64)])
    """

    probe_name = "curvature"
    layout_stats = ("lambda_max", "trace", "sharpness_ratio", "alpha")

    def __init__(self, every_n_steps: int = 5000, num_samples: int = 64, lanczos_iters: int = 10,
                 trace_samples: int = 10, alpha: bool = True, seed: int = 0,
                 loss_fn: PerSampleLoss = cross_entropy_loss, output_dir: Optional[str] = None,
                 name: Optional[str] = None, flush_every_n_steps: Optional[int] = None,
                 flush_secs: Optional[float] = DEFAULT_FLUSH_SECS, on_error: Optional[str] = None) -> None:
        super().__init__(output_dir, name, flush_every_n_steps, flush_secs, on_error=on_error)
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("num_samples", num_samples)
        for arg, value in (("lanczos_iters", lanczos_iters), ("trace_samples", trace_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{arg}` to be a non-negative integer (0: not computed), but got {value!r}")
        if not (lanczos_iters or trace_samples or alpha):
            raise ValueError("Expected at least one of `lanczos_iters`, `trace_samples` and `alpha` to be on, but got "
                             "lanczos_iters=0, trace_samples=0, alpha=False: nothing to compute")
        if not isinstance(alpha, bool):
            raise ValueError(f"Expected `alpha` to be True or False, but got {alpha!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, but got {seed!r}")
        if not callable(loss_fn):
            raise ValueError(f"Expected `loss_fn` to be callable as loss_fn(module_call, batch), but got {loss_fn!r}")
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.lanczos_iters, self.trace_samples, self.seed = lanczos_iters, trace_samples, seed
        self.alpha = alpha
        self.loss_fn = loss_fn
        self._batch: Any = None
        self._batch_leaves: Optional[list[list[torch.Tensor]]] = None  # every rank's probe tensors (CPU), DDP
        self._restored: Optional[list[list[torch.Tensor]]] = None  # from a checkpoint
        self._next_due = 0
        self._pending: Optional[_Pending] = None
        self._checked = False  # the first analysis of the run has run

    def reset_run(self) -> None:
        super().reset_run()
        self._batch = self._batch_leaves = self._restored = self._pending = None
        self._next_due = 0
        self._checked = False

    # -- state: the probe batch and the cadence survive a checkpoint --------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["next_due"] = self._next_due
        batches = self._batch_leaves
        if batches is None and self._batch is not None:  # one process: rank 0's tensors, copied now
            batches = [[t.detach().cpu() for t in tree_flatten(self._batch)[0] if isinstance(t, torch.Tensor)]]
        if batches is not None:
            state["probe_batches"] = batches
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._next_due = int(state_dict.get("next_due", 0))
        self._restored = state_dict.get("probe_batches")

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy).__name__ == "ModelParallelStrategy":
            raise ProbeConfigurationError(
                f"{type(self).__name__} does not support ModelParallelStrategy (FSDP2 or tensor parallelism): its "
                f"Hessian-vector products need the full parameters in every process. Use strategy='ddp' or remove "
                f"the probe.")
        super().setup(trainer, pl_module, stage)

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        if trainer.state.fn != "fit":
            return None
        if any(is_dtensor(p) for p in pl_module.parameters()):
            raise ProbeConfigurationError(f"{type(self).__name__}: the parameters are sharded (DTensor); its "
                                          f"Hessian-vector products need full parameters. Use strategy='ddp'.")
        if not any(p.requires_grad for p in pl_module.parameters()):
            return "the model has no trainable parameter"
        return None

    # -- hooks --------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.state.fn != "fit":
            return
        if self._batch is None:
            with self.probe_pass(trainer):
                self._take_batch(trainer, pl_module, batch)
            if not self.active:
                return
        step = trainer.global_step
        if step < self._next_due or any(is_lazy(p) for p in pl_module.parameters()):
            return  # not due (or the micro-batches after the first of a due step); lazy: once they exist
        self._next_due = (step // self.every_n_steps + 1) * self.every_n_steps
        self._write_pending(trainer)  # a step that never finished (e.g. the optimiser step was never taken)
        with self.probe_pass(trainer):
            self._analyse(trainer, pl_module, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pending = self._pending
        if pending is None or trainer.global_step == pending.step:
            return  # no analysis waiting, or its optimiser step has not been taken yet (accumulation)
        if pending.start is not None:
            with self.probe_pass(trainer):
                pending.block = torch.cat([pending.block, self._alpha_block(trainer, pl_module, pending.start)])
        self._write_pending(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_pending(trainer)

    def on_disable(self, trainer: pl.Trainer) -> None:
        self._pending = None

    # -- the work -----------------------------------------------------------------------------------------
    def _take_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """The probe batch: the first ``num_samples`` samples of this first batch, or those of the checkpoint."""
        n = min(self.num_samples, sample_count(batch))
        leaves, spec = tree_flatten(slice_samples(batch, 0, n))
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        restored, self._restored = self._restored, None
        rank, world = trainer.global_rank, trainer.world_size
        if restored is not None and (len(restored) != world or len(restored[rank]) != len(where)):
            rank_zero_warn(f"{type(self).__name__} {self.name!r}: the checkpoint's probe batch ({len(restored)} "
                           f"process(es)) does not fit this run ({world} process(es), {len(where)} tensors a "
                           f"batch); a new probe batch is taken from this first batch, so the records from here on "
                           f"are of other samples than before the checkpoint")
            restored = None
        if restored is not None:
            for i, saved in zip(where, restored[rank]):
                leaves[i] = saved.to(leaves[i].device)
            self._batch_leaves = restored if world > 1 else None
        else:
            leaves = [leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            if world > 1:  # every rank's probe batch in rank 0's checkpoint: one gather, once per fit
                import torch.distributed as dist

                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, [leaves[i].cpu() for i in where])
                self._batch_leaves = gathered
        self._batch = tree_unflatten(leaves, spec)
        if self.loss_fn is cross_entropy_loss:
            reason = _default_loss_mismatch(pl_module, self._batch)
            if reason is not None:
                self.skip(trainer, f"the default loss_fn (cross entropy of module(batch[0]) against the class "
                                   f"indices batch[1]) does not apply to this model's batches: {reason}; pass "
                                   f"`loss_fn(module_call, batch)`")

    def _analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not self._checked:  # the first analysis: an operation without a second derivative is a skip
            self._checked = True
            try:
                self._curvature(trainer, pl_module, step)
            except (RuntimeError, NotImplementedError) as err:
                if "derivative for" not in str(err) or "not implemented" not in str(err):
                    raise
                self.skip(trainer, f"the model has an operation without a second derivative, so there is no "
                                   f"Hessian-vector product ({str(err).splitlines()[0]})")
            return
        self._curvature(trainer, pl_module, step)

    def _curvature(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        with eval_mode(pl_module), math_attention():
            if self.lanczos_iters or self.trace_samples:
                hvp, loss, names = hvp_operator(pl_module, self._batch, self.loss_fn)
            else:  # alpha only: no Hessian-vector product, no double-backward graph
                with torch.no_grad():
                    loss = self.loss_fn(pl_module, self._batch).detach()
                names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
                hvp = None
            params = dict(pl_module.named_parameters())
            first = params[names[0]]
            device, dtype = first.device, first.dtype
            size = sum(params[n].numel() for n in names)
            n_local = float(sample_count(self._batch))
            if trainer.world_size > 1:
                head = torch.stack([torch.tensor(n_local, device=device, dtype=torch.float64),
                                    loss.double().to(device) * n_local])
                all_reduce_sum(head)
                total, loss = head[0], head[1] / head[0]
                local = hvp

                def hvp(v: torch.Tensor) -> torch.Tensor:  # the union batch: sum_r n_r H_r v / sum_r n_r
                    out = local(v) * n_local
                    all_reduce_sum(out)
                    return out / total.to(out.dtype)
            else:
                total = torch.tensor(n_local, device=device, dtype=torch.float64)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            nan = torch.full((), math.nan, device=device, dtype=torch.float64)
            ritz, residual = (lanczos(hvp, size, self.lanczos_iters, generator, device, dtype)
                              if self.lanczos_iters else (nan.expand(1), nan))
            trace, stderr, _ = (hutchinson_trace(hvp, size, self.trace_samples, generator, device, dtype)
                                if self.trace_samples else (nan, nan, None))
            hvp = None  # the double-backward graph
        block = torch.stack([ritz[-1], ritz[0], residual, trace, stderr, loss.double().to(device), total])
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
        start = {n: params[n].detach().clone() for n in names} if self.alpha else None
        self._pending = _Pending(step, trainer.current_epoch, lr, min(self.lanczos_iters, size) + self.trace_samples,
                                 block, start)

    def _alpha_block(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     start: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[alpha, step_length, loss_end, slope_start, slope_end]`` on the device (float64)."""
        now = dict(pl_module.named_parameters())
        end = {n: now[n].detach() for n in start}
        direction = [end[n] - start[n] for n in start]
        with eval_mode(pl_module), math_attention():
            l0, d0 = directional_samples(pl_module, self._batch, start, direction, self.loss_fn)
            l1, d1 = directional_samples(pl_module, self._batch, end, direction, self.loss_fn)
        sums = alpha_sums(l0, d0, l1, d1)
        if trainer.world_size > 1:
            all_reduce_sum(sums)
        length = torch.sqrt(sum((d.double() * d.double()).sum() for d in direction))
        out = step_alpha(length, sums)
        return torch.stack([out["alpha"], length, out["loss_end"], out["slope_start"], out["slope_end"]])

    def _write_pending(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return

        def produce(host: torch.Tensor) -> list[dict[str, Any]]:
            values = [v if math.isfinite(v) else None for v in host.tolist()]
            lr = pending.lr
            record: dict[str, Any] = {"step": pending.step, "epoch": pending.epoch,
                                      **dict(zip(_FIELDS, values[:6]))}
            record.update(lr=lr, two_over_lr=2.0 / lr if lr > 0 else None,
                          sharpness_ratio=(record["lambda_max"] * lr / 2.0
                                           if record["lambda_max"] is not None and lr > 0 else None),
                          num_samples=int(values[6]), hvps=pending.hvps)
            if self.alpha:
                record.update(dict.fromkeys(_ALPHA_FIELDS) if len(values) == 7 else dict(zip(_ALPHA_FIELDS,
                                                                                             values[7:])))
            return [record]

        self.defer_records(trainer, produce, pending.block)


@dataclass
class _Pending:
    """An analysis waiting for the end of its optimiser step (for alpha)."""

    step: int
    epoch: int
    lr: float
    hvps: int
    block: torch.Tensor
    start: Optional[dict[str, torch.Tensor]]


@contextmanager
def math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on its math kernel (the fused CPU/GPU kernels have no double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _default_loss_mismatch(pl_module: pl.LightningModule, batch: Any) -> Optional[str]:
    """Why ``cross_entropy(module(batch[0]), batch[1])`` is not this model's loss, or ``None`` (one forward)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return f"the batch is a {type(batch).__name__}, not an (inputs, targets) pair"
    target = batch[1]
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
        return "batch[1] is not a tensor of integer class indices"
    try:
        with torch.no_grad(), eval_mode(pl_module):
            logits = pl_module(batch[0])
    except Exception as err:  # noqa: BLE001 - the reason of the skip
        return f"module(batch[0]) raised {type(err).__name__}: {err}"
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        return "module(batch[0]) is not a tensor of logits (N, C, ...)"
    if logits.shape[1] < 2:
        return f"module(batch[0]) has {logits.shape[1]} logit per sample (binary: pass a BCE loss_fn)"
    if tuple(logits.shape[:1]) + tuple(logits.shape[2:]) != tuple(target.shape):
        return f"logits {tuple(logits.shape)} do not match targets {tuple(target.shape)}"
    if int(target.min()) < 0 or int(target.max()) >= logits.shape[1]:  # once per fit, at the first batch
        return f"the targets are not class indices in [0, {logits.shape[1]})"
    return None
