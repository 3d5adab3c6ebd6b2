import numpy as np
import pytest
import torch

from lightning_probes.functional.dynamics import (
    COUNT_NAMES,
    default_zero_threshold,
    encode_previous,
    transition_counts,
    zero_counts,
)


def reference_counts(g_prev, dw_prev, g_now, zero_thr, release_thr):
    """Element-by-element loop: the definitions, with dg = g_now - g_prev."""
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
    return [out[k] for k in COUNT_NAMES]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transition_counts_match_loop(seed):
    rng = np.random.default_rng(seed)
    n = 400
    scale = 10.0 ** rng.integers(-8, 0, n)  # magnitudes spanning the thresholds
    g_prev = rng.standard_normal(n) * scale
    g_prev[rng.random(n) < 0.1] = 0.0
    g_now = rng.standard_normal(n) * scale
    g_now[rng.random(n) < 0.1] = 0.0
    dw = rng.standard_normal(n)
    dw[rng.random(n) < 0.1] = 0.0
    code = encode_previous(torch.tensor(g_prev), torch.tensor(dw))
    assert code.dtype == torch.int8
    below = torch.tensor(np.abs(g_prev) < 1e-5)
    sizes = [150, 250]
    counts = transition_counts(code, below, torch.tensor(g_now), 1e-7, 1e-5, sizes)
    assert counts.shape == (2, len(COUNT_NAMES))
    for i, (lo, hi) in enumerate([(0, 150), (150, 400)]):
        expected = reference_counts(g_prev[lo:hi], dw[lo:hi], g_now[lo:hi], 1e-7, 1e-5)
        assert counts[i].tolist() == expected
    whole = transition_counts(code, below, torch.tensor(g_now), 1e-7, 1e-5)
    assert whole.tolist() == counts.sum(0).tolist()


def test_plain_sgd_flips_cross_minima_only():
    # With dw = -lr * g_prev, every sign flip has dw * dg > 0: a minimum crossed.
    g_prev = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g_now = torch.tensor([-1.0, 2.0, 0.5, -0.1])
    counts = dict(zip(COUNT_NAMES, transition_counts(encode_previous(g_prev, -0.1 * g_prev),
                                                     g_prev.abs() < 1e-5, g_now, 1e-7, 1e-5).tolist()))
    assert counts["flips"] == 3 and counts["minima"] == 3 and counts["maxima"] == 0


def test_zero_counts_segments():
    g = torch.tensor([0.0, 1e-9, 1.0, 0.0, 2.0])
    assert zero_counts(g, 1e-7).item() == 3
    assert zero_counts(g, 1e-7, [2, 3]).tolist() == [2, 1]


def test_zero_threshold_is_dtype_aware():
    assert default_zero_threshold(torch.float32, 1e-7) == 1e-7
    assert default_zero_threshold(torch.float16, 1e-7) == pytest.approx(6.1035e-05, rel=1e-3)
    assert default_zero_threshold(torch.bfloat16, 1e-7) == 1e-7  # bf16's tiny (~1.2e-38) is lower
