"""Cockpit's gradient tests from per-sample gradients: sums over samples in, test values out.

The per-sample gradients ``g_i`` (``i = 1..n``) of a batch and its mean gradient ``g = (1/n) sum_i g_i`` give every
quantity here through a few sums over the samples (`per_sample_sums`), so that a batch processed in chunks, or
split over data-parallel ranks, is combined exactly by adding the sums (`merge_sums`; an all-reduce across
ranks). From them `gradient_tests` forms, per parameter tensor and for all of them together, the quantities of
Cockpit (Schneider, Dangel & Hennig, 2021), with Cockpit's definitions:

- ``norm_test`` (Byrd, Chin, Nocedal & Wu, 2012, eq. 3.9): ``sqrt(sum_i ||g_i - g||^2 / (n (n - 1) ||g||^2))``,
  the largest ``theta`` for which the norm test passes;
- ``inner_test`` (Bollapragada, Byrd & Nocedal, 2018, eq. 2.6): ``sqrt(sum_i (g_i.g - ||g||^2)^2 /
  (n (n - 1) ||g||^4))``;
- ``ortho_test`` (same paper, eq. 3.3): ``sqrt(sum_i ||g_i - (g_i.g / ||g||^2) g||^2 / (n (n - 1) ||g||^2))``;
- ``mean_gsnr`` (Liu et al., 2020): the mean over entries ``j`` of ``g_j^2 / (mean_i g_ij^2 - g_j^2 + eps)``;
- ``early_stopping`` (Mahsereci, Balles, Lassner & Hennig, 2017, eq. 7): ``1 - n mean_j g_j^2 / (s_j^2 + eps)``
  with ``s_j^2`` the unbiased sample variance of entry ``j``; above 0: stop;
- ``cabs`` (Balles, Romero & Hennig, 2017, eq. 22): ``lr sum_j (sum_i g_ij^2 - n g_j^2) / (n loss)``, the batch
  size CABS suggests for SGD at learning rate ``lr``;
- ``tic_trace`` and ``tic_diag`` (Thomas et al., 2020, as Cockpit's ``TICTrace``/``TICDiag``):
  ``mean_i ||g_i||^2 / (tr H + eps)`` and ``sum_j mean_i g_ij^2 / (H_jj + eps)``, with the Hessian's trace or
  diagonal (`hutchinson_diagonal` estimates both from Hessian-vector products).

Histograms (`per_sample_sums` with a `HistogramSpec`): Cockpit's ``GradHist1d`` (every entry ``g_ij`` of every
sample in ``bins_1d`` equal bins over ``range_1d``, values outside clipped into the edge bins) and ``GradHist2d``
(``(g_ij, w_j)`` pairs, gradient entry against the parameter's value, in ``bins_2d`` bins over ``range_2d``, clipped
likewise), counted per tensor; the clipped entries are counted too.

Nothing here synchronises with the host: tensors in, tensors out, on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["GRADIENT_TEST_FIELDS", "HistogramSpec", "exact_edges", "exact_histogram_1d", "gradient_tests",
           "histogram_counts_1d", "histogram_counts_2d", "hutchinson_diagonal", "merge_sums", "per_sample_sums"]

#: The columns of `gradient_tests`' table, in order.
GRADIENT_TEST_FIELDS = ("grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping", "cabs",
                        "hessian_trace", "hessian_trace_stderr", "tic_trace", "tic_diag")


def exact_edges(low: float, high: float, bins: int) -> torch.Tensor:
    """The ``bins + 1`` edges ``(low (bins - j) + high j) / bins`` in float64: ``torch.linspace``'s, except that
    the middle edge of a symmetric range is exactly 0 (``linspace(-2, 2, 101)[50]`` is ``-4e-17``)."""
    j = torch.arange(bins + 1, dtype=torch.float64)
    return (low * (bins - j) + high * j) / bins


@dataclass(frozen=True)
class HistogramSpec:
    """Bins of the per-sample gradient histograms (Cockpit's ``GradHist1d``/``GradHist2d`` defaults).

    ``bins_1d`` bins of the 1-D histogram of gradient entries over ``range_1d`` (``None``: no 1-D histogram);
    ``bins_2d`` = ``(gradient bins, parameter bins)`` of the 2-D histogram over ``range_2d`` =
    ``((gradient low, high), (parameter low, high))`` (``None``: no 2-D histogram). Entries (pairs) outside a range
    are clipped into its edge bins.
    """

    bins_1d: Optional[int] = 100
    range_1d: tuple[float, float] = (-2.0, 2.0)
    bins_2d: Optional[tuple[int, int]] = (40, 50)
    range_2d: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0))

    def edges_1d(self) -> torch.Tensor:
        """The ``bins_1d + 1`` edges (float64)."""
        return exact_edges(self.range_1d[0], self.range_1d[1], int(self.bins_1d or 0))

    def edges_2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The edges of both axes (float64)."""
        (xlo, xhi), (ylo, yhi) = self.range_2d
        xb, yb = self.bins_2d or (0, 0)
        return exact_edges(xlo, xhi, xb), exact_edges(ylo, yhi, yb)


def histogram_counts_1d(values: torch.Tensor, bins: int, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of ``values`` in ``bins`` equal bins of ``[low, high]``, values outside clipped into the edge bins
    (Cockpit's ``GradHist1d``: ``torch.histc`` of the clamped values), and how many were outside.

    Returns:
        ``(counts, outside)``: ``(bins,)`` and a scalar, float64 on the values' device (no host sync).

    Example:
        >>> counts, outside = histogram_counts_1d(torch.tensor([-3.0, -0.5, 0.2, 0.4, 5.0]), 4, -1.0, 1.0)
        >>> counts.tolist(), float(outside)
        ([1.0, 1.0, 2.0, 1.0], 2.0)
    """
    flat = values.reshape(-1)
    below, above = torch.count_nonzero(flat < low), torch.count_nonzero(flat > high)
    counts = _histc(flat, bins, low, high)  # values outside are left out by histc ...
    counts[0] += below  # ... and clipped into the edge bins here (the same counts as histc of the clamped values)
    counts[-1] += above
    outside = (below + above).double()
    return counts, outside


#: torch.histc counts in the input's dtype: a float32 count stops growing at 2**24, so larger inputs go in pieces.
_HISTC_PIECE = 1 << 24


def _histc(flat: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """``torch.histc`` of a flat tensor, float64 counts, exact beyond ``2**24`` entries a bin (in pieces: histc
    accumulates in the input's dtype, and a float32 bin of a 72-million-entry histogram saturates at 16,777,216)."""
    if flat.dtype == torch.float64 or flat.numel() <= _HISTC_PIECE:
        return torch.histc(flat, bins=bins, min=low, max=high).double()
    return sum(torch.histc(part, bins=bins, min=low, max=high).double() for part in torch.split(flat, _HISTC_PIECE))


def exact_histogram_1d(values: torch.Tensor, bins: int, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`histogram_counts_1d` against the exact edges (`exact_edges`; bin ``j`` holds ``e_j <= x < e_j+1``) where the
    C kernel runs (CPU, float32/float64), as the C path of `per_sample_sums` counts; elsewhere `histogram_counts_1d`
    (``torch.histc``'s arithmetic in the values' dtype: an entry within a rounding of an edge may sit one bin over).
    """
    flat = values.reshape(1, -1)
    if not _native_sums(flat):
        return histogram_counts_1d(values, bins, low, high)
    from lightning_probes.functional import _native

    flat = flat.contiguous()
    _, _, _, counts, outside = _native.sample_sums(flat, torch.zeros(flat.shape[1], dtype=flat.dtype),
                                                   exact_edges(low, high, bins))
    return counts, outside.sum()


def _bin_index(values: torch.Tensor, bins: int, low: float, high: float) -> torch.Tensor:
    """The bin of each value among ``bins`` equal bins of ``[low, high]``, outside values in the edge bins, as
    integer-valued floats (exact below 2^24)."""
    return values.sub(low).mul_(bins / (high - low)).floor_().clamp_(0, bins - 1)


def histogram_counts_2d(x: torch.Tensor, y: torch.Tensor, bins: tuple[int, int],
                        ranges: tuple[tuple[float, float], tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the pairs ``(x, y)`` (``y`` broadcast against ``x``) in a grid of equal bins, pairs outside
    clipped into the edge bins (Cockpit's ``GradHist2d``), and how many pairs were outside.

    Returns:
        ``(counts, outside)``: ``(x bins, y bins)`` and a scalar, float64 on the device of ``x``.
    """
    (xlo, xhi), (ylo, yhi) = ranges
    xb, yb = bins
    dtype = x.dtype if xb * yb < 2 ** 24 or x.dtype == torch.float64 else torch.float64
    x = x.to(dtype)
    y_index = _bin_index(y.to(dtype), yb, ylo, yhi)  # (1, numel): the parameter's bin, once
    index = _bin_index(x, xb, xlo, xhi).mul_(yb).add_(y_index)  # (c, numel): the cell, as a float
    counts = _histc(index.reshape(-1), xb * yb, 0, xb * yb)
    outside = torch.count_nonzero((x < xlo).logical_or_(x > xhi).logical_or_((y < ylo) | (y > yhi))).double()
    return counts.view(xb, yb), outside


def _native_sums(flat: torch.Tensor) -> bool:
    """Whether `per_sample_sums` takes a tensor's sums in one pass of the C kernel (`_native.sample_sums`): on the
    CPU, float32 or float64, with the library built (``LIGHTNING_PROBES_NATIVE=0`` turns it off)."""
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64) or flat.numel() == 0:
        return False
    from lightning_probes.functional import _native

    return _native.available()


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def per_sample_sums(grads: Sequence[torch.Tensor], mean_grad: Sequence[torch.Tensor],
                    params: Optional[Sequence[torch.Tensor]] = None,
                    histograms: Optional[HistogramSpec] = None,
                    base_projection: Optional[torch.Tensor] = None,
                    into: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The sums over one chunk of samples that every test is formed from (add chunks with `merge_sums`).

    Args:
        grads: Per tensor ``t``, the per-sample gradients ``(c, *shape_t)`` of the chunk's ``c`` samples.
        mean_grad: Per tensor, the mean gradient ``g^t`` of the whole batch (over every chunk and rank).
        params: Per tensor, the parameter values (needed for the 2-D histogram only).
        histograms: The histogram bins, or ``None``: no histograms.
        base_projection: ``(c,)``, each sample's projections ``g_i^t . g^t`` summed over tensors taken elsewhere
            (`lightning_probes.functional.rank_one.rank_one_sums`), added to this chunk's before the total
            ``proj_sq[T]`` is squared; ``None``: none.
        into: The sums of the chunks before (an earlier result of this function for the same tensors): this
            chunk's are added to them in place and they are returned (`merge_sums` without the second copy; the
            C path adds its per-entry squares straight into ``into["sq_entries"]``).

    Returns:
        ``{"count": (), "sq_norm": (T,), "proj_sq": (T + 1,), "sq_entries": (D,)}``, plus ``"hist_1d"``
        ``(T, bins)``, ``"outside_1d"`` ``(T,)``, ``"hist_2d"`` ``(T, xb, yb)``, ``"outside_2d"`` ``(T,)`` with
        histograms. With ``p_i^t = g_i^t . g^t``: ``count = c``, ``sq_norm[t] = sum_i ||g_i^t||^2``,
        ``proj_sq[t] = sum_i (p_i^t)^2`` and ``proj_sq[T] = sum_i (sum_t p_i^t)^2`` (the whole parameter
        vector), ``sq_entries`` = ``sum_i g_i^2`` entry by entry (flat, the tensors concatenated). Float64,
        except ``sq_entries`` (the gradients' dtype, at least float32).
    """
    if not grads:
        raise ValueError("Expected at least one per-sample gradient tensor, but got none")
    count = grads[0].shape[0]
    device = grads[0].device
    sq_norm = torch.zeros(len(grads), dtype=torch.float64, device=device)
    projections = torch.zeros(count, len(grads), dtype=torch.float64, device=device)  # (c, T): p_i^t
    entries = []
    hist_1d, out_1d, hist_2d, out_2d = [], [], [], []
    want_1d = histograms is not None and bool(histograms.bins_1d)
    offsets = [0]
    for g in grads:
        offsets.append(offsets[-1] + math.prod(g.shape[1:]))
    target = into["sq_entries"] if into is not None and into["sq_entries"].dtype == torch.float64 else None
    for t, (g, mean) in enumerate(zip(grads, mean_grad)):
        flat = g.reshape(count, -1).to(_accumulator_dtype(g.dtype))  # (c, numel_t)
        flat_mean = mean.reshape(-1).to(flat.dtype)
        if _native_sums(flat):  # one pass in C on the CPU: the same sums, the histogram against the exact edges
            from lightning_probes.functional import _native

            flat, flat_mean = flat.contiguous(), flat_mean.contiguous()
            slot = None if target is None else target[offsets[t]:offsets[t + 1]]
            per_entry64, proj, squares, counts, outside = _native.sample_sums(
                flat, flat_mean, histograms.edges_1d() if want_1d else None, slot)
            sq_norm[t] = squares
            entries.append(per_entry64 if slot is None else None)  # None: already added into `into`
            projections[:, t] = proj
            if want_1d:
                hist_1d.append(counts)
                out_1d.append(outside.sum())
        else:
            squares = flat * flat
            per_entry = squares.sum(0)
            entries.append(per_entry)
            sq_norm[t] = per_entry.sum().double()
            projections[:, t] = (flat @ flat_mean).double()
            del squares
            if want_1d:
                counts, outside = histogram_counts_1d(flat, histograms.bins_1d, *histograms.range_1d)
                hist_1d.append(counts)
                out_1d.append(outside)
        if histograms is not None and histograms.bins_2d:
            if params is None:
                raise ValueError("Expected `params` for the 2-D histogram (gradient entry against parameter value)")
            counts, outside = histogram_counts_2d(flat, params[t].detach().reshape(1, -1).to(flat.dtype),
                                                  histograms.bins_2d, histograms.range_2d)
            hist_2d.append(counts)
            out_2d.append(outside)
    total = projections.sum(1) if base_projection is None else projections.sum(1) + base_projection.double()
    sums = {
        "count": torch.tensor(float(count), dtype=torch.float64, device=device),
        "sq_norm": sq_norm,
        "proj_sq": torch.cat([projections.square().sum(0), total.square().sum().reshape(1)]),
    }
    if hist_1d:
        sums["hist_1d"], sums["outside_1d"] = torch.stack(hist_1d), torch.stack(out_1d)
    if hist_2d:
        sums["hist_2d"], sums["outside_2d"] = torch.stack(hist_2d), torch.stack(out_2d)
    if into is None:
        dtype = max((e.dtype for e in entries), key=lambda d: torch.finfo(d).bits)
        sums["sq_entries"] = torch.cat([e.to(dtype) for e in entries])
        return sums
    for t, part in enumerate(entries):
        if part is not None:
            into["sq_entries"][offsets[t]:offsets[t + 1]] += part.to(into["sq_entries"].dtype)
    for key, value in sums.items():
        into[key] += value
    return into


def merge_sums(total: Optional[Mapping[str, torch.Tensor]],
               part: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total + part`` key by key (``total`` ``None``: a copy of ``part``)."""
    if total is None:
        return dict(part)
    return {k: total[k] + part[k] for k in part}


def hutchinson_diagonal(hvp: Callable[[torch.Tensor], torch.Tensor], sizes: Sequence[int], samples: int,
                        generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's estimates of the Hessian diagonal, ``mean_k v_k * (H v_k)``, and of the traces of its diagonal
    blocks (one block per tensor), from ``samples`` Rademacher vectors ``v_k``.

    The vectors are drawn as `lightning_probes.functional.curvature.hutchinson_trace` draws them, so with the same
    generator state the two give the same trace.

    Args:
        hvp: ``v -> H v`` on flat vectors (`lightning_probes.functional.curvature.hvp_operator`).
        sizes: Entries of each tensor, in the flat order (``sum(sizes)`` is the vector length).
        samples: Rademacher vectors.
        generator: A CPU generator (every rank draws the same vectors).
        device: Where the vectors live.
        dtype: Their dtype.

    Returns:
        ``(diagonal, forms)``: the ``(D,)`` diagonal estimate and the ``(samples, T)`` forms ``v_k^t . (H v_k)^t``
        per tensor (their row sums are ``v_k^T H v_k``; the mean over rows estimates each block's trace), float64.

    Example:
        >>> h = torch.diag(torch.tensor([3.0, 1.0, -2.0]))
        >>> diag, forms = hutchinson_diagonal(lambda v: h @ v, [2, 1], 3, torch.Generator().manual_seed(0),
        ...                                   torch.device("cpu"))
        >>> diag.tolist(), forms.mean(0).tolist()  # exact for a diagonal matrix
        ([3.0, 1.0, -2.0], [4.0, -2.0])
    """
    size = int(sum(sizes))
    diagonal = torch.zeros(size, dtype=torch.float64, device=device)
    forms = torch.zeros(samples, len(sizes), dtype=torch.float64, device=device)
    for k in range(samples):
        v = (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(device=device, dtype=dtype)
        product = (v * hvp(v)).double()
        diagonal += product
        forms[k] = _segment_sum(product, sizes)
    return diagonal / max(1, samples), forms


def _segment_sum(values: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The sums of consecutive segments of ``sizes`` entries (one per tensor), float64."""
    return torch.stack([part.sum() for part in torch.split(values, list(sizes))]).double()


def gradient_tests(sums: Mapping[str, torch.Tensor], mean_grad: Sequence[torch.Tensor], loss: torch.Tensor,
                   lr: float = math.nan, hessian_diagonal: Optional[torch.Tensor] = None,
                   hessian_forms: Optional[torch.Tensor] = None, gsnr_eps: float = 1e-5, eb_eps: float = 1e-5,
                   tic_eps: float = 1e-7) -> torch.Tensor:
    """The test values per tensor and for all tensors together, from the sums of the whole batch.

    Args:
        sums: `per_sample_sums` merged over every chunk (and rank) of the batch.
        mean_grad: Per tensor, the batch's mean gradient ``g^t`` (the one the sums were made with).
        loss: The batch's mean loss (for CABS).
        lr: The learning rate (for CABS; NaN: no CABS).
        hessian_diagonal: ``(D,)`` Hessian diagonal for ``tic_diag`` (exact, or `hutchinson_diagonal`'s), or
            ``None``.
        hessian_forms: ``(samples, T)`` Hutchinson forms (`hutchinson_diagonal`) for ``hessian_trace``, its
            standard error and ``tic_trace``, or ``None``. An exact trace per tensor is a ``(1, T)`` tensor.
        gsnr_eps: ``eps`` of the mean GSNR (Cockpit's ``MeanGSNR`` default).
        eb_eps: ``eps`` of the EB criterion (Cockpit's ``EarlyStopping`` default).
        tic_eps: ``eps`` of the TIC (Cockpit's ``TICDiag``/``TICTrace`` default).

    Returns:
        A ``(T + 1, len(GRADIENT_TEST_FIELDS))`` float64 table: one row per tensor, the last for all tensors
        together; columns `GRADIENT_TEST_FIELDS`. NaN where a value is undefined (one sample, a zero gradient, no
        curvature given).
    """
    count = sums["count"].double()
    device = sums["sq_norm"].device
    sizes = [m.numel() for m in mean_grad]
    g = torch.cat([m.reshape(-1) for m in mean_grad]).to(sums["sq_entries"].dtype)  # (D,)
    g2 = g.square()
    sq_entries = sums["sq_entries"]

    def with_total(per_tensor: torch.Tensor, total: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat([per_tensor, (per_tensor.sum() if total is None else total).reshape(1)])

    grad_sq = with_total(_segment_sum(g2, sizes))  # ||g||^2, (T + 1,)
    sq_norm = with_total(sums["sq_norm"])  # sum_i ||g_i||^2
    proj_sq = sums["proj_sq"]  # sum_i (g_i . g)^2
    numel = with_total(torch.tensor(sizes, dtype=torch.float64, device=device))
    nan = torch.full_like(grad_sq, math.nan)

    var_l1 = (sq_norm - count * grad_sq) / (count - 1)  # the sample variance's l1 norm, sum_j s_j^2
    norm_test = (var_l1.clamp_min(0) / count / grad_sq).sqrt()
    inner_test = ((proj_sq - count * grad_sq.square()).clamp_min(0) / (count - 1) / count / grad_sq.square()).sqrt()
    ortho_test = ((sq_norm - proj_sq / grad_sq).clamp_min(0) / (count - 1) / count / grad_sq).sqrt()

    gsnr = g2 / (sq_entries / count.to(g.dtype) - g2 + gsnr_eps)
    mean_gsnr = with_total(_segment_sum(gsnr, sizes)) / numel
    diag_var = (sq_entries - count.to(g.dtype) * g2) / (count.to(g.dtype) - 1)
    snr = g2 / (diag_var + eb_eps)
    early_stopping = 1 - count * with_total(_segment_sum(snr, sizes)) / numel
    undefined = count < 2  # one sample: no sample variance (NaN, not the inf or 0 of x / 0 after rounding)
    norm_test, inner_test, ortho_test, early_stopping = (
        torch.where(undefined, nan, v.double()) for v in (norm_test, inner_test, ortho_test, early_stopping))
    cabs = lr * with_total(_segment_sum(sq_entries - count.to(g.dtype) * g2, sizes)) \
        / (count * loss.double())

    if hessian_forms is not None:
        forms = torch.cat([hessian_forms, hessian_forms.sum(1, keepdim=True)], 1).double()  # (k, T + 1)
        trace = forms.mean(0)
        stderr = forms.std(0) / math.sqrt(forms.shape[0]) if forms.shape[0] > 1 else nan
        tic_trace = (sq_norm / count) / (trace + tic_eps)
    else:
        trace = stderr = tic_trace = nan
    if hessian_diagonal is not None:
        ratio = (sq_entries.double() / count) / (hessian_diagonal.double() + tic_eps)
        tic_diag = with_total(_segment_sum(ratio, sizes))
    else:
        tic_diag = nan
    return torch.stack([grad_sq.sqrt(), norm_test, inner_test, ortho_test, mean_gsnr.double(),
                        early_stopping.double(), cabs.double(), trace, stderr, tic_trace, tic_diag], 1)
