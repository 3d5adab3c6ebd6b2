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


@torch.no_grad()
def noisy_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    sigma: float,
    num_draws: int,
    generator: Optional[torch.Generator] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Logits of ``num_draws`` Gaussian-noise copies of every input: ``(D, N, C)``.

    Noise is ``sigma * N(0, 1)`` in the inputs' units (normalised units for normalised images), drawn from
    ``generator`` for reproducibility; copies go through ``forward`` in chunks of at most ``chunk_size`` rows.
    """
    outputs = []
    for _ in range(num_draws):
        noise = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        noisy = inputs + sigma * noise
        outputs.append(torch.cat([forward(part) for part in noisy.split(chunk_size)]))
    return torch.stack(outputs)
