import numpy as np
import pytest
import torch

from lightning_probes.functional.dynamics import (
    COUNT_NAMES,
    counts_from_histogram,
    encode_codes,
    encode_previous,
    gradient_codes,
    transition_bins,
    transition_counts,
    transition_histogram,
    zero_threshold_for,
)


def reference_counts(g_prev, dw_prev, g_now, zero_thr, release_thr):
    """Element-by-element loop over the definitions, with dg = g_now - g_prev."""
    out = dict.fromkeys(COUNT_NAMES, 0)
    for gp, dw, gn in zip(g_prev, dw_prev, g_now):
        out["zero"] += abs(gn) < zero_thr
        if abs(gp) < release_thr:
            out["prev_below"] += 1
            out["released"] += abs(gn) >= release_thr
        if gp != 0 and gn != 0:
            out["both_nonzero"] += 1
            if np.sign(gp) != np.sign(gn):
                out["flips"] += 1
                product = dw * (gn - gp)
                out["minima"] += product > 0
                out["maxima"] += product < 0
    return [int(out[k]) for k in COUNT_NAMES]


def _random_case(seed, n=400):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-9, 0, n)  # magnitudes spanning both thresholds
    g_prev = (rng.standard_normal(n) * scale).astype(np.float32)
    g_now = (rng.standard_normal(n) * scale).astype(np.float32)
    dw = rng.standard_normal(n).astype(np.float32)
    for a in (g_prev, g_now, dw):
        a[rng.random(n) < 0.1] = 0.0
    return g_prev, dw, g_now


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_transition_counts_match_loop(seed):
    g_prev, dw, g_now = _random_case(seed)
    sizes = [150, 250]
    counts = transition_counts(torch.tensor(g_prev), torch.tensor(dw), torch.tensor(g_now), 1e-7, 1e-5, sizes)
    assert counts.shape == (2, len(COUNT_NAMES))
    for i, (lo, hi) in enumerate([(0, 150), (150, 400)]):
        assert counts[i].tolist() == reference_counts(g_prev[lo:hi], dw[lo:hi], g_now[lo:hi], 1e-7, 1e-5)
    whole = transition_counts(torch.tensor(g_prev), torch.tensor(dw), torch.tensor(g_now), 1e-7, 1e-5)
    assert whole.tolist() == counts.sum(0).tolist()


def test_state_is_one_byte_per_entry():
    g_prev, dw, _ = _random_case(0)
    state = encode_previous(torch.tensor(g_prev), torch.tensor(dw), 1e-5)
    assert state.dtype == torch.int8 and state.shape == (400,)
    assert int(state.min()) >= -3 and int(state.max()) <= 11


def test_plain_sgd_flips_cross_minima_only():
    # With dw = -lr * g_prev, every sign flip has dw * dg > 0: a minimum crossed.
    g_prev = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g_now = torch.tensor([-1.0, 2.0, 0.5, -0.1])
    counts = dict(zip(COUNT_NAMES, transition_counts(g_prev, -0.1 * g_prev, g_now, 1e-7, 1e-5).tolist()))
    assert counts["flips"] == 3 and counts["minima"] == 3 and counts["maxima"] == 0


def test_histogram_counts_every_entry_once():
    g_prev, dw, g_now = _random_case(5)
    state = encode_previous(torch.tensor(g_prev), torch.tensor(dw), 1e-5)
    hist = transition_histogram(state, torch.tensor(g_now), 1e-7, 1e-5, [100, 300]).numpy()
    assert hist.sum(1).tolist() == [100, 300]
    assert counts_from_histogram(hist).shape == (2, 7)


def test_zero_threshold_above_release_threshold_is_rejected():
    state = torch.zeros(3, dtype=torch.int8)
    with pytest.raises(ValueError, match="zero_threshold"):
        transition_histogram(state, torch.zeros(3), 1e-3, 1e-5)


def test_zero_threshold_is_dtype_aware():
    assert zero_threshold_for(torch.float32, 1e-7) == 1e-7
    assert zero_threshold_for(torch.float16, 1e-7) == pytest.approx(6.1035e-05, rel=1e-3)
    assert zero_threshold_for(torch.bfloat16, 1e-7) == 1e-7  # bf16's tiny (~1.2e-38) is lower


def test_shared_gradient_codes_give_the_same_bins_and_state():
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(5000, generator=gen) * 1e-3
    grad[::7] = 0.0
    prev = encode_previous(torch.randn(5000, generator=gen) * 1e-3, torch.randn(5000, generator=gen), 1e-3)
    update = torch.randn(5000, generator=gen)
    codes = gradient_codes(grad, 1e-3)
    for zero_threshold in (0.0, 1e-8, 1e-4):
        assert torch.equal(transition_bins(prev, grad, zero_threshold, 1e-3, codes),
                           transition_bins(prev, grad, zero_threshold, 1e-3))
    assert torch.equal(encode_codes(*codes, update), encode_previous(grad, update, 1e-3))
    # by hand: zero_threshold 0 counts no entry as zero, even exact zeros (|g| < 0 never holds)
    bins = transition_bins(prev, grad, 0.0, 1e-3).long()
    assert int((bins // 42 == 2).sum()) == 0
