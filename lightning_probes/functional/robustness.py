"""Robustness of predictions to Gaussian input noise.

`noisy_logits` and `stability_ratio` are the classification case (``(N, C)`` logits). `class_scores` brings any
logits layout to ``(N, C, P)`` class scores over ``P`` positions (one for a classifier, every pixel of a
segmentation map, every step of a sequence), with one-logit binary classifiers turned into the two scores
``[0, z]`` (``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``, so the prediction is the sign of ``z``);
`agreement` and `kl_per_position` then score one noisy forward against the clean one, per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

#: Modules whose output `embedding_noise` perturbs (token ids in, floating vectors out).
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def stability_ratio(clean_pred: torch.Tensor, noisy_pred: torch.Tensor) -> torch.Tensor:
    """Share of noisy predictions equal to the clean prediction, per sample.

    Args:
        clean_pred: ``(N,)`` predicted classes on the clean inputs.
        noisy_pred: ``(D, N)`` predicted classes on ``D`` noisy copies of each input.

    Returns:
        ``(N,)`` float ratios in [0, 1].
    """
    if noisy_pred.ndim != 2 or noisy_pred.shape[1] != clean_pred.shape[0]:
        raise ValueError(
            f"Expected `noisy_pred` of shape (draws, {clean_pred.shape[0]}), but got {tuple(noisy_pred.shape)}")
    return (noisy_pred == clean_pred.unsqueeze(0)).float().mean(dim=0)


def kl_from_clean(clean_logits: torch.Tensor, noisy_logits: torch.Tensor) -> torch.Tensor:
    """Mean over draws of ``KL(softmax(clean) || softmax(noisy))`` per sample: ``(D, N, C) -> (N,)``."""
    log_p = clean_logits.log_softmax(dim=-1).unsqueeze(0)  # (1, N, C)
    log_q = noisy_logits.log_softmax(dim=-1)  # (D, N, C)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=0)


def check_logits(logits: object, rows: int, source: str = "logits_fn") -> torch.Tensor:
    """``logits`` if it is a floating ``(rows, C)`` tensor, else a ``TypeError`` naming ``source``."""
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.ndim == 2 \
            and logits.shape[0] == rows:
        return logits
    got = f"a {logits.dtype} tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) \
        else f"a {type(logits).__name__}"
    raise TypeError(f"Expected `{source}` to give floating logits of shape ({rows}, num_classes), but got {got}; pass "
                    f"a `{source}` that returns them, e.g. `lambda module, x: module(x)[0]` for a model that returns "
                    "a tuple")


def check_scores(logits: object, rows: int, source: str = "logits_fn") -> torch.Tensor:
    """``logits`` if it is a floating tensor of ``rows`` samples (``(rows,)``, ``(rows, C)``, ``(rows, C, ...)``),
    else a ``TypeError`` naming ``source``."""
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.ndim >= 1 \
            and logits.shape[0] == rows:
        return logits
    got = f"a {logits.dtype} tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) \
        else f"a {type(logits).__name__}"
    raise TypeError(f"Expected `{source}` to give floating logits of {rows} samples, of shape ({rows}, num_classes) "
                    f"(or ({rows},) / ({rows}, 1) for one-logit binary classifiers, ({rows}, num_classes, ...) for "
                    f"dense predictions), but got {got}; pass a `{source}` that returns them, e.g. "
                    "`lambda module, x: module(x)[0]` for a model that returns a tuple")


def resolve_class_dim(ndim: int, class_dim: Optional[int]) -> Optional[int]:
    """The classes axis of logits with ``ndim`` dimensions, as a non-negative index; ``None`` when ambiguous.

    ``class_dim=None`` (the default of `NoiseRobustnessMonitor`) means axis 1 for ``(N, C)`` and for
    ``(N, C, d1, d2, ...)`` logits with two or more spatial axes (torchmetrics' and ``nn.CrossEntropyLoss``'s
    layout), and is ambiguous for 3-D logits: ``(N, C, L)`` (a 1-D segmentation) and ``(N, T, C)`` (a sequence
    model) are both common. 1-D logits ``(N,)`` have no classes axis (one-logit binary): 1 is returned.

    Raises:
        ValueError: ``class_dim`` is not an axis of the logits other than the batch axis 0.
    """
    if ndim < 1:
        raise ValueError(f"Expected logits with a batch axis, but got a {ndim}-D tensor")
    if ndim == 1:
        return 1
    if class_dim is None:
        return None if ndim == 3 else 1
    if isinstance(class_dim, bool) or not isinstance(class_dim, int) or not -ndim < class_dim < ndim \
            or class_dim % ndim == 0:
        raise ValueError(f"Expected `class_dim` to be an axis of the {ndim}-D logits other than the batch axis 0 "
                         f"(1 to {ndim - 1}, or -1 to {-(ndim - 1)}), but got {class_dim!r}")
    return class_dim % ndim


def class_scores(logits: torch.Tensor, class_dim: int = 1) -> torch.Tensor:
    """Logits of any layout as ``(N, C, P)`` class scores over ``P`` positions, with ``C >= 2``.

    ``(N, C)`` gives ``(N, C, 1)``; ``(N, ..., C, ...)`` with the classes on axis ``class_dim`` gives
    ``(N, C, P)``, ``P`` the product of the other axes (pixels, time steps). One logit per position (``(N,)``,
    ``(N, 1)`` or a classes axis of size 1) is a binary classifier's ``z``: it becomes the two scores
    ``[0, z]``, whose softmax is ``[1 - sigmoid(z), sigmoid(z)]`` and whose argmax is ``1`` exactly when
    ``z > 0`` (the prediction is the sign of the logit).

    Args:
        logits: Floating logits with the batch on axis 0.
        class_dim: Axis of the classes (ignored for 1-D logits).

    Example:
        >>> class_scores(torch.tensor([[-1.0], [2.0]])).argmax(1).flatten().tolist()
        [0, 1]
    """
    if logits.ndim == 1:
        scores = logits.reshape(-1, 1, 1)
    else:
        dim = resolve_class_dim(logits.ndim, class_dim)
        moved = logits.movedim(dim, 1) if dim != 1 else logits
        scores = moved.reshape(moved.shape[0], moved.shape[1], -1)
    if scores.shape[1] == 1:
        scores = torch.cat([torch.zeros_like(scores), scores], dim=1)
    return scores


def agreement(clean_pred: torch.Tensor, noisy_scores: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of positions whose noisy prediction equals the clean one: ``(N, P), (N, C, P) -> (N,)``.

    Averaged over draws, this is the stability ratio of dense predictions (the mean over positions and draws of
    ``noisy argmax == clean argmax``); with one position it is 0 or 1 per draw, as in `stability_ratio`.
    """
    if noisy_scores.ndim != 3 or noisy_scores.shape[0] != clean_pred.shape[0] \
            or noisy_scores.shape[2:] != clean_pred.shape[1:]:
        raise ValueError(f"Expected `noisy_scores` of shape ({clean_pred.shape[0]}, C, {clean_pred.shape[1]}) to "
                         f"match `clean_pred` {tuple(clean_pred.shape)}, but got {tuple(noisy_scores.shape)}")
    return (noisy_scores.argmax(dim=1) == clean_pred).double().mean(dim=1)


