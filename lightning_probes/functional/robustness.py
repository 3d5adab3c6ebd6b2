"""Robustness of predictions to Gaussian input noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch


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
