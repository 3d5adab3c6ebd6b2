"""Curvature maths against the exact Hessian (`torch.func.hessian`), PyHessian and Cockpit's alpha."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.functional.curvature import (
    alpha_sums,
    directional_samples,
    flatten,
    hutchinson_trace,
    hvp_operator,
    lanczos,
    local_step_alpha,
    quadratic_fit,
    step_alpha,
    unflatten,
)
from lightning_probes.functional.per_sample import cross_entropy_loss


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def _exact_hessian(model, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = flatten([p.detach() for p in model.parameters()])

    def loss(vec):
        params = dict(zip(names, unflatten(vec, [torch.empty(s) for s in shapes])))
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.func.hessian(loss)(flat)


def test_hvp_equals_the_exact_hessian_times_v():
    model, x, y = _setup()
    hess = _exact_hessian(model, x, y)
    hvp, loss, names = hvp_operator(model, (x, y), cross_entropy_loss)
    assert names == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(x), y).detach())
    v = torch.randn(hess.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(v), hess @ v, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # the module's gradients are not touched


def test_lanczos_finds_the_extreme_eigenvalues():
    model, x, y = _setup()
    eig = torch.linalg.eigvalsh(_exact_hessian(model, x, y))
    hvp, _, _ = hvp_operator(model, (x, y), cross_entropy_loss)
    size = eig.numel()
    ritz, _ = lanczos(hvp, size, size, torch.Generator().manual_seed(1), torch.device("cpu"), torch.float64)
    torch.testing.assert_close(ritz, eig, rtol=1e-8, atol=1e-10)  # the whole space: exact
    ritz, residual = lanczos(hvp, size, 20, torch.Generator().manual_seed(1), torch.device("cpu"), torch.float64)
    assert abs(float(ritz[-1]) - float(eig[-1])) <= 1e-3 * abs(float(eig[-1]))
    assert abs(float(ritz[-1]) - float(eig[-1])) <= float(residual) + 1e-12  # the residual bounds the error


def test_hutchinson_is_within_three_standard_errors_of_the_trace():
    model, x, y = _setup()
    trace = float(torch.trace(_exact_hessian(model, x, y)))
    hvp, _, _ = hvp_operator(model, (x, y), cross_entropy_loss)
    size = sum(p.numel() for p in model.parameters())
    est, se, forms = hutchinson_trace(hvp, size, 64, torch.Generator().manual_seed(2), torch.device("cpu"),
                                      torch.float64)
    assert forms.shape == (64,)
    assert float(se) > 0 and abs(float(est) - trace) <= 3 * float(se)
    torch.testing.assert_close(se, forms.std() / 8)


def test_pyhessian_agrees():
    hessian = pytest.importorskip("pyhessian.hessian")
    model, x, y = _setup()
    eig = torch.linalg.eigvalsh(_exact_hessian(model, x, y))
    ref = hessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    # One product on the same vector: PyHessian's double backward and ours.
    v = [torch.randn_like(p) for p in ref.params]
    theirs = flatten(hessian.hessian_vector_product(ref.gradsH, ref.params, v))
    hvp, _, _ = hvp_operator(model, (x, y), cross_entropy_loss)
    torch.testing.assert_close(hvp(flatten(v)), theirs.detach(), rtol=1e-10, atol=1e-12)
    # PyHessian's power iteration finds the eigenvalue of largest magnitude; Lanczos gives both ends.
    torch.manual_seed(3)
    top, _ = ref.eigenvalues(maxIter=500, tol=1e-8)
    ritz, _ = lanczos(hvp, eig.numel(), 25, torch.Generator().manual_seed(1), torch.device("cpu"), torch.float64)
    ours = max(float(ritz[-1]), float(ritz[0]), key=abs)
    assert math.isclose(top[0], ours, rel_tol=1e-3)
    assert math.isclose(ours, max(float(eig[-1]), float(eig[0]), key=abs), rel_tol=1e-6)
    torch.manual_seed(4)
    forms = np.array(ref.trace(maxIter=200, tol=0.0))
    trace = float(torch.trace(_exact_hessian(model, x, y)))
    assert abs(forms.mean() - trace) <= 3 * forms.std(ddof=1) / math.sqrt(len(forms))


def _cockpit_alpha():
    if "pkg_resources" not in sys.modules:  # cockpit 1.0.2 imports it; setuptools >= 81 no longer ships it
        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = type("DistributionNotFound", (Exception,), {})
        shim.get_distribution = lambda name: (_ for _ in ()).throw(shim.DistributionNotFound())
        sys.modules["pkg_resources"] = shim
    return pytest.importorskip("cockpit.quantities.alpha")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", [
    (0.5, [2.0, 1.5], [-1.2, 0.3], [0.1, 0.2], [0.05, 0.3]),  # a step past the minimum
    (0.1, [2.0, 1.9], [-1.0, -0.9], [0.1, 0.1], [0.2, 0.2]),  # too short
    (0.2, [2.0, 1.5], [-1.0, -3.0], [0.1, 0.1], [0.2, 0.2]),  # concave: -1
    (0.3, [1.0, 1.2], [0.4, 0.9], [0.0, 0.1], [0.2, 0.0]),  # zero variances: Cockpit's eps
])
def test_alpha_equals_cockpit(case):
    alpha_mod = _cockpit_alpha()
    t, fs, dfs, var_fs, var_dfs = case
    mu_ref = alpha_mod._fit_quadratic(t, fs, dfs, var_fs, var_dfs)
    mu = quadratic_fit(*(torch.tensor(v, dtype=torch.float64) for v in case))
    np.testing.assert_allclose(mu.numpy(), mu_ref, rtol=1e-6, atol=1e-9)  # case 4 is ill-conditioned (weights 1e10)
    alpha = local_step_alpha(mu, torch.tensor(t, dtype=torch.float64))
    assert math.isclose(float(alpha), alpha_mod._get_alpha(mu_ref, t), rel_tol=1e-6, abs_tol=1e-9)


def test_directional_samples_are_per_sample_derivatives():
    model, x, y = _setup()
    params = {n: p.detach() for n, p in model.named_parameters()}
    direction = [torch.randn_like(p) for p in params.values()]
    losses, derivs = directional_samples(model, (x, y), params, direction, cross_entropy_loss, chunk_size=5)
    for i in (0, 7, 15):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        ref = sum((p.grad * d).sum() for p, d in zip(model.parameters(), direction))
        assert math.isclose(float(losses[i]), loss.item(), rel_tol=1e-12)
        assert math.isclose(float(derivs[i]), float(ref), rel_tol=1e-10)


def test_directional_samples_without_a_batching_rule():
    """``aten::lstm`` has no vmap batching rule: the losses are taken one sample at a time, the same numbers."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Seq().double()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    direction = [torch.randn_like(p) for p in params.values()]
    losses, derivs = directional_samples(model, (x, y), params, direction, cross_entropy_loss)
    for i in range(5):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        ref = sum((p.grad * d).sum() for p, d in zip(model.parameters(), direction))
        assert math.isclose(float(losses[i]), loss.item(), rel_tol=1e-12)
        assert math.isclose(float(derivs[i]), float(ref), rel_tol=1e-10)


