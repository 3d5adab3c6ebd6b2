"""`AttentionMonitor`: per attention layer and head, entropy, maximum logit and first-token mass in training."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_probes.callbacks.base import DEFAULT_FLUSH_SECS, ProbeCallback, check_positive_int
from lightning_probes.checks import check_float
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.attention import (
    ATTENTION_MAXIMA,
    ATTENTION_SUMS,
    attention_stats,
    mha_row_summary,
    sdpa_row_summary,
)
from lightning_probes.naming import Patterns, clean_name, close_matches, compile_patterns
from lightning_probes.sharding import all_reduce_max, all_reduce_sum, is_dtensor

log = logging.getLogger(__name__)

#: Statistics of every record (per layer, and per head under ``per_head``).
STATS = ("entropy_mean", "entropy_min", "entropy_norm_mean", "max_logit", "sink_mass")
#: Arguments of ``torch.nn.functional.scaled_dot_product_attention`` in their positional order.
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class _Layer:
    """One observed attention layer."""

    name: str
    module: nn.Module
    kind: str  # "mha" (recomputed from the inputs) or "sdpa" (its SDPA calls intercepted)
    heads: Optional[int]  # known for "mha"; for "sdpa" learned at the first call (agreed across ranks)
    signature: Optional[inspect.Signature] = None
    local_heads: Optional[int] = None  # heads seen on this rank before they were agreed
    acc: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (sums, maxima) of this step on this rank
    calls: int = 0
    modes: list = field(default_factory=list)  # entered interceptors (None: not recording), one per forward


class _SdpaInterceptor(TorchFunctionMode):
    """Sees every ``scaled_dot_product_attention`` call made directly in one module's forward (others pass)."""

    def __init__(self, probe: AttentionMonitor, layer: _Layer) -> None:
        super().__init__()
        self.probe, self.layer = probe, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.probe._observe_sdpa(self.layer, args, kwargs)
        return func(*args, **kwargs)


