"""Per-sample gradients with `torch.func`, chunked over samples to stay inside a byte budget.

``vmap(grad(per-sample loss))`` over a `functional_call` of the module: any layer autograd differentiates works
(``Linear``, convolutions, ``LayerNorm``, ``GroupNorm``, attention, embeddings), no BackPACK extension needed.

Buffers and modes: the pass runs the module in **eval mode** (`eval_mode`): batch norm uses its running
statistics and updates nothing, dropout is off. In training mode a batch-norm layer makes every sample's loss
depend on the whole batch (through the batch statistics), so "the gradient of sample i" is not defined (a vmap
over samples would normalise each sample by its own statistics, a different model, and would write the running
statistics once per sample); in eval mode the batch loss is a plain mean of independent per-sample losses, the
per-sample gradients average to its gradient, and training's buffers are left as they were. For models without
batch norm or dropout the eval-mode gradients are the training gradients.

Memory: a chunk of ``c`` samples holds ``c`` copies of the gradient plus the per-sample forward and backward
temporaries; `chunk_size_for` picks ``c`` from a byte budget and `per_sample_bytes` (an estimate: the gradient, its
vmap intermediate and the activations of one sample, measured once with a forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

__all__ = ["PerSampleLoss", "chunk_size_for", "cross_entropy_loss", "eval_mode", "mean_gradient", "per_sample_bytes",
           "per_sample_gradients", "sample_count", "slice_samples", "stack_chunks"]

#: ``loss_fn(module_call, sample_batch) -> scalar``: the loss of a batch of one sample. ``module_call(*inputs)``
#: runs the module (with the parameters being differentiated); ``sample_batch`` has the dataloader's structure
#: with a leading dimension of 1.
PerSampleLoss = Callable[[Callable[..., Any], Any], torch.Tensor]


def cross_entropy_loss(module_call: Callable[..., Any], batch: Any) -> torch.Tensor:
    """The default per-sample loss: ``cross_entropy(module(x), y)`` for an ``(x, y, ...)`` batch."""
    x, y = batch[0], batch[1]
    return nn.functional.cross_entropy(module_call(x), y)


def sample_count(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return sample_count(value)
    raise TypeError(f"Expected a batch holding at least one tensor, but got {type(batch).__name__}")


def slice_samples(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor of a batch (the same structure back)."""
    return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, batch)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` for the block; every submodule gets its own ``training`` flag back afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def per_sample_bytes(params: Mapping[str, torch.Tensor], activation_bytes: int = 0) -> int:
    """Estimated bytes one sample of a chunk costs: three gradient-sized tensors (the result, vmap's batched
    intermediate, the parameter broadcast of the backward) plus ``activation_bytes`` (the per-sample forward
    temporaries, e.g. measured by `lightning_probes.probe_data.forward_peak_bytes` for one sample), doubled for
    the backward."""
    grad = sum(p.numel() * p.element_size() for p in params.values())
    return int(3 * grad + 2 * activation_bytes)


def chunk_size_for(max_bytes: Optional[int], bytes_per_sample: int, num_samples: int) -> int:
    """Samples per chunk: as many as ``max_bytes`` holds (at least 1, at most ``num_samples``); ``None``: all."""
    if max_bytes is None:
        return max(1, num_samples)
    return int(max(1, min(num_samples, max_bytes // max(1, bytes_per_sample))))


def _sample_loss(module: nn.Module, loss_fn: PerSampleLoss) -> Callable[..., torch.Tensor]:
    def loss(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        batch = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(module, (params, buffers), args, kwargs)

        return loss_fn(call, batch)

    return loss


def per_sample_gradients(
    module: nn.Module,
    batch: Any,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    loss_fn: PerSampleLoss = cross_entropy_loss,
    chunk_size: Optional[int] = None,
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
    vectorize: bool = True,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Per-sample gradients of ``loss_fn`` on ``batch``, one chunk of samples at a time.

    Args:
        module: The model (its forward is what ``loss_fn``'s ``module_call`` runs). Put it in the mode you want
            (see `eval_mode`); nothing of it is changed.
        batch: A tensor or a tuple/list/dict of tensors, every tensor with the samples in dimension 0.
        params: The parameters to differentiate, by name as in ``named_parameters`` (default: every parameter that
            requires grad, detached); parameters left out are held fixed at their current values.
        loss_fn: ``loss_fn(module_call, sample_batch)``, the loss of one sample (see `PerSampleLoss`).
        chunk_size: Samples per chunk (see `chunk_size_for`); default all at once.
        buffers: The buffers to use (default the module's own).
        vectorize: ``True``: ``vmap`` over the samples of a chunk; ``False``: a loop of ``grad`` over the samples
            (the same numbers, for layers without a batching rule, e.g. the fused RNN kernels ``nn.GRU`` and
            ``nn.LSTM``; slower).

    Yields:
        ``(grads, losses)`` per chunk: ``{name: (c, *param.shape)}`` and the ``(c,)`` per-sample losses.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
        >>> grads, losses = next(per_sample_gradients(net, (x, y)))
        >>> grads["weight"].shape, losses.shape
        (torch.Size([5, 2, 3]), torch.Size([5]))
    """
    if params is None:
        params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    params = dict(params)
    buffers = dict(module.named_buffers()) if buffers is None else dict(buffers)
    n = sample_count(batch)
    size = max(1, n if chunk_size is None else int(chunk_size))
    if vectorize:
        compute = vmap(grad_and_value(_sample_loss(module, loss_fn)), in_dims=(None, None, 0),
                       randomness="different")
    else:
        compute = _looped(grad_and_value(_sample_loss(module, loss_fn)))
    for start in range(0, n, size):
        grads, losses = compute(params, buffers, slice_samples(batch, start, min(n, start + size)))
        yield grads, losses


def mean_gradient(
    module: nn.Module,
    batch: Any,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    loss_fn: PerSampleLoss = cross_entropy_loss,
    chunk_size: Optional[int] = None,
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradient and the value of the mean loss of ``batch`` (``loss_fn`` on chunks of ``chunk_size`` samples,
    weighted by their sizes): the mean of the per-sample gradients of `per_sample_gradients` when ``loss_fn`` is a
    mean over samples, at the cost of one batched backward pass. Arguments as in `per_sample_gradients`.

    Returns:
        ``({name: param.shape}, loss)``, detached.
    """
    if params is None:
        params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    params = dict(params)
    buffers = dict(module.named_buffers()) if buffers is None else dict(buffers)
    n = sample_count(batch)
    size = max(1, n if chunk_size is None else int(chunk_size))

    def chunk_loss(p: dict[str, torch.Tensor], chunk: Any) -> torch.Tensor:
        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(module, (p, buffers), args, kwargs)

        return loss_fn(call, chunk)

    compute = grad_and_value(chunk_loss)
    total: Optional[dict[str, torch.Tensor]] = None
    loss_total: Optional[torch.Tensor] = None
    for start in range(0, n, size):
        stop = min(n, start + size)
        grads, loss = compute(params, slice_samples(batch, start, stop))
        weight = (stop - start) / n
        grads = {k: v.detach() * weight for k, v in grads.items()}
        total = grads if total is None else {k: total[k] + grads[k] for k in grads}
        loss_total = loss.detach() * weight if loss_total is None else loss_total + loss.detach() * weight
    if total is None or loss_total is None:
        raise ValueError("Expected a batch of at least one sample, but got an empty batch")
    return total, loss_total


def _looped(single: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]
            ) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``single(params, buffers, sample)`` over the samples of a chunk, one at a time, stacked like vmap's result."""
    def squeeze(sample: Any) -> Any:  # vmap hands `_sample_loss` one sample without its batch dimension
        return tree_map(lambda t: t.squeeze(0) if isinstance(t, torch.Tensor) else t, sample)

    def run(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], chunk: Any
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        outs = [single(params, buffers, squeeze(slice_samples(chunk, i, i + 1))) for i in range(sample_count(chunk))]
        grads = {k: torch.stack([o[0][k] for o in outs]) for k in outs[0][0]}
        return grads, torch.stack([o[1].reshape(()) for o in outs])

    return run


def stack_chunks(chunks: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The chunks of `per_sample_gradients` joined into one ``(grads, losses)`` (for tests and small batches)."""
    names = chunks[0][0].keys()
    return {k: torch.cat([c[0][k] for c in chunks]) for k in names}, torch.cat([c[1] for c in chunks])
