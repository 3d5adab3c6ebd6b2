"""Linearised boundary distances against autograd's Jacobian, a hand-worked linear model and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from lightning_probes.functional import boundary_distances, linear_stability
from lightning_probes.models import LeNet5


def _reference(fn, x):
    """Per-sample margins and gradient norms from ``torch.autograd.functional.jacobian`` (no vmap, no jacrev)."""
    margins, norms = [], []
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda s: fn(s.unsqueeze(0)).squeeze(0), sample.double())
        jac = jac.reshape(jac.shape[0], -1)
        logits = fn(sample.unsqueeze(0).double()).squeeze(0).detach()
        p = int(logits.argmax())
        margins.append((logits[p] - logits).numpy())
        norms.append(torch.linalg.vector_norm(jac[p] - jac, dim=1).numpy())
    return np.stack(margins), np.stack(norms)


def test_lenet5_distances_match_autograd_jacobian():
    torch.manual_seed(0)
    model = LeNet5(activation="tanh", padding=0).double().eval()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    out = boundary_distances(model, x, chunk_size=2)
    margins, norms = _reference(model, x)
    np.testing.assert_allclose(out["margin"].numpy(), margins, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["grad_norm"].numpy(), norms, rtol=1e-10, atol=1e-12)
    pred = out["pred"].numpy()
    dist = out["distance"].numpy()
    assert np.isinf(dist[np.arange(5), pred]).all()
    others = ~np.eye(10, dtype=bool)[pred]
    np.testing.assert_allclose(dist[others], (margins / np.where(norms > 0, norms, 1))[others], rtol=1e-10)
    np.testing.assert_allclose(out["min_distance"].numpy(), np.where(others, dist, np.inf).min(axis=1))
    assert (out["min_distance"] >= 0).all()


def test_linear_model_worked_by_hand():
    w = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([0.5, 0.0, -1.0])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    out = boundary_distances(lambda t: t @ w.T + b, x, chunk_size=None)
    # z = (2 + 3 + 0.5, 2, 1 + 2 + 3 - 1) = (5.5, 2, 5): predicted class 0.
    assert int(out["pred"][0]) == 0
    assert out["margin"][0].tolist() == pytest.approx([0.0, 3.5, 0.5])
    # ||w0 - w1|| = ||(2, -1, 1)|| = sqrt(6); ||w0 - w2|| = ||(1, -1, 0)|| = sqrt(2).
    assert out["distance"][0, 1].item() == pytest.approx(3.5 / math.sqrt(6))
    assert out["distance"][0, 2].item() == pytest.approx(0.5 / math.sqrt(2))
    assert out["min_distance"][0].item() == pytest.approx(0.5 / math.sqrt(2))


def test_linear_two_class_stability_is_phi_of_distance_by_monte_carlo():
    # For a linear two-class model, Gaussian noise keeps the prediction with probability Phi(d / sigma) exactly.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 6, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    fn = lambda t: t @ w.T + b  # noqa: E731
    out = boundary_distances(fn, x)
    sigma, draws = 0.7, 200_000
    predicted = linear_stability(out["min_distance"], sigma)
    for i in range(len(x)):
        noisy = x[i] + sigma * torch.randn(draws, 6, generator=g, dtype=torch.float64)
        kept = (fn(noisy).argmax(dim=1) == out["pred"][i]).double().mean().item()
        # Binomial standard error <= 0.5 / sqrt(200000) ~ 0.0011: 5 standard errors.
        assert kept == pytest.approx(predicted[i].item(), abs=0.006)
    np.testing.assert_allclose(predicted.numpy(), norm.cdf(out["min_distance"].numpy() / sigma), rtol=1e-12)


def test_zero_gradient_gives_infinite_distance():
    out = boundary_distances(lambda t: torch.stack([t.sum(1) * 0 + 1.0, t.sum(1) * 0], dim=1), torch.ones(2, 3))
    assert torch.isinf(out["distance"]).all()
    assert linear_stability(out["min_distance"], 1.0).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"x": torch.ones(3)}, "`x`"),
    ({"chunk_size": 0}, "`chunk_size`"),
    ({"fn": lambda t: t.sum(1, keepdim=True)}, "C >= 2"),
])
def test_bad_arguments(kwargs, match):
    args = {"fn": lambda t: t, "x": torch.ones(2, 3), **kwargs}
    fn, x = args.pop("fn"), args.pop("x")
    with pytest.raises(ValueError, match=match):
        boundary_distances(fn, x, **args)


def test_linear_stability_rejects_bad_sigma():
    with pytest.raises(ValueError, match="`sigma`.*positive.*0"):
        linear_stability(torch.zeros(1), 0)