class AttentionMonitor(ProbeCallback):
    """Attention entropy, maximum pre-softmax logit and attention sink per layer and head, on the training batch.

    Every ``every_n_steps`` optimiser steps (from step 0), forward hooks on the attention layers see the training
    batch's forward: they are registered at the start of a due step and removed after it, so a step that is not
    due runs no probe code at all. On a due step, for a seeded sample of ``max_queries`` query rows
    ``(batch element, query position)`` per call, the scores against every key of the row's sequence are
    recomputed (`lightning_probes.functional.attention`) and, per head:

    - ``entropy_mean``: mean over the rows of ``H = -sum_k p_k log p_k`` (nats); ``entropy_min``: its minimum over
      the rows that see at least 2 keys (a row that sees one key, as the first position under a causal mask, has
      ``H = 0`` whatever the model learnt);
    - ``entropy_norm_mean``: mean of ``H / log(n)``, ``n`` the keys the row sees (causal or padding masks make it
      vary by row; rows that see one key are left out): 1 is uniform attention, 0 one key;
    - ``max_logit``: maximum of ``scale * q . k`` over the rows and their visible keys (what QK-clip bounds; the
      additive mask is not part of it; a maximum over the sample, so at most the maximum over every row, equal
      to it with ``max_queries=None``);
    - ``sink_mass``: mean attention weight on key 0 (the first token).

    Sources: every ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` /
    ``nn.Transformer``) by default: a forward pre-hook reads the call's inputs and masks (``attn_mask``,
    ``key_padding_mask``, ``is_causal``) and recomputes ``q`` and ``k`` with the module's weights; its output and
    ``need_weights`` are untouched. Attention computed with ``torch.nn.functional.scaled_dot_product_attention``:
    name the module whose forward calls it in ``sdpa_modules`` (regular expressions of module names), and on due
    steps the probe intercepts the SDPA calls made in that module's forward (a ``TorchFunctionMode`` entered by a
    pre-hook and left by an always-called forward hook), reads ``query``, ``key``, ``attn_mask``, ``is_causal``,
    ``scale`` and ``enable_gqa`` and calls the real function with the same arguments.

    Records (``attention.jsonl``): one per logged step and layer: ``step``, ``epoch``, ``layer``, ``kind``
    (``"mha"``/``"sdpa"``), ``heads``, ``queries`` (rows per head, over every call and rank), the five statistics
    over every head (means pooled over the rows of all heads, ``entropy_min`` the minimum, ``max_logit`` the
    maximum) and ``per_head``: ``{stat: [one value per head]}``. Scalars ``attention/<stat>/<layer>`` go to the
    loggers; the headlines ``attention/max_logit`` (over layers) and ``attention/entropy_min`` to
    ``trainer.callback_metrics``.

    Distributed: each rank samples its own batch (its seed offset by the rank); on a due step every rank enters
    one all-reduce sum (entropy sums, counts, sink sums) and one all-reduce max (maximum logit, minus the
    minimum entropy), so the records are those of the union of the ranks' batches. Under FSDP2 the hooks run
    inside the forward, where the parameters are unsharded; a layer whose weights are still ``DTensor`` shards
    there is refused at the first due step.

    Memory: only the sampled rows' scores, ``rows x heads x keys``, and their keys' projections, in chunks of
    rows whose temporaries stay under ``workspace_mb`` (at least one row a chunk); nothing is kept between steps
    but per-head scalars.

    Args:
        every_n_steps: Observe the training forward of every n-th optimiser step (``global_step % n == 0``).
        max_queries: Query rows sampled per attention call (per rank); ``None``: every row.
        layers: Module names (as ``named_modules`` of the LightningModule gives them) to observe, each an
            ``nn.MultiheadAttention`` or a module whose forward calls ``scaled_dot_product_attention``; default
            every ``nn.MultiheadAttention``. A name that is not found stops the run before the first step.
        sdpa_modules: Regular expression(s) (``re.search`` on the module name) of modules observed through their
            ``scaled_dot_product_attention`` calls, in addition to ``layers``; each must match a module.
        seed: Seed of the query-row samples (with the step, the layer, the call and the rank).
        workspace_mb: Bound (MB, 1e6 bytes) on the temporaries of one chunk of rows.
        output_dir: Directory for the outputs; default ``<trainer.log_dir>/probes``.
        name: Name of the probe's files and scalar prefix; default ``attention``.
        flush_every_n_steps: Write the buffered records once they span this many optimiser steps (see
            `ProbeCallback`); default the Trainer's ``log_every_n_steps``.
        flush_secs: Also write them once the oldest is this many seconds old; ``None``: no time limit.
        on_error: ``"warn"`` (default) or ``"raise"``; ``None``: ``$LIGHTNING_PROBES_ON_ERROR``, else ``"warn"``.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> trainer = Trainer(callbacks=[AttentionMonitor(every_n_steps=50, max_queries=64)])
    """

    probe_name = "attention"
    layout_stats = STATS

    def __init__(
        self,
        every_n_steps: int = 50,
        max_queries: Optional[int] = 64,
        layers: Optional[Sequence[str]] = None,
        sdpa_modules: Patterns = None,
        seed: int = 0,
        workspace_mb: float = 16.0,
        output_dir: Optional[str] = None,
        name: Optional[str] = None,
        flush_every_n_steps: Optional[int] = None,
        flush_secs: Optional[float] = DEFAULT_FLUSH_SECS,
        on_error: Optional[str] = None,
    ) -> None:
        super().__init__(output_dir, name, flush_every_n_steps=flush_every_n_steps, flush_secs=flush_secs,
                         on_error=on_error)
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("max_queries", max_queries, allow_none=True)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f"Expected `layers` to be None or a list of module names, but got {layers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, but got {seed!r}")
        check_float("workspace_mb", workspace_mb, low=0.0, low_open=True)
        self.every_n_steps = every_n_steps
        self.max_queries = max_queries
        self.layers = None if layers is None else list(layers)
        self.sdpa_modules = sdpa_modules
        self._sdpa_patterns = compile_patterns("sdpa_modules", sdpa_modules)
        self.seed = seed
        self.workspace_mb = float(workspace_mb)
        self._layers: list[_Layer] = []
        self._handles: list[Any] = []
        self._armed_step: Optional[int] = None
        self._done_step: Optional[int] = None
        self._recording = False
        self._error: Optional[str] = None
        self._rank = 0

    def reset_run(self) -> None:
        super().reset_run()
        self._remove_hooks()
        self._layers = []
        self._armed_step = self._done_step = None
        self._recording = False
        self._error = None

    # -- selection ----------------------------------------------------------------------------------
    def preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        self._rank = trainer.global_rank
        if trainer.state.fn != TrainerFn.FITTING:
            return None  # it watches training batches only: idle in validate, test and predict
        modules: dict[str, nn.Module] = {}
        for raw, module in pl_module.named_modules():
            modules.setdefault(clean_name(raw), module)
        chosen: dict[str, _Layer] = {}
        if self.layers is not None:
            missing = [n for n in self.layers if n not in modules]
            if missing:
                hints = "; ".join(f"{n!r}: did you mean {close_matches(n, modules)}?" for n in missing)
                raise ProbeConfigurationError(
                    f"{type(self).__name__} {self.name!r}: `layers` names modules that {type(pl_module).__name__} "
                    f"does not have: {missing} ({hints}). Attention modules it has: "
                    f"{[n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)][:20]}")
            for n in self.layers:
                chosen[n] = self._layer(n, modules[n])
        elif not self._sdpa_patterns:
            chosen = {n: self._layer(n, m) for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
        for pattern in self._sdpa_patterns:
            matched = [n for n in modules if n and pattern.search(n)]
            if not matched:
                raise ProbeConfigurationError(
                    f"{type(self).__name__} {self.name!r}: `sdpa_modules` pattern {pattern.pattern!r} matches no "
                    f"module of {type(pl_module).__name__} (names look like {[n for n in modules if n][:8]})")
            for n in matched:
                chosen.setdefault(n, self._layer(n, modules[n]))
        if self.layers is None and self._sdpa_patterns:  # SDPA modules named: every MultiheadAttention as well
            for n, m in modules.items():
                if isinstance(m, nn.MultiheadAttention) and not any(n.startswith(s + ".") for s in chosen):
                    chosen.setdefault(n, self._layer(n, m))
        sdpa = [n for n, layer in chosen.items() if layer.kind == "sdpa"]
        nested = [(outer, inner) for outer in sdpa for inner in sdpa if inner.startswith(outer + ".")]
        if nested:
            raise ProbeConfigurationError(
                f"{type(self).__name__} {self.name!r}: SDPA-observed modules inside one another would count each "
                f"call twice: {nested[:5]}. Select only the inner or only the outer modules.")
        if not chosen:
            return (f"{type(pl_module).__name__} has no nn.MultiheadAttention; to observe attention computed with "
                    f"scaled_dot_product_attention, name the modules that call it in `sdpa_modules` or `layers`")
        order = {n: i for i, n in enumerate(modules)}
        self._layers = sorted(chosen.values(), key=lambda layer: order[layer.name])  # the model's order
        return None

    @staticmethod
    def _layer(name: str, module: nn.Module) -> _Layer:
        if isinstance(module, nn.MultiheadAttention):
            return _Layer(name, module, "mha", module.num_heads, inspect.signature(module.forward))
        return _Layer(name, module, "sdpa", None)

    # -- hooks on due steps -------------------------------------------------------------------------
    def _arm(self, step: int) -> None:
        self._armed_step = step
        for layer in self._layers:
            layer.acc, layer.calls, layer.modes = None, 0, []
            if layer.kind == "mha":
                self._handles.append(layer.module.register_forward_pre_hook(
                    self._mha_hook(layer), with_kwargs=True))
            else:
                pre, post = self._sdpa_hooks(layer)
                self._handles.append(layer.module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(layer.module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers:
            while layer.modes:
                mode = layer.modes.pop()
                if mode is not None:
                    mode.__exit__(None, None, None)

    def on_disable(self, trainer: pl.Trainer) -> None:
        self._remove_hooks()
        self._armed_step = None
        self._recording = False

    def _mha_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._recording or self._error is not None:
                return None
            try:
                bound = layer.signature.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
                if is_dtensor(weight):
                    raise RuntimeError(f"the weights of {layer.name!r} are sharded DTensors inside its forward "
                                       f"(FSDP2 without an unsharded forward); the probe cannot recompute q and k")
                query = a["query"]
                with torch.autocast(query.device.type, enabled=False):
                    part = mha_row_summary(module, query, a["key"], a.get("key_padding_mask"), a.get("attn_mask"),
                                           bool(a.get("is_causal", False)), bool(a.get("need_weights", True)),
                                           self.max_queries, self._generator(layer), self._max_bytes)
                self._add(layer, part, module.num_heads)
            except Exception as err:  # noqa: BLE001 - never raise into the model's forward; raised after the step
                self._error = f"{layer.name}: {type(err).__name__}: {err}"
            return None

        return hook

    def _sdpa_hooks(self, layer: _Layer):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mode = None
            if self._recording and self._error is None:
                mode = _SdpaInterceptor(self, layer)
                mode.__enter__()
            layer.modes.append(mode)
            return None

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if layer.modes:
                mode = layer.modes.pop()
                if mode is not None:
                    mode.__exit__(None, None, None)
            return None

        return pre, post

    def _observe_sdpa(self, layer: _Layer, args: tuple, kwargs: dict) -> None:
        if not self._recording or self._error is not None:
            return
        try:
            a = dict(zip(_SDPA_ARGS, args))
            a.update(kwargs)
            query, key = a["query"], a["key"]
            with torch.autocast(query.device.type, enabled=False):
                part = sdpa_row_summary(query, key, a.get("attn_mask"), bool(a.get("is_causal", False)),
                                        a.get("scale"), self.max_queries, self._generator(layer), self._max_bytes)
            heads = 1 if query.dim() == 3 else int(query.shape[-3])
            self._add(layer, part, heads)
        except Exception as err:  # noqa: BLE001 - never raise into the model's forward; raised after the step
            self._error = f"{layer.name}: {type(err).__name__}: {err}"

    @property
    def _max_bytes(self) -> int:
        return int(self.workspace_mb * 1e6)

    def _generator(self, layer: _Layer) -> torch.Generator:
        index = self._layers.index(layer)
        key = (((self.seed * 1_000_003 + self._armed_step) * 1_009 + index) * 10_007 + layer.calls) * 101 + self._rank
        layer.calls += 1
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def _add(self, layer: _Layer, part: tuple[torch.Tensor, torch.Tensor], heads: int) -> None:
        known = layer.heads if layer.heads is not None else layer.local_heads
        if known is not None and known != heads:
            raise RuntimeError(f"{layer.name!r} attended with {heads} heads after {known}")
        if layer.heads is None:
            layer.local_heads = heads
        sums, maxima = part[0].double(), part[1].double()
        if layer.acc is None:
            layer.acc = (sums, maxima)
        else:
            layer.acc = (layer.acc[0] + sums, torch.maximum(layer.acc[1], maxima))

    # -- Lightning hooks ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if self._armed_step is not None and self._armed_step != step:
            self._finish(trainer)
        if self._armed_step is None and step % self.every_n_steps == 0 and step != self._done_step:
            self._arm(step)
        self._recording = self._armed_step is not None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._recording = False  # a forward recomputed in the backward (activation checkpointing) is not counted

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recording = self._armed_step is not None  # manual optimisation: forwards after a backward count

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._recording = False
        if self._armed_step is not None and trainer.global_step != self._armed_step:
            self._finish(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._armed_step is not None:
            self._finish(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._armed_step is not None:
            self._finish(trainer)
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        self._armed_step = None
        self._recording = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._armed_step = None

    # -- combining and writing ----------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer) -> None:
        """Every rank: combine the step's partials (one sum and one max all-reduce; a first max of the SDPA
        layers' head counts while some are unknown), write the records (global rank 0), publish the headlines."""
        step = self._armed_step
        self._remove_hooks()
        self._armed_step, self._done_step, self._recording = None, step, False
        device = trainer.strategy.root_device
        distributed = trainer.world_size > 1
        unknown = [layer for layer in self._layers if layer.heads is None]
        if unknown:
            heads = torch.tensor([float(layer.local_heads or 0) for layer in unknown], dtype=torch.float64,
                                 device=device)
            if distributed:
                heads = all_reduce_max(heads)
            for layer, h in zip(unknown, heads.tolist()):
                if h > 0:
                    layer.heads = int(h)
                    if layer.local_heads is not None and layer.local_heads != layer.heads and self._error is None:
                        self._error = f"{layer.name}: {layer.local_heads} heads here, {layer.heads} on another rank"
        known = [layer for layer in self._layers if layer.heads is not None]
        sums, maxima = [], []
        for layer in known:
            if layer.acc is not None and layer.acc[0].shape[0] == layer.heads:
                s, m = layer.acc
                sums.append(s.to(device))
                maxima.append(m.to(device))
            else:
                sums.append(torch.zeros(layer.heads, len(ATTENTION_SUMS), dtype=torch.float64, device=device))
                maxima.append(torch.full((layer.heads, len(ATTENTION_MAXIMA)), float("-inf"), dtype=torch.float64,
                                         device=device))
            layer.acc = None
        flag = torch.zeros(1, len(ATTENTION_SUMS), dtype=torch.float64, device=device)
        flag[0, 0] = float(self._error is not None)
        sums_all = torch.cat([*sums, flag])
        maxima_all = torch.cat(maxima) if maxima else torch.zeros(0, len(ATTENTION_MAXIMA), dtype=torch.float64,
                                                                  device=device)
        if distributed:
            all_reduce_sum(sums_all)
            all_reduce_max(maxima_all)
        host = torch.cat([sums_all.flatten(), maxima_all.flatten()]).cpu()  # the one transfer of the step
        split = sums_all.numel()
        sums_host = host[:split].view(-1, len(ATTENTION_SUMS))
        maxima_host = host[split:].view(-1, len(ATTENTION_MAXIMA))
        if sums_host[-1, 0] > 0:
            error, self._error = self._error, None
            raise RuntimeError(f"{type(self).__name__} could not observe the attention of step {step}: "
                               f"{error or 'it failed on another rank'}")
        self._write(trainer, step, known, sums_host[:-1], maxima_host)

    def _write(self, trainer: pl.Trainer, step: int, layers: list[_Layer], sums: torch.Tensor,
               maxima: torch.Tensor) -> None:
        records, offset = [], 0
        for layer in layers:
            s, m = sums[offset:offset + layer.heads], maxima[offset:offset + layer.heads]
            offset += layer.heads
            if s[:, 1].sum() <= 0:
                continue  # the layer did not run on this step (on any rank)
            per_head = attention_stats(s, m)
            pooled = attention_stats(s.sum(0, keepdim=True), m.amax(0, keepdim=True))
            record = {"step": step, "epoch": trainer.current_epoch, "layer": layer.name, "kind": layer.kind,
                      "heads": layer.heads, "queries": int(s[:, 1].max())}
            for stat in STATS:
                value = float(pooled[stat][0])
                record[stat] = None if math.isnan(value) else value
            record["per_head"] = {stat: [None if math.isnan(v) else v for v in per_head[stat].tolist()]
                                  for stat in STATS}
            records.append(record)
        if not records:
            return
        maxima_over_layers = [r["max_logit"] for r in records if r["max_logit"] is not None]
        minima = [r["entropy_min"] for r in records if r["entropy_min"] is not None]
        self.publish(trainer, {f"{self.name}/max_logit": max(maxima_over_layers, default=None),
                               f"{self.name}/entropy_min": min(minima, default=None)})
        self.write_records(trainer, records)
        if trainer.is_global_zero and self.logger_due(trainer, step):
            self.log_scalars(trainer, self.scalars(records, STATS), step)

