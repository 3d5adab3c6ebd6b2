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


# -- the probe's compact codes (lightning_probes.functional._fused) ------------------------------------------
def _compact_case(seed, n=400):
    g_prev, dw, g_now = _random_case(seed, n)
    before = np.random.default_rng(seed + 100).standard_normal(n).astype(np.float32)
    after = (before + dw).astype(np.float32)
    dw = after - before  # the update as float32 arithmetic gives it (its sign is what the codes keep)
    return g_prev, before, after, dw, g_now


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("zero_threshold", [1e-7, 0.0])
def test_compact_codes_match_loop(seed, zero_threshold):
    from lightning_probes.functional._fused import transition_counts_compact

    g_prev, before, after, dw, g_now = _compact_case(seed)
    sizes = [150, 250]
    counts = transition_counts_compact(torch.tensor(g_prev), torch.tensor(before), torch.tensor(after),
                                       torch.tensor(g_now), zero_threshold, 1e-5, sizes)
    for i, (lo, hi) in enumerate([(0, 150), (150, 400)]):
        assert counts[i].tolist() == reference_counts(g_prev[lo:hi], dw[lo:hi], g_now[lo:hi], zero_threshold, 1e-5)
    # the same counts as the documented [-3, 11] codes of `encode_previous`
    old = transition_counts(torch.tensor(g_prev), torch.tensor(dw), torch.tensor(g_now), zero_threshold, 1e-5, sizes)
    assert counts.tolist() == old.tolist()


def test_compact_codes_at_the_thresholds_and_signed_zeros():
    from lightning_probes.functional._fused import current_codes, state_codes, transition_counts_compact

    f32 = np.float32
    edges = [f32(1e-5), np.nextafter(f32(1e-5), f32(0)), f32(1e-7), np.nextafter(f32(1e-7), f32(0)), f32(0.0),
             f32(-0.0), f32(3.0)]
    values = np.array(edges + [-v for v in edges], dtype=np.float32)
    g_prev = np.repeat(values, len(values))
    g_now = np.tile(values, len(values))
    before = np.zeros_like(g_prev)
    after = np.resize(np.array([1.0, -1.0, 0.0], dtype=np.float32), len(g_prev))
    counts = transition_counts_compact(torch.tensor(g_prev), torch.tensor(before), torch.tensor(after),
                                       torch.tensor(g_now), 1e-7, 1e-5)
    assert counts.tolist() == reference_counts(g_prev, after - before, g_now, f32(1e-7), f32(1e-5))
    state = state_codes(current_codes(torch.tensor(g_prev), 1e-7, 1e-5), torch.tensor(after), torch.tensor(before))
    assert state.dtype == torch.int8 and int(state.min()) >= 0 and int(state.max()) < 27


def test_fused_kernels_run_eagerly_give_the_compact_results():
    """The compiled kernels' functions, run eagerly: the counts of the 243-key histogram, the current codes in the
    low nibble, and the state `state_codes` gives from full weight copies."""
    from lightning_probes.functional._fused import (
        counts_from_keys,
        current_codes,
        fused_dynamics_after,
        fused_dynamics_before,
        key_histogram,
        state_codes,
    )

    gen = torch.Generator().manual_seed(4)
    sizes = [60, 7, 33]
    grads = [torch.randn(n, generator=gen) * 10.0 ** -torch.randint(3, 9, (n,), generator=gen) for n in sizes]
    grads[0][::5] = 0.0
    before = torch.randn(sum(sizes), generator=gen)
    params = [w + torch.randn(w.shape, generator=gen) * (torch.rand(w.shape, generator=gen) > 0.3)
              for w in before.split(sizes)]
    state = torch.randint(0, 27, (sum(sizes),), dtype=torch.int8, generator=gen)
    counts, squares, codes, planes, erefs = fused_dynamics_before(grads, list(state.split(sizes)),
                                                                  list(before.split(sizes)), 1e-7, 1e-5)
    flat = torch.cat(grads)
    current = current_codes(flat, 1e-7, 1e-5)
    assert torch.equal(torch.cat(codes).view(torch.uint8) & 15, current.view(torch.uint8))
    assert torch.equal(counts.long(), counts_from_keys(key_histogram(state, current, sizes)).round().long())
    torch.testing.assert_close(squares, torch.stack([g.double().square().sum() for g in grads]))
    states, updates, weights = fused_dynamics_after(params, codes, planes, erefs)
    assert torch.equal(torch.cat(states), state_codes(current, torch.cat(params), before))
    torch.testing.assert_close(updates.sqrt(), torch.stack([(p - b).double().norm() for p, b in
                                                            zip(params, before.split(sizes))]))
    torch.testing.assert_close(weights.sqrt(), torch.stack([p.double().norm() for p in params]))


def test_fused_kernel_falls_back_to_eager_once(monkeypatch, caplog):
    import logging

    from lightning_probes.functional._fused import FusedKernel

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    kernel = FusedKernel(lambda x: x * 2, name="doubler")
    with caplog.at_level(logging.INFO, logger="lightning_probes.functional._fused"):
        assert kernel(torch.ones(2)).tolist() == [2.0, 2.0]
        assert kernel(torch.ones(1)).tolist() == [2.0]
    assert not kernel.active and kernel.compile_seconds == 0.0
    assert [r.getMessage() for r in caplog.records] == [
        "Could not compile doubler (RuntimeError: no compiler here); running it eagerly."]
    assert FusedKernel(lambda x: x, enabled=False).active is False


def test_offset_key_histogram_equals_one_histogram_per_segment():
    """The accelerator path (one histc over keys offset by segment) counts what one bincount per segment does."""
    from lightning_probes.functional._fused import key_histogram, offset_key_histogram

    g = torch.Generator().manual_seed(0)
    sizes = [5, 300, 1, 77, 12]
    state = torch.randint(0, 27, (sum(sizes),), dtype=torch.int8, generator=g)
    current = torch.randint(0, 9, (sum(sizes),), dtype=torch.int8, generator=g)
    per_segment = key_histogram(state, current, sizes)  # CPU: one bincount per segment
    keys = (current * 27 + state).view(torch.uint8)
    assert torch.equal(offset_key_histogram(keys, sizes), per_segment)
    assert per_segment.sum(dim=1).tolist() == sizes
