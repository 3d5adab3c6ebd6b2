"""Per-sample gradient sums of ``nn.Linear`` layers without per-sample gradients: the rank-one shortcut.

For a linear layer ``z = W a + b`` that sees one input row ``a_i`` per sample ``i`` (a 2-D input ``(n, in)``), the
gradient of sample ``i``'s loss ``l_i`` is the outer product ``dl_i/dW = d_i a_i^T`` of the layer's output gradient
``d_i = dl_i/dz_i`` and its input, and ``dl_i/db = d_i``. Every sum over samples that Cockpit's gradient tests need
(`lightning_probes.functional.gradient_tests.per_sample_sums`) then follows from ``a`` and ``d`` alone, with no
``(n, out, in)`` tensor (Goodfellow, 2015, "Efficient per-example gradient computations"; BackPACK's
``BatchL2Grad`` uses the same identity):

- ``||g_i^W||^2 = ||d_i||^2 ||a_i||^2``;
- ``g_i^W . G = d_i^T G a_i`` for the mean gradient ``G``;
- ``sum_i (g_i^W)^2`` entry by entry ``= (d * d)^T (a * a)``, one matrix product.

The 1-D histogram of the entries ``d_io a_ik`` (Cockpit's ``GradHist1d``) is counted without forming them either
(`rank_one_histogram_1d`): a row ``(i, o)`` whose products all lie in the two bins around zero (``|d_io| max_k
|a_ik|`` below the first edge on either side of zero: in a trained or untrained network nearly every row) is
counted from the signs of ``a_i`` alone; only the remaining rows are multiplied out and binned. The products are
formed in float64, where the product of two float32 numbers is exact, so the counts are those of the exact entries
(a float32 entry within one rounding of an edge may fall on the other side of it in a float32 histogram).

Nothing here synchronises with the host except `rank_one_histogram_1d`, which reads the number of rows to multiply
out (one synchronisation per layer and analysis).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

from lightning_probes.functional.gradient_tests import (
    HistogramSpec,
    exact_edges,
    exact_histogram_1d,
    histogram_counts_2d,
)

__all__ = ["capture_linear", "combine_sums", "rank_one_histogram_1d", "rank_one_sums"]


#: Products multiplied out at once by `rank_one_histogram_1d` (float64: 32 MiB).
_PRODUCTS_AT_ONCE = 1 << 22


def rank_one_histogram_1d(x: torch.Tensor, y: torch.Tensor, bins: int, low: float,
                          high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of every product ``x[i, o] * y[i, k]`` in ``bins`` equal bins of ``[low, high]`` (outside values
    clipped into the edge bins, as `lightning_probes.functional.gradient_tests.histogram_counts_1d`), and how
    many were outside, without forming the ``(n, p, q)`` products where they are not needed.

    Args:
        x: ``(n, p)``, e.g. a linear layer's per-sample output gradients.
        y: ``(n, q)``, e.g. its inputs.
        bins: Number of bins.
        low: Lower end of the range.
        high: Upper end.

    Returns:
        ``(counts, outside)``: ``(bins,)`` and a scalar, float64 on ``x``'s device.

    Example:
        >>> x, y = torch.tensor([[0.5, -2.0]]), torch.tensor([[1.0, -0.1, 0.0]])
        >>> counts, outside = rank_one_histogram_1d(x, y, 4, -1.0, 1.0)  # products 0.5, -0.05, 0, -2, 0.2, 0
        >>> counts.tolist(), float(outside)
        ([1.0, 1.0, 3.0, 1.0], 1.0)
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected x (n, p) and y (n, q) with the same n, but got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    device = x.device
    x, y = x.double(), y.double()
    q = y.shape[1]
    edges = exact_edges(low, high, bins)
    below_zero, above_zero = edges[edges < 0], edges[edges > 0]
    counts = torch.zeros(bins, dtype=torch.float64, device=device)
    outside = torch.zeros((), dtype=torch.float64, device=device)
    if len(below_zero) == 0 or len(above_zero) == 0:  # zero outside the range's interior: multiply every row out
        small = torch.zeros_like(x, dtype=torch.bool)
    else:
        # Row (i, o)'s products lie in [-m, m], m = |x_io| max_k |y_ik|: inside (edge below 0, edge above 0) they
        # fall in the bin(s) around zero, split by sign where zero is an edge.
        reach = x.abs() * y.abs().amax(1, keepdim=True)
        small = (reach < float(above_zero[0])) & (-reach > float(below_zero[-1]))
        zero_is_edge = bool((edges == 0).any())
        home = int(torch.searchsorted(edges, torch.zeros((), dtype=torch.float64), right=True)) - 1  # 0's bin
        negative_y = (y < 0).sum(1, keepdim=True).double()  # (n, 1)
        positive_y = (y > 0).sum(1, keepdim=True).double()
        # Products < 0 of a small row: x > 0 with y < 0, or x < 0 with y > 0.
        negative = torch.where(x > 0, negative_y, torch.where(x < 0, positive_y, torch.zeros_like(x)))
        negative = (negative * small).sum()
        total = small.sum().double() * q
        if zero_is_edge:
            counts[home - 1] += negative
            counts[home] += total - negative
        else:
            counts[home] += total
    rows = torch.nonzero(~small)  # the one host synchronisation: how many rows to multiply out
    step = max(1, _PRODUCTS_AT_ONCE // max(1, q))  # rows a block: every row may need it (NaN, a spike, a narrow range)
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        products = x[block[:, 0], block[:, 1]].unsqueeze(1) * y[block[:, 0]]  # (m, q), exact in float64
        part, out = exact_histogram_1d(products, bins, low, high)
        counts += part
        outside += out
    return counts, outside


def rank_one_sums(inputs: torch.Tensor, out_grads: torch.Tensor, mean_weight: torch.Tensor,
                  mean_bias: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  histograms: Optional[HistogramSpec] = None, bias: Optional[torch.Tensor] = None,
                  ) -> dict[str, torch.Tensor]:
    """`lightning_probes.functional.gradient_tests.per_sample_sums` of a linear layer's weight (and bias) from its
    inputs and per-sample output gradients, with the per-sample projections kept for the total.

    Args:
        inputs: ``(n, in)``, the layer's input rows, one per sample.
        out_grads: ``(n, out)``, ``d_i = dl_i/dz_i`` (the gradient of sample ``i``'s own loss).
        mean_weight: ``(out, in)``, the mean gradient ``G`` of the weight (of the whole batch).
        mean_bias: ``(out,)``, that of the bias, or ``None``: no bias tensor.
        weight: The weight's values (for the 2-D histogram only).
        histograms: The histogram bins, or ``None``.
        bias: The bias's values (for the 2-D histogram only).

    Returns:
        The keys of `per_sample_sums` for the weight (and bias: two tensors, in that order), plus ``"projections"``
        ``(n, T)``: ``g_i^t . G^t`` per sample and tensor (float64).
    """
    dtype = torch.promote_types(out_grads.dtype, torch.float32)
    a, d = inputs.to(dtype), out_grads.to(dtype)
    n = a.shape[0]
    a2, d2 = a * a, d * d
    a_sq, d_sq = a2.sum(1), d2.sum(1)
    sq_norm = [(d_sq.double() * a_sq.double()).sum()]
    projections = [((d @ mean_weight.to(dtype)) * a).sum(1).double()]
    entries = [(d2.T @ a2).reshape(-1)]
    if mean_bias is not None:
        sq_norm.append(d_sq.double().sum())
        projections.append((d @ mean_bias.to(dtype)).double())
        entries.append(d2.sum(0))
    hist_1d, out_1d, hist_2d, out_2d = [], [], [], []
    if histograms is not None and histograms.bins_1d:
        counts, outside = rank_one_histogram_1d(d, a, histograms.bins_1d, *histograms.range_1d)
        hist_1d.append(counts)
        out_1d.append(outside)
        if mean_bias is not None:
            counts, outside = exact_histogram_1d(d, histograms.bins_1d, *histograms.range_1d)
            hist_1d.append(counts)
            out_1d.append(outside)
    if histograms is not None and histograms.bins_2d:
        if weight is None or (mean_bias is not None and bias is None):
            raise ValueError("Expected `weight` (and `bias`) for the 2-D histogram (gradient entry against value)")
        xb, yb = histograms.bins_2d
        cells = torch.zeros(xb, yb, dtype=torch.float64, device=d.device)
        outside = torch.zeros((), dtype=torch.float64, device=d.device)
        step = max(1, (1 << 24) // max(1, weight.numel()))  # samples multiplied out at once
        for start in range(0, n, step):
            block = torch.einsum("no,ni->noi", d[start:start + step], a[start:start + step]).reshape(
                min(step, n - start), -1)
            part, out = histogram_counts_2d(block, weight.detach().reshape(1, -1).to(dtype), histograms.bins_2d,
                                            histograms.range_2d)
            cells += part
            outside += out
        hist_2d.append(cells)
        out_2d.append(outside)
        if mean_bias is not None:
            part, out = histogram_counts_2d(d, bias.detach().reshape(1, -1).to(dtype), histograms.bins_2d,
                                            histograms.range_2d)
            hist_2d.append(part)
            out_2d.append(out)
    proj = torch.stack(projections, 1)  # (n, T)
    sums = {
        "count": torch.tensor(float(n), dtype=torch.float64, device=d.device),
        "sq_norm": torch.stack(sq_norm),
        "proj_sq": torch.cat([proj.square().sum(0), proj.sum(1).square().sum().reshape(1)]),
        "sq_entries": torch.cat(entries),
        "projections": proj,
    }
    if hist_1d:
        sums["hist_1d"], sums["outside_1d"] = torch.stack(hist_1d), torch.stack(out_1d)
    if hist_2d:
        sums["hist_2d"], sums["outside_2d"] = torch.stack(hist_2d), torch.stack(out_2d)
    return sums


def combine_sums(parts: Sequence[tuple[Sequence[str], Mapping[str, torch.Tensor]]], names: Sequence[str],
                 sizes: Mapping[str, int], total_proj_sq: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums of every tensor in ``names`` order from sums over disjoint groups of tensors of the same samples.

    Args:
        parts: ``(tensor names, sums)`` per group (`per_sample_sums` or `rank_one_sums` of those tensors).
        names: Every tensor, in the order of the result.
        sizes: Entries of each tensor (to cut ``sq_entries``).
        total_proj_sq: ``sum_i (sum_t g_i^t . G^t)^2`` over every tensor (the groups' totals do not add).

    Returns:
        The keys of `per_sample_sums` over ``names``.
    """
    rows: dict[str, dict[str, torch.Tensor]] = {}
    count = None
    for group, sums in parts:
        count = sums["count"] if count is None else count
        entries = torch.split(sums["sq_entries"], [sizes[n] for n in group])
        for t, name in enumerate(group):
            rows[name] = {"sq_norm": sums["sq_norm"][t], "proj_sq": sums["proj_sq"][t], "sq_entries": entries[t]}
            for key in ("hist_1d", "outside_1d", "hist_2d", "outside_2d"):
                if key in sums:
                    rows[name][key] = sums[key][t]
    if count is None or set(rows) != set(names):
        raise ValueError(f"Expected the groups to cover {list(names)} once, but got {sorted(rows)}")
    dtype = max((rows[n]["sq_entries"].dtype for n in names), key=lambda d: torch.finfo(d).bits)
    out = {
        "count": count,
        "sq_norm": torch.stack([rows[n]["sq_norm"] for n in names]),
        "proj_sq": torch.cat([torch.stack([rows[n]["proj_sq"] for n in names]), total_proj_sq.reshape(1)]),
        "sq_entries": torch.cat([rows[n]["sq_entries"].to(dtype) for n in names]),
    }
    for key in ("hist_1d", "outside_1d", "hist_2d", "outside_2d"):
        if key in rows[names[0]]:
            out[key] = torch.stack([rows[n][key] for n in names])
    return out


@contextmanager
def _captured(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Forward hooks that keep each layer's input and output (the output handed on as a copy, so that an in-place
    operation after the layer, e.g. ``ReLU(inplace=True)``, cannot change the tensor its gradient is taken of)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, layer in layers.items():
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str = name) -> torch.Tensor:
            seen[name] = (args[0].detach(), output)
            return output.clone()

        handles.append(layer.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _caller(module: nn.Module, leaves: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
            ) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return functional_call(module, (dict(leaves), dict(buffers)), args, kwargs)

    return call


def capture_linear(module: nn.Module, batch: Any, params: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module],
                   loss_fn: Callable[[Callable[..., Any], Any], torch.Tensor], chunk_size: Optional[int] = None,
                   buffers: Optional[Mapping[str, torch.Tensor]] = None,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The mean gradient and loss of ``batch`` (as `lightning_probes.functional.per_sample.mean_gradient`), and each
    linear layer's inputs and per-sample output gradients, from the same batched backward passes.

    ``loss_fn`` must be the mean of per-sample losses of independent samples (put the module in eval mode): then
    the per-sample output gradient of a chunk of ``c`` samples is ``c`` times the gradient of its mean loss.

    Args:
        module: The model; nothing of it is changed (hooks are added for the passes and removed).
        batch: The batch (every tensor with the samples in dimension 0).
        params: The parameters to differentiate, by name.
        layers: The linear layers by module name; each must see a 2-D input of one row per sample, once a forward.
        loss_fn: ``loss_fn(module_call, batch) -> scalar``.
        chunk_size: Samples per pass (default all at once).
        buffers: Buffers to use (default the module's own).

    Returns:
        ``(grads, loss, captured)``: ``{name: param.shape}``, the mean loss, and ``{layer: (inputs (n, in),
        out_grads (n, out))}``, detached.
    """
    from lightning_probes.functional.per_sample import sample_count, slice_samples

    names = list(params)
    buffers = dict(module.named_buffers()) if buffers is None else dict(buffers)
    n = sample_count(batch)
    size = max(1, n if chunk_size is None else int(chunk_size))
    total: dict[str, torch.Tensor] = {}
    loss_total: Optional[torch.Tensor] = None
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    for start in range(0, n, size):
        stop = min(n, start + size)
        chunk = slice_samples(batch, start, stop)
        with torch.enable_grad(), _captured(layers) as seen:
            leaves = {k: params[k].detach().requires_grad_(True) for k in names}

            loss = loss_fn(_caller(module, leaves, buffers), chunk)
            missing = [name for name in layers if name not in seen]
            if missing:
                raise RuntimeError(f"capture_linear: the layers {missing} were not called in the forward")
            outputs = [seen[name][1] for name in layers]
            grads = torch.autograd.grad(loss, [leaves[k] for k in names] + outputs, allow_unused=True)
        weight = (stop - start) / n
        for k, g in zip(names, grads[:len(names)]):
            g = torch.zeros_like(params[k]) if g is None else g.detach()
            total[k] = g * weight if k not in total else total[k] + g * weight
        loss_total = loss.detach() * weight if loss_total is None else loss_total + loss.detach() * weight
        for name, g in zip(layers, grads[len(names):]):
            inputs = seen[name][0]
            out_grad = torch.zeros_like(seen[name][1]) if g is None else g.detach() * (stop - start)
            pieces[name].append((inputs, out_grad))
    if loss_total is None:
        raise ValueError("Expected a batch of at least one sample, but got an empty batch")
    captured = {name: (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
                for name, parts in pieces.items()}
    return total, loss_total, captured
