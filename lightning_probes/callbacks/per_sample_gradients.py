"""`PerSampleGradientMonitor`: Cockpit's gradient tests and per-sample gradient histograms, without BackPACK."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils._pytree import tree_map

from lightning_probes.budget import format_bytes
from lightning_probes.callbacks._per_sample_records import RecordContext, record_producer
from lightning_probes.callbacks._per_sample_support import (
    default_loss_problem,
    detach_clone,
    differentiable_twice,
    item_of,
    rank_one_layers,
)
from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, ProbeCallback
from lightning_probes.checks import check_choice, check_float, check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.curvature import hvp_operator
from lightning_probes.functional.gradient_tests import (
    HistogramSpec,
    gradient_tests,
    hutchinson_diagonal,
    per_sample_sums,
)
from lightning_probes.functional.per_sample import (
    PerSampleLoss,
    chunk_size_for,
    cross_entropy_loss,
    eval_mode,
    mean_gradient,
    per_sample_bytes,
    per_sample_gradients,
    sample_count,
    slice_samples,
)
from lightning_probes.functional.rank_one import capture_linear, combine_sums, rank_one_sums
from lightning_probes.naming import clean_name
from lightning_probes.probe_data import forward_peak_bytes
from lightning_probes.sharding import all_reduce_sum, is_dtensor

log = logging.getLogger(__name__)

__all__ = ["PerSampleGradientMonitor"]

_HISTOGRAMS = ("both", "1d", "2d", "none")
_PROBE_BATCH = ("fixed", "current")
#: The float64 sums all-reduced in one tensor (``sq_entries``, in the gradients' dtype, goes in a second one).
_PACKED = ("count", "sq_norm", "proj_sq", "hist_1d", "outside_1d", "hist_2d", "outside_2d")
#: torch.func's notice when a layer has no batching rule (it then loops inside vmap: slower, the same numbers).
_NO_BATCHING_RULE = "There is a performance drop"


class PerSampleGradientMonitor(ProbeCallback):
    """Cockpit's gradient tests (norm, inner-product and orthogonality tests, mean GSNR, EB criterion, CABS, TIC)
    and per-sample gradient histograms, from ``torch.func`` per-sample gradients on a probe batch.

    Every ``every_n_steps`` optimiser steps (in ``on_before_optimizer_step``: the parameters the step starts
    from), on the probe batch, in eval mode (batch norm on its running statistics, dropout off, nothing of the model
    changed, its ``.grad`` untouched; see `lightning_probes.functional.per_sample`):

    1. the mean gradient ``g`` and loss of the batch (one batched backward pass, `mean_gradient`), which also
       keeps the inputs and output gradients of the ``nn.Linear`` layers the rank-one shortcut takes;
    2. for those layers (``rank_one=True``, a layer that sees one input row per sample), every sum from the
       inputs and output gradients (`lightning_probes.functional.rank_one`): ``g_i = d_i a_i^T``, no per-sample
       gradient formed, the same numbers; for every other tensor the per-sample gradients ``g_i`` (``vmap``
       over ``grad``, in chunks sized by the memory budget), reduced to sums over the samples at once
       (`lightning_probes.functional.gradient_tests.per_sample_sums`): nothing of the size of ``n`` gradients
       is kept;
    3. with ``curvature_samples > 0``, ``curvature_samples`` Hessian-vector products (double backward, as
       `CurvatureMonitor`) for Hutchinson's estimates of the Hessian trace and diagonal, for the TIC;
    4. the tests per parameter tensor and for all tensors together (`gradient_tests`), Cockpit's definitions.

    Records (``per_sample_gradients.jsonl``, rank 0): per analysed step one record per parameter tensor
    (``layer``: its name) and one with ``layer: "__total__"``: ``step``, ``epoch``, ``numel``, ``num_samples`` (over
    all ranks), ``grad_norm``, ``norm_test``, ``inner_test``, ``ortho_test``, ``mean_gsnr``, ``early_stopping``,
    ``cabs``, ``hessian_trace``, ``hessian_trace_stderr``, ``tic_trace``, ``tic_diag``, ``hist_outside_1d``,
    ``hist_outside_2d``; the total record also ``loss``, ``lr``, ``vectorized``, ``rank_one_tensors`` (how many
    tensors the rank-one shortcut took), ``histograms`` (the npz file, relative
    to the output directory) and, for a model without second derivatives, ``curvature_unavailable``. Histograms:
    ``<output_dir>/per_sample_gradients/histograms/step_<step>.npz``. Everything stays on the device until the
    records are written, except one host synchronisation per rank-one layer and analysis (how many rows of its
    histogram to multiply out): a constant number on an analysed step, none in between.

    DDP: each rank computes on its own probe batch; the mean gradient is all-reduced before the per-sample pass,
    the sums after it, and every Hessian-vector product, so the records equal one process on the union of the
    ranks' batches. FSDP2 and tensor parallelism (``ModelParallelStrategy``, DTensor parameters) are refused at
    setup: ``functional_call`` needs the full parameters in every process.

    Args:
        every_n_steps: Analyse every n-th optimiser step (the first at step 0). Default 5000: at the defaults one
            analysis (per-sample gradients of 32 samples, the 1-D histogram of their entries, 10 Hessian-vector
            products) costs about 31 training steps of an MNIST MLP (784-128-10, batch 128, one CPU thread) and
            about 104 of a resnet18 at 32x32 (batch 32; its convolutions through ``vmap``), so every 5000 steps it
            adds about 0.6% and 2.1% (``benchmarks/cockpit_comparison.py``).
        num_samples: Samples of the probe batch per rank (at most the training batch's).
        probe_batch: ``"fixed"``: the first ``num_samples`` samples of the first training batch of the fit, kept
            for the whole run (curves that describe the model, not the sampling noise of changing batches; kept in
            the checkpoint: under DDP every rank's batch is gathered once into rank 0's state and each rank takes
            its own back at a resume); ``"current"``: the first ``num_samples`` of the batch of the analysed
            step (Cockpit's choice: the batch the step trains on).
        curvature_samples: Rademacher vectors (Hessian-vector products) for Hutchinson's Hessian trace of the TIC
            (``tic_trace``, ``hessian_trace`` and its standard error); 0: no curvature, no TIC.
        tic_diag: Also record ``tic_diag`` (Cockpit's ``TICDiag``) from Hutchinson's estimate of the Hessian
            diagonal by the same vectors. Off by default: the estimate is unbiased, but each entry's error is of the
            size of its row's off-diagonal mass over ``sqrt(curvature_samples)``, and dividing by noisy entries
            near 0 makes the sum meaningless unless ``curvature_samples`` is large.
        histograms: Which per-sample gradient histograms to write: ``"1d"`` (default, Cockpit's ``GradHist1d``),
            ``"2d"`` (``GradHist2d``, gradient entry against parameter value: about twice the 1-D's cost),
            ``"both"`` or ``"none"``.
        hist_bins_1d: Bins of the 1-D histogram of gradient entries (Cockpit's ``GradHist1d``: 100).
        hist_range_1d: Its range (Cockpit: (-2, 2)); entries outside are clipped into the edge bins and counted
            in ``hist_outside_1d``.
        hist_bins_2d: ``(gradient, parameter)`` bins of the 2-D histogram (Cockpit's ``GradHist2d``: (40, 50)).
        hist_range_2d: Its ranges (Cockpit: ((-1, 1), (-2, 2))); pairs outside clipped likewise.
        seed: Seeds the Rademacher vectors (with the step).
        loss_fn: ``loss_fn(module_call, batch) -> scalar``, the **mean** loss of a batch (it is called on batches of
            one sample and on the probe batch). Default: cross entropy of ``module(x)`` against ``y`` for
            ``(x, y, ...)`` batches; a batch it does not fit skips the probe with the reason.
        rank_one: Take the sums and histograms of ``nn.Linear`` layers that see one input row per sample from the
            layers' inputs and output gradients (``||g_i||^2 = ||d_i||^2 ||a_i||^2``, ...; the 1-D histogram
            counted without forming the entries): the same numbers at a fraction of the cost (18 ms against 634 ms
            for 128 samples of a 784-512-256-128-10 MLP, one CPU thread). Stock ``nn.Linear`` only, its weight
            not shared, called once a forward; other layers (and sequence inputs) go through ``vmap``. ``False``:
            every tensor through ``vmap``.
        max_memory_gb: This probe's own memory allowance in GB (1e9 bytes), outside the shared budget; default
            ``None``: its share of the probes' budget (`lightning_probes.set_memory_budget`).
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files; default ``per_sample_gradients``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: ``"warn"`` (default) or ``"raise"`` (see `ProbeCallback`).

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[PerSampleGradientMonitor(every_n_steps=5000, num_samples=32)])
    """

    probe_name = "per_sample_gradients"
    layout_stats = ("norm_test", "inner_test", "ortho_test", "mean_gsnr")
    uses_memory_budget = True

    def __init__(self, every_n_steps: int = 5000, num_samples: int = 32,
                 probe_batch: Literal["fixed", "current"] = "fixed", curvature_samples: int = 10,
                 tic_diag: bool = False,
                 histograms: Literal["both", "1d", "2d", "none"] = "1d", hist_bins_1d: int = 100,
                 hist_range_1d: tuple[float, float] = (-2.0, 2.0), hist_bins_2d: tuple[int, int] = (40, 50),
                 hist_range_2d: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0)),
                 seed: int = 0, loss_fn: Optional[PerSampleLoss] = None, rank_one: bool = True,
                 max_memory_gb: Optional[float] = None, output_dir: Optional[str] = None, name: Optional[str] = None,
                 flush_every_n_steps: Optional[int] = None, flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
                 on_error: Optional[str] = None) -> None:
        super().__init__(output_dir, name, flush_every_n_steps, flush_secs, on_error=on_error)
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("num_samples", num_samples)
        check_positive_int("hist_bins_1d", hist_bins_1d)
        check_choice("probe_batch", probe_batch, _PROBE_BATCH)
        check_choice("histograms", histograms, _HISTOGRAMS)
        if isinstance(curvature_samples, bool) or not isinstance(curvature_samples, int) or curvature_samples < 0:
            raise ValueError(f"Expected `curvature_samples` to be an integer >= 0 (0: no TIC), but got "
                             f"{curvature_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, but got {seed!r}")
        if not isinstance(tic_diag, bool) or (tic_diag and not curvature_samples):
            raise ValueError(f"Expected `tic_diag` to be a bool, True only with curvature_samples > 0, but got "
                             f"{tic_diag!r} with curvature_samples={curvature_samples!r}")
        if not isinstance(rank_one, bool):
            raise ValueError(f"Expected `rank_one` to be True or False, but got {rank_one!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Expected `loss_fn` to be None or callable as loss_fn(module_call, batch), but got "
                             f"{loss_fn!r}")
        if max_memory_gb is not None:
            check_float("max_memory_gb", max_memory_gb, low=0.0, low_open=True)
        if not (isinstance(hist_bins_2d, (tuple, list)) and len(hist_bins_2d) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in hist_bins_2d)):
            raise ValueError(f"Expected `hist_bins_2d` to be two positive integers (gradient bins, parameter bins), "
                             f"but got {hist_bins_2d!r}")
        for arg, pair in (("hist_range_1d", hist_range_1d), ("hist_range_2d[0]", item_of(hist_range_2d, 0)),
                          ("hist_range_2d[1]", item_of(hist_range_2d, 1))):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in pair) and pair[0] < pair[1]):
                raise ValueError(f"Expected `{arg}` to be (low, high) with finite low < high, but got {pair!r}")
        self.every_n_steps, self.num_samples, self.probe_batch = every_n_steps, num_samples, probe_batch
        self.curvature_samples, self.histograms, self.seed = curvature_samples, histograms, seed
        self.tic_diag = tic_diag
        self.hist_bins_1d, self.hist_range_1d = hist_bins_1d, tuple(float(v) for v in hist_range_1d)
        self.hist_bins_2d = tuple(int(b) for b in hist_bins_2d)
        self.hist_range_2d = tuple(tuple(float(v) for v in r) for r in hist_range_2d)
        self.loss_fn = loss_fn
        self.rank_one = rank_one
        self.max_memory_gb = max_memory_gb
        self._spec = None if histograms == "none" else HistogramSpec(
            bins_1d=hist_bins_1d if histograms in ("both", "1d") else None, range_1d=self.hist_range_1d,
            bins_2d=self.hist_bins_2d if histograms in ("both", "2d") else None, range_2d=self.hist_range_2d)
        self._restored_batch: Any = None
        self.reset_run()

    def reset_run(self) -> None:
        super().reset_run()
        self._batch: Any = None
        self._batches: Optional[list[Any]] = None  # DDP: every rank's fixed probe batch (CPU), for rank 0's state
        self._current: Any = None
        self._last_step: Optional[int] = None
        self._prepared = False
        self._chunk = self._batch_chunk = 1
        self._vectorize = True
        self._linear: dict[str, torch.nn.Linear] = {}
        self._no_curvature: Optional[str] = None
        self._share = 0
        self._world_size = 1

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.probe_batch != "fixed":
            return state
        # The fixed probe batch of every rank, so a resumed run analyses the same samples: under DDP gathered once at
        # the first batch of the fit into rank 0's state (the only one Lightning keeps); at a resume each rank takes
        # its own entry back. One process: "probe_batch" alone.
        batches = self._batches
        if batches is None and self._batch is not None and self._world_size == 1:
            batches = [tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, self._batch)]
        if batches is None:
            batches = self._restored_batch  # restored, not taken back yet
        if batches is not None:
            if len(batches) == 1:
                state["probe_batch"] = batches[0]
            else:
                state["probe_batches"] = batches
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # One entry per rank of the run that saved it: "probe_batches" under DDP, "probe_batch" in one process.
        batches = state_dict.get("probe_batches")
        if batches is None and state_dict.get("probe_batch") is not None:
            batches = [state_dict["probe_batch"]]
        self._restored_batch = batches

    # -- setup -----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy).__name__ == "ModelParallelStrategy":
            raise ProbeConfigurationError(
                f"{type(self).__name__} does not support ModelParallelStrategy (FSDP2 or tensor parallelism): its "
                f"per-sample gradients run the model through functional_call, which needs the full parameters in "
                f"every process. Use strategy='ddp' or remove the probe.")
        super().setup(trainer, pl_module, stage)
        self._world_size = int(trainer.world_size)

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        if trainer.state.fn != "fit":
            return None
        if any(is_dtensor(p) for p in pl_module.parameters()):
            raise ProbeConfigurationError(f"{type(self).__name__}: the parameters are sharded (DTensor); its "
                                          f"per-sample gradients need full parameters. Use strategy='ddp'.")
        if not pl_module.automatic_optimization:
            return "manual optimisation: there is no one training loss per optimiser step to take per-sample " \
                   "gradients of"
        if not any(p.requires_grad for p in pl_module.parameters()):
            return "the model has no trainable parameter"
        self._share = self.memory_share(trainer, pl_module)
        return None

    # -- hooks -----------------------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and step != self._last_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.state.fn != "fit":
            return
        if self.probe_batch == "fixed":
            if self._batch is None:
                rank, world = trainer.global_rank, trainer.world_size
                restored, self._restored_batch = self._restored_batch, None
                if restored is not None and len(restored) != world:
                    rank_zero_warn(f"{type(self).__name__} {self.name!r}: the checkpoint's probe batch "
                                   f"({len(restored)} process(es)) does not fit this run ({world} process(es)); a "
                                   f"new probe batch is taken from this first batch, so the records from here on "
                                   f"are of other samples than before the checkpoint")
                    restored = None
                if restored is not None:
                    device = next(pl_module.parameters()).device
                    self._batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t,
                                           restored[rank])
                    self._batches = restored if world > 1 else None
                else:
                    self._batch = detach_clone(slice_samples(batch, 0, min(self.num_samples, sample_count(batch))))
                    if world > 1:  # every rank's probe batch in rank 0's checkpoint: one gather, once per fit
                        import torch.distributed as dist

                        gathered: list[Any] = [None] * world
                        dist.all_gather_object(gathered, tree_map(
                            lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, self._batch))
                        self._batches = gathered
        elif self._due(trainer.global_step):
            self._current = slice_samples(batch, 0, min(self.num_samples, sample_count(batch)))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if trainer.state.fn != "fit" or not self._due(step):
            return
        batch = self._batch if self.probe_batch == "fixed" else self._current
        self._current = None
        if batch is None:
            return
        self._last_step = step
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else math.nan
        with self.probe_pass(trainer):
            if not self._prepared and not self._prepare(trainer, pl_module, batch):
                return
            self._analyse(trainer, pl_module, batch, step, lr)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = None

    def on_disable(self, trainer: pl.Trainer) -> None:
        self._batch = self._current = None

    # -- the analysis ------------------------------------------------------------------------------------
    @property
    def _loss_fn(self) -> PerSampleLoss:
        return cross_entropy_loss if self.loss_fn is None else self.loss_fn

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> bool:
        """At the first analysis: whether the default loss fits the batch (every rank agrees), and the chunk sizes
        inside the memory share (one forward of one sample measures the activations)."""
        problem = default_loss_problem(pl_module, batch) if self.loss_fn is None else None
        if trainer.world_size > 1:
            if not trainer.strategy.reduce_boolean_decision(problem is None, all=True) and problem is None:
                problem = "the default loss_fn does not fit the training batch on another rank; pass loss_fn"
        if problem is not None:
            self.skip(trainer, problem)
            return False
        self._prepared = True
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        one = slice_samples(batch, 0, 1)

        def forward() -> None:
            with torch.no_grad(), eval_mode(pl_module):
                self._loss_fn(pl_module, one)

        activation = forward_peak_bytes(pl_module, forward)
        self._linear = rank_one_layers(pl_module, params, forward) if self.rank_one else {}
        if self._linear:
            log.info("%s %r: the rank-one shortcut for %d linear layers (%s)", type(self).__name__, self.name,
                     len(self._linear), ", ".join(n or "<root>" for n in self._linear))
        grad_bytes = sum(p.numel() * p.element_size() for p in params.values())
        largest = max(p.numel() for p in params.values())
        hist = 0 if self._spec is None else largest * 16 * (2 if self._spec.bins_1d and self._spec.bins_2d else 1)
        per_sample = per_sample_bytes(params, activation) + 2 * grad_bytes + hist
        n = sample_count(batch)
        captured = sum(2 * n * (layer.in_features + layer.out_features) * layer.weight.element_size()
                       for layer in self._linear.values())
        # the mean gradient, the per-entry sums (float64 on the C path: twice a float32 gradient) and a spare copy
        entries = sum(p.numel() for p in params.values()) * 8
        fixed = 2 * grad_bytes + entries + captured + (n * 3 * activation + 2 * grad_bytes if self.curvature_samples
                                                       else 0)
        self._chunk = chunk_size_for(max(0, self._share - fixed), per_sample, n)
        self._batch_chunk = chunk_size_for(max(0, self._share - fixed), 2 * activation + 1, n)
        reduced = None
        if self._chunk < n:
            reduced = f"per-sample gradients in chunks of {self._chunk} of the {n} samples " \
                      f"(about {format_bytes(per_sample)} a sample)"
            if fixed + per_sample > self._share:
                reduced += f"; one sample and the fixed part ({format_bytes(fixed)}) exceed the share"
        self.report_memory_plan(trainer, pl_module, int(fixed + self._chunk * per_sample), reduced)
        return True

    def _per_sample_pass(self, pl_module: pl.LightningModule, batch: Any, params: dict[str, torch.Tensor],
                         mean: list[torch.Tensor], base: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The sums of ``params`` (a subset of the trainable parameters; the others held fixed) from ``vmap``'s
        per-sample gradients; ``base``: ``(n,)`` per-sample projections of the other tensors, for the total."""
        names = list(params)
        values = list(params.values())
        sums = None
        done = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
            chunks = per_sample_gradients(pl_module, batch, params, self._loss_fn, self._chunk,
                                          vectorize=self._vectorize)
            while True:
                try:
                    grads, _ = next(chunks)
                except StopIteration:
                    break
                except Exception as err:  # noqa: BLE001 - a layer vmap cannot batch: loop over the samples instead
                    if not self._vectorize or sums is not None:
                        raise
                    log.info("%s %r: vmap failed (%s: %s); per-sample gradients by a loop over the samples from now "
                             "on", type(self).__name__, self.name, type(err).__name__, err)
                    self._vectorize = False
                    chunks = per_sample_gradients(pl_module, batch, params, self._loss_fn, self._chunk,
                                                  vectorize=False)
                    continue
                size = grads[names[0]].shape[0]
                part = None if base is None else base[done:done + size]
                done += size
                sums = per_sample_sums([grads[n] for n in names], mean, values, self._spec, part, into=sums)
        if sums is None:
            raise ValueError("Expected a probe batch of at least one sample, but got an empty batch")
        return sums

    def _sums(self, pl_module: pl.LightningModule, batch: Any, params: dict[str, torch.Tensor],
              mean: dict[str, torch.Tensor], captured: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
              ) -> dict[str, torch.Tensor]:
        """The per-sample sums of every tensor: the rank-one shortcut's for the captured linear layers, ``vmap``'s
        for the rest (with the shortcut's per-sample projections added to the total's)."""
        names = list(params)
        if not captured:
            return self._per_sample_pass(pl_module, batch, params, [mean[n] for n in names])
        parts, base = [], None
        for layer, (inputs, out_grads) in captured.items():
            prefix = f"{layer}." if layer else ""
            group = [prefix + "weight"] + ([prefix + "bias"] if prefix + "bias" in params else [])
            sums = rank_one_sums(inputs, out_grads, mean[group[0]], mean.get(group[1]) if len(group) > 1 else None,
                                 params[group[0]], self._spec, params.get(group[-1]) if len(group) > 1 else None)
            projections = sums.pop("projections").sum(1)
            base = projections if base is None else base + projections
            parts.append((group, sums))
        taken = {n for group, _ in parts for n in group}
        rest = [n for n in names if n not in taken]
        if rest:
            sums = self._per_sample_pass(pl_module, batch, {n: params[n] for n in rest}, [mean[n] for n in rest],
                                         base)
            total = sums["proj_sq"][-1]
            parts.append((rest, sums))
        else:
            total = base.square().sum()
        return combine_sums(parts, names, {n: params[n].numel() for n in names}, total)

    def _curvature(self, pl_module: pl.LightningModule, batch: Any, params: dict[str, torch.Tensor], n_local: float,
                   total: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hutchinson's Hessian diagonal and per-tensor forms on the (union) probe batch."""
        with differentiable_twice():
            local, _, _ = hvp_operator(pl_module, batch, self._loss_fn, params)
        hvp = local
        if self._world_size > 1:
            def hvp(v: torch.Tensor) -> torch.Tensor:  # the union batch: sum_r n_r H_r v / sum_r n_r
                out = local(v) * n_local
                all_reduce_sum(out)
                return out / total.to(out.dtype)
        first = next(iter(params.values()))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        with differentiable_twice():
            return hutchinson_diagonal(hvp, [p.numel() for p in params.values()], self.curvature_samples, generator,
                                       first.device, first.dtype)

    def _analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int,
                 lr: float) -> None:
        distributed = trainer.world_size > 1
        params = {n: p.detach() for n, p in pl_module.named_parameters() if p.requires_grad}
        names = list(params)
        n_local = float(sample_count(batch))
        with eval_mode(pl_module):
            if self._linear:
                grad, loss, captured = capture_linear(pl_module, batch, params, self._linear, self._loss_fn,
                                                      self._batch_chunk)
            else:
                grad, loss = mean_gradient(pl_module, batch, params, self._loss_fn, self._batch_chunk)
                captured = {}
            flat = torch.cat([grad[n].reshape(-1) for n in names])
            head = torch.cat([flat * n_local, torch.stack([loss.to(flat.dtype) * n_local,
                                                           flat.new_tensor(n_local)])])
            if distributed:
                all_reduce_sum(head)
            total = head[-1]
            mean_flat = head[:-2] / total
            mean = [m.view_as(params[n]) for m, n in zip(torch.split(mean_flat, [params[n].numel() for n in names]),
                                                          names)]
            loss = head[-2] / total
            sums = self._sums(pl_module, batch, params, dict(zip(names, mean)), captured)
            if distributed:
                keys = [k for k in _PACKED if k in sums]
                packed = torch.cat([sums[k].reshape(-1) for k in keys])
                all_reduce_sum(packed)
                sums.update({k: p.view_as(sums[k]) for k, p in zip(keys, torch.split(
                    packed, [sums[k].numel() for k in keys]))})
                all_reduce_sum(sums["sq_entries"])
            diagonal = forms = None
            if self.curvature_samples and self._no_curvature is None:
                try:
                    diagonal, forms = self._curvature(pl_module, batch, params, n_local, total, step)
                except RuntimeError as err:
                    # A layer autograd cannot differentiate twice (e.g. hardsigmoid's backward): the same on every
                    # rank, at the first product, before any all-reduce of it. No TIC from now on, said in the records.
                    if "not implemented" not in str(err):
                        raise
                    self._no_curvature = f"no Hessian-vector product: {err}".splitlines()[0][:300]
                    log.warning("%s %r: %s; hessian_trace and the TIC are null for this run", type(self).__name__,
                                self.name, self._no_curvature)
        table = gradient_tests(sums, mean, loss, lr, diagonal if self.tic_diag else None, forms)  # (T + 1, F)
        outside = [sums.get(k, torch.full_like(sums["sq_norm"], math.nan)) for k in ("outside_1d", "outside_2d")]
        outside = torch.stack([torch.cat([o, o.sum().reshape(1)]) for o in outside], 1)  # (T + 1, 2)
        hists = [sums[k].reshape(-1) for k in ("hist_1d", "hist_2d") if k in sums]
        block = torch.cat([table.reshape(-1), outside.reshape(-1), torch.stack([loss.double(), total.double()]),
                           *hists])
        shapes = {k: tuple(sums[k].shape) for k in ("hist_1d", "hist_2d") if k in sums}
        context = RecordContext(
            output_dir=self.output_dir, name=self.name, layers=[clean_name(n) for n in names],
            numels=[params[n].numel() for n in names], epoch=trainer.current_epoch, spec=self._spec,
            vectorized=self._vectorize, no_curvature=self._no_curvature,
            rank_one_tensors=sum(1 + int((f"{layer}.bias" if layer else "bias") in params) for layer in self._linear))
        self.defer_records(trainer, record_producer(context, shapes, step, lr), block)
