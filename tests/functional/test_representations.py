import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.capture import ActivationCapture, reduce_features, select_modules
from lightning_probes.functional.activations import ActivationAccumulator
from lightning_probes.functional.representations import (
    MomentAccumulator,
    cka_from_covariances,
    cka_from_hsic,
    correlation_from_covariance,
    cross_correlation,
    effective_rank,
    effective_rank_from_covariance,
    linear_cka,
    minibatch_hsic_terms,
)


def _x(n=200, p=12, seed=0):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cross_correlation_equals_numpy():
    x, y = _x(100, 5), _x(100, 3, seed=1)
    y[:, 0] = x[:, 0] * 2 + 0.1 * y[:, 0]
    expected = np.corrcoef(x.numpy(), y.numpy(), rowvar=False)[:5, 5:]
    np.testing.assert_allclose(cross_correlation(x, y).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariances(unbiased):
    x = _x()
    rotation, _ = torch.linalg.qr(_x(12, 12, seed=3))
    assert linear_cka(x, x, unbiased).item() == pytest.approx(1.0)
    assert linear_cka(x, x @ rotation, unbiased).item() == pytest.approx(1.0)
    assert linear_cka(x, 7.5 * x, unbiased).item() == pytest.approx(1.0)
    noise = _x(2000, 12, seed=5)
    assert abs(linear_cka(_x(2000, 12, seed=4), noise, unbiased).item()) < 0.03


def test_unbiased_cka_needs_more_than_three_samples():
    with pytest.raises(ValueError, match="more than 3 samples"):
        linear_cka(_x(3, 2), _x(3, 2), unbiased=True)


def test_effective_rank_references():
    centred = _x(50, 8) - _x(50, 8).mean(0)
    q, _ = torch.linalg.qr(centred)  # 8 orthonormal, centred directions
    assert effective_rank(q).item() == pytest.approx(8.0)
    rank_one = torch.outer(torch.randn(40, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    assert effective_rank(rank_one).item() == pytest.approx(1.0)
    x = _x(300, 10)
    moments = MomentAccumulator(10)
    for chunk in x.split(64):
        moments.update(chunk)
    assert effective_rank_from_covariance(moments.covariance()).item() == pytest.approx(effective_rank(x).item())


def test_streamed_moments_equal_numpy_and_one_shot_cka():
    x = _x(300, 6) + 100.0  # a large mean: the shift keeps the streamed covariance exact
    y = x[:, :3] ** 2 + _x(300, 3, seed=2)
    z = torch.cat([x, y], dim=1)
    moments = MomentAccumulator(9)
    for chunk in z.split(50):
        moments.update(chunk.float())
    cov = moments.covariance()
    np.testing.assert_allclose(cov.numpy(), np.cov(z.numpy(), rowvar=False), rtol=1e-4, atol=1e-4)
    cka = cka_from_covariances(cov[6:, :6], cov[:6, :6], cov[6:, 6:])
    assert cka.item() == pytest.approx(linear_cka(x, y).item(), rel=1e-4)


def test_minibatch_cka_from_summed_hsic():
    x, y = _x(256, 5), _x(256, 4, seed=9)
    total = sum(minibatch_hsic_terms([a @ a.T, b @ b.T]) for a, b in zip(x.split(64), y.split(64)))
    cka = cka_from_hsic(total)
    assert cka[0, 0].item() == pytest.approx(1.0) and cka[1, 1].item() == pytest.approx(1.0)
    one_batch = linear_cka(x[:64], y[:64], unbiased=True).item()
    single = cka_from_hsic(minibatch_hsic_terms([x[:64] @ x[:64].T, y[:64] @ y[:64].T]))[0, 1].item()
    assert single == pytest.approx(one_batch)


def test_activation_accumulator_against_numpy():
    g = torch.Generator().manual_seed(0)
    out = torch.relu(torch.randn(40, 6, 3, 3, generator=g))
    out[:, 2] = 0.0  # a dead channel
    acc = ActivationAccumulator()
    for chunk in out.split(16):
        acc.update(chunk)
    stats = acc.compute()
    a = out.numpy()
    assert stats["mean"] == pytest.approx(a.mean()) and stats["std"] == pytest.approx(a.std())
    assert stats["sparsity"] == pytest.approx((a == 0).mean())
    assert stats["positive_ratio"] == pytest.approx((a > 0).mean())
    assert stats["dead_units"] == 1 and stats["dead_fraction"] == pytest.approx(1 / 6)
    assert stats["saturation"] is None
    tanh = ActivationAccumulator(bounds=(-1.0, 1.0))
    tanh.update(torch.tensor([[-1.0, 0.995, 0.0, 0.5]]))
    assert tanh.compute()["saturation"] == pytest.approx(0.5)


def test_reduce_features_pools_conv_outputs():
    out = torch.randn(2, 64, 8, 8)
    reduced = reduce_features(out, 1024)
    assert reduced.shape == (2, 1024)
    torch.testing.assert_close(reduced, torch.nn.functional.adaptive_avg_pool2d(out, 4).reshape(2, -1))
    assert reduce_features(torch.randn(2, 10), 1024).shape == (2, 10)
    assert reduce_features(torch.randn(2, 2048, 2, 2), 1024).shape == (2, 1024)


def test_capture_survives_inplace_relu_and_removes_hooks():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    modules = select_modules(model, default="all")
    assert list(modules) == ["0", "1", "2"]
    capture = ActivationCapture(modules, 1024)
    with capture.capturing():
        model(torch.randn(16, 4))
        out = capture.pop()
    assert (out["0"] < 0).any() and (out["1"] >= 0).all()  # the clone kept the pre-ReLU values
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), capture.capturing():
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_default_selection_is_the_signal_leaving_each_block():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    assert list(select_modules(model)) == ["2", "4", "5"]  # activations and the classifier
    assert list(select_modules(model, default="all")) == ["0", "1", "2", "3", "4", "5"]
    functional = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))  # no activation module: every parametrised leaf
    assert list(select_modules(functional)) == ["0", "1"]
    with pytest.raises(ValueError, match="`default`"):
        select_modules(model, default="some")


