"""Cockpit's gradient tests from per-sample gradients against Cockpit 1.0.2 + BackPACK and against NumPy."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.functional.curvature import flatten, hutchinson_trace, hvp_operator, unflatten
from lightning_probes.functional.gradient_tests import (
    GRADIENT_TEST_FIELDS,
    HistogramSpec,
    gradient_tests,
    histogram_counts_1d,
    histogram_counts_2d,
    hutchinson_diagonal,
    merge_sums,
    per_sample_sums,
)
from lightning_probes.functional.per_sample import mean_gradient, per_sample_gradients, stack_chunks

COLUMN = {f: i for i, f in enumerate(GRADIENT_TEST_FIELDS)}
N = 12


def _cockpit():
    if "pkg_resources" not in sys.modules:  # cockpit 1.0.2 imports it; setuptools >= 81 no longer ships it
        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = type("DistributionNotFound", (Exception,), {})
        shim.get_distribution = lambda name: (_ for _ in ()).throw(shim.DistributionNotFound())
        sys.modules["pkg_resources"] = shim
    return pytest.importorskip("cockpit")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(N, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    return model, x, y


def _ours(model, x, y, chunk=None, lr=0.1, diag=None, forms=None, spec=None):
    params = {n: p.detach() for n, p in model.named_parameters()}
    g, loss = mean_gradient(model, (x, y), params)
    mean = [g[n] for n in params]
    sums = None
    for grads, _ in per_sample_gradients(model, (x, y), params, chunk_size=chunk):
        sums = merge_sums(sums, per_sample_sums([grads[n] for n in params], mean, list(params.values()), spec))
    return gradient_tests(sums, mean, loss, lr, diag, forms), sums, mean, loss


def _exact_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]

    def loss(vec):
        return nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, unflatten(vec, like))),
                                                                      (x,)), y)

    return torch.func.hessian(loss)(flatten(like))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_test_equals_cockpit_on_a_linear_relu_model():
    cockpit = _cockpit()
    from backpack import extend
    from cockpit import quantities as q

    model, x, y = _setup()
    lr = 0.1
    hess = _exact_hessian(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    diag = torch.diagonal(hess)
    blocks = torch.stack([d.sum() for d in torch.split(diag, sizes)]).reshape(1, -1)
    table, *_ = _ours(model, x, y, chunk=5, lr=lr, diag=diag, forms=blocks)

    every = {"track_schedule": lambda step: True}
    tracked = {"norm_test": q.NormTest(**every), "inner_test": q.InnerTest(**every), "ortho_test": q.OrthoTest(**every),
               "mean_gsnr": q.MeanGSNR(**every), "early_stopping": q.EarlyStopping(**every), "cabs": q.CABS(**every),
               "tic_diag": q.TICDiag(**every), "tic_trace": q.TICTrace(**every), "grad_norm": q.GradNorm(**every)}
    net = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss(reduction="mean"))
    individual = extend(nn.CrossEntropyLoss(reduction="none"))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    cp = cockpit.Cockpit(list(net.parameters()), quantities=list(tracked.values()))
    optimizer.zero_grad()
    logits = net(x)
    loss = lossfunc(logits, y)
    with cp(0, info={"batch_size": N, "individual_losses": individual(logits, y), "loss": loss,
                     "optimizer": optimizer}):
        loss.backward(create_graph=cp.create_graph(0))
    for field, quantity in tracked.items():
        ref = quantity.get_output()[0]
        if field == "grad_norm":  # Cockpit keeps one norm per parameter tensor
            ref = math.sqrt(sum(v ** 2 for v in ref))
            np.testing.assert_allclose(table[:-1, COLUMN[field]].numpy(), quantity.get_output()[0], rtol=1e-10)
        assert math.isclose(float(table[-1, COLUMN[field]]), ref, rel_tol=1e-8, abs_tol=1e-12), field


def test_every_test_equals_numpy_per_tensor_and_total():
    model, x, y = _setup(1)
    lr = 0.05
    table, sums, mean, loss = _ours(model, x, y, chunk=4, lr=lr)
    params = dict(model.named_parameters())
    grads, losses = stack_chunks(list(per_sample_gradients(model, (x, y))))
    per = [grads[n].reshape(N, -1).numpy() for n in params]  # (n, numel_t)
    loss_np = float(losses.mean())
    assert math.isclose(float(loss), loss_np, rel_tol=1e-12)
    for t in range(len(per) + 1):
        gs = per[t] if t < len(per) else np.concatenate(per, 1)  # (n, d): the samples' gradients
        g = gs.mean(0)
        n, g2 = gs.shape[0], float(g @ g)
        want = {
            "grad_norm": math.sqrt(g2),
            "norm_test": math.sqrt(((gs - g) ** 2).sum() / (n * (n - 1) * g2)),
            "inner_test": math.sqrt(((gs @ g - g2) ** 2).sum() / (n * (n - 1) * g2 ** 2)),
            "ortho_test": math.sqrt(((gs - np.outer(gs @ g / g2, g)) ** 2).sum() / (n * (n - 1) * g2)),
            "mean_gsnr": float(np.mean(g ** 2 / (gs.var(0) + 1e-5))),
            "early_stopping": 1 - n * float(np.mean(g ** 2 / (gs.var(0, ddof=1) + 1e-5))),
            "cabs": lr * float(gs.var(0).sum()) / loss_np,
        }
        for field, value in want.items():
            assert math.isclose(float(table[t, COLUMN[field]]), value, rel_tol=1e-9), (t, field)
        assert math.isnan(float(table[t, COLUMN["tic_trace"]])) and math.isnan(float(table[t, COLUMN["tic_diag"]]))


def test_tic_equals_numpy_with_the_exact_hessian_and_hutchinson_matches_hutchinson_trace():
    model, x, y = _setup(2)
    hess = _exact_hessian(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    diag = torch.diagonal(hess)
    blocks = torch.stack([d.sum() for d in torch.split(diag, sizes)]).reshape(1, -1)
    table, *_ = _ours(model, x, y, diag=diag, forms=blocks)
    grads, _ = stack_chunks(list(per_sample_gradients(model, (x, y))))
    gs = np.concatenate([grads[n].reshape(N, -1).numpy() for n, _ in model.named_parameters()], 1)
    h = diag.numpy()
    assert math.isclose(float(table[-1, COLUMN["tic_trace"]]), (gs ** 2).sum(1).mean() / (h.sum() + 1e-7),
                        rel_tol=1e-10)
    assert math.isclose(float(table[-1, COLUMN["tic_diag"]]), ((gs ** 2).mean(0) / (h + 1e-7)).sum(), rel_tol=1e-10)
    assert math.isclose(float(table[-1, COLUMN["hessian_trace"]]), float(h.sum()), rel_tol=1e-12)
    # Hutchinson: the same vectors as hutchinson_trace; the diagonal of a diagonal operator is exact
    hvp, _, _ = hvp_operator(model, (x, y), lambda call, b: nn.functional.cross_entropy(call(b[0]), b[1]))
    est, forms = hutchinson_diagonal(hvp, sizes, 6, torch.Generator().manual_seed(3), torch.device("cpu"),
                                     torch.float64)
    trace, stderr, ref_forms = hutchinson_trace(hvp, sum(sizes), 6, torch.Generator().manual_seed(3),
                                                torch.device("cpu"), torch.float64)
    torch.testing.assert_close(forms.sum(1), ref_forms)
    table, *_ = _ours(model, x, y, diag=est, forms=forms)
    assert math.isclose(float(table[-1, COLUMN["hessian_trace"]]), float(trace), rel_tol=1e-10)
    assert math.isclose(float(table[-1, COLUMN["hessian_trace_stderr"]]), float(stderr), rel_tol=1e-10)
    d = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    est, _ = hutchinson_diagonal(lambda v: d * v, [3], 2, torch.Generator().manual_seed(0), torch.device("cpu"),
                                 torch.float64)
    torch.testing.assert_close(est, d)


def test_chunks_merge_exactly_and_one_sample_gives_nan():
    model, x, y = _setup(3)
    whole, *_ = _ours(model, x, y)
    chunked, *_ = _ours(model, x, y, chunk=1)
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-14, equal_nan=True)
    one, *_ = _ours(model, x[:1], y[:1])
    assert torch.isnan(one[:, COLUMN["norm_test"]]).all() and torch.isfinite(one[:, COLUMN["grad_norm"]]).all()


def test_histograms_equal_numpy():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.normal(0, 1.5, size=(7, 40)))
    counts, outside = histogram_counts_1d(values, 13, -2.0, 2.0)
    ref, _ = np.histogram(np.clip(values.numpy(), -2, 2), bins=13, range=(-2, 2))
    np.testing.assert_array_equal(counts.numpy(), ref)
    assert float(outside) == float((np.abs(values.numpy()) > 2).sum())
    param = torch.from_numpy(rng.normal(0, 1.5, size=(1, 40)))
    counts2, outside2 = histogram_counts_2d(values, param, (6, 9), ((-1.0, 1.0), (-2.0, 2.0)))
    xs = np.clip(values.numpy(), -1, 1).ravel()
    ys = np.clip(np.broadcast_to(param.numpy(), values.shape), -2, 2).ravel()
    ref2, _, _ = np.histogram2d(xs, ys, bins=(6, 9), range=((-1, 1), (-2, 2)))
    np.testing.assert_array_equal(counts2.numpy(), ref2)
    inside = (np.abs(values.numpy()) <= 1) & (np.abs(np.broadcast_to(param.numpy(), values.shape)) <= 2)
    assert float(outside2) == float((~inside).sum())


def test_per_sample_histograms_in_the_sums_equal_numpy():
    model, x, y = _setup(4)
    spec = HistogramSpec(bins_1d=20, range_1d=(-0.5, 0.5), bins_2d=(8, 10), range_2d=((-0.3, 0.3), (-1.0, 1.0)))
    _, sums, _, _ = _ours(model, x, y, chunk=5, spec=spec)
    grads, _ = stack_chunks(list(per_sample_gradients(model, (x, y))))
    for t, (name, p) in enumerate(model.named_parameters()):
        gs = grads[name].reshape(N, -1).numpy()
        ref, _ = np.histogram(np.clip(gs, -0.5, 0.5), bins=20, range=(-0.5, 0.5))
        np.testing.assert_array_equal(sums["hist_1d"][t].numpy(), ref)
        w = np.broadcast_to(p.detach().reshape(1, -1).numpy(), gs.shape)
        ref2, _, _ = np.histogram2d(np.clip(gs, -0.3, 0.3).ravel(), np.clip(w, -1, 1).ravel(), bins=(8, 10),
                                    range=((-0.3, 0.3), (-1, 1)))
        np.testing.assert_array_equal(sums["hist_2d"][t].numpy(), ref2)
    np.testing.assert_allclose(spec.edges_1d().numpy(), np.linspace(-0.5, 0.5, 21), atol=1e-15)


def test_sums_added_into_the_earlier_chunks_equal_the_whole_batch():
    """`per_sample_sums(..., into=sums)` (the probe's chunk loop) gives the sums of the whole batch at once."""
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(7, 3, 4, generator=g), torch.randn(7, 5, generator=g)]
    mean = [t.mean(0) for t in grads]
    spec = HistogramSpec(bins_1d=12, range_1d=(-1.5, 1.5), bins_2d=(3, 4), range_2d=((-1.0, 1.0), (-1.0, 1.0)))
    params = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    whole = per_sample_sums(grads, mean, params, spec)
    sums = None
    for start, stop in ((0, 2), (2, 3), (3, 7)):
        sums = per_sample_sums([t[start:stop] for t in grads], mean, params, spec, into=sums)
    assert set(sums) == set(whole)
    for key in whole:
        torch.testing.assert_close(sums[key].double(), whole[key].double(), rtol=1e-6, atol=1e-6, msg=key)