def test_step_alpha_equals_cockpits_fit_on_per_sample_values():
    """`alpha_sums` + `step_alpha` against Cockpit's `_fit_quadratic`/`_get_alpha` on the means and variances
    (ddof=1) of the same per-sample values, the derivatives projected on the unit step as Cockpit does."""
    alpha_mod = _cockpit_alpha()
    g = torch.Generator().manual_seed(5)
    l0, l1, d0, d1 = (torch.randn(12, generator=g, dtype=torch.float64) * s + m
                      for m, s in ((2.0, 0.3), (1.5, 0.2), (-1.0, 1.0), (0.3, 1.0)))
    t = torch.tensor(0.7, dtype=torch.float64)
    out = step_alpha(t, alpha_sums(l0, d0, l1, d1))
    fs = [float(l0.mean()), float(l1.mean())]
    dfs = [float(d0.mean() / t), float(d1.mean() / t)]
    var_fs = [float(l0.var()), float(l1.var())]
    var_dfs = [float((d0 / t).var()), float((d1 / t).var())]
    mu = alpha_mod._fit_quadratic(0.7, fs, dfs, var_fs, var_dfs)
    assert math.isclose(float(out["alpha"]), alpha_mod._get_alpha(mu, 0.7), rel_tol=1e-9)
    assert math.isclose(float(out["slope_start"]), dfs[0], rel_tol=1e-12)
    assert math.isclose(float(out["loss_end"]), fs[1], rel_tol=1e-12)
    zero = step_alpha(torch.tensor(0.0, dtype=torch.float64), alpha_sums(l0, d0 * 0, l0, d0 * 0))
    assert math.isnan(float(zero["alpha"])) and math.isnan(float(zero["slope_start"]))  # no step: nothing to fit