def kl_per_position(clean_scores: torch.Tensor, noisy_scores: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(clean) || softmax(noisy))`` over the classes axis 1, averaged over positions: ``(N, C, P) -> (N,)``.

    For one-logit binary scores ``[0, z]`` this is the KL divergence between the two Bernoulli distributions.
    """
    log_p = clean_scores.double().log_softmax(dim=1)
    log_q = noisy_scores.double().log_softmax(dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean(dim=1)


def _call(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return module(x)


@torch.no_grad()
def noisy_logits(
    module: Callable[..., object],
    inputs: torch.Tensor,
    sigma: float,
    num_draws: int,
    generator: Optional[torch.Generator] = None,
    chunk_size: int = 1024,
    logits_fn: Optional[Callable[[object, torch.Tensor], torch.Tensor]] = None,
    noise_bank: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits of ``num_draws`` Gaussian-noise copies of every input: ``(D, N, C)``.

    Noise is ``sigma * N(0, 1)`` in the inputs' units (normalised units for normalised images), drawn from
    ``generator`` for reproducibility; copies go through ``logits_fn(module, x)`` (default ``module(x)``) in
    chunks of at most ``chunk_size`` rows.

    Args:
        module: The model (any callable when ``logits_fn`` is not given).
        inputs: ``(N, ...)`` floating-point inputs.
        sigma: Standard deviation of the noise.
        num_draws: Noisy copies of each input.
        generator: Random generator on the inputs' device.
        chunk_size: Most rows per call.
        logits_fn: ``logits_fn(module, x) -> (n, C)`` logits, for models that return tuples or dicts.
        noise_bank: ``(num_draws, *inputs.shape[1:])`` standard-normal draws reused for every input (the original
            meta-network study's one fixed bank: draw ``d`` of every image uses the same noise); ``None`` draws new
            noise for every input from ``generator``.

    Raises:
        TypeError: ``inputs`` are not floating point (e.g. token ids), or the logits are not a floating
            ``(n, C)`` tensor.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> noisy_logits(model, torch.zeros(5, 3), sigma=0.1, num_draws=4).shape
        torch.Size([4, 5, 2])
    """
    if not inputs.is_floating_point():
        raise TypeError(f"Gaussian noise needs floating-point inputs, but got {inputs.dtype} inputs (token ids or "
                        "labels?)")
    fn = _call if logits_fn is None else logits_fn
    if noise_bank is not None and tuple(noise_bank.shape) != (num_draws, *inputs.shape[1:]):
        raise ValueError(f"Expected `noise_bank` of shape {(num_draws, *inputs.shape[1:])} (num_draws, one input), "
                         f"but got {tuple(noise_bank.shape)}")
    outputs = []
    for draw in range(num_draws):
        if noise_bank is None:
            noise = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        else:
            noise = noise_bank[draw].to(inputs.device, inputs.dtype).expand_as(inputs)
        noisy = inputs + sigma * noise
        outputs.append(torch.cat([check_logits(fn(module, part), len(part)) for part in noisy.split(chunk_size)]))
    return torch.stack(outputs)


