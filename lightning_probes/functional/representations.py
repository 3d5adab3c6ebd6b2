"""Representation maths: cross-correlation, linear CKA, effective rank, activation statistics.

One-shot functions take feature matrices ``(n_samples, n_features)``. `MomentAccumulator` streams centred
batches into first and second moments (float64, or float32 products where the tests show it agrees), from
which the same quantities follow in float64 without keeping activations.
"""

from __future__ import annotations

from typing import Optional

import torch


def _as_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"Expected `{name}` of shape (n_samples, n_features), but got shape {tuple(x.shape)}")
    return x.double()


def correlation_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Pearson correlation from a covariance matrix; features with zero variance give NaN rows and columns."""
    std = cov.diagonal().clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.full_like(std, float("nan")))
    return (cov / std.unsqueeze(1) / std.unsqueeze(0)).clamp(-1, 1)


def cross_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every feature of ``x`` and every feature of ``y`` over the samples.

    Args:
        x: ``(n, p)`` features.
        y: ``(n, q)`` features of the same samples.

    Returns:
        ``(p, q)`` float64 matrix, equal to the off-diagonal block of ``numpy.corrcoef(x, y, rowvar=False)``;
        NaN where a feature has zero variance.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected `x` and `y` to have as many samples, but got {x.shape[0]} and {y.shape[0]}")
    z = torch.cat([x, y], dim=1)
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / max(1, z.shape[0] - 1)
    return correlation_from_covariance(cov)[: x.shape[1], x.shape[1]:]


def cka_from_covariances(cov_xy: torch.Tensor, cov_xx: torch.Tensor, cov_yy: torch.Tensor) -> torch.Tensor:
    """Linear CKA from centred (cross-)covariance blocks: ``||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F)``."""
    denominator = torch.linalg.matrix_norm(cov_xx) * torch.linalg.matrix_norm(cov_yy)
    return torch.where(denominator > 0, cov_xy.square().sum() / denominator, torch.zeros_like(denominator))


def _hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 (the paper's name)
    """Unbiased HSIC estimator of Song et al. (2012) on Gram matrices (their diagonals are ignored)."""
    n = k.shape[0]
    k = k - torch.diag_embed(k.diagonal())
    l = l - torch.diag_embed(l.diagonal())  # noqa: E741
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    term = (k * l).sum() + (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    term = term - 2.0 / (n - 2) * (ones.T @ k @ l @ ones)
    return (term / (n * (n - 3))).reshape(())


def linear_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Linear centred kernel alignment (Kornblith et al. 2019), a similarity in [0, 1].

    Args:
        x: ``(n, p)`` features.
        y: ``(n, q)`` features of the same samples.
        unbiased: Use the unbiased HSIC estimator (Nguyen et al. 2021), which needs ``n > 3``; it may fall
            slightly outside [0, 1] on small samples.

    Returns:
        A 0-dim float64 tensor. It is invariant to orthogonal transforms and isotropic scaling of either input.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"Expected `x` and `y` to have as many samples, but got {n} and {y.shape[0]}")
    if unbiased:
        if n <= 3:
            raise ValueError(f"The unbiased CKA estimator needs more than 3 samples, but got {n}")
        k, l = x @ x.T, y @ y.T  # noqa: E741
        denominator = (_hsic1(k, k) * _hsic1(l, l)).clamp_min(0).sqrt()
        return _hsic1(k, l) / denominator if denominator > 0 else torch.zeros((), dtype=torch.float64)
    xc, yc = x - x.mean(dim=0), y - y.mean(dim=0)
    return cka_from_covariances(yc.T @ xc, xc.T @ xc, yc.T @ yc)


def minibatch_hsic_terms(grams: list[torch.Tensor]) -> torch.Tensor:
    """Unbiased HSIC of every pair of layers on one minibatch: ``(L, L)``, to be summed over minibatches.

    Minibatch CKA (Nguyen et al. 2021) is ``sum_b H_b[i, j] / sqrt(sum_b H_b[i, i] * sum_b H_b[j, j])``.
    """
    size = len(grams)
    out = torch.zeros(size, size, dtype=torch.float64, device=grams[0].device)
    for i in range(size):
        for j in range(i, size):
            out[i, j] = out[j, i] = _hsic1(grams[i], grams[j])
    return out


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """CKA matrix from summed HSIC terms ``(L, L)``."""
    diagonal = hsic.diagonal().clamp_min(0).sqrt()
    denominator = diagonal.unsqueeze(1) * diagonal.unsqueeze(0)
    return torch.where(denominator > 0, hsic / denominator, torch.zeros_like(hsic))


def effective_rank_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Effective rank from a covariance matrix: ``exp(H(p))``, ``p = s / sum(s)``, ``s`` = singular values.

    The singular values of the centred activations are ``sqrt(n * eigenvalues(cov))``; ``p`` does not depend
    on the scale ``n``. Computed in float64: float32 eigenvalues of a rank-deficient covariance can move the rank
    by up to about 1e-4 (see `MomentAccumulator`).
    """
    eigenvalues = torch.linalg.eigvalsh(cov.double())
    # Eigenvalues within rounding of zero (as numpy.linalg.matrix_rank's tolerance) are zero: their square roots
    # (about 1e-8 of the largest singular value each) would otherwise count.
    tolerance = eigenvalues.abs().max() * cov.shape[-1] * torch.finfo(torch.float64).eps
    eigenvalues = torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues))
    singular = eigenvalues.sqrt()
    total = singular.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64)
    p = singular / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).where(p > 0, torch.zeros_like(p)).sum()
    return entropy.exp()


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy and Vetterli 2007) of activations ``(n, p)``.

    ``exp(-sum_i p_i log p_i)`` with ``p_i = s_i / sum_j s_j`` and ``s`` the singular values of the centred
    activations. It is 1 for rank-1 activations and ``k`` for ``k`` orthogonal directions of equal spread.
    """
    x = _as_2d(x, "x")
    singular = torch.linalg.svdvals(x - x.mean(dim=0))
    total = singular.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64)
    p = singular / total
    return (-(p * torch.log(p.clamp_min(1e-300))).where(p > 0, torch.zeros_like(p)).sum()).exp()


class MomentAccumulator:
    """Streams feature batches into sums; gives the covariance without keeping activations.

    Each batch is shifted by the first batch's mean before its products are summed (covariance is
    shift-invariant; the shift keeps the centred products small and avoids cancellation). The products are
    formed and summed in ``dtype``, the feature sums in float64; `covariance` is float64.

    ``dtype=torch.float32`` halves the memory and skips a float64 pass per batch. The tests show it agrees
    with float64 to 1e-5 for the covariance (relative to each pair's scale), correlation and linear CKA. The
    effective rank of rank-deficient layers (e.g. a 10-class classifier fed by 8 units) keeps float64 sums:
    float32 rounding can lift the zero eigenvalues to about 1e-7 of the largest, and their square roots can then
    move the rank by up to about 1e-4 (how far depends on the data and the kernels), while float64 sums match
    NumPy's SVD, with the same cutoff of near-zero eigenvalues, to 1e-6 (tested). `LayerCorrelationMonitor`
    accumulates in float32; the effective rank keeps float64.

    Args:
        num_features: Width of the feature rows.
        device: Device of the sums.
        dtype: Dtype of the products and their sums: ``torch.float64`` or ``torch.float32``.
    """

    def __init__(self, num_features: int, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Expected `dtype` to be torch.float32 or torch.float64, but got {dtype}")
        self.n = 0
        self.shift: Optional[torch.Tensor] = None
        self.sum = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.products = torch.zeros(num_features, num_features, dtype=dtype, device=device)

    def update(self, z: torch.Tensor) -> None:
        """Add a batch ``(b, num_features)``."""
        z = z.detach().to(self.products.dtype)
        if self.shift is None:
            self.shift = z.mean(dim=0)
        zs = z - self.shift
        self.n += z.shape[0]
        self.sum += zs.sum(dim=0, dtype=torch.float64)
        self.products.addmm_(zs.T, zs)

    def covariance(self) -> torch.Tensor:
        """Sample covariance (``n - 1`` in the denominator), float64."""
        if self.n < 2:
            raise ValueError(f"Expected at least 2 samples for a covariance, but got {self.n}")
        mean = self.sum / self.n
        return (self.products.double() - self.n * torch.outer(mean, mean)) / (self.n - 1)

    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.n) + (0 if self.shift is None else self.shift.double())


def effective_rank_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Effective rank from the Gram matrix ``X_c X_c^T`` of centred activations ``X_c`` ``(n, p)``.

    ``X_c X_c^T`` and ``X_c^T X_c = (n - 1) cov`` share their non-zero eigenvalues, so this equals
    `effective_rank_from_covariance` at the cost of an ``(n x n)`` instead of a ``(p x p)`` eigenproblem: the
    cheaper one for layers wider than the probe set (``p > n``).
    """
    return effective_rank_from_covariance(gram)  # p = s / sum(s) does not depend on the scale


class EffectiveRankAccumulator:
    """Streams feature rows and gives their effective rank from the smaller of the two eigenproblems.

    While no more rows than features have come, the centred rows are kept (at most ``p x p`` values, as the
    covariance would take) and the rank comes from their ``(n x n)`` Gram matrix (`effective_rank_from_gram`);
    once the rows outnumber the features they are folded into a `MomentAccumulator` (float64) and the rank comes
    from the ``(p x p)`` covariance.

    Args:
        num_features: Width ``p`` of the rows.
        device: Device of the sums.
    """

    def __init__(self, num_features: int, device: Optional[torch.device] = None) -> None:
        self.num_features = num_features
        self.device = device
        self.rows: list[torch.Tensor] = []
        self.n = 0
        self.moments: Optional[MomentAccumulator] = None

    def update(self, z: torch.Tensor) -> None:
        """Add a batch ``(b, num_features)``."""
        rows_ptr = z.data_ptr()
        z = z.detach().double()
        self.n += z.shape[0]
        if self.moments is not None:
            self.moments.update(z)
            return
        self.rows.append(z if z.data_ptr() != rows_ptr else z.clone())  # a copy: the caller's tensor may change
        if self.n > self.num_features:  # the covariance is now the smaller problem
            self.moments = MomentAccumulator(self.num_features, device=z.device)
            self.moments.update(torch.cat(self.rows))
            self.rows = []

    @property
    def uses_gram(self) -> bool:
        """Whether the rank will come from the Gram matrix (no more rows than features so far)."""
        return self.moments is None

    def compute(self) -> torch.Tensor:
        """The effective rank (0-dim float64)."""
        if self.moments is not None:
            return effective_rank_from_covariance(self.moments.covariance())
        if self.n < 2:
            raise ValueError(f"Expected at least 2 samples for an effective rank, but got {self.n}")
        x = torch.cat(self.rows)
        centred = x - x.mean(dim=0)
        return effective_rank_from_gram(centred @ centred.T)


def blockwise_layer_similarity(moments: MomentAccumulator, widths: list[int], cka: bool = True,
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlation matrix, mean absolute correlation and linear CKA of every pair of layers from one streamed
    `MomentAccumulator` over their concatenated features, derived one layer's block row at a time.

    The covariance is never formed whole: for the rows of layer ``i`` the float64 block row
    ``C[i, :] = (P[i, :] - n m_i m^T) / (n - 1)`` is derived from the sums, turned into correlations, reduced to the
    statistics of the pairs ``(i, j >= i)`` and written into the float16 correlation matrix; so besides the
    accumulator's ``(F x F)`` sums it holds that float16 matrix (``2 F^2`` bytes) and one float64 block row. Equal
    to `correlation_from_covariance` and `cka_from_covariances` of the whole covariance (``MomentAccumulator
    .covariance``), to float64 rounding.

    Args:
        moments: The streamed sums over the features of all layers, side by side (at least 2 rows).
        widths: The layers' feature counts, in the order of the columns (they sum to the accumulator's width).
        cka: Also the linear CKA of every pair (else zeros).

    Returns:
        ``(correlation, mean_abs, cka)``: the ``(F, F)`` float16 correlation matrix (NaN rows and columns for
        features without variance), and ``(L, L)`` float64 matrices of the mean absolute correlation of each
        pair's block (NaN entries left out; NaN when none is left) and of linear CKA (0 where a layer has no
        variance).
    """
    total = sum(widths)
    if moments.products.shape[0] != total:
        raise ValueError(f"Expected `widths` summing to the accumulator's {moments.products.shape[0]} features, but "
                         f"got {widths} (sum {total})")
    if moments.n < 2:
        raise ValueError(f"Expected at least 2 samples for a covariance, but got {moments.n}")
    n = moments.n
    mean = moments.sum / n
    diagonal = (moments.products.diagonal().double() - n * mean.square()) / (n - 1)
    std = diagonal.clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.full_like(std, float("nan")))
    edges = [0]
    for width in widths:
        edges.append(edges[-1] + width)
    layers = len(widths)
    correlation = torch.empty(total, total, dtype=torch.float16, device=moments.products.device)
    mean_abs = torch.full((layers, layers), float("nan"), dtype=torch.float64)
    squares = torch.zeros(layers, layers, dtype=torch.float64)
    for i in range(layers):
        a, b = edges[i], edges[i + 1]
        block = moments.products[a:b].to(torch.float64, copy=True)  # (w_i, F): a copy of one block row
        block.sub_(n * torch.outer(mean[a:b], mean)).div_(n - 1)  # the covariance block row, in place
        if cka:
            for j in range(i, layers):
                squares[i, j] = squares[j, i] = block[:, edges[j]:edges[j + 1]].square().sum()
        block.div_(std[a:b].unsqueeze(1)).div_(std.unsqueeze(0)).clamp_(-1, 1)  # the correlation block row
        for j in range(i, layers):
            part = block[:, edges[j]:edges[j + 1]].abs()
            finite = ~part.isnan()
            if finite.any():
                mean_abs[i, j] = mean_abs[j, i] = part[finite].mean()
        correlation[a:b] = block.to(torch.float16)
        del block
    similarity = torch.zeros(layers, layers, dtype=torch.float64)
    if cka:
        norms = squares.diagonal().sqrt()  # ||C_ii||_F
        denominator = norms.unsqueeze(1) * norms.unsqueeze(0)
        similarity = torch.where(denominator > 0, squares / denominator.where(denominator > 0,
                                                                             torch.ones_like(denominator)),
                                 torch.zeros_like(squares))
    return correlation, mean_abs, similarity
