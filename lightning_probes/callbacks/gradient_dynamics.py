"""`GradientDynamicsMonitor`: near-zero gradients, their release, sign flips, crossings and update norms."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_probes.callbacks._dynamics_after import AfterStep
from lightning_probes.callbacks._dynamics_init import InitDistance
from lightning_probes.callbacks._dynamics_paths import DynamicsPasses, sample_of
from lightning_probes.callbacks._dynamics_records import EPOCH_MEANS, DynamicsRecords
from lightning_probes.callbacks._dynamics_step import Deferred, Pending, Previous
from lightning_probes.callbacks._entries import (
    EntrySelection,
    auto_max_entries,
    bytes_per_entry,
    draw_subsets,
    megabytes,
    pick_columns,
    select_entries,
)
from lightning_probes.callbacks._gradient_figures import (
    dynamics_specs,
    over_training_figure,
    sign_categories,
    sign_map_specs,
)
from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, FigureSpec
from lightning_probes.callbacks.parameter_probe import ParameterProbe
from lightning_probes.checks import check_float, check_positive_int
from lightning_probes.functional._fused import FusedKernel, fused_dynamics_after, fused_dynamics_before
from lightning_probes.functional.dynamics import zero_threshold_for
from lightning_probes.functional.gradients import l2_norms
from lightning_probes.naming import TOTAL, Patterns
from lightning_probes.sharding import ShardLayout, all_reduce_sum, local_tensor

log = logging.getLogger(__name__)

#: Above this many tracked entries, ``max_entries="auto"`` follows a subset of each large tensor.
_AUTO_ABOVE = 100_000_000


class GradientDynamicsMonitor(AfterStep, InitDistance, DynamicsRecords, ParameterProbe):
    """Tracks how the optimiser moves: near-zero gradients, their release, sign flips and weight updates.

    At every ``every_n_steps``-th optimiser step ``t`` it compares the gradient with the one at step ``t-1``
    and writes, per parameter tensor and as ``__total__``, to ``gradient_dynamics.jsonl`` and the loggers
    (``gradient_dynamics/<stat>/<layer>``):

    - ``zero_count``, ``zero_fraction``: entries with ``|g| < zero_threshold``;
    - ``released_fraction`` / ``retained_fraction``: of the entries with ``|g| < release_threshold`` at
      ``t-1``, the share now at or above it / still below it;
    - ``sign_flip_fraction``: share of entries whose gradient sign changed (entries that are exactly zero at
      either step excluded);
    - ``minima_crossings`` / ``maxima_crossings``: flipped entries with ``dw * dg > 0`` / ``< 0``, where
      ``dw = w_t - w_{t-1}`` and ``dg = g_t - g_{t-1}``;
    - ``update_norm`` (``||w_after - w_before||`` of step ``t``), ``weight_norm`` (after the step),
      ``grad_norm``, and their exponential moving averages ``*_ema`` (over logged steps, ``ema_decay``);
    - ``update_ratio`` (``||w_after - w_before|| / ||w_after||``, the update-to-weight ratio; the ratio of the
      RMS values is the same number) and ``update_rms`` (``||w_after - w_before|| / sqrt(n)``);
    - with ``init_distance=True``: ``init_distance`` (``||w_after - w_0||``, ``w_0`` the weights at the first
      optimiser step of the fit) and ``relative_init_distance`` (``||w_after - w_0|| / ||w_0||``). ``w_0`` is
      written once to ``<name>/initial_weights.rank<r>.bin`` (4 bytes per followed entry on disk, 8 for float64;
      never a second model in memory) and read back in pieces of 64 MiB on logged steps; a resumed fit reopens
      the file of the fit it resumes.

    A record of a step the AMP GradScaler skipped (non-finite gradients) has ``skipped: true`` and no flip,
    release or update statistics; the next step then has no previous gradient (``has_previous: false``), as
    does the first step after a restart. Between steps it keeps one byte per tracked entry (an ``int8``
    sign-level-and-direction code, see `lightning_probes.functional._fused`), and only for the step before
    a logged one. A compared step rewrites that byte in place and adds a compact copy of the weights before the
    optimiser step: 3 bytes per float32 entry (exact for every weight of at least ``2**-15`` times its tensor's
    largest magnitude; see `lightning_probes.functional._fused.decode_weights` for the smaller ones), 2 per
    16-bit entry, 8 per float64 entry; so 4 bytes per followed float32 entry in all, freed after the step. On a
    CPU each of the two passes of a step (before and after the optimiser) is one C loop over the gradients,
    weights and state (`lightning_probes.functional._native`, built with the system's C compiler at the first
    step, half a second; without a compiler the eager torch reference runs). A logged step costs one
    device-to-host transfer.

    Headline metrics for ``EarlyStopping``/``ModelCheckpoint`` (``trainer.callback_metrics``, at every train
    epoch end, on every rank): the epoch means over the logged steps of the ``__total__`` fractions and update
    norm, ``<name>/epoch_mean_<stat>/__total__`` for ``zero_fraction``, ``released_fraction``,
    ``retained_fraction``, ``sign_flip_fraction`` and ``update_norm`` (the same values are logged).

    At every epoch end it adds a row to a gradient-sign map (columns: gradient entries from the first to the
    last layer, deterministically subsampled to ``max_columns``): white where ``|g| > release_threshold``, red
    for small negative, green for small positive, black for exact zeros. It is drawn whole and zoomed on
    ``zoom_columns`` to ``<name>/gradient_sign_map.png`` / ``<name>/gradient_sign_map_zoom.png`` and TensorBoard;
    its rows are kept in ``state_dict`` and in ``<name>/sign_map.npz`` (``lightning-probes plot`` redraws it).
    At the end of fit it plots zero counts, released fraction, flip fraction and update norm over the whole
    history (a resumed run's included) to ``<name>/gradient_dynamics.png``.

    No state is tied to where the parameters were at ``setup``: the index tensors of the sign-map columns
    follow the gradients' device, and norms are taken in float32 (float64 for float64 gradients). The optimiser
    step post-hooks run outside Lightning's hook dispatch; a failure there goes through ``on_error`` all the same
    (see `lightning_probes.callbacks._dynamics_after`). Each ``fit`` starts clean (`reset_run`): a probe reused in
    a second ``fit`` writes that fit's records from its step 0.

    Large models: ``max_entries`` follows, per tensor, a seeded fixed subset of at most that many entries (the
    same at every step and on every rank). Every record carries ``sampled_entries``, the number of entries its
    counts are over; ``zero_count``, ``minima_crossings``, ``maxima_crossings`` are counts over the subset (not
    scaled), the fractions are over the subset, and so is ``update_norm`` (the weights are copied only there);
    ``grad_norm`` and ``weight_norm`` need no state and stay over the whole tensors. The default ``"auto"``
    follows every entry up to 100M tracked entries; above that it picks the cap that keeps the probe's peak
    memory (4 bytes per followed float32 entry: the state byte and the weights' compact copy) under 10% of the
    parameters' memory, and says so in one info line. The memory estimate is logged once the
    parameters are selected (the start of training).

    Strategies: under FSDP2 every rank compares the entries of its own shards and one all-reduce (a sum over one
    stacked tensor: counts, squared norms, non-finite flags and the sign-map columns each rank holds) per logged
    step gives the full tensors' records. Under AMP with an optimizer that unscales inside its ``step`` (fused
    Adam) the gradients reach the hook still scaled: they are divided by the loss scale before they are compared.

    Args:
        every_n_steps: Log at every n-th optimiser step (of each optimiser).
        zero_threshold: Magnitude below which a gradient entry counts as zero. Dtype-aware: for bf16/fp16
            gradients it is raised to the dtype's smallest normal number when lower.
        release_threshold: Magnitude below which an entry is "near zero" for release/retention and the sign map.
        ema_decay: Decay of the exponential moving averages, in [0, 1).
        max_columns: Most gradient entries shown in the sign map.
        zoom_columns: ``(start, stop)`` column range of the zoomed sign map.
        include: Regular expression(s); only parameters whose name matches one are tracked.
        exclude: Regular expression(s); parameters whose name matches one are not tracked.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``gradient_dynamics``.
        compile: Run the two passes of a step through ``torch.compile`` (Triton kernels on a GPU, C++ on a CPU)
            instead of the C loops (CPU) or the eager torch reference. The first step pays the compilation once
            (seconds; see `compile_seconds`); where compiling is unavailable or fails, it runs as without it
            (logged once). Counts are identical on every path; norms agree to float rounding (summed in
            float64). Compiled only where one process holds whole tensors and follows every entry. ``"auto"``
            (default): compile on an accelerator when the fit will log at least 5,000 steps and
            ``torch.compile`` can build kernels there; on a CPU the C loops are faster than Inductor's code.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).
        max_entries: Most entries followed per tensor (a seeded fixed subset); ``None``: all; ``"auto"``: all up
            to 100M tracked entries, else the cap that keeps the probe under 10% of the parameters' memory.
        seed: Seed of the ``max_entries`` subsets.
        init_distance: Also record the distance from the initial weights (``init_distance``,
            ``relative_init_distance``): costs a file of the followed weights on disk and reading it on logged steps.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[GradientDynamicsMonitor(every_n_steps=10)])
    """

    probe_name = "gradient_dynamics"
    _charted = ("zero_count", "zero_fraction", "released_fraction", "retained_fraction", "sign_flip_fraction",
                "minima_crossings", "maxima_crossings", "grad_norm", "update_norm", "weight_norm", "grad_norm_ema",
                "weight_norm_ema", "update_ratio", "update_rms")

    @property
    def layout_stats(self) -> tuple[str, ...]:  # type: ignore[override]
        """The statistics charted in TensorBoard's custom-scalar layout (one chart each, every layer in it)."""
        return self._charted + (("init_distance", "relative_init_distance") if self.init_distance else ())

    def __init__(
        self,
        every_n_steps: int = 50,
        zero_threshold: float = 1e-7,
        release_threshold: float = 1e-5,
        ema_decay: float = 0.9,
        max_columns: int = 2000,
        zoom_columns: tuple[int, int] = (0, 200),
        include: Patterns = None,
        exclude: Patterns = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        compile: Union[bool, Literal["auto"]] = "auto",
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        max_entries: Union[int, None, Literal["auto"]] = "auto",
        seed: int = 0,
        on_error: Optional[str] = None,
        init_distance: bool = False,
    ) -> None:
        super().__init__(every_n_steps, include, exclude, output_dir, name,
                         flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs, on_error=on_error)
        check_float("zero_threshold", zero_threshold, low=0.0, low_open=True)
        check_float("release_threshold", release_threshold, low=0.0, low_open=True)
        if zero_threshold > release_threshold:
            raise ValueError(f"Expected `zero_threshold` <= `release_threshold`, but got {zero_threshold!r} > "
                             f"{release_threshold!r}")
        check_float("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        check_positive_int("max_columns", max_columns)
        if (len(tuple(zoom_columns)) != 2 or not all(isinstance(c, int) for c in zoom_columns)
                or not 0 <= zoom_columns[0] < zoom_columns[1]):
            raise ValueError(
                f"Expected `zoom_columns` to be (start, stop) with 0 <= start < stop, but got {zoom_columns!r}")
        self.zero_threshold = float(zero_threshold)
        self.release_threshold = float(release_threshold)
        self.ema_decay = float(ema_decay)
        self.max_columns = max_columns
        self.zoom_columns = tuple(zoom_columns)
        self._previous: dict[int, Previous] = {}
        self._pending: dict[int, Pending] = {}
        self._hooks: list[Any] = []
        self._ema: dict[str, dict[str, float]] = {}
        self._epoch_sums: dict[str, list[float]] = {}
        self._sign_rows: list[np.ndarray] = []
        self._sign_epochs: list[int] = []
        self._latest_row: Optional[np.ndarray] = None
        if max_entries != "auto" and max_entries is not None and (
                isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1):
            raise ValueError(f"Expected `max_entries` to be a positive integer, None (every entry) or 'auto', but got "
                             f"{max_entries!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Expected `seed` to be a non-negative integer, but got {seed!r}")
        self.max_entries = max_entries
        self.seed = seed
        if not isinstance(init_distance, bool):
            raise ValueError(f"Expected `init_distance` to be True or False, but got {init_distance!r}")
        self.init_distance = init_distance
        # Per tracked tensor: the followed subset (None: every entry), the count of followed entries, the sign-map
        # columns (positions in the followed entries, CPU) and where they start in a map row.
        self._subsets: list[Optional[np.ndarray]] = []
        self._selected_counts: list[int] = []
        self._auto_cap: Optional[int] = None
        self._columns: list[torch.Tensor] = []
        self._column_offsets: list[int] = []
        self._n_columns = 0
        # Per (tracked indices, device): the index tensors of `_entries.select_entries`.
        self._selections: dict[tuple[tuple[int, ...], torch.device], EntrySelection] = {}
        self._warned_nonfinite = False
        self._unproduced: list[Deferred] = []  # deferred blocks whose records are not made yet (rank 0)
        if compile not in (True, False, "auto"):
            raise ValueError(f"Expected `compile` to be True, False or 'auto', but got {compile!r}")
        self.compile = compile
        self._kernel_before = FusedKernel(fused_dynamics_before, enabled=self.compile is True,
                                          name=f"{type(self).__name__} statistics")
        self._kernel_after = FusedKernel(fused_dynamics_after, enabled=self.compile is True,
                                         name=f"{type(self).__name__} state update")
        self._passes = DynamicsPasses(self._kernel_before, self._kernel_after)

    def _kernels(self) -> list[FusedKernel]:
        return [self._kernel_before, self._kernel_after]

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in the first (compiling) calls of the compiled kernels; 0 when running eagerly."""
        return self._kernel_before.compile_seconds + self._kernel_after.compile_seconds

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # writes the pending records first: the EMAs, sums and row below follow them
        latest = None if self._latest_row is None else self._latest_row.tolist()
        return {**state, "ema": {k: dict(v) for k, v in self._ema.items()},
                "sign_rows": [r.tolist() for r in self._sign_rows], "sign_epochs": list(self._sign_epochs),
                "latest_row": latest, "epoch_sums": {k: list(v) for k, v in self._epoch_sums.items()},
                **self._initial_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._ema = {k: dict(v) for k, v in state_dict.get("ema", {}).items()}
        self._sign_rows = [np.asarray(r, dtype=np.int8) for r in state_dict.get("sign_rows", [])]
        self._sign_epochs = list(state_dict.get("sign_epochs", []))
        latest = state_dict.get("latest_row")
        self._latest_row = None if latest is None else np.asarray(latest, dtype=float)
        self._epoch_sums = {k: [float(v[0]), int(v[1])] for k, v in state_dict.get("epoch_sums", {}).items()}
        self._previous = {}  # the first step after a restore has no previous gradient
        self._restored_initial = state_dict.get("initial_weights")  # `w_0` is the resumed fit's own

    # -- setup and teardown -------------------------------------------------------------------------
    def reset_run(self) -> None:
        """Forget the previous run: hooks, pending steps, states, EMAs, epoch sums, sign-map rows, caches (a
        resumed fit restores its state afterwards, in `load_state_dict`)."""
        super().reset_run()
        self._remove_hooks()
        self._previous, self._pending, self._unproduced = {}, {}, []
        self._ema, self._epoch_sums = {}, {}
        self._sign_rows, self._sign_epochs = [], []
        self._latest_row = None
        self._selections = {}
        self._passes.reset()
        self._warned_nonfinite = False
        self._reset_initial()

    def on_disable(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()  # from inside a post-hook: at teardown (see `AfterStep`)
        self._previous, self._pending, self._unproduced = {}, {}, []

    def _memory_info(self) -> None:
        followed = sum(self._selected_counts)
        itemsize = max((p.element_size() for p in self._params), default=4)
        rank_zero_info(
            f"{type(self).__name__} {self.name!r}: follows {followed:,} of {sum(p.numel() for p in self._params):,} "
            f"gradient entries; memory: {megabytes(followed)} between steps (one byte per followed entry), "
            f"{megabytes(followed * bytes_per_entry(itemsize))} during a compared step (the state byte and the "
            f"weights' compact before-copy; under FSDP2 shared among the ranks).")

    def _select(self, pl_module: pl.LightningModule, trainable: Optional[set[str]] = None) -> None:
        super()._select(pl_module, trainable)
        numels = [p.numel() for p in self._params]
        cap: Optional[int] = None if self.max_entries == "auto" else self.max_entries
        if self.max_entries == "auto" and sum(numels) > _AUTO_ABOVE:
            itemsize = max(p.element_size() for p in self._params)
            cap = auto_max_entries(numels, itemsize)
            if cap != self._auto_cap:
                rank_zero_info(
                    f"{type(self).__name__} {self.name!r}: {sum(numels):,} tracked entries (over {_AUTO_ABOVE:,}): "
                    f"following at most {cap:,} seeded entries per tensor (max_entries='auto') keeps the probe "
                    f"under 10% of the parameters' memory; set `max_entries` to choose.")
        self._auto_cap = cap
        self._subsets = draw_subsets(numels, cap, self.seed)
        self._selected_counts = [n if s is None else len(s) for n, s in zip(numels, self._subsets)]
        self._columns, self._column_offsets, n_columns = pick_columns(self._selected_counts, self.max_columns)
        if self._latest_row is not None and len(self._latest_row) != n_columns:
            self._latest_row = None
        self._n_columns = n_columns
        self._selections = {}

    def _selection_for(self, tracked: list[int], device: torch.device) -> EntrySelection:
        """The index tensors of the ``tracked`` tensors on ``device`` (built at the first step that meets them)."""
        key = (tuple(tracked), device)
        if key not in self._selections:
            layouts = self._layouts or [None] * len(self._params)
            if layouts[0] is None:  # no training start yet (direct use): every entry is local
                layouts = [ShardLayout(0, p.numel(), p.numel(), True) for p in self._params]
            self._selections[key] = select_entries(tracked, layouts, self._subsets, self._columns,
                                                   self._column_offsets, device, self.sharded)
        return self._selections[key]

    def _on_layout(self, trainer: pl.Trainer) -> None:
        self._selections = {}
        self._memory_info()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # selects the parameters (lazy modules: at the first step)
        self._register_hooks(trainer)  # every rank: whether it computes is known once the parameters are laid out
        self._previous, self._pending = {}, {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._pending, self._previous, self._unproduced = {}, {}, []  # the buffer still makes queued records

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._pending, self._previous, self._unproduced = {}, {}, []
        super().teardown(trainer, pl_module, stage)

    # -- the step -----------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._ensure_layout(trainer, pl_module)
        if not self.computes(trainer):
            return
        opt_index, tracked = self._tracked_for(trainer, optimizer)
        self._resolve_skipped(trainer, opt_index)
        self._ensure_initial(trainer)
        count = self._next_step(opt_index)
        log_now = count % self.every_n_steps == 0
        snapshot = (count + 1) % self.every_n_steps == 0
        previous = self._previous.pop(opt_index, None)
        if not (log_now or snapshot):
            return
        tracked = [i for i in tracked if self._params[i].grad is not None]
        if not tracked:
            return
        params = [local_tensor(self._params[i]).detach() for i in tracked]  # this rank's shards under FSDP2
        grads = [local_tensor(self._params[i].grad).detach() for i in tracked]
        device = grads[0].device
        selection = self._selection_for(tracked, device)
        has_previous = (log_now and previous is not None and previous.count == count - 1
                        and previous.tracked == tracked)
        state = previous.state if has_previous else None
        scale = self.loss_scale_inverse(trainer, optimizer)
        whole = not self.sharded and all(self._subsets[i] is None for i in tracked)
        dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads])
        counts, squares, sample, buffers = self._passes.before(
            grads, params, selection, state, zero_threshold_for(dtype, self.zero_threshold), self.release_threshold,
            scale, whole)  # one pass: counts, squared norms, the step's codes and the weights' compact copy
        squares = self._whole_squares(grads, squares, tracked, selection, device)
        if scale is not None:
            squares = squares * scale.square()
        pending = Pending(count=count, tracked=tracked, log=log_now, snapshot=snapshot,
                          step=trainer.global_step, epoch=trainer.current_epoch,
                          finite=torch.isfinite(squares).all(), grad_norm=squares, sizes=selection.sizes,
                          buffers=buffers, scale=scale, whole=whole)
        if log_now:
            pending.has_previous = has_previous
            pending.counts = counts.double()  # (P, 7)
            pending.previous_finite = previous.finite if has_previous else pending.finite
            compare = torch.float64 if dtype == torch.float64 else torch.float32
            pending.sample = sample_of(grads, selection, compare, scale, sample)
        self._pending[opt_index] = pending

    def _whole_squares(self, tensors: list[torch.Tensor], squares: Optional[torch.Tensor], tracked: list[int],
                       selection: EntrySelection, device: torch.device) -> torch.Tensor:
        """``(P,)`` float64 squared norms of the whole local ``tensors`` (masked to the tensors this rank owns):
        ``squares`` (over the followed entries) where those are the whole tensor, else computed here."""
        partial = [k for k, index in enumerate(selection.local_index) if index is not None]
        if squares is None or len(partial) == len(tensors):
            return self._owned(l2_norms(tensors).double().square(), tracked, device)
        if partial:
            squares = squares.clone()
            squares[partial] = l2_norms([tensors[k] for k in partial]).double().square()
        return self._owned(squares.to(device), tracked, device)

    def _owned(self, values: torch.Tensor, tracked: list[int], device: torch.device) -> torch.Tensor:
        """``values`` (one per tracked tensor) with the tensors another rank contributes set to 0 (FSDP2)."""
        if not self.sharded or all(self._layouts[i].owner for i in tracked):
            return values
        mask = torch.tensor([float(self._layouts[i].owner) for i in tracked], dtype=values.dtype, device=device)
        return values * mask

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.computes(trainer):
            self._resolve_skipped(trainer)

    # -- records ------------------------------------------------------------------------------------
    def _write(self, trainer: pl.Trainer, opt_index: int, pending: Pending, skipped: bool) -> None:
        tracked = pending.tracked
        n_layers = len(tracked)
        device = pending.counts.device
        missing = torch.full((n_layers,), float("nan"), dtype=torch.float64, device=device)
        not_finite = torch.stack([~pending.finite, ~pending.previous_finite])  # summed over ranks under FSDP2
        packed = torch.cat([  # everything the records need: one all-reduce under FSDP2, one transfer
            pending.counts.reshape(-1).double(),
            pending.grad_norm.double(),
            (missing if pending.update_norm is None else pending.update_norm).double(),
            (missing if pending.weight_norm is None else pending.weight_norm).double(),
            (missing if pending.followed_weight is None else pending.followed_weight).double(),
            *((missing, missing) if pending.initial is None else pending.initial),
            not_finite.double(),
            pending.sample.double(),
        ])
        if self.sharded:
            packed = all_reduce_sum(packed)
        if not trainer.is_global_zero:
            return
        base = self._base_record(trainer, opt_index)
        base.update(step=pending.step, epoch=pending.epoch, skipped=skipped)
        due = self.logger_due(trainer, pending.step)
        # The block stays on the device until the buffer is written (one host copy for all pending blocks). A step
        # whose scalars go to the loggers now (every `log_every_n_steps`) makes its records at once, after those of
        # the blocks before it (the EMAs run in step order), and they are still written with the buffer.
        item = Deferred(functools.partial(self._records, trainer, tracked, pending.has_previous, base, device, due),
                        packed)
        self._unproduced = [d for d in self._unproduced if d.records is None]
        if due:
            Deferred.materialise_all([*self._unproduced, item])
            self._unproduced = []
        else:
            self._unproduced.append(item)
        self.defer_records(trainer, item, None if due else packed)

    # -- epoch and fit end --------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_sums = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        means = None
        if self.computes(trainer):
            self._resolve_skipped(trainer)  # under FSDP2 every rank enters the step's all-reduce
        if trainer.is_global_zero:
            self.flush_records()  # the pending blocks fill the epoch means and the sign-map row
            means = self.scalars([{"layer": TOTAL, **{k: s / n for k, (s, n) in self._epoch_sums.items() if n}}],
                                 EPOCH_MEANS, prefix="epoch_mean_")
            self.log_scalars(trainer, means, trainer.global_step)
            self._add_sign_row(trainer)
        # Every rank calls `publish` (rank 0's values are broadcast): only rank 0 computes the statistics.
        self.publish(trainer, means, from_rank_zero=True)

    def _add_sign_row(self, trainer: pl.Trainer) -> None:
        if self._latest_row is not None:
            self._sign_rows.append(sign_categories(self._latest_row, self.release_threshold))
            self._sign_epochs.append(trainer.current_epoch)
            rows = np.stack(self._sign_rows)
            self.save_npz(trainer, "sign_map.npz", rows=rows, epochs=np.asarray(self._sign_epochs),
                          release_threshold=np.asarray(self.release_threshold),
                          zoom_columns=np.asarray(self.zoom_columns))
            for filename, tag, draw in sign_map_specs(rows, self._sign_epochs, self.release_threshold,
                                                      self.zoom_columns):
                self.save_figure(trainer, draw(), filename, tag, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        totals = [r for r in self.read_history() if r.get("layer") == TOTAL]
        if totals:
            self.save_figure(trainer, over_training_figure(totals), "gradient_dynamics.png", "over_training",
                             trainer.global_step)

    @classmethod
    def figures_from_files(cls, directory: str, name: str, settings: Mapping[str, Any]) -> list[FigureSpec]:
        """The sign maps (from ``<name>/sign_map.npz``) and the all-layer dynamics over the steps (from the
        JSONL's ``__total__`` records)."""
        return dynamics_specs(directory, name, cls.records_of(directory, name))
