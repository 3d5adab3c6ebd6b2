"""Per-unit alignment: how much of a layer's input variance lies along each unit's weight vector.

For a unit with weight vector ``w`` (a row of a ``Linear`` weight, or a flattened ``Conv2d`` filter) and ``C``
the unbiased covariance of the inputs it sees (``torch.cov`` semantics: rows are observations), the alignment is

    ``a(w) = (w^T C w) / (w^T w * trace(C))``,

the share of the total input variance that lies along ``w``, in [0, 1]. It is 1 when all the variance lies
along ``w`` and ``lambda_min / trace(C)`` for the eigenvector of the least variance. A random direction has
``E[a] = 1 / D`` whatever ``C`` is (``D`` input features): that is the chance level to compare with. The bias is
ignored, and so is the input mean (the covariance is centred).

For a ``Conv2d``, the inputs a filter sees are the patches of the layer's receptive field: `conv_patches`
unfolds ``(N, C, H, W)`` inputs with the layer's geometry (as ``F.unfold``) into ``(N * positions, C * kh * kw)``
rows, the same order as ``weight.reshape(out_channels, -1)``. With ``groups > 1``, a filter of group ``g`` sees
only its group's input channels, and its alignment uses that group's covariance (``trace`` included). A
``Conv1d`` is read as the ``Conv2d`` of kernel ``(1, k)`` on inputs of height 1 (``C * k`` features per patch).

`AlignmentAccumulator` streams such rows batch by batch into float64 sums, so that the covariance of a large
probe set is never held as inputs; `AlignmentAccumulator.for_layer` and `layer_rows` fit it to one
``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``, for the callback and for any command that ranks units by alignment.

Undefined cases give ``NaN``: a unit whose weight vector is all zeros has no direction, and inputs without
variance (``trace(C) == 0``) have no variance to share. Rounding can push a ratio a hair outside [0, 1]; the
values are clamped to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

IntPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]

#: ``padding_mode`` of ``nn.Conv2d`` -> ``mode`` of ``F.pad``.
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)):
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum} or a pair of them, but got {value!r}")
    return int(value[0]), int(value[1])


def _paddings(padding: Padding, kernel: tuple[int, int], stride: tuple[int, int],
              dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of the last two dimensions, as ``nn.Conv2d`` applies it."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), but got stride {stride}")
        # As PyTorch: total padding d * (k - 1) per dimension, the odd one extra at the end.
        (top, bottom), (left, right) = ((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                                        for k, d in zip(kernel, dilation))
        return left, right, top, bottom
    if isinstance(padding, str):
        raise ValueError(f"Expected `padding` to be 'valid', 'same', an integer >= 0 or a pair of them, but got "
                         f"{padding!r}")
    height, width = _pair("padding", padding, 0)
    return width, width, height, height


def conv_patches(
    inputs: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """The receptive-field patches a ``Conv2d`` filter is applied to, one row per (sample, output position).

    The rows of ``F.unfold`` with the same geometry (transposed to one row per position), with the padding modes
    of ``nn.Conv2d`` besides. ``conv_patches(x, ...) @ weight.reshape(out_channels, -1).T`` reshaped to
    ``(N, H_out, W_out, O)`` equals the convolution without bias (``groups=1``).

    Args:
        inputs: ``(N, C, H, W)`` (or unbatched ``(C, H, W)``) inputs of the convolution.
        kernel_size: ``kh`` and ``kw`` (an integer for both).
        stride: The convolution's stride.
        padding: An integer, a pair ``(ph, pw)``, ``"valid"`` or ``"same"``, as ``nn.Conv2d`` takes it.
        dilation: The convolution's dilation.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as ``nn.Conv2d`` takes it.

    Returns:
        ``(N * H_out * W_out, C * kh * kw)`` rows, in the inputs' dtype; the columns are ordered as
        ``weight.reshape(out_channels, -1)`` (channel, then kernel row, then kernel column).

    Raises:
        ValueError: On inputs that are not 3- or 4-dimensional, or an invalid geometry.

    Example:
        >>> conv_patches(torch.zeros(2, 3, 8, 8), kernel_size=3, padding=1).shape
        torch.Size([128, 27])
    """
    if inputs.ndim == 3:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim != 4:
        raise ValueError(f"Expected `inputs` of shape (N, C, H, W), but got shape {tuple(inputs.shape)}")
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"Expected `padding_mode` to be one of {tuple(_PAD_MODES)}, but got {padding_mode!r}")
    kernel = _pair("kernel_size", kernel_size, 1)
    strides = _pair("stride", stride, 1)
    dilations = _pair("dilation", dilation, 1)
    left, right, top, bottom = _paddings(padding, kernel, strides, dilations)
    if left or right or top or bottom:
        inputs = F.pad(inputs, (left, right, top, bottom), mode=_PAD_MODES[padding_mode])
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    out_h = (inputs.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (inputs.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"The kernel {kernel} with dilation {dilations} does not fit the padded inputs of shape "
                         f"{tuple(inputs.shape)}")
    # The same patches as F.unfold, from kh * kw strided views (several times faster than F.unfold on CPU).
    views = [inputs[:, :, i * dh:i * dh + sh * (out_h - 1) + 1:sh, j * dw:j * dw + sw * (out_w - 1) + 1:sw]
             for i in range(kh) for j in range(kw)]
    patches = torch.stack(views, dim=-1)  # (N, C, H_out, W_out, kh * kw)
    # -> (N, H_out, W_out, C, kh * kw) -> (N * H_out * W_out, C * kh * kw)
    return patches.permute(0, 2, 3, 1, 4).reshape(-1, inputs.shape[1] * kh * kw)


def _flat_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.ndim < 2:
        raise ValueError(f"Expected `weight` of shape (units, features, ...), but got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1).double()


def alignment_from_covariance(covariance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-unit alignment from the covariance of the inputs: ``w^T C w / (w^T w * trace(C))``.

    Args:
        covariance: ``(D, D)`` input covariance, or ``(G, d, d)``: one covariance per group of a grouped
            convolution, the units split into ``G`` consecutive groups of ``U / G``.
        weight: ``(U, D)`` (resp. ``(U, d)``) weight rows; more dimensions are flattened
            (``weight.reshape(U, -1)``, e.g. conv filters).

    Returns:
        ``(U,)`` float64 alignments in [0, 1]; ``NaN`` for all-zero weight rows and for inputs without variance.

    Raises:
        ValueError: If the shapes do not fit.

    Example:
        >>> alignment_from_covariance(torch.diag(torch.tensor([3.0, 1.0])), torch.eye(2)).tolist()
        [0.75, 0.25]
    """
    cov = covariance.double()
    if cov.ndim == 2:
        cov = cov.unsqueeze(0)
    if cov.ndim != 3 or cov.shape[1] != cov.shape[2]:
        raise ValueError(f"Expected `covariance` of shape (D, D) or (groups, d, d), but got shape "
                         f"{tuple(covariance.shape)}")
    w = _grouped_weight(weight, cov.shape[0], cov.shape[1]).to(cov.device)  # (G, U/G, d)
    variance = ((w @ cov) * w).sum(dim=-1)  # (G, U/G): w^T C w
    total = cov.diagonal(dim1=-2, dim2=-1).sum(dim=-1, keepdim=True)  # (G, 1): trace(C)
    return _ratio(variance, w, total)


