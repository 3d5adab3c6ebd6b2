import numpy as np
import pytest
import torch

from lightning_probes.functional.gradients import (
    gradient_stats,
    l2_norms,
    nonfinite_counts,
    norm_summary,
    stats_from_summary,
    total_summary,
)


def test_norm_summary_matches_numpy():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 7, generator=g), torch.randn(3, generator=g) * 1e-3, torch.randn(2, 2, 2, generator=g)]
    summary = norm_summary(tensors)
    assert summary.shape == (3, 3)
    for row, t in zip(summary, tensors):
        a = np.abs(t.numpy().ravel())
        np.testing.assert_allclose(row.numpy(), [a.sum(), np.sqrt((a**2).sum()), a.max()], rtol=1e-5)
    stats = stats_from_summary(summary, torch.tensor([t.numel() for t in tensors]))
    for i, t in enumerate(tensors):
        a = np.abs(t.numpy().ravel()).astype(np.float64)
        assert stats["grad_abs_mean"][i].item() == pytest.approx(a.mean(), rel=1e-5)
        assert stats["grad_abs_std"][i].item() == pytest.approx(a.std(ddof=0), rel=1e-4)
        assert stats["grad_norm"][i].item() == pytest.approx(np.linalg.norm(a), rel=1e-5)
        assert stats["grad_abs_max"][i].item() == pytest.approx(a.max(), rel=1e-6)
    total = total_summary(summary)[0]
    every = np.concatenate([np.abs(t.numpy().ravel()) for t in tensors])
    np.testing.assert_allclose(total.numpy(), [every.sum(), np.linalg.norm(every), every.max()], rtol=1e-5)


def test_hand_worked_example():
    stats = gradient_stats(torch.tensor([3.0, -4.0, 0.0, 1.0]))
    # |g| = 3, 4, 0, 1: mean 2, E[g^2] = 26/4 = 6.5, var = 6.5 - 4 = 2.5
    assert stats == pytest.approx({"grad_abs_mean": 2.0, "grad_abs_std": 2.5**0.5, "grad_norm": 26**0.5,
                                   "grad_abs_max": 4.0, "nonfinite": 0})


def test_bf16_input_is_summarised_in_float32():
    t = torch.full((1000,), 0.1, dtype=torch.bfloat16)
    summary = norm_summary([t])
    assert summary.dtype == torch.float32
    assert summary[0, 0].item() == pytest.approx(1000 * float(t[0]), rel=1e-4)


def test_nonfinite_counts():
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert nonfinite_counts([t, torch.ones(3)]).tolist() == [3, 0]


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="at least one tensor"):
        norm_summary([])


def test_float64_input_stays_float64():
    # A "64-true" run: no downcast (and no copy), float64 precision kept.
    t = torch.tensor([1.0, 1e-12, -3.0], dtype=torch.float64)
    summary = norm_summary([t, torch.ones(2)])  # mixed: every row in float64
    assert summary.dtype == torch.float64
    assert summary[0, 0].item() == 4.0 + 1e-12
    assert norm_summary([torch.ones(2, dtype=torch.bfloat16)]).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_l2_norms_match_numpy(dtype):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 5, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)]
    norms = l2_norms(tensors)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = [np.linalg.norm(t.double().numpy()) for t in tensors]
    np.testing.assert_allclose(norms.double().numpy(), expected, rtol=1e-12 if dtype == torch.float64 else 1e-6)
    with pytest.raises(ValueError, match="at least one tensor"):
        l2_norms([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_abs_summary_matches_norm_summary(dtype):
    from lightning_probes.functional._fused import fused_abs_summary

    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(6, 9, generator=g).to(dtype), -torch.rand(5, generator=g).to(dtype) * 1e-3]
    fused = fused_abs_summary(tensors)  # run eagerly here; the probe may compile it
    assert fused.dtype == dtype and fused.shape == (2, 3)
    # Two float32 reductions of 54 values in different orders: each within 54 * 2**-24 = 3.2e-6 of the exact sum
    # whatever the order (the kernels decide it), so 1e-5 holds on any machine.
    torch.testing.assert_close(fused, norm_summary(tensors), rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=0)


@pytest.mark.parametrize("sizes", [[(300, 200), (5,)], [(7, 3)] * 40])
def test_both_summary_paths_match_numpy(sizes, monkeypatch):
    """The multi-tensor (foreach) path and the per-tensor loop give the NumPy values, whichever is chosen."""
    from lightning_probes.functional import gradients

    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(*s, generator=g) for s in sizes]
    reference = np.array([[np.abs(t.numpy()).sum(), np.linalg.norm(t.numpy()), np.abs(t.numpy()).max()]
                          for t in tensors])
    for threshold in (0, 10**9):  # 0: always the loop on CPU; 10**9: always foreach
        monkeypatch.setattr(gradients, "FOREACH_CPU_MEAN_NUMEL", threshold)
        np.testing.assert_allclose(norm_summary(tensors).numpy(), reference, rtol=1e-5)
        half = [t.to(torch.bfloat16) for t in tensors]
        bf16 = np.array([[np.abs(h.float().numpy()).sum(), np.linalg.norm(h.float().numpy()),
                          np.abs(h.float().numpy()).max()] for h in half])
        summary = norm_summary(half)
        assert summary.dtype == torch.float32
        np.testing.assert_allclose(summary.numpy(), bf16, rtol=1e-5)


def test_partial_sums_of_shards_give_the_full_summary():
    """Row blocks of a tensor (FSDP2's dim-0 shards, one empty) combine exactly into the whole tensor's summary."""
    from lightning_probes.functional.gradients import partial_summary, summary_from_partials

    g = torch.Generator().manual_seed(2)
    full = [torch.randn(9, 4, generator=g), torch.randn(3, generator=g)]
    for split in (3, 2):  # 3: the second rank holds none of the bias (the loop path); 2: every shard has entries
        shards = [[full[0][:5], full[1][:split]], [full[0][5:], full[1][split:]]]
        partials = [partial_summary(s) for s in shards]
        sums = partials[0][:, :2] + partials[1][:, :2]
        maxima = torch.maximum(partials[0][:, 2], partials[1][:, 2])
        np.testing.assert_allclose(summary_from_partials(sums, maxima).numpy(),
                                   norm_summary(full).double().numpy(), rtol=1e-6)