# -- noise in the embedding space (token inputs) ----------------------------------------------------
def _is_tokens(value: Any, tokens: torch.Tensor) -> bool:
    """Whether ``value`` is the token tensor ``tokens`` (the same tensor, or one of its shape and values)."""
    if value is tokens:
        return True
    return isinstance(value, torch.Tensor) and value.shape == tokens.shape and not value.is_floating_point() \
        and value.device == tokens.device and torch.equal(value.long(), tokens.long())


@contextmanager
def find_input_embeddings(module: nn.Module, tokens: torch.Tensor) -> Iterator[list[tuple[str, nn.Module]]]:
    """Inside the block, record every embedding (`EMBEDDING_TYPES`) of ``module`` called on ``tokens``.

    Yields a list that the forwards run inside the block fill with ``(name, embedding)`` pairs, in the order of
    their first call on ``tokens`` (an embedding called on other ids, say a tied output use, is not recorded).
    """
    found: list[tuple[str, nn.Module]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(embedding: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and _is_tokens(args[0], tokens) and all(m is not embedding for _, m in found):
                found.append((name, embedding))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in module.named_modules()
               if isinstance(m, EMBEDDING_TYPES)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def embedding_std(embedding: nn.Module) -> float:
    """Standard deviation of all entries of an embedding's weight (a sharded ``DTensor`` is gathered first)."""
    weight = embedding.weight.detach()
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
    return float(weight.double().std()) if weight.numel() > 1 else 0.0


@contextmanager
def embedding_noise(embedding: nn.Module, tokens: torch.Tensor, std: float,
                    generator: Optional[torch.Generator] = None,
                    draw: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Iterator[None]:
    """Inside the block, add ``std * N(0, 1)`` to ``embedding``'s output wherever its input is ``tokens``.

    One noise tensor is drawn (from ``generator``, in the output's shape, dtype and device; or ``draw(output)``
    when given, which must return standard-normal noise of the output's shape) at the first such call and
    reused by later calls on ``tokens`` in the block, so an input embedded twice (an encoder and a decoder fed
    the same ids) is perturbed once; calls on other ids (a tied output head that calls the module) are left
    alone. One block is one noisy draw.
    """
    noise: list[torch.Tensor] = []

    def perturb(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not (args and isinstance(output, torch.Tensor) and _is_tokens(args[0], tokens)):
            return None
        if not noise or noise[0].shape != output.shape:
            noise[:] = [draw(output) if draw is not None else
                        torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)]
        return output + std * noise[0]

    handle = embedding.register_forward_hook(perturb)
    try:
        yield
    finally:
        handle.remove()