def _grouped_weight(weight: torch.Tensor, groups: int, features: int) -> torch.Tensor:
    """``(U, ...)`` weight as float64 ``(G, U/G, d)``, with a clear error where the shapes do not fit."""
    w = _flat_weight(weight)
    units = w.shape[0]
    if w.shape[1] != features or units % groups:
        raise ValueError(f"Expected `weight` of shape (units, {features}) with units divisible by {groups} groups, "
                         f"but got shape {tuple(w.shape)}")
    return w.reshape(groups, units // groups, features)


def _ratio(variance: torch.Tensor, w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``variance / (|w|^2 * total)`` flattened to ``(U,)``, clamped to [0, 1]; NaN where the denominator is 0."""
    denominator = w.square().sum(dim=-1) * total
    ratio = (variance / denominator.where(denominator > 0, torch.ones_like(denominator))).clamp(0.0, 1.0)
    return ratio.where(denominator > 0, torch.full_like(ratio, float("nan"))).reshape(-1)


def _covariance(rows: torch.Tensor) -> torch.Tensor:
    """``torch.cov`` of ``(n, D)`` rows as a ``(D, D)`` float64 matrix (also for ``D == 1``)."""
    if rows.shape[0] < 2:
        raise ValueError(f"Expected at least 2 input rows for a covariance, but got {rows.shape[0]}")
    return torch.cov(rows.double().T).reshape(rows.shape[1], rows.shape[1])


def alignment(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-unit alignment of a linear map with the variance of its inputs (see the module docstring).

    Args:
        inputs: ``(N, D)`` inputs, ``N >= 2``.
        weight: ``(U, D)`` weight rows (``nn.Linear.weight``).

    Returns:
        ``(U,)`` float64 alignments in [0, 1]; ``NaN`` for all-zero weight rows and for constant inputs.

    Raises:
        ValueError: If the shapes do not fit or there are fewer than 2 inputs.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # all the variance along the first axis
        >>> alignment(x, torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])).tolist()
        [1.0, 0.0, 0.5]
    """
    if inputs.ndim != 2:
        raise ValueError(f"Expected `inputs` of shape (N, D), but got shape {tuple(inputs.shape)}")
    return alignment_from_covariance(_covariance(inputs), weight)


def conv2d_alignment(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Per-filter alignment of a ``Conv2d`` with the variance of its input patches.

    The inputs are unfolded with the layer's geometry (`conv_patches`) into one row per (sample, output
    position); each filter's alignment is then `alignment` of its flattened weights with those rows (with
    ``groups > 1``, with the rows of its group's input channels).

    Args:
        inputs: ``(N, C, H, W)`` inputs of the convolution.
        weight: ``(O, C / groups, kh, kw)`` filters (``nn.Conv2d.weight``).
        stride: The convolution's stride.
        padding: An integer, a pair, ``"valid"`` or ``"same"``.
        dilation: The convolution's dilation.
        groups: The convolution's groups; ``C`` and ``O`` must be divisible by it.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``(O,)`` float64 alignments in [0, 1], one per output channel (``NaN`` as in `alignment`).

    Raises:
        ValueError: If the shapes, groups or geometry do not fit, or the patches are fewer than 2.

    Example:
        >>> conv2d_alignment(torch.randn(4, 3, 8, 8), torch.randn(5, 3, 3, 3), padding=1).shape
        torch.Size([5])
    """
    if weight.ndim != 4:
        raise ValueError(f"Expected `weight` of shape (O, C / groups, kh, kw), but got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Expected `groups` to be a positive integer, but got {groups!r}")
    channels = inputs.shape[-3] if inputs.ndim in (3, 4) else None
    if channels != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"Expected `inputs` with {weight.shape[1] * groups} channels and {weight.shape[0]} output "
                         f"channels divisible by groups={groups}, but got inputs of shape {tuple(inputs.shape)}")
    rows = conv_patches(inputs, tuple(weight.shape[2:]), stride, padding, dilation, padding_mode)
    width = rows.shape[1] // groups
    covariance = torch.stack([_covariance(rows[:, g * width:(g + 1) * width]) for g in range(groups)])
    return alignment_from_covariance(covariance, weight)


class AlignmentAccumulator:
    """Streams input rows ``(n, D)`` into float64 sums; gives the per-unit alignment without keeping all inputs.

    It keeps the row count, the sum of the rows and the sum of their outer products (per group, ``(G, d, d)``
    with ``d = D / G``), the rows shifted by the first batch's mean (the covariance is shift-invariant; the
    shift avoids cancellation). Rows are buffered until ``d`` of them have come, then their products are formed
    in one matrix product in float32 (float64 for float64 rows; half-precision rows are promoted) and added in
    float64; so a layer with few rows per batch does not pay a ``(d, d)`` update per batch. While no more than
    ``d`` rows have come, `compute` works from the buffered rows themselves (exactly, in float64) and the
    ``(d, d)`` sums are never formed. Memory: at most ``12 * D * D / G`` bytes (sums and buffer), on the device of
    the first batch.

    Args:
        num_features: Width ``D`` of the rows (``in_features`` of a ``Linear``, ``C * kh * kw`` of a ``Conv2d``).
        groups: Groups of a grouped convolution: the rows split into ``groups`` consecutive blocks of features,
            each with its own covariance.

    Raises:
        ValueError: If ``num_features`` or ``groups`` is not a positive integer, or ``groups`` does not divide
            ``num_features``.

    Example:
        >>> acc = AlignmentAccumulator(2)
        >>> acc.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        >>> acc.update(torch.tensor([[3.0, 0.0]]))
        >>> acc.compute(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist()
        [1.0, 0.0]
    """

    def __init__(self, num_features: int, groups: int = 1) -> None:
        for name, value in (("num_features", num_features), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}")
        if num_features % groups:
            raise ValueError(f"Expected `groups` to divide `num_features`={num_features}, but got {groups}")
        self.num_features, self.groups = num_features, groups
        self.width = num_features // groups
        self.n = 0
        self.shift: Optional[torch.Tensor] = None
        self.sum: Optional[torch.Tensor] = None
        self.products: Optional[torch.Tensor] = None
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0

    #: Columns of the rows kept (`for_layer` with ``columns``), or ``None`` for all.
    columns: Optional[torch.Tensor] = None

    @classmethod
    def for_layer(cls, module: nn.Module, columns: Optional[torch.Tensor] = None) -> AlignmentAccumulator:
        """An accumulator sized for the input rows of one ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (see
        `layer_rows`).

        Args:
            module: The layer.
            columns: Sorted indices of the input features to keep (a subsample, for layers too wide for the
                memory; ``groups == 1`` only). `update` then takes full rows and keeps these columns, and
                `compute` takes the full weight and keeps the same columns: the alignment within the subspace of
                the kept features, ``w_S^T C_SS w_S / (|w_S|^2 trace(C_SS))``.
        """
        features, groups = layer_features(module)
        if columns is None:
            return cls(features, groups)
        if groups != 1 or columns.ndim != 1 or not 0 < len(columns) <= features:
            raise ValueError(f"Expected `columns` to be at most {features} feature indices of a layer with groups=1, "
                             f"but got {len(columns)} for groups={groups}")
        accumulator = cls(len(columns))
        accumulator.columns = columns.long()
        return accumulator

    def update(self, rows: torch.Tensor) -> None:
        """Add a batch of rows ``(n, num_features)`` (with `columns`: full rows, of which those are kept)."""
        if self.columns is not None and rows.ndim == 2:
            rows = rows.index_select(1, self.columns.to(rows.device))
        if rows.ndim != 2 or rows.shape[1] != self.num_features:
            raise ValueError(f"Expected rows of shape (n, {self.num_features}), but got shape {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        x = rows.detach()
        if x.dtype != torch.float64:
            x = x.float()
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.sum = torch.zeros(self.num_features, dtype=torch.float64, device=x.device)
        xs = x - self.shift.to(x.dtype)
        self.n += xs.shape[0]
        self.sum += xs.sum(dim=0, dtype=torch.float64)
        self._buffer.append(xs)
        self._buffered += xs.shape[0]
        if self._buffered >= self.width:
            self._flush()

    def _flush(self) -> None:
        """Add the buffered rows' outer products to the float64 sums."""
        if not self._buffer:
            return
        rows = torch.cat(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        grouped = rows.reshape(rows.shape[0], self.groups, self.width).transpose(0, 1)  # (G, n, d)
        products = (grouped.transpose(1, 2) @ grouped).double()  # (G, d, d)
        if self.products is None:
            self.products = products
        else:
            self.products += products

    def update_layer(self, module: nn.Module, inputs: torch.Tensor, chunk_elements: int = 2**24) -> None:
        """Add a batch of one layer's inputs (see `layer_rows`).

        A convolution's inputs are unfolded a few samples at a time, so that the patches of one chunk hold about
        ``chunk_elements`` values at most (at least one sample per chunk): patches are ``kh * kw`` times larger
        than the inputs they come from.

        Args:
            module: The ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` the accumulator was made for (`for_layer`).
            inputs: Its input, as the layer receives it.
            chunk_elements: Largest number of patch values unfolded at once.
        """
        spatial = _CONV_SPATIAL.get(type(module)) or next((d for t, d in _CONV_SPATIAL.items()
                                                           if isinstance(module, t)), None)
        if spatial is not None and inputs.ndim == spatial + 2 and inputs.shape[0] > 1:
            per_sample = inputs[0].numel() * math.prod(module.kernel_size)
            for part in torch.split(inputs, max(1, chunk_elements // max(1, per_sample))):
                self.update(layer_rows(module, part))
            return
        self.update(layer_rows(module, inputs))

    def _check_rows(self) -> None:
        if self.n < 2 or self.sum is None:
            raise ValueError(f"Expected at least 2 rows for a covariance, but got {self.n}")

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance of the rows so far: ``(D, D)``, or ``(G, d, d)`` with ``groups > 1``."""
        self._check_rows()
        self._flush()  # with at least 2 rows, the sums exist from here on
        mean = (self.sum / self.n).reshape(self.groups, -1, 1)  # (G, d, 1)
        cov = (self.products - self.n * (mean @ mean.transpose(1, 2))) / (self.n - 1)
        return cov[0] if self.groups == 1 else cov

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-unit alignment ``(U,)`` of ``weight`` (``(U, D / groups)``, or a conv weight flattened to it; with
        `columns`, the full weight, of which those columns are kept)."""
        self._check_rows()
        if self.columns is not None:
            weight = _flat_weight(weight)
            weight = weight.index_select(1, self.columns.to(weight.device))
        if self.products is not None or not self._buffer:
            return alignment_from_covariance(self.covariance(), weight)
        # Every row is still buffered: w^T C w = |X_c w|^2 / (n - 1) and trace(C) = |X_c|_F^2 / (n - 1).
        rows = torch.cat(self._buffer).double()
        centred = (rows - rows.mean(dim=0)).reshape(self.n, self.groups, self.width).transpose(0, 1)  # (G, n, d)
        w = _grouped_weight(weight, self.groups, self.width).to(centred.device)  # (G, U/G, d)
        variance = (centred @ w.transpose(1, 2)).square().sum(dim=1) / (self.n - 1)  # (G, U/G)
        total = centred.square().sum(dim=(1, 2)).unsqueeze(1) / (self.n - 1)  # (G, 1)
        return _ratio(variance, w, total)


def layer_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The rows an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` applies its weight to, for
    `AlignmentAccumulator.update`.

    Args:
        module: The layer.
        inputs: Its input: ``(..., in_features)`` for a ``Linear`` (every leading index is one row, e.g. every
            token of a sequence), ``(N, C, L)`` or ``(C, L)`` for a ``Conv1d``, ``(N, C, H, W)`` or ``(C, H, W)``
            for a ``Conv2d``.

    Returns:
        ``(rows, in_features)`` for a ``Linear``; `conv_patches` with the layer's geometry for a ``Conv2d`` (for a
        ``Conv1d``, as the ``Conv2d`` of kernel ``(1, k)`` on inputs of height 1: ``(N * L_out, C * k)``).

    Raises:
        ValueError: For other modules, or inputs whose shape does not fit the layer.
    """
    if isinstance(module, nn.Linear):
        if inputs.ndim < 1 or inputs.shape[-1] != module.in_features:
            raise ValueError(f"Expected inputs of shape (..., {module.in_features}) for {module}, but got shape "
                             f"{tuple(inputs.shape)}")
        return inputs.reshape(-1, module.in_features)
    if isinstance(module, nn.Conv2d):
        if inputs.ndim not in (3, 4) or inputs.shape[-3] != module.in_channels:
            raise ValueError(f"Expected inputs of shape (N, {module.in_channels}, H, W) for {module}, but got shape "
                             f"{tuple(inputs.shape)}")
        return conv_patches(inputs, module.kernel_size, module.stride, module.padding, module.dilation,
                            module.padding_mode)
    if isinstance(module, nn.Conv1d):
        if inputs.ndim not in (2, 3) or inputs.shape[-2] != module.in_channels:
            raise ValueError(f"Expected inputs of shape (N, {module.in_channels}, L) for {module}, but got shape "
                             f"{tuple(inputs.shape)}")
        # A Conv1d is a Conv2d of kernel (1, k) on inputs of height 1: the same patches, in the weight's order.
        padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
        return conv_patches(inputs.unsqueeze(-2), (1, module.kernel_size[0]), (1, module.stride[0]), padding,
                            (1, module.dilation[0]), module.padding_mode)
    raise ValueError(f"Alignment is defined for nn.Linear, nn.Conv1d and nn.Conv2d layers, but got "
                     f"{type(module).__name__}")


#: Convolutions the alignment is defined for, with their spatial dimensions.
_CONV_SPATIAL: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2}


def layer_features(module: nn.Module) -> tuple[int, int]:
    """``(D, groups)``: the width ``D`` of the input rows of one ``nn.Linear`` (``in_features``), ``nn.Conv1d``
    (``in_channels * k``) or ``nn.Conv2d`` (``in_channels * kh * kw``), and its groups (1 for a ``Linear``).

    Raises:
        ValueError: For other modules.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.in_channels * math.prod(module.kernel_size), module.groups
    raise ValueError(f"Alignment is defined for nn.Linear, nn.Conv1d and nn.Conv2d layers, but got "
                     f"{type(module).__name__}")


#: Quantiles of `alignment_summary`, with their record keys.
QUANTILES = {"q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95}


def alignment_summary(values: torch.Tensor) -> dict[str, Optional[float]]:
    """Summary of one layer's per-unit alignments: ``mean``, ``std`` (population), quantiles and ``nan_units``.

    ``NaN`` units (all-zero weights, inputs without variance) are left out of the statistics and counted in
    ``nan_units``; with no finite unit every statistic is ``None``. Quantiles interpolate linearly, as
    ``numpy.quantile``.

    Args:
        values: ``(U,)`` alignments.

    Returns:
        ``{"mean", "std", "q05", "q25", "q50", "q75", "q95", "nan_units"}``.

    Example:
        >>> summary = alignment_summary(torch.tensor([0.25, 0.75, float("nan")], dtype=torch.float64))
        >>> summary["mean"], summary["q50"], summary["nan_units"]
        (0.5, 0.5, 1)
    """
    if values.ndim != 1:
        raise ValueError(f"Expected `values` of shape (U,), but got shape {tuple(values.shape)}")
    finite = values.detach().double().cpu()
    nan_units = int(finite.isnan().sum())
    finite = finite[~finite.isnan()]
    if finite.numel() == 0:
        return {"mean": None, "std": None, **dict.fromkeys(QUANTILES), "nan_units": nan_units}
    quantiles = torch.quantile(finite, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {"mean": float(finite.mean()), "std": float(finite.std(correction=0)),
            **{key: float(q) for key, q in zip(QUANTILES, quantiles)}, "nan_units": nan_units}
