"""`ParameterProbe`: the base of the probes that read parameters at optimiser steps (the gradient probes)."""

from __future__ import annotations

import math
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, ProbeCallback
from lightning_probes.checks import check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.naming import Patterns, clean_name, compile_patterns, name_filter
from lightning_probes.probe_data import has_uninitialized, is_uninitialized
from lightning_probes.sharding import ShardLayout, check_strategy, is_dtensor, shard_layout

__all__ = ["ParameterProbe"]


class ParameterProbe(ProbeCallback):
    """Base of probes that read parameters at optimiser steps (gradient statistics and dynamics).

    It selects the trainable parameters whose cleaned names pass ``include``/``exclude``, maps each optimiser
    to the tracked parameters it steps, and counts each optimiser's steps so that a probe logs at every
    ``every_n_steps``-th step of each optimiser (one optimiser: every ``every_n_steps``-th global step).
    Parameters are selected once they exist: at the start of training, after ``configure_model``, after the
    strategy has moved and converted the module (device, dtype) and FSDP2 has sharded it, so no state is tied to
    where the parameters were at ``setup``. A model with lazy modules (``nn.LazyLinear``) is read at its first
    optimiser step, once the first forward has given the parameters their shapes (that step is logged too); a lazy
    parameter still without a shape then (its module never ran) has no gradient and is left out.

    Pre-flight (``fit``): ``include``/``exclude`` that match no trainable parameter stop the run before the first
    step with one `lightning_probes.errors.ProbeConfigurationError` listing the trainable parameters; a model
    without any trainable parameter (and neither argument given) skips the probe with one warning. Outside
    ``fit`` (validate, test, predict) there is no optimiser step: the probe stays idle.

    Each ``fit`` starts clean (`reset_run`: step counts, optimiser maps, the selection); a fit resumed from a
    checkpoint restores the optimiser step counts (``state_dict``).

    Strategies: under DDP (and one process) the gradients are the same on every rank and only global rank 0
    computes. Under FSDP2 (``fully_shard``; the parameters are ``DTensor``s sharded on dim 0) every rank computes
    partial sums over its local shard and the probe combines them with a constant number of all-reduces on the
    steps it reads gradients (`sharded` is then true; see `lightning_probes.sharding`). DeepSpeed, FSDP1 and
    tensor parallelism are refused at ``setup`` (`lightning_probes.sharding.check_strategy`).

    Args:
        every_n_steps: Log at every n-th optimiser step.
        include: Regular expression(s); only parameters whose name matches one are tracked.
        exclude: Regular expression(s); parameters whose name matches one are not tracked.
        output_dir: Directory for the probe's files (see `ProbeCallback`).
        name: Name of the probe's files and scalars (see `ProbeCallback`).
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe into one warning,
            a ``{"disabled": true}`` record and a disabled probe while training goes on; ``"raise"`` re-raises.
            ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"`` (see `lightning_probes.callbacks.guard`).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Patterns = None,
        exclude: Patterns = None,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir, name, flush_every_n_steps, flush_secs, on_error=on_error)
        check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.include, self.exclude = include, exclude
        self._keep = name_filter(compile_patterns("include", include), compile_patterns("exclude", exclude))
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._by_optimizer: dict[int, tuple[int, list[int]]] = {}
        self._optimizer_steps: dict[int, int] = {}
        #: Whether the tracked parameters are sharded (FSDP2): every rank computes, partial sums are all-reduced.
        self.sharded = False
        self._may_shard = False
        self._layouts: list[ShardLayout] = []
        self._layout_due = False  # lazy modules: select at the first optimiser step (`_ensure_layout`)
        self._trainable_names: Optional[set[str]] = None

    def reset_run(self) -> None:
        """Forget the previous run: selection, layouts, optimiser maps and step counts (a resumed fit restores the
        counts afterwards, in `load_state_dict`)."""
        super().reset_run()
        self._names, self._params = [], []
        self._by_optimizer = {}
        self._optimizer_steps = {}
        self.sharded = False
        self._layouts = []
        self._layout_due = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "optimizer_steps": dict(self._optimizer_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._optimizer_steps = {int(k): int(v) for k, v in state_dict.get("optimizer_steps", {}).items()}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._may_shard = check_strategy(type(self).__name__, trainer.strategy)
        # No selection here: `configure_model` builds layers after `setup`, the strategy replaces parameters, and
        # lazy modules get their shapes in the first forward (see `preflight`, `on_train_start`).

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """``fit`` only: refuse ``include``/``exclude`` that match no trainable parameter (by name: a lazy
        parameter counts, though it has no shape yet); skip a model without trainable parameters."""
        reason = super().preflight(trainer, pl_module)
        if reason is not None or trainer.state.fn != TrainerFn.FITTING:
            return reason
        named = self._trainable(pl_module)
        if any(self._keep(n) for n, _ in named):
            return None
        if not named and self.include is None and self.exclude is None:
            return "the model has no trainable parameter (no gradient to read)"
        raise ProbeConfigurationError(self._no_match_message(named))

    def _no_match_message(self, named: list[tuple[str, torch.nn.Parameter]]) -> str:
        available = ", ".join(n for n, _ in named) or "none"
        return (f"{type(self).__name__} {self.name!r} found no trainable parameter matching include={self.include!r}, "
                f"exclude={self.exclude!r}; set `include`/`exclude` to select at least one of them. Trainable "
                f"parameters: {available}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if has_uninitialized(pl_module):  # lazy modules: their parameters get shapes in the first forward
            # Trainable as of now: at the first step a manual-optimisation `toggle_optimizer` may have frozen some.
            self._trainable_names = {n for n, _ in self._trainable(pl_module)}
            self._layout_due = True
            return
        self._lay_out(trainer, pl_module)

    def _ensure_layout(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the parameters now if the start of training could not (lazy modules); at every optimiser step,
        before anything else, on every rank."""
        if self._layout_due:
            self._layout_due = False
            self._lay_out(trainer, pl_module, self._trainable_names)

    def _lay_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 trainable: Optional[set[str]] = None) -> None:
        """Select the parameters as they are now and learn their layout (sharded or not, shard extents)."""
        self._select(pl_module, trainable)
        self.sharded = any(is_dtensor(p) for p in self._params)
        self._layouts = [shard_layout(type(self).__name__, name, p, trainer.global_rank, trainer.world_size)
                         for name, p in zip(self._names, self._params)]
        self._on_layout(trainer)
        if getattr(self, "compile", None) == "auto":
            self._decide_compile(trainer)

    def _kernels(self) -> list[Any]:
        """The probe's `FusedKernel`s (for ``compile="auto"``)."""
        return []

    def _decide_compile(self, trainer: pl.Trainer) -> bool:
        """``compile="auto"``: compile the kernels when the fit will log enough steps for the compilation to pay
        (`lightning_probes.functional._fused.should_compile`) and the parameters are not sharded."""
        from lightning_probes.functional._fused import COMPILE_MIN_LOGGED_STEPS, should_compile

        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - a length Lightning cannot estimate: stay eager
            total = math.inf
        device = self._params[0].device if self._params else torch.device("cpu")
        enabled = not self.sharded and should_compile(total, self.every_n_steps, device)
        for kernel in self._kernels():
            kernel.enable(enabled)
        if enabled:
            rank_zero_info(f"{type(self).__name__} {self.name!r}: compile='auto' compiles its kernels (about "
                           f"{total / self.every_n_steps:,.0f} logged steps, at least {COMPILE_MIN_LOGGED_STEPS:,}).")
        return enabled

    def _on_layout(self, trainer: pl.Trainer) -> None:
        """Called at the start of training once `sharded` and the shard layouts are known (for subclasses)."""

    def computes(self, trainer: pl.Trainer) -> bool:
        """Whether this rank computes statistics: global rank 0, or every rank when the parameters are sharded."""
        return self.sharded or trainer.is_global_zero

    @staticmethod
    def _trainable(pl_module: pl.LightningModule,
                   names: Optional[set[str]] = None) -> list[tuple[str, torch.nn.Parameter]]:
        """``(clean name, parameter)`` of the parameters that require gradients (or, given ``names``, of those
        named there)."""
        named = [(clean_name(n), p) for n, p in pl_module.named_parameters()]
        return [(n, p) for n, p in named if (p.requires_grad if names is None else n in names)]

    def _select(self, pl_module: pl.LightningModule, trainable: Optional[set[str]] = None) -> None:
        """Track the trainable parameters (those named in ``trainable`` when given) that pass
        ``include``/``exclude`` and have a shape (never an uninitialised lazy parameter)."""
        named = self._trainable(pl_module, trainable)
        selected = [(n, p) for n, p in named if self._keep(n) and not is_uninitialized(p)]
        if not selected:
            message = self._no_match_message(named)
            if any(self._keep(n) for n, _ in named):
                message += " (those matching are lazy parameters that still have no shape: their module never ran)"
            raise ProbeConfigurationError(message)
        self._names = [n for n, _ in selected]
        self._params = [p for _, p in selected]
        self._by_optimizer = {}

    def _tracked_for(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> tuple[int, list[int]]:
        """``(optimizer index, indices of tracked parameters it steps)``, cached per optimizer."""
        key = id(optimizer)
        if key not in self._by_optimizer:
            index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._by_optimizer[key] = (index, [i for i, p in enumerate(self._params) if id(p) in owned])
        return self._by_optimizer[key]

    def _next_step(self, optimizer_index: int) -> int:
        """This optimiser's step count before this step; advances the count."""
        count = self._optimizer_steps.get(optimizer_index, 0)
        self._optimizer_steps[optimizer_index] = count + 1
        return count

    @staticmethod
    def loss_scale_inverse(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
        """``1 / loss scale`` (a 0-d tensor on the scale's device) when the gradients reach
        ``on_before_optimizer_step`` still multiplied by an AMP ``GradScaler``'s scale, else ``None``.

        Lightning's ``MixedPrecision`` unscales the gradients before the hook, except for optimizers that unscale
        inside their own ``step`` (fused optimizers such as ``Adam(fused=True)``): there the probe divides by the
        scale itself. Read from the scaler's per-optimizer stage, so no host synchronisation.
        """
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return None
        scale = getattr(scaler, "_scale", None)
        states = getattr(scaler, "_per_optimizer_states", None)
        if scale is None or states is None:
            return None
        from torch.amp.grad_scaler import OptState

        stage = states[id(optimizer)]["stage"] if id(optimizer) in states else OptState.READY
        if stage is OptState.UNSCALED:
            return None
        return scale.double().reciprocal()

    def _base_record(self, trainer: pl.Trainer, optimizer_index: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        if len(trainer.optimizers) > 1:
            record["optimizer"] = optimizer_index
        return record