def test_unknown_layer_names_suggest_close_matches():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'fc_1' \\(did you mean 'fc1'"):
        select_modules(model, ["fc_1"])


def test_tuple_outputs_and_repeated_calls():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.shared(self.shared(out[:, -1]))

    net = Net()
    capture = ActivationCapture(select_modules(net, ["lstm", "shared"]), 1024)
    x = torch.randn(5, 2, 3)
    with capture.capturing():
        net(x)
        out = capture.pop()
    assert out["lstm"].shape == (5, 8)
    torch.testing.assert_close(out["shared"], net.shared(net.lstm(x)[0][:, -1]).detach())  # the first call


def _float64_moments(batches: list[torch.Tensor]) -> torch.Tensor:
    """Reference: the same centred batches summed in float64 (the accumulator's former arithmetic)."""
    z = torch.cat(batches).double()
    zc = z - z.mean(dim=0)
    return zc.T @ zc / (z.shape[0] - 1)


@pytest.mark.parametrize("batch", [128, 50])
def test_float32_accumulation_agrees_with_float64_to_1e_5(batch):
    """Float32 activations (ReLU layers of different widths and scales, a large mean, a rank-deficient
    classifier) streamed as LayerCorrelationMonitor streams them: covariance, correlation and CKA within 1e-5
    of float64 sums."""
    g = torch.Generator().manual_seed(0)
    n = 512
    hidden = torch.relu(torch.randn(n, 64, generator=g) @ torch.randn(64, 300, generator=g) * 0.3 + 0.2)
    wide = torch.relu(hidden @ torch.randn(300, 200, generator=g) * 0.1) * 50.0 + 100.0  # large scale and mean
    logits = hidden[:, :8] @ torch.randn(8, 10, generator=g)  # rank 8 in 10 features
    z = torch.cat([hidden, wide, logits], dim=1).float()
    batches = list(z.split(batch))
    moments = MomentAccumulator(z.shape[1], dtype=torch.float32)
    for chunk in batches:
        moments.update(chunk)
    assert moments.products.dtype == torch.float32
    cov, reference = moments.covariance(), _float64_moments(batches)
    scale = reference.diagonal().sqrt()
    np.testing.assert_allclose((cov / scale / scale[:, None]).numpy(), (reference / scale / scale[:, None]).numpy(),
                               atol=1e-5)  # relative to each pair's scale
    corr, corr64 = correlation_from_covariance(cov), correlation_from_covariance(reference)
    assert torch.nan_to_num(corr - corr64).abs().max() < 1e-5
    edges = (0, 300, 500, 510)
    blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    for bi in blocks:
        for bj in blocks:
            assert cka_from_covariances(cov[bj, bi], cov[bi, bi], cov[bj, bj]).item() == pytest.approx(
                cka_from_covariances(reference[bj, bi], reference[bi, bi], reference[bj, bj]).item(), abs=1e-5)


def _numpy_effective_rank(x: np.ndarray, cutoff: bool) -> float:
    """Independent reference: exp(entropy) of the normalised singular values of the centred data, in float64.

    With ``cutoff``, singular values whose squares are within ``p * eps`` of the largest (numpy.linalg.matrix_rank's
    tolerance, on the covariance's eigenvalues) count as zero, as `effective_rank_from_covariance` counts them."""
    x = np.asarray(x, dtype=np.float64)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    if cutoff:
        s = np.where(s ** 2 > s.max() ** 2 * x.shape[1] * np.finfo(np.float64).eps, s, 0.0)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [10, 8, 3])
def test_effective_rank_from_float64_sums_matches_numpy(seed, rank):
    """What ActivationStatsMonitor relies on: float32 activations streamed into float64 sums give the effective
    rank of NumPy's float64 SVD of the whole data, for full-rank and rank-deficient layers (a 10-class classifier
    fed by 8 or 3 units).

    The null directions of float32 activations keep singular values of about 2e-8 of the largest (the data's own
    rounding, eigenvalues 1e-16 to 1e-15 of the largest): below the cutoff of `effective_rank_from_covariance`
    (2.2e-15 for 10 features), so the reference applies the same cutoff. Measured here: 2e-16 to 2e-15 from the
    reference. The bound on rank-deficient data is 1e-6: were one null direction to land on the other side of the
    cutoff on another machine, it would move the rank by about 3e-7. The one-shot SVD (`effective_rank`, no cutoff)
    matches NumPy's plain SVD to 1e-9.
    """
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(48, rank, generator=g) @ torch.randn(rank, 10, generator=g) + 3.0).float()
    moments = MomentAccumulator(10, dtype=torch.float64)
    for chunk in logits.split(16):
        moments.update(chunk)
    got = effective_rank_from_covariance(moments.covariance()).item()
    reference = _numpy_effective_rank(logits.numpy(), cutoff=True)
    assert got == pytest.approx(reference, rel=1e-9 if rank == 10 else 1e-6)
    plain = _numpy_effective_rank(logits.numpy(), cutoff=False)
    assert effective_rank(logits.double()).item() == pytest.approx(plain, rel=1e-9)  # the one-shot path
