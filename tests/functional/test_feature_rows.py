import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.feature_rows import (
    FeatureReducer,
    fit_cap,
    infer_layouts,
    recording_calls,
    rows_per_sample,
    subsample_columns,
    token_rows,
)
from lightning_probes.functional import EffectiveRankAccumulator, effective_rank_from_gram, linear_cka


def _numpy_effective_rank(rows: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values, from NumPy's eigenvalues of the covariance (those that are
    zero in exact arithmetic, below 1e-12 of the largest, set to 0: their rounding's square roots would count)."""
    eigenvalues = np.linalg.eigvalsh(np.cov(rows, rowvar=False))
    eigenvalues = np.where(eigenvalues > 1e-12 * eigenvalues.max(), eigenvalues, 0.0)
    p = np.sqrt(eigenvalues) / np.sqrt(eigenvalues).sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_token_modes_match_numpy_reshapes():
    x = torch.randn(3, 5, 4)
    a = x.numpy()
    np.testing.assert_allclose(token_rows(x, "tokens", "samples").numpy(), a.reshape(15, 4))
    np.testing.assert_allclose(token_rows(x, "tokens", "mean").numpy(), a.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(token_rows(x, "tokens", "flatten").numpy(), a.reshape(3, 20))
    # Sequence first (tokens, batch, features), recognised by the batch size in the second place.
    np.testing.assert_allclose(token_rows(x.transpose(0, 1), "tokens", "samples", batch=3).numpy(), a.reshape(15, 4))
    assert rows_per_sample((5, 3, 4), "tokens", "samples", batch=3) == 5
    assert rows_per_sample((3, 5, 4), "tokens", "mean") == 1
    with pytest.raises(ValueError, match="`token_mode`"):
        token_rows(x, "tokens", "tokens")


def test_layouts_follow_the_module_that_made_the_shape():
    conv = nn.Sequential(nn.Conv1d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8, 3))
    seq = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8))
    with recording_calls(conv) as calls:
        conv(torch.randn(2, 2, 10))
    assert infer_layouts(calls, ["0", "1", "3"]) == {"0": "channels", "1": "channels", "3": "flat"}
    with recording_calls(seq) as calls:
        seq(torch.randn(2, 7, 4))
    assert infer_layouts(calls, ["0", "1", "2"]) == {"0": "tokens", "1": "tokens", "2": "tokens"}
    assert all(not m._forward_hooks for m in [*conv.modules(), *seq.modules()])


def test_reducer_pools_channels_and_subsamples_the_rest():
    out = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(FeatureReducer("c", "channels", "samples", 1024)(out),
                               nn.functional.adaptive_avg_pool2d(out, 4).reshape(2, -1))
    wide = torch.randn(6, 50)
    reducer = FeatureReducer("layer", "flat", "samples", 20)
    kept = reducer(wide)
    index = subsample_columns(50, 20, "layer")
    assert kept.shape == (6, 20) and torch.equal(kept, wide[:, index])
    assert torch.equal(index, subsample_columns(50, 20, "layer")) and torch.equal(index, index.sort().values)
    assert not torch.equal(index, subsample_columns(50, 20, "other"))
    assert reducer.width((6, 50)) == 20 and reducer.full_width((6, 50)) == 50
    # 2048 channels: global average, then a seeded subsample of the channels.
    assert FeatureReducer("c", "channels", "samples", 1024).width((2, 2048, 2, 2)) == 1024


def test_fit_cap_cuts_only_the_widest():
    assert fit_cap([10, 100, 1000], 2000) == 1000
    cap = fit_cap([10, 100, 1000], 300)
    assert sum(min(w, cap) for w in [10, 100, 1000]) <= 300 < sum(min(w, cap + 1) for w in [10, 100, 1000])
    assert cap == 190 and fit_cap([5, 5], 1) is None


def test_subsampled_features_keep_exact_correlations_and_close_cka():
    """The documented behaviour of the reduction: correlations of kept features are exact entries of the full
    matrix; linear CKA on the subsample stays close to the full CKA (low-rank signal plus noise, 1500 features
    each, 300 kept)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 8, generator=g, dtype=torch.float64)
    x = z @ torch.randn(8, 1500, generator=g, dtype=torch.float64) + 0.5 * torch.randn(400, 1500, generator=g,
                                                                                         dtype=torch.float64)
    y = torch.tanh(z[:, :5]) @ torch.randn(5, 1500, generator=g, dtype=torch.float64) \
        + torch.randn(400, 1500, generator=g, dtype=torch.float64)
    ix, iy = subsample_columns(1500, 300, "x"), subsample_columns(1500, 300, "y")
    full = np.corrcoef(x.numpy(), y.numpy(), rowvar=False)
    sub = np.corrcoef(x[:, ix].numpy(), y[:, iy].numpy(), rowvar=False)
    np.testing.assert_allclose(sub[:300, 300:], full[:1500, 1500:][np.ix_(ix.numpy(), iy.numpy())], atol=1e-12)
    cka_full, cka_sub = linear_cka(x, y).item(), linear_cka(x[:, ix], y[:, iy]).item()
    assert abs(cka_sub - cka_full) < 0.02, (cka_sub, cka_full)
    # Mean |correlation| of the kept pairs estimates the full mean.
    assert abs(np.abs(sub[:300, 300:]).mean() - np.abs(full[:1500, 1500:]).mean()) < 0.01


@pytest.mark.parametrize("rows", [12, 90])
def test_effective_rank_from_the_smaller_problem(rows):
    """Wider than the rows: the (rows x rows) Gram matrix; more rows than features: the covariance. Both equal
    NumPy's eigenvalues of the covariance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 40, generator=g, dtype=torch.float64)
    x = x + 0.1 * torch.randn(rows, 40, generator=g, dtype=torch.float64)
    acc = EffectiveRankAccumulator(40)
    for part in x.split(5):
        acc.update(part)
    assert acc.uses_gram == (rows <= 40)
    expected = _numpy_effective_rank(x.numpy())
    assert acc.compute().item() == pytest.approx(expected, rel=1e-9)
    centred = x - x.mean(0)
    assert effective_rank_from_gram(centred @ centred.T).item() == pytest.approx(expected, rel=1e-9)
