"""Helpers of `PerSampleGradientMonitor`: the default loss's check, the math attention kernel, the layers of the
rank-one shortcut."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

from lightning_probes.functional.per_sample import eval_mode


def differentiable_twice() -> Any:
    """Scaled dot-product attention on its math kernel: the fused (flash, memory-efficient) kernels have no double
    backward, which the Hessian-vector products need; the math kernel is plain differentiable operations."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def detach_clone(batch: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, batch)


def default_loss_problem(module: nn.Module, batch: Any) -> Optional[str]:
    """Why the default loss (cross entropy of ``module(batch[0])`` against ``batch[1]``) does not apply to this
    batch, or ``None``; one forward of one sample, and one read of the targets' range (the first analysis only)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(
            isinstance(b, torch.Tensor) for b in batch[:2]):
        return (f"the default loss_fn takes (input, target, ...) batches of tensors, but the training batch is a "
                f"{type(batch).__name__}; pass loss_fn=lambda module_call, batch: <the mean loss of the batch>")
    x, y = batch[0], batch[1]
    if y.is_floating_point() or y.is_complex():
        return (f"the default loss_fn is cross entropy against integer class targets, but the targets are {y.dtype}; "
                f"pass loss_fn")
    with torch.no_grad(), eval_mode(module):
        logits = module(x[:1])
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim < 2 \
            or tuple(logits.shape[2:]) != tuple(y.shape[1:]):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        return (f"the default loss_fn is cross entropy of module(x) (N, C, *) against targets (N, *), but one "
                f"sample gives outputs {shape} for targets {tuple(y[:1].shape)}; pass loss_fn")
    low, high = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
    if low < 0 or high >= logits.shape[1]:
        return (f"the default loss_fn is cross entropy over the {logits.shape[1]} output classes, but the targets "
                f"range over [{low}, {high}]; pass loss_fn")
    return None

def item_of(value: Any, index: int) -> Any:
    try:
        return value[index]
    except (TypeError, IndexError, KeyError):
        return None


def rank_one_layers(module: nn.Module, params: dict[str, torch.Tensor], run_one_sample: Any) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers whose per-sample gradients `lightning_probes.functional.rank_one` takes from their
    inputs and output gradients: a stock ``nn.Linear`` (no subclass forward, no hooks of its own), its weight
    trainable, tracked and not shared with another module, called once a forward with one input row per sample
    (``run_one_sample()`` runs the forward of one sample to see it). Sequence inputs ``(n, T, in)``, whose
    per-sample gradient is a sum of ``T`` outer products, are left to ``vmap``."""
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    candidates: dict[str, nn.Linear] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear) or type(layer).forward is not nn.Linear.forward:
            continue
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks:
            continue
        prefix = f"{name}." if name else ""
        weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
        if weight is None or uses.get(id(layer.weight), 0) != 1:
            continue
        if layer.bias is not None and layer.bias.requires_grad and (bias is None or uses.get(id(layer.bias), 0) != 1):
            continue
        candidates[name] = layer
    calls: dict[str, list[bool]] = {name: [] for name in candidates}

    def watch(name: str) -> Any:
        def hook(layer: nn.Linear, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if len(args) == 1 and not kwargs else None
            calls[name].append(isinstance(x, torch.Tensor) and tuple(x.shape) == (1, layer.in_features)
                               and isinstance(output, torch.Tensor) and tuple(output.shape) == (1, layer.out_features))
        return hook

    handles = [layer.register_forward_hook(watch(name), with_kwargs=True) for name, layer in candidates.items()]
    try:
        run_one_sample()
    finally:
        for handle in handles:
            handle.remove()
    return {name: layer for name, layer in candidates.items() if calls[name] == [True]}
