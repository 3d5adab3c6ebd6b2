"""`lightning_probes.functional.noise_scale`: the estimators against NumPy by hand, and unbiased against the true
``|G|^2`` and ``tr(Sigma)`` of per-sample gradients drawn from a known distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_probes.functional import (
    batch_sizes,
    ema_update,
    noise_scale_estimates,
    noise_scale_from_micro_batches,
    noise_scale_terms,
    simple_noise_scale,
)


def test_estimators_equal_the_formulas_by_hand():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(5, 7)) + 1.0  # 5 micro-batch mean gradients with a common mean
    sizes = [8, 8, 8, 8, 4]
    out = noise_scale_from_micro_batches(torch.from_numpy(grads), sizes)
    small = np.mean(np.sum(grads ** 2, axis=1))
    big = np.sum(grads.mean(axis=0) ** 2)
    h = np.mean([1.0 / s for s in sizes])
    bs, bb = 1 / h, 5 / h
    assert out["small_sq"] == pytest.approx(small, rel=1e-12)
    assert out["big_sq"] == pytest.approx(big, rel=1e-12)
    assert (out["b_small"], out["b_big"]) == pytest.approx((bs, bb), rel=1e-12)
    assert out["grad_sq"] == pytest.approx((bb * big - bs * small) / (bb - bs), rel=1e-12)
    assert out["trace_sigma"] == pytest.approx((small - big) / (1 / bs - 1 / bb), rel=1e-12)
    assert out["b_simple"] == pytest.approx(out["trace_sigma"] / out["grad_sq"], rel=1e-12)
    # The device version (sums, counts, no sync) gives the same row.
    row, usable = noise_scale_terms(torch.tensor(small * 5), torch.tensor(5.0), torch.tensor(5 * h), torch.tensor(big))
    assert bool(usable)
    assert row.tolist() == pytest.approx([small, big, bs, bb, out["grad_sq"], out["trace_sigma"]], rel=1e-12)


def test_equal_sizes_and_rejections():
    assert batch_sizes(4, 4 / 8) == (8.0, 32.0)
    assert simple_noise_scale(3.0, -1.0) != simple_noise_scale(3.0, -1.0)  # nan: no meaningful batch size
    assert float(simple_noise_scale(torch.tensor(3.0), torch.tensor(0.0))) != float(simple_noise_scale(3.0, 0.0))
    one = noise_scale_terms(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.25), torch.tensor(2.0))
    assert not bool(one[1]) and torch.equal(one[0], torch.zeros(6, dtype=torch.float64))  # one micro-batch
    inf = noise_scale_terms(torch.tensor(float("inf")), torch.tensor(4.0), torch.tensor(1.0), torch.tensor(2.0))
    assert not bool(inf[1]) and bool(torch.isfinite(inf[0]).all())
    with pytest.raises(ValueError, match="M = len"):
        noise_scale_from_micro_batches(torch.zeros(3, 2), [1, 1])


def test_ema_update_is_bias_corrected_and_skips_rejected_values():
    ema = torch.zeros(3, dtype=torch.float64)
    values = [(1.0, 10.0, True), (3.0, 30.0, True), (100.0, 100.0, False), (2.0, 5.0, True)]
    decay, ref, weight = 0.8, np.zeros(2), 0.0
    for g, t, ok in values:
        ema_update(ema, torch.tensor([g, t], dtype=torch.float64), decay, torch.tensor(ok))
        if ok:
            ref = decay * ref + (1 - decay) * np.array([g, t])
            weight = decay * weight + (1 - decay)
    assert ema[:2].numpy() == pytest.approx(ref, rel=1e-12)
    assert float(ema[2]) == pytest.approx(1 - decay ** 3, rel=1e-12)
    assert (ema[:2] / ema[2]).numpy() == pytest.approx(ref / weight, rel=1e-12)
    first = ema_update(torch.zeros(3, dtype=torch.float64), torch.tensor([4.0, 8.0]), 0.9, torch.tensor(True))
    assert (first[:2] / first[2]).tolist() == pytest.approx([4.0, 8.0])  # one update: the value itself


@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [16, 4, 8]])
def test_unbiased_on_known_per_sample_gradients(sizes):
    """Per-sample gradients ~ N(mu, diag(s^2)): |G|^2 = |mu|^2, tr(Sigma) = sum s^2. Over many draws the mean of each
    estimate is within 4 standard errors of the truth; the naive small-batch norm is not (it is biased by tr/B)."""
    rng = np.random.default_rng(3)
    dim, trials = 20, 4000
    mu = rng.normal(size=dim) * 0.3
    s = rng.uniform(0.5, 2.0, size=dim)
    true_grad_sq, true_trace = float(mu @ mu), float(np.sum(s ** 2))
    estimates = np.empty((trials, 2))
    small = np.empty(trials)
    for t in range(trials):
        means = np.stack([(mu + s * rng.normal(size=(b, dim))).mean(axis=0) for b in sizes])  # (M, D)
        out = noise_scale_from_micro_batches(torch.from_numpy(means), sizes)
        estimates[t] = out["grad_sq"], out["trace_sigma"]
        small[t] = out["small_sq"]
    mean, se = estimates.mean(axis=0), estimates.std(axis=0, ddof=1) / np.sqrt(trials)
    assert abs(mean[0] - true_grad_sq) < 4 * se[0]
    assert abs(mean[1] - true_trace) < 4 * se[1]
    assert se[1] < 0.05 * true_trace  # the check has teeth: a 5% bias would be seen
    naive_se = small.std(ddof=1) / np.sqrt(trials)
    assert small.mean() - true_grad_sq > 10 * naive_se  # |G_small|^2 alone overestimates |G|^2 by tr(Sigma)/B
    ratio = mean[1] / mean[0]  # B_simple of the averaged estimates
    assert ratio == pytest.approx(true_trace / true_grad_sq, rel=0.15)


def test_scalar_estimates_docstring_values():
    assert noise_scale_estimates(2.0, 1.1, 10, 100) == pytest.approx((1.0, 10.0))
