"""From a layer output of any shape to feature rows ``(samples, features)``: layouts, token modes, reduction.

A layer output is read in one of three layouts, found once per layer (`infer_layouts`) from one forward pass:

- ``"flat"``: ``(batch, features)`` (and ``(batch,)``, read as one feature);
- ``"channels"``: ``(batch, C, *spatial)``, channel first, as convolutions, pooling and batch norm give it;
- ``"tokens"``: ``(batch, *tokens, features)``, features last, as ``Linear``, ``Embedding``, attention, layer norm
  and transformer layers give it on sequences (``(tokens, batch, features)`` of sequence-first modules is
  recognised by its batch size in the second place and transposed).

A ``"tokens"`` output becomes rows by the probe's ``token_mode`` (`TOKEN_MODES`): ``"samples"`` (default), every
token is a sample of ``features`` (``batch * tokens`` rows); ``"mean"``, the mean over the tokens (``batch`` rows);
``"flatten"``, one row of ``tokens * features`` per sample (the reading before token modes existed).
``"channels"`` outputs keep their reduction by adaptive average pooling (`FeatureReducer`).

Reduction: a layer wider than its cap keeps a *seeded subsample of its features* (the same columns at every batch
and analysis, sorted, chosen by `subsample_columns` from the layer name and the widths), after adaptive pooling for
``"channels"`` outputs. A subsample keeps every kept feature a real unit: the correlations between kept features
are exactly entries of the full correlation matrix, the mean absolute correlation over them is an unbiased estimate
of the full one (a uniform random subset of pairs), and linear CKA, ``||C_xy||^2 / (||C_xx|| ||C_yy||)``, becomes a
ratio of sums over sampled feature pairs whose numerator and denominator scale alike (tested against the full
computation in ``tests/functional/test_feature_rows.py``). A random projection would keep the Gram matrix (CKA)
slightly better but mixes units, so the correlation matrix and dead-unit counts would lose their meaning.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_probes.naming import clean_name

#: How a ``(batch, tokens, features)`` output becomes feature rows.
TOKEN_MODES = ("samples", "mean", "flatten")

#: Modules whose outputs are channel first, ``(batch, C, *spatial)``.
CHANNEL_FIRST: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd,
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm, nn.Upsample, nn.PixelShuffle,
)
#: Modules whose outputs are features last, ``(batch, *tokens, features)``.
FEATURES_LAST: tuple[type, ...] = (
    nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.LayerNorm, nn.RMSNorm,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
    nn.Transformer, nn.RNNBase,
)


def first_tensor(value: object) -> Optional[torch.Tensor]:
    """``value`` if it is a tensor, else the first tensor of a tuple/list, else ``None``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


@contextmanager
def recording_calls(model: nn.Module) -> Iterator[list[tuple[str, nn.Module, tuple[int, ...]]]]:
    """Record ``(clean name, module, output shape)`` of every module call (in call order) inside the block."""
    calls: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args, output) -> None:
            tensor = first_tensor(output)
            if tensor is not None:
                calls.append((name, module, tuple(tensor.shape)))
        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(hook_for(clean_name(name))))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _own_layout(module: nn.Module, ndim: int) -> Optional[str]:
    if ndim <= 2:
        return "flat"
    if isinstance(module, CHANNEL_FIRST):
        return "channels"
    if isinstance(module, FEATURES_LAST):
        return "tokens"
    return None


def infer_layouts(calls: Sequence[tuple[str, nn.Module, tuple[int, ...]]], names: Sequence[str]) -> dict[str, str]:
    """The layout of each named layer from the recorded calls of one forward pass (`recording_calls`).

    A module of a known kind (`CHANNEL_FIRST`, `FEATURES_LAST`) gives its own layout; any other module (an
    activation, dropout, a custom block) takes the layout of the closest earlier call of a known kind whose output
    had the same shape (a ReLU after a ``Conv1d`` is channel first, after a ``Linear`` on tokens features last);
    without one, 3-D outputs are ``"tokens"`` and outputs of 4 or more dimensions ``"channels"``.
    """
    first_call: dict[str, int] = {}
    for index, (name, _, _) in enumerate(calls):
        first_call.setdefault(name, index)
    layouts = {}
    for name in names:
        if name not in first_call:
            continue
        index = first_call[name]
        _, module, shape = calls[index]
        layout = _own_layout(module, len(shape))
        for _, earlier, earlier_shape in reversed(calls[:index]):
            if layout is not None:
                break
            if earlier_shape == shape:
                layout = _own_layout(earlier, len(shape))
        layouts[name] = layout or ("tokens" if len(shape) == 3 else "channels")
    return layouts


