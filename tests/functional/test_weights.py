"""Weight statistics and the health score against NumPy / SciPy on small known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from lightning_probes.functional import HEALTH_FORMULA, health_score, weight_matrix, weight_statistics


@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 3, 3), (6, 2, 5), (9,)])
def test_statistics_equal_numpy_and_scipy(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 0.3 + 0.05
    w.view(-1)[:3] = 0.0  # some exact zeros
    stats = weight_statistics(w)
    a = w.double().numpy()
    m = a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)
    assert stats["l1"] == pytest.approx(np.abs(a).sum(), rel=1e-12)
    assert stats["l2"] == pytest.approx(np.linalg.norm(m, "fro"), rel=1e-12)
    assert stats["spectral_norm"] == pytest.approx(np.linalg.norm(m, 2), rel=1e-10)
    assert stats["stable_rank"] == pytest.approx(np.linalg.norm(m, "fro") ** 2 / np.linalg.norm(m, 2) ** 2, rel=1e-10)
    assert stats["mean"] == pytest.approx(a.mean(), rel=1e-10)
    assert stats["std"] == pytest.approx(a.std(), rel=1e-10)
    # Independent of scipy: the moment formulas of the biased estimators.
    d = a.ravel() - a.mean()
    m2, m3, m4 = (d ** 2).mean(), (d ** 3).mean(), (d ** 4).mean()
    assert stats["skewness"] == pytest.approx(m3 / m2 ** 1.5, rel=1e-9)
    assert stats["kurtosis"] == pytest.approx(m4 / m2 ** 2 - 3.0, rel=1e-9)
    assert stats["kurtosis"] == pytest.approx(sps.kurtosis(a.ravel()), rel=1e-9)
    assert stats["sparsity"] == pytest.approx(np.mean(np.abs(a) < 1e-6))
    assert stats["fan_in"] == m.shape[1] and stats["numel"] == a.size and stats["shape"] == list(shape)


def test_conv_weight_is_the_patch_matrix():
    w = torch.randn(8, 3, 5, 5)
    assert weight_matrix(w).shape == (8, 75)
    assert weight_statistics(w)["spectral_norm"] == pytest.approx(
        np.linalg.norm(w.double().reshape(8, -1).numpy(), 2), rel=1e-10)


def test_known_cases():
    identity = weight_statistics(torch.eye(4))
    assert identity["spectral_norm"] == 1.0 and identity["stable_rank"] == pytest.approx(4.0)
    assert identity["sparsity"] == 0.75
    rank_one = weight_statistics(torch.outer(torch.arange(1.0, 4.0), torch.ones(5)))
    assert rank_one["stable_rank"] == pytest.approx(1.0)
    zeros = weight_statistics(torch.zeros(3, 3))
    assert math.isnan(zeros["stable_rank"]) and zeros["sparsity"] == 1.0 and math.isnan(zeros["kurtosis"])
    bad = weight_statistics(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    assert not bad["finite"] and math.isnan(bad["l2"])
    with pytest.raises(ValueError, match="at least one dimension"):
        weight_matrix(torch.tensor(1.0))


def test_health_score_follows_its_formula():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 200, generator=g) * 0.5
    w[:, :20] = 0
    stats = weight_statistics(w)
    h = health_score(stats)
    density = 1 - stats["sparsity"]
    scale = math.exp(-abs(math.log10(stats["std"] * math.sqrt(200))))
    tails = 1 / (1 + max(0.0, stats["kurtosis"]) / 10)
    assert h["density"] == pytest.approx(0.9) and h["scale"] == pytest.approx(scale)
    assert h["tails"] == pytest.approx(tails)
    assert h["health"] == pytest.approx(100 * density * scale * tails)
    # Scale: 1 at std = 1/sqrt(fan_in), 1/e at ten times too large or too small.
    base = {"finite": True, "sparsity": 0.0, "fan_in": 100, "kurtosis": 0.0}
    assert health_score({**base, "std": 0.1})["health"] == pytest.approx(100)
    assert health_score({**base, "std": 1.0})["scale"] == pytest.approx(math.exp(-1))
    assert health_score({**base, "std": 0.01})["scale"] == pytest.approx(math.exp(-1))
    assert health_score({**base, "std": 0.1, "kurtosis": 10.0})["tails"] == pytest.approx(0.5)
    assert health_score({**base, "std": 0.0})["health"] == 0.0
    assert health_score({"finite": False})["health"] == 0.0
    assert "kurtosis" in HEALTH_FORMULA and "sqrt(fan_in)" in HEALTH_FORMULA
