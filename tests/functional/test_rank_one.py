"""The rank-one shortcut for linear layers against per-sample gradients from single-sample backward passes and
NumPy histograms of the explicit products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.callbacks._per_sample_support import rank_one_layers
from lightning_probes.functional.gradient_tests import (
    HistogramSpec,
    exact_edges,
    histogram_counts_1d,
    per_sample_sums,
)
from lightning_probes.functional.per_sample import cross_entropy_loss, mean_gradient
from lightning_probes.functional.rank_one import capture_linear, combine_sums, rank_one_histogram_1d, rank_one_sums


def _numpy_histogram(products: np.ndarray, bins: int, low: float, high: float) -> tuple[np.ndarray, int]:
    """Exact bins of float64 values against the exact edges, outside values clipped into the edge bins."""
    edges = exact_edges(low, high, bins).numpy()
    index = np.searchsorted(edges, products, side="right") - 1  # [e_j, e_j+1)
    index = np.clip(index, 0, bins - 1)
    counts = np.bincount(index.ravel(), minlength=bins)
    return counts, int(((products < low) | (products > high)).sum())


@pytest.mark.parametrize("bins, low, high", [(100, -2.0, 2.0), (11, -0.3, 0.2), (8, 0.05, 0.4), (4, -1.0, 1.0)],
                         ids=["cockpit", "asymmetric_odd", "zero_outside", "coarse"])
def test_histogram_equals_the_explicit_products(bins, low, high):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 13, generator=g) * 0.05
    y = torch.relu(torch.randn(9, 21, generator=g)) * 3  # exact zeros, as after a ReLU
    x[0, :4] = 0.0
    x[1] *= 40  # rows far beyond the central bins, and outside the range
    y[2] = 0.0
    counts, outside = rank_one_histogram_1d(x, y, bins, low, high)
    products = (x.double()[:, :, None] * y.double()[:, None, :]).numpy()
    ref, ref_outside = _numpy_histogram(products, bins, low, high)
    np.testing.assert_array_equal(counts.numpy(), ref)
    assert float(outside) == ref_outside and counts.sum() == products.size


def test_a_negative_product_below_float32_resolution_is_counted_below_zero():
    """float32 torch.histc puts -1e-9 into the bin above 0 ((-1e-9 + 2) rounds to 2); the exact count does not."""
    x, y = torch.tensor([[1e-5, -1e-5]]), torch.tensor([[1e-4, 0.0]])
    counts, _ = rank_one_histogram_1d(x, y, 100, -2.0, 2.0)
    assert counts[49] == 1 and counts[50] == 3 and counts.sum() == 4


def test_float32_histograms_count_beyond_two_to_the_24_in_one_bin():
    values = torch.zeros((1 << 24) + 5)  # torch.histc alone stops at 16,777,216 in float32
    counts, _ = histogram_counts_1d(values, 4, -1.0, 1.0)
    assert counts[2] == (1 << 24) + 5


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(inplace=True), nn.LayerNorm(7), nn.Linear(7, 5),
                         nn.Tanh(), nn.Linear(5, 3, bias=False)).double().eval()


def _loop(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients by single-sample backward passes: {name: (n, *shape)}."""
    rows = []
    for i in range(len(x)):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append({n: p.grad.clone() for n, p in net.named_parameters()})
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def test_captured_layers_give_the_sums_of_per_sample_gradients():
    net = _mlp()
    x, y = torch.randn(10, 2, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    params = {n: p.detach() for n, p in net.named_parameters()}
    layers = {"1": net[1], "4": net[4], "6": net[6]}
    grad, loss, captured = capture_linear(net, (x, y), params, layers, cross_entropy_loss, chunk_size=4)
    ref_grad, ref_loss = mean_gradient(net, (x, y), params, cross_entropy_loss)
    loop = _loop(net, x, y)
    for name in params:
        torch.testing.assert_close(grad[name], ref_grad[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(loop[name].mean(0), grad[name], rtol=1e-10, atol=1e-13)
    assert torch.isclose(loss, ref_loss, rtol=1e-12)
    for layer, (inputs, out_grads) in captured.items():  # g_i = d_i a_i^T, sample by sample
        torch.testing.assert_close(torch.einsum("no,ni->noi", out_grads, inputs), loop[f"{layer}.weight"],
                                   rtol=1e-10, atol=1e-13)

    spec = HistogramSpec(bins_1d=30, range_1d=(-0.3, 0.3), bins_2d=(6, 5), range_2d=((-0.2, 0.2), (-0.5, 0.5)))
    names = list(params)
    mean = [loop[n].mean(0) for n in names]
    ref = per_sample_sums([loop[n] for n in names], mean, [params[n] for n in names], spec)
    parts, base = [], torch.zeros(10, dtype=torch.float64)
    for layer, (inputs, out_grads) in captured.items():
        group = [f"{layer}.weight"] + ([f"{layer}.bias"] if f"{layer}.bias" in params else [])
        bias = group[1] if len(group) > 1 else None
        sums = rank_one_sums(inputs, out_grads, loop[group[0]].mean(0), loop[bias].mean(0) if bias else None,
                             params[group[0]], spec, params[bias] if bias else None)
        base += sums.pop("projections").sum(1)
        parts.append((group, sums))
    rest = [n for n in names if n.startswith("3.")]  # the LayerNorm, through per-sample gradients
    parts.append((rest, per_sample_sums([loop[n] for n in rest], [loop[n].mean(0) for n in rest],
                                        [params[n] for n in rest], spec, base)))
    combined = combine_sums(parts, names, {n: p.numel() for n, p in params.items()}, parts[-1][1]["proj_sq"][-1])
    assert set(combined) == set(ref)
    for key in ref:
        torch.testing.assert_close(combined[key].double(), ref[key].double(), rtol=1e-9, atol=1e-12, msg=key)


def test_combine_sums_refuses_groups_that_miss_a_tensor():
    sums = per_sample_sums([torch.ones(2, 3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="cover"):
        combine_sums([(["a"], sums)], ["a", "b"], {"a": 3, "b": 1}, sums["proj_sq"][-1])


class Tied(nn.Module):
    """One layer of each kind the shortcut must leave to vmap, and two it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.tied = nn.Linear(4, 10, bias=False)
        self.tied.weight = self.embed.weight  # shared with the embedding
        self.seq = nn.Linear(4, 4)  # sees (n, T, 4)
        self.twice = nn.Linear(4, 4)  # called twice a forward
        self.frozen_bias = nn.Linear(4, 4)
        self.frozen_bias.bias.requires_grad_(False)
        self.custom = type("Scaled", (nn.Linear,), {"forward": lambda self, x: 2 * super(type(self), self).forward(x)})(
            4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):  # (n, T)
        h = self.seq(self.embed(tokens)).mean(1)
        h = self.twice(self.twice(h))
        return self.head(self.custom(self.frozen_bias(h))) + self.tied(h)[:, :3]


def test_rank_one_layers_takes_only_the_layers_it_is_exact_for():
    net = Tied()
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    chosen = rank_one_layers(net, params, lambda: net(torch.zeros(1, 5, dtype=torch.long)))
    assert sorted(chosen) == ["frozen_bias", "head"]


def test_rows_multiplied_out_go_in_blocks_with_the_same_counts(monkeypatch):
    """Where every row needs multiplying out (a narrow range here; a spike or NaN in training), the products are
    formed a block of rows at a time, never all at once."""
    import lightning_probes.functional.rank_one as rank_one

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 7, generator=g), torch.randn(6, 5, generator=g)
    whole = rank_one_histogram_1d(x, y, 10, -0.01, 0.01)
    monkeypatch.setattr(rank_one, "_PRODUCTS_AT_ONCE", 12)  # two rows of 5 products a block
    blocks = rank_one_histogram_1d(x, y, 10, -0.01, 0.01)
    products = (x.double()[:, :, None] * y.double()[:, None, :]).numpy()
    ref, ref_outside = _numpy_histogram(products, 10, -0.01, 0.01)
    for counts, outside in (whole, blocks):
        np.testing.assert_array_equal(counts.numpy(), ref)
        assert float(outside) == ref_outside
