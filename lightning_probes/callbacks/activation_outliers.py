"""`ActivationOutlierMonitor`: massive activations and outlier entries in the training batch, per layer."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, ProbeCallback
from lightning_probes.callbacks.guard import handle_failure
from lightning_probes.capture import has_own_parameters, is_parametrization_part
from lightning_probes.checks import check_choice, check_float, check_positive_int
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.feature_rows import CHANNEL_FIRST, FEATURES_LAST
from lightning_probes.functional.outliers import channel_dim_for, exceed_count, outlier_partials, outlier_stats
from lightning_probes.naming import Patterns, clean_name, close_matches, compile_patterns, name_filter
from lightning_probes.sharding import all_reduce_max, all_reduce_sum, is_dtensor, tensor_parallel_size

log = logging.getLogger(__name__)

__all__ = ["ActivationOutlierMonitor", "default_outlier_layers"]

_STATS = ("rms", "max_abs", "exceed_fraction", "channel_max_ratio", "top_channel")
#: Modules always watched by default (besides the modules holding parameters and repeated blocks).
_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def default_outlier_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The default selection of `ActivationOutlierMonitor`, by clean name, in ``named_modules`` order.

    Every module that holds parameters itself (``Linear``, convolutions, ``LayerNorm``/``RMSNorm``/batch norm,
    ``Embedding``, ``nn.MultiheadAttention``, ...; never the modules of a ``parametrizations`` container, nor the
    ``out_proj`` of an ``nn.MultiheadAttention``, which it applies through its weight and never calls), plus the
    blocks: every ``nn.TransformerEncoderLayer``/``TransformerDecoderLayer``, and every member with children of an
    ``nn.ModuleList``/``nn.Sequential`` that holds at least two members of its class (the repeated blocks of a
    GPT, a ResNet stage, ...), whose outputs are the residual stream where massive activations live.
    """
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        name = clean_name(name)
        if name and name not in modules:
            modules[name] = module
    attention_parts = {f"{n}.out_proj" for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    blocks: set[int] = set()
    for module in modules.values():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = [c for c in module.children() if any(True for _ in c.children())]
            for child in children:
                if sum(type(c) is type(child) for c in children) >= 2:
                    blocks.add(id(child))
    chosen = {}
    for name, module in modules.items():
        if is_parametrization_part(name) or name in attention_parts:
            continue
        if has_own_parameters(module) or isinstance(module, _BLOCKS) or id(module) in blocks:
            chosen[name] = module
    return chosen


def _first_float_tensor(value: Any) -> Optional[torch.Tensor]:
    """The first floating-point tensor of a layer output: the output itself, else depth-first through tuples,
    lists and dict values (``(output, weights)`` of attention, ``(output, (h, c))`` of an LSTM, a ``ModelOutput``)."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_float_tensor(item)
        if found is not None:
            return found
    return None


def _or_nothing(names: list[str]) -> str:
    return ", ".join(map(repr, names)) or "nothing close"


def _channel_first(module: nn.Module, ndim: int) -> bool:
    """Whether ``module``'s output of ``ndim`` dimensions has its channels in dimension 1."""
    if isinstance(module, CHANNEL_FIRST):
        return True
    if isinstance(module, FEATURES_LAST):
        return False
    return ndim >= 4  # a custom block: (N, T, C) features last, (N, C, H, W) channel first


@dataclass
class _Slot:
    """One layer's partials of the watched forward (this rank)."""

    sums: torch.Tensor  # float64 [sum x^2, n]
    channel_max: torch.Tensor  # (C,)
    exceed: Optional[torch.Tensor] = None  # counted in the hook (one process, or exceed_rms="local")
    local_exceed: Optional[torch.Tensor] = None  # against this rank's RMS (fallback of an in-place change)
    kept: Optional[torch.Tensor] = None  # the output itself, until the global RMS is known
    version: int = 0


@dataclass
class _Watch:
    """What the hooks collect during one watched forward pass."""

    step: int
    slots: dict[str, _Slot] = field(default_factory=dict)
    repeated: set[str] = field(default_factory=set)
    unreadable: dict[str, str] = field(default_factory=dict)
    error: Optional[BaseException] = None
    held_bytes: int = 0
    storages: set[int] = field(default_factory=set)


class ActivationOutlierMonitor(ProbeCallback):
    """Per-layer outlier statistics of the layer outputs on the training batch, every ``every_n_steps`` steps.

    At every ``every_n_steps``-th optimiser step (``trainer.global_step % every_n_steps == 0``; the first
    micro-batch of that step under gradient accumulation) the probe registers forward hooks on the selected layers
    in ``on_train_batch_start`` and removes them after the forward (``on_before_backward``, or at the batch end for
    a step without backward): on any other step no hook exists and nothing runs. Inside each hook, on the device,
    it reduces the layer's output ``x`` (`lightning_probes.functional.outliers`) and keeps no copy of it:

    - ``rms = sqrt(mean(x**2))``, ``max_abs = max |x|``, ``numel``;
    - ``exceed_fraction``: the share of entries with ``|x| > k * rms``;
    - per channel (the last dimension of ``(N, C)``/``(N, T, C)`` outputs, dimension 1 of convolution-like
      ``(N, C, H, W)`` outputs) the maximum ``|x|``; ``channel_max_ratio`` = the largest channel's maximum over the
      median channel's ("massive activations"), ``top_channel`` = that channel's index.

    The hook reads the output before the next module runs, so an in-place operation after the layer
    (``ReLU(inplace=True)``) does not change what it sees. A tuple, list or dict output contributes its first
    floating-point tensor (depth first); an output without one (indices) is left out; a module called several times
    in one forward contributes its first call. A layer not called in the watched forward has no record at that step.

    Several processes (DDP, FSDP2: the hooks see each rank's full activations of its own batch): the records are
    those of the union of the ranks' batches. Every rank reduces its part; one all-reduce SUM of the sums of
    squares and entries gives the global RMS, one all-reduce MAX the per-channel maxima (the median is then taken
    of the reduced vector), and one all-reduce SUM the counts above ``k`` times the *global* RMS. Those counts need
    the RMS of every rank's batch, so with ``exceed_rms="global"`` (default) each rank keeps a reference to each
    selected output (no copy) from its hook until the forward has ended; outputs that autograd saves for the
    backward anyway (most of them) cost nothing more, others (activation checkpointing, ``no_grad`` parts) are held
    until then (`last_held_bytes`). An output changed in place after its hook (its version counter moved) cannot be
    counted again: its count is then against each rank's own RMS, and its record says ``exceed_rms: "local"``.
    ``exceed_rms="local"`` always counts in the hook against the rank's own RMS and keeps nothing. In one process
    both are the same. Every rank enters the same collectives in the same order on a watched step only; a watched
    step moves one block of scalars to the host (a second small one the first time a layer runs on some ranks
    only).

    Records (``activation_outliers.jsonl``, rank 0), one per watched step and layer: ``step``, ``epoch``,
    ``layer``, ``rms``, ``max_abs``, ``exceed_fraction``, ``k``, ``channel_max_ratio``, ``top_channel``,
    ``channels``, ``numel``, ``exceed_rms``; non-finite values are ``null``. The same go to the loggers as
    ``<name>/<stat>/<layer>`` (at most once per ``log_every_n_steps``), and the headline scalars
    ``<name>/max_abs_max`` and ``<name>/channel_max_ratio_max`` (the maxima over layers of the last watched step)
    to ``trainer.callback_metrics`` at every train epoch end.

    Pre-flight (``fit``): named ``layers`` that do not exist, or ``include``/``exclude`` that match no selected
    layer, stop the run with one `ProbeConfigurationError`; a model whose default selection is empty skips the
    probe with one warning. Tensor parallelism (``ModelParallelStrategy(tensor_parallel_size > 1)``, whose
    activations are sharded) is refused at ``setup``.

    Args:
        every_n_steps: Watch the training batch of every n-th optimiser step.
        k: The multiple of the RMS above which an entry counts in ``exceed_fraction`` (> 0).
        layers: Module names to watch (as in ``named_modules``, the ``module.``/``_orig_mod.`` prefixes removed);
            default `default_outlier_layers`: every module that holds parameters plus the repeated blocks.
        include: Regular expression(s); only selected layers whose name matches one are watched.
        exclude: Regular expression(s); selected layers whose name matches one are not watched.
        exceed_rms: ``"global"`` (default): with several processes, count ``|x| > k * rms`` against the RMS over
            every rank's batch (exactly the one-process number of the union batch; outputs held until the forward
            ends); ``"local"``: against each rank's own RMS (nothing held).
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``activation_outliers``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: After the run started, ``"warn"`` (default) turns an exception inside the probe (its hooks
            included) into one warning, a ``{"disabled": true}`` record and a disabled probe while training goes on;
            ``"raise"`` re-raises. ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[ActivationOutlierMonitor(every_n_steps=100, k=10.0)])
    """

    probe_name = "activation_outliers"
    layout_stats = ("rms", "max_abs", "exceed_fraction", "channel_max_ratio")

    def __init__(
        self,
        every_n_steps: int = 50,
        k: float = 10.0,
        layers: Optional[Sequence[str]] = None,
        include: Patterns = None,
        exclude: Patterns = None,
        exceed_rms: Literal["global", "local"] = "global",
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir, name, flush_every_n_steps, flush_secs, on_error=on_error)
        check_positive_int("every_n_steps", every_n_steps)
        check_float("k", k, low=0.0, low_open=True)
        check_choice("exceed_rms", exceed_rms, ("global", "local"))
        if layers is not None and (isinstance(layers, str) or len(layers) == 0
                                   or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f"Expected `layers` to be None or a non-empty list of module names, but got {layers!r}")
        self.every_n_steps = every_n_steps
        self.k = float(k)
        self.layers = None if layers is None else list(layers)
        self.include, self.exclude = include, exclude
        self.exceed_rms = exceed_rms
        self._keep = name_filter(compile_patterns("include", include), compile_patterns("exclude", exclude))
        self._modules: dict[str, nn.Module] = {}
        self._handles: list[RemovableHandle] = []
        self._watch: Optional[_Watch] = None
        self._trainer: Optional[pl.Trainer] = None
        self._last_watched: Optional[int] = None
        self._channels: dict[str, int] = {}
        self._constants: dict[tuple, torch.Tensor] = {}
        self._indices: dict[tuple, torch.Tensor] = {}
        self._told: set[str] = set()
        self._headline: dict[str, Optional[float]] = {}
        #: Bytes of layer outputs held from their hook to the end of the last watched forward (distinct storages;
        #: 0 in one process or with ``exceed_rms="local"``).
        self.last_held_bytes = 0
        #: Forward-hook calls of the probe so far (every watched layer call; 0 on a step that is not watched).
        self.hook_calls = 0
        self._hold: Optional[bool] = None  # tests: force holding (True) or counting in the hook (False)

    def reset_run(self) -> None:
        """Forget the previous run: the selection, any armed hooks, the last watched step, the headline."""
        super().reset_run()
        self._remove_hooks()
        self._modules = {}
        self._last_watched = None
        self._channels = {}
        self._constants, self._indices = {}, {}
        self._told = set()
        self._headline = {}
        self.last_held_bytes = 0

    # -- selection ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        size = tensor_parallel_size(trainer.strategy)
        if size > 1:
            raise ProbeConfigurationError(
                f"{type(self).__name__} does not support tensor parallelism (ModelParallelStrategy with "
                f"tensor_parallel_size={size}): the layer outputs are sharded. Use tensor_parallel_size=1 "
                f"(FSDP2) or strategy='ddp', or remove the probe.")

    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """``fit`` only: select the layers; refuse unknown ``layers`` and filters that leave nothing; skip a model
        whose default selection is empty."""
        reason = super().preflight(trainer, pl_module)
        if reason is not None or trainer.state.fn != TrainerFn.FITTING:
            return reason
        if self.layers is not None:
            modules = {}
            for name, module in pl_module.named_modules():
                modules.setdefault(clean_name(name), module)
            unknown = [n for n in self.layers if n not in modules]
            if unknown:
                hints = "; ".join(f"{n!r} (did you mean {_or_nothing(close_matches(n, modules))}?)"
                                  for n in unknown)
                raise ProbeConfigurationError(
                    f"{type(self).__name__} {self.name!r}: `layers` names modules that {type(pl_module).__name__} "
                    f"does not have: {hints}. Available: {', '.join(n for n in modules if n)[:2000]}")
            candidates = {n: modules[n] for n in self.layers}
        else:
            candidates = default_outlier_layers(pl_module)
        self._modules = {n: m for n, m in candidates.items() if self._keep(n)}
        if self._modules:
            return None
        if candidates and (self.include is not None or self.exclude is not None):
            raise ProbeConfigurationError(
                f"{type(self).__name__} {self.name!r} found no layer matching include={self.include!r}, "
                f"exclude={self.exclude!r}; set `include`/`exclude` to keep at least one of: "
                f"{', '.join(candidates)[:2000]}")
        return (f"{type(pl_module).__name__} has no module holding parameters and no repeated block to watch (it "
                f"applies its parameters functionally); pass `layers` to name modules")

    # -- arming and the hooks -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_watched or not self._modules:
            return
        self._last_watched = step
        self._remove_hooks()
        self._trainer = trainer
        self._watch = _Watch(step)
        self._handles = [module.register_forward_hook(self._hook_for(name))
                         for name, module in self._modules.items()]

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            watch = self._watch
            if watch is None or watch.error is not None:
                return
            self.hook_calls += 1
            try:
                self._consume(watch, name, module, output)
            except Exception as err:  # noqa: BLE001 - never into the forward: every rank decides after it
                watch.error = err
        return hook

    def _holds(self) -> bool:
        if self._hold is not None:
            return self._hold
        return self.exceed_rms == "global" and self._trainer is not None and self._trainer.world_size > 1

    def _consume(self, watch: _Watch, name: str, module: nn.Module, output: Any) -> None:
        """Reduce one layer's output of the watched forward (this rank), on its device."""
        if name in watch.slots or name in watch.unreadable:
            watch.repeated.add(name)
            return
        x = _first_float_tensor(output)
        if x is None or is_dtensor(x) or x.numel() == 0:
            watch.unreadable[name] = ("a DTensor" if x is not None and is_dtensor(x) else "an empty tensor"
                                      if x is not None else f"no floating-point tensor ({type(output).__name__})")
            return
        x = x.detach()
        dim = channel_dim_for(x.ndim, _channel_first(module, x.ndim))
        sums, channel_max = outlier_partials(x, dim)
        slot = _Slot(sums, channel_max)
        threshold = self.k * (sums[0] / sums[1]).sqrt()  # this rank's RMS
        if self._holds():
            slot.kept, slot.version = x, x._version
            slot.local_exceed = exceed_count(x, threshold)
            storage = x.untyped_storage()
            if storage.data_ptr() not in watch.storages:
                watch.storages.add(storage.data_ptr())
                watch.held_bytes += storage.nbytes()
        else:
            slot.exceed = exceed_count(x, threshold)
        watch.slots[name] = slot

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- after the forward: combine, record ---------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._watch is not None:
            self._finish(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._watch is not None:  # a step without backward (training_step returned None)
            self._finish(trainer, pl_module)

    def _constant(self, values: tuple, device: torch.device) -> torch.Tensor:
        """A float64 tensor of host ``values`` on ``device``, made once per value (a copy to the device, which may
        synchronise, the first time only)."""
        key = (values, str(device))
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=torch.float64, device=device)
        return self._constants[key]

    def _padding_index(self, widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``(L, max width)`` indices into the concatenated channel maxima plus one ``nan`` after them: layer
        ``i``'s channels, then the ``nan`` (made once per widths)."""
        key = (widths, str(device))
        if key not in self._indices:
            total, widest = sum(widths), max(max(widths), 1)
            index = torch.full((len(widths), widest), total, dtype=torch.long)
            offset = 0
            for i, width in enumerate(widths):
                index[i, :width] = torch.arange(offset, offset + width)
                offset += width
            self._indices[key] = index.to(device)
        return self._indices[key]

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank, once per watched step: three all-reduces in the same order, one host transfer; a constant
        number of device operations besides one count per held output."""
        self._remove_hooks()
        watch, self._watch = self._watch, None
        names = list(self._modules)
        slots = [watch.slots.get(n) for n in names]
        device = next((s.sums.device for s in slots if s is not None), trainer.strategy.root_device)
        for name, slot in zip(names, slots):
            if slot is not None:
                self._channels[name] = slot.channel_max.numel()
        zeros = torch.zeros(2, dtype=torch.float64, device=device)
        sums = torch.stack([zeros if s is None else s.sums.to(device) for s in slots])  # (L, 2): sum x^2, n
        # (L + 1, 4): per layer [sum x^2, n, ranks that saw it, channels * seen]; last row [ranks that failed, ...].
        meta = self._constant(tuple((0.0, 0.0) if s is None else (1.0, float(s.channel_max.numel())) for s in slots)
                              + ((float(watch.error is not None), 0.0),), device)
        head = torch.cat([torch.cat([sums, sums.new_zeros(1, 2)]), meta], dim=1)
        all_reduce_sum(head)
        if any(n not in self._channels for n in names):  # a layer that ran on another rank only: learn its width
            host = head.cpu()
            for i, name in enumerate(names):
                if name not in self._channels and host[i, 2] > 0:
                    self._channels[name] = int(round(float(host[i, 3] / host[i, 2])))
        widths = tuple(self._channels.get(n, 0) for n in names)
        pieces = [s.channel_max.to(device) if s is not None else torch.zeros(w, device=device)
                  for s, w in zip(slots, widths)]
        flat = torch.cat(pieces).double()  # (sum of widths,)
        all_reduce_max(flat)
        # (L, 2): [entries above k * RMS, ranks that counted against their own RMS].
        rms = (head[:-1, 0] / head[:-1, 1].clamp_min(1.0)).sqrt()
        counts, local = [], []
        for i, slot in enumerate(slots):
            if slot is None:
                counts.append(zeros[0])
                local.append(0.0)
            elif slot.exceed is not None:  # counted in its hook: against this rank's RMS (one process: the global)
                counts.append(slot.exceed.to(device))
                local.append(float(trainer.world_size > 1))
            elif slot.kept._version == slot.version:
                counts.append(exceed_count(slot.kept, self.k * rms[i].to(slot.kept.device)).to(device))
                local.append(0.0)
            else:  # changed in place after the hook: only this rank's own-RMS count is left
                counts.append(slot.local_exceed.to(device))
                local.append(1.0)
            if slot is not None:
                slot.kept = None
        self.last_held_bytes = watch.held_bytes
        counts = torch.stack([torch.stack(counts), self._constant(tuple(local), device)], dim=1)
        all_reduce_sum(counts)
        padded = torch.cat([flat, flat.new_full((1,), math.nan)])[self._padding_index(widths, device)]
        stats = outlier_stats(head[:-1, :2], counts[:, 0], padded)  # (L, 5)
        block = torch.cat([stats, head[:-1, 1:3], counts[:, 1:2], head[-1:, 2:3].expand(len(names), 1)],
                          dim=1).cpu()  # the one transfer
        self._write(trainer, watch, names, list(widths), block)

    def _write(self, trainer: pl.Trainer, watch: _Watch, names: list[str], widths: list[int],
               block: torch.Tensor) -> None:
        failed = int(block[0, 8]) if len(names) else int(watch.error is not None)
        if failed:  # the same decision on every rank: the error where it happened, a note elsewhere
            if watch.error is not None:
                handle_failure(self, trainer, "forward hook", watch.error)
            else:
                self.disable(trainer, "a forward hook failed on another rank", "forward hook")
            return
        self._tell(trainer, watch)
        records = []
        values = block.tolist()
        for name, width, row in zip(names, widths, values):
            if row[6] <= 0:  # no rank saw the layer in this forward
                continue
            stats = [v if math.isfinite(v) else None for v in row[:5]]
            record = {"step": watch.step, "epoch": trainer.current_epoch, "layer": name,
                      "rms": stats[0], "max_abs": stats[1], "exceed_fraction": stats[2], "k": self.k,
                      "channel_max_ratio": stats[3],
                      "top_channel": None if stats[4] is None else int(stats[4]),
                      "channels": width, "numel": int(row[5]),
                      "exceed_rms": "local" if row[7] > 0 else "global"}
            records.append(record)
        self._headline = {f"{self.name}/{stat}_max": max((r[stat] for r in records if r[stat] is not None),
                                                          default=None)
                          for stat in ("max_abs", "channel_max_ratio")}
        self.write_records(trainer, records)
        if trainer.is_global_zero and self.logger_due(trainer, watch.step):
            self.log_scalars(trainer, self.scalars(records, _STATS), watch.step)

    def _tell(self, trainer: pl.Trainer, watch: _Watch) -> None:
        """Once per layer and run: a layer called twice, never called, or without a floating-point output."""
        missing = [n for n in self._modules if n not in watch.slots and n not in watch.unreadable]
        notes = [(n, f"{n!r} was called more than once in one forward pass; its first call is used")
                 for n in watch.repeated]
        notes += [(n, f"{n!r} gave {what}: left out") for n, what in watch.unreadable.items()]
        notes += [(n, f"{n!r} was not called in the forward pass of step {watch.step}: no record") for n in missing]
        for name, text in notes:
            if name in self._told:
                continue
            self._told.add(name)
            message = f"{type(self).__name__} {self.name!r}: layer {text}."
            if self.layers is not None and name in self.layers and name not in watch.repeated:
                rank_zero_warn(message)  # the user named it
            elif trainer.is_global_zero:
                log.info(message)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank holds the same reduced values: no broadcast.
        self.publish(trainer, self._headline)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._watch = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._watch = None

    def on_disable(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        self._watch = None