def _tokens_first_batch(output: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
    """``(batch, *tokens, features)``: a sequence-first ``(tokens, batch, features)`` output is transposed."""
    if batch is not None and output.ndim == 3 and output.shape[0] != batch and output.shape[1] == batch:
        return output.transpose(0, 1)
    return output


def unit_rows(output: torch.Tensor, layout: str, batch: Optional[int] = None) -> torch.Tensor:
    """The output with one unit per column of its second dimension: ``"tokens"`` outputs as ``(batch * tokens,
    features)`` (a unit is a feature, every token a sample); other layouts unchanged (a unit is a channel of a
    ``"channels"`` output, a feature of a ``"flat"`` one)."""
    if layout == "tokens":
        output = _tokens_first_batch(output, batch)
        return output.reshape(-1, output.shape[-1])
    return output


def token_rows(output: torch.Tensor, layout: str, token_mode: str, batch: Optional[int] = None) -> torch.Tensor:
    """Feature rows of a ``"tokens"`` output by ``token_mode``; other layouts flattened to ``(batch, -1)``."""
    if layout != "tokens":
        return output.reshape(output.shape[0], -1)
    output = _tokens_first_batch(output, batch)
    if token_mode == "samples":
        return output.reshape(-1, output.shape[-1])
    if token_mode == "mean":
        return output.reshape(output.shape[0], -1, output.shape[-1]).mean(dim=1)
    if token_mode == "flatten":
        return output.reshape(output.shape[0], -1)
    raise ValueError(f"Expected `token_mode` to be one of {TOKEN_MODES}, but got {token_mode!r}")


def rows_per_sample(shape: Sequence[int], layout: str, token_mode: str, batch: Optional[int] = None) -> int:
    """Rows one sample contributes: its token count for ``"tokens"`` outputs read with ``token_mode="samples"``,
    else 1."""
    if layout != "tokens" or token_mode != "samples" or len(shape) < 3:
        return 1
    shape = list(shape)
    if batch is not None and len(shape) == 3 and shape[0] != batch and shape[1] == batch:
        shape[0], shape[1] = shape[1], shape[0]
    return int(math.prod(shape[1:-1]))


def subsample_columns(width: int, keep: int, key: str) -> torch.Tensor:
    """Sorted indices of ``keep`` of ``width`` columns, seeded by ``key`` (e.g. the layer name) and the sizes: the
    same subset at every call, in every process."""
    seed = zlib.crc32(f"{key}|{width}|{keep}".encode())
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(width, generator=generator)[:keep].sort().values


def pooled(output: torch.Tensor, cap: int) -> torch.Tensor:
    """A channel-first ``(batch, C, *spatial)`` output adaptively average-pooled to the largest square (cube) grid
    with ``C * grid <= cap`` (global average when even ``C`` is more than ``cap``), flattened."""
    if output[0].numel() > cap:
        channels, spatial = output.shape[1], output.ndim - 2
        side = max(1, int(math.floor((cap / channels) ** (1 / spatial))))
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}.get(spatial)
        if pool is not None:
            output = pool(output, side)
    return output.reshape(output.shape[0], -1)


class FeatureReducer:
    """One layer's output to at most ``cap`` feature columns: the layout's rows (`token_rows`, `pooled`), then a
    seeded subsample of the columns (`subsample_columns`) when still wider than ``cap``.

    Args:
        name: The layer name (seeds the subsample).
        layout: ``"flat"``, ``"channels"`` or ``"tokens"`` (see `infer_layouts`).
        token_mode: One of `TOKEN_MODES`.
        cap: Most columns kept.
    """

    def __init__(self, name: str, layout: str, token_mode: str, cap: int) -> None:
        if layout not in ("flat", "channels", "tokens"):
            raise ValueError(f"Expected `layout` to be 'flat', 'channels' or 'tokens', but got {layout!r}")
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"Expected `token_mode` to be one of {TOKEN_MODES}, but got {token_mode!r}")
        self.name, self.layout, self.token_mode, self.cap = name, layout, token_mode, int(cap)
        self._index: Optional[torch.Tensor] = None

    def __call__(self, output: torch.Tensor, batch: Optional[int] = None) -> torch.Tensor:
        if self.layout == "channels" and output.ndim > 2:
            rows = pooled(output, self.cap)
        else:
            rows = token_rows(output, self.layout, self.token_mode, batch)
        if rows.shape[1] <= self.cap:
            return rows
        if self._index is None or self._index.device != rows.device:
            self._index = subsample_columns(rows.shape[1], self.cap, self.name).to(rows.device)
        return rows.index_select(1, self._index)

    def width(self, shape: Sequence[int], batch: Optional[int] = None) -> int:
        """Columns kept from an output of ``shape``."""
        return int(self(torch.zeros(shape, device="meta"), batch).shape[1])

    def full_width(self, shape: Sequence[int], batch: Optional[int] = None) -> int:
        """Columns before any reduction (pooling or subsample)."""
        return int(token_rows(torch.zeros(shape, device="meta"), self.layout, self.token_mode, batch).shape[1])


def fit_cap(widths: Sequence[int], budget: int) -> Optional[int]:
    """The largest per-layer cap ``c`` with ``sum(min(w, c)) <= budget`` (water-filling: only the widest layers
    are cut); ``None`` when even ``c = 1`` does not fit."""
    if not widths:
        return None
    if sum(widths) <= budget:
        return max(widths)
    if len(widths) > budget:
        return None
    low, high = 1, max(widths)  # sum(min(w, low)) <= budget < sum(min(w, high))
    while high - low > 1:
        middle = (low + high) // 2
        if sum(min(w, middle) for w in widths) <= budget:
            low = middle
        else:
            high = middle
    return low
