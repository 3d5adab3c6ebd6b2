"""Attention statistics of sampled query rows: entropy, maximum pre-softmax logit, mass on the first key.

The probe (`lightning_probes.callbacks.AttentionMonitor`) recomputes the attention scores of a sample of query
rows, ``(batch element, query position)`` pairs, against every key of their sequence:

- ``logits = scale * q . k`` (``scale`` = ``1/sqrt(head_dim)`` unless given), ``(rows, heads, keys)``;
- ``bias``, the additive mask of those rows (``0`` where a key takes part, ``-inf`` where it is masked; a float
  mask as given). A key is *visible* where its bias is above `MASKED_BELOW` (``-1e4``: the large negative
  constants models mask with, ``finfo.min`` or ``-1e9``, count as masked);
- ``p = softmax(logits + bias)`` over the keys.

Per head, over the sampled rows that see at least one key: the entropy ``H = -sum_k p_k log p_k`` (nats; its
sum; its minimum over the rows that see at least 2 keys, since a row that sees one key has ``H = 0`` whatever
the model does, as the first position under a causal mask), ``H / log(n)`` with ``n`` the keys the row sees
(rows that see at least 2), ``p_0`` (the mass on key 0, the "sink") and the maximum of ``logits`` over
visible keys (the quantity QK-clip bounds; the additive mask is not part of it). `attention_row_summary`
returns them as partial sums and maxima that add and max over chunks of rows, calls and ranks;
`attention_stats` turns them into the reported means.

`mha_row_summary` and `sdpa_row_summary` compute the partials for ``nn.MultiheadAttention`` (from its inputs,
weights and masks, as ``torch.nn.functional.multi_head_attention_forward`` uses them) and for the arguments of
one ``torch.nn.functional.scaled_dot_product_attention`` call, chunked over rows so that the temporaries of a
chunk stay under ``max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ATTENTION_MAXIMA", "ATTENTION_SUMS", "MASKED_BELOW", "attention_row_summary", "attention_stats",
           "canonical_mask", "mha_row_summary", "sample_query_rows", "sdpa_row_summary"]

#: Columns of the partial sums (per head): entropy sum, rows, normalised-entropy sum, rows seeing >= 2 keys, sink sum.
ATTENTION_SUMS = ("entropy_sum", "rows", "entropy_norm_sum", "rows_norm", "sink_sum")
#: Columns of the partial maxima (per head): maximum logit, minus the minimum entropy (rows seeing >= 2 keys).
ATTENTION_MAXIMA = ("max_logit", "neg_entropy_min")
#: An additive mask entry at or below this counts as masking the key (``-inf``, ``finfo.min``, ``-1e9``).
MASKED_BELOW = -1e4


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when every tensor is float64, else float32 (half precision is promoted)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def sample_query_rows(batch: int, queries: int, max_queries: Optional[int],
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch index, query position)`` of ``max_queries`` rows drawn without replacement from ``batch x queries``
    (all of them when ``max_queries`` is ``None`` or not smaller), sorted by batch element then position.

    Args:
        batch: Batch elements.
        queries: Query positions per element.
        max_queries: Rows to draw; ``None``: every row.
        generator: CPU generator of the draw (the global random state is never used).

    Returns:
        Two int64 CPU tensors of the drawn rows' batch indices and positions.
    """
    total = batch * queries
    if max_queries is None or max_queries >= total:
        flat = torch.arange(total)
    else:
        flat = torch.randperm(total, generator=generator)[:max_queries].sort().values
    return flat // queries, flat % queries


def canonical_mask(mask: Optional[torch.Tensor], dtype: torch.dtype, attend_where_true: bool) -> Optional[torch.Tensor]:
    """An attention mask as an additive float mask of ``dtype``: a boolean mask becomes ``0`` / ``-inf``
    (``attend_where_true``: ``True`` means the key takes part, as in SDPA; else ``True`` means masked, as in
    ``nn.MultiheadAttention``); a float mask is cast."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        allowed = mask if attend_where_true else ~mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, float("-inf"))
    return mask.to(dtype)


def attention_row_summary(logits: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """Per-head partial statistics of sampled query rows.

    Args:
        logits: ``(rows, heads, keys)`` scaled scores ``scale * q . k`` (float32 or float64).
        bias: Additive mask broadcastable to ``logits`` (``-inf`` or <= `MASKED_BELOW` where masked), or ``None``.

    Returns:
        ``sums`` ``(heads, 5)`` (columns `ATTENTION_SUMS`) and ``maxima`` ``(heads, 2)`` (columns
        `ATTENTION_MAXIMA`; ``-inf`` for a head without a row), in the dtype of ``logits``.
    """
    if bias is None:
        visible = torch.ones_like(logits, dtype=torch.bool)
        z = logits
    else:
        bias = bias.to(logits.dtype)
        visible = (bias > MASKED_BELOW).expand_as(logits)
        z = logits + bias
    z = z.masked_fill(~visible, float("-inf"))  # masked keys get no mass, whatever their bias
    seen = visible.sum(-1)  # (rows, heads) keys each row sees
    row_ok = seen > 0
    p = torch.softmax(z.masked_fill(~row_ok.unsqueeze(-1), 0.0), dim=-1)  # a fully masked row: finite, left out
    entropy = torch.special.entr(p).sum(-1)  # (rows, heads), nats
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    norm_ok = seen > 1
    norm = torch.where(norm_ok, entropy / seen.clamp_min(2).to(logits.dtype).log(), zero)
    sums = torch.stack([torch.where(row_ok, entropy, zero).sum(0), row_ok.sum(0).to(logits.dtype),
                        norm.sum(0), norm_ok.sum(0).to(logits.dtype),
                        torch.where(row_ok, p[..., 0], zero).sum(0)], dim=1)
    neg_inf = torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    max_logit = torch.where(visible, logits, neg_inf).amax(dim=(0, 2)) if logits.shape[0] else \
        neg_inf.expand(logits.shape[1])
    neg_min = torch.where(norm_ok, -entropy, neg_inf).amax(0) if logits.shape[0] else neg_inf.expand(logits.shape[1])
    return sums, torch.stack([max_logit, neg_min], dim=1)


def attention_stats(sums: torch.Tensor, maxima: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reported statistics from (combined) partials, per head, float64 on the host side of the caller.

    Args:
        sums: ``(heads, 5)`` summed partials (`ATTENTION_SUMS`).
        maxima: ``(heads, 2)`` maxed partials (`ATTENTION_MAXIMA`).

    Returns:
        ``{"queries", "entropy_mean", "entropy_min", "entropy_norm_mean", "max_logit", "sink_mass"}``, each
        ``(heads,)``; NaN where a head had no row (no row seeing 2 keys for ``entropy_norm_mean`` and
        ``entropy_min``).
    """
    sums, maxima = sums.double(), maxima.double()
    rows, rows_norm = sums[:, 1], sums[:, 3]
    nan = torch.full_like(rows, float("nan"))
    some, some_norm = rows > 0, rows_norm > 0
    return {"queries": rows,
            "entropy_mean": torch.where(some, sums[:, 0] / rows.clamp_min(1), nan),
            "entropy_min": torch.where(some_norm, -maxima[:, 1], nan),
            "entropy_norm_mean": torch.where(some_norm, sums[:, 2] / rows_norm.clamp_min(1), nan),
            "max_logit": torch.where(some, maxima[:, 0], nan),
            "sink_mass": torch.where(some, sums[:, 4] / rows.clamp_min(1), nan)}


def _merge(total: Optional[tuple[torch.Tensor, torch.Tensor]],
           part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if total is None:
        return part
    return total[0] + part[0], torch.maximum(total[1], part[1])


def _chunks(rows: int, per_row: int, max_bytes: Optional[int]) -> list[tuple[int, int]]:
    size = rows if max_bytes is None else max(1, min(rows, max_bytes // max(1, per_row)))
    return [(i, min(rows, i + size)) for i in range(0, rows, size)]


def _empty(heads: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(heads, len(ATTENTION_SUMS), dtype=dtype, device=device),
            torch.full((heads, len(ATTENTION_MAXIMA)), float("-inf"), dtype=dtype, device=device))


@torch.no_grad()
def mha_row_summary(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                    key_padding_mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                    is_causal: bool = False, need_weights: bool = True, max_queries: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    max_bytes: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_row_summary` of sampled query rows of one ``nn.MultiheadAttention`` call.

    Recomputes ``q`` (of the sampled rows) and ``k`` (of their sequences) from the call's inputs with the module's
    in-projection (packed or separate weights, ``bias_k``, ``add_zero_attn``), splits the heads, scales by
    ``1/sqrt(head_dim)`` and applies the call's masks as ``multi_head_attention_forward`` does (a boolean
    ``attn_mask``/``key_padding_mask`` masks where ``True``; a float one is added; with ``is_causal`` and neither
    ``key_padding_mask`` nor ``need_weights``, PyTorch uses a causal mask in place of ``attn_mask``, and so does
    this). Attention dropout is not applied: the statistics are those of the attention weights before dropout.

    Args:
        module: The attention module (its ``batch_first`` decides the input layout).
        query: The call's ``query``, ``(N, L, E)`` with ``batch_first`` else ``(L, N, E)``; or unbatched ``(L, E)``.
        key: The call's ``key``, laid out as ``query``.
        key_padding_mask: ``(N, S)`` (or ``(S,)`` unbatched), or ``None``.
        attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``, or ``None``.
        is_causal: The call's ``is_causal`` hint.
        need_weights: The call's ``need_weights``.
        max_queries: Query rows drawn (`sample_query_rows`); ``None``: every row.
        generator: CPU generator of the draw.
        max_bytes: Bound on a chunk's temporaries (rows are processed in chunks; at least one row per chunk).

    Returns:
        ``(sums, maxima)`` of shapes ``(num_heads, 5)`` and ``(num_heads, 2)``.
    """
    batched = query.dim() == 3
    if not batched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    tgt_len, bsz, _ = query.shape
    src_len = key.shape[0]
    heads, embed = module.num_heads, module.embed_dim
    head_dim = embed // heads
    dtype = _work_dtype(query, key)
    device = query.device
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed:2 * embed]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k = module.in_proj_bias[:embed], module.in_proj_bias[embed:2 * embed]
    w_q, w_k = w_q.to(dtype), w_k.to(dtype)
    b_q = None if b_q is None else b_q.to(dtype)
    b_k = None if b_k is None else b_k.to(dtype)
    extra = int(module.bias_k is not None) + int(module.add_zero_attn)
    keys = src_len + extra
    causal = is_causal and key_padding_mask is None and not need_weights
    mask = None if causal else canonical_mask(attn_mask, dtype, attend_where_true=False)
    pad = canonical_mask(key_padding_mask, dtype, attend_where_true=False)
    b_idx, t_idx = sample_query_rows(bsz, tgt_len, max_queries, generator)
    b_idx, t_idx = b_idx.to(device), t_idx.to(device)
    total = _empty(heads, dtype, device) if b_idx.numel() == 0 else None
    item = torch.finfo(dtype).bits // 8
    per_row = item * keys * (key.shape[-1] + 2 * embed + 4 * heads)
    for lo, hi in _chunks(b_idx.numel(), per_row, max_bytes):
        b, t = b_idx[lo:hi], t_idx[lo:hi]
        q = F.linear(query[t, b].to(dtype), w_q, b_q).view(-1, heads, head_dim)  # (R, H, d)
        elements, inverse = torch.unique(b, return_inverse=True)
        k = F.linear(key[:, elements].to(dtype), w_k, b_k)  # (S, U, E)
        if module.bias_k is not None:
            k = torch.cat([k, module.bias_k.to(dtype).expand(1, k.shape[1], embed)])
        k = k.view(k.shape[0], -1, heads, head_dim).permute(1, 2, 0, 3)  # (U, H, S', d)
        if module.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[0], heads, 1, head_dim)], dim=2)
        logits = torch.einsum("rhd,rhsd->rhs", q, k[inverse]) / math.sqrt(head_dim)  # (R, H, S'')
        bias = torch.zeros(1, 1, keys, dtype=dtype, device=device)
        if causal:
            positions = torch.arange(keys, device=device)
            bias = torch.zeros(t.numel(), 1, keys, dtype=dtype, device=device).masked_fill_(
                positions.view(1, 1, -1) > t.view(-1, 1, 1), float("-inf"))
        if mask is not None:
            if mask.dim() == 2:
                rows = mask[t].unsqueeze(1)  # (R, 1, S)
            else:
                rows = mask.view(bsz, heads, tgt_len, src_len)[b, :, t]  # (R, H, S)
            bias = bias + F.pad(rows, (0, extra))
        if pad is not None:
            bias = bias + F.pad(pad[b], (0, extra)).unsqueeze(1)  # (R, 1, S'')
        total = _merge(total, attention_row_summary(logits, bias))
    return total


@torch.no_grad()
def sdpa_row_summary(query: torch.Tensor, key: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                     is_causal: bool = False, scale: Optional[float] = None, max_queries: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     max_bytes: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_row_summary` of sampled query rows of one ``scaled_dot_product_attention(query, key, ...)`` call.

    ``query`` is ``(..., heads, L, d)`` (every dimension before the heads is a batch dimension; a 3-D query
    ``(N, L, d)`` has one head), ``key`` ``(..., heads_k, S, d)``; with fewer key heads than query heads
    (grouped-query attention, ``enable_gqa``) query head ``h`` reads key head ``h // (heads / heads_k)``.
    ``attn_mask`` (broadcastable to ``(..., heads, L, S)``) is boolean (``True``: the key takes part) or added;
    ``is_causal`` masks keys after the query position (top-left aligned, as SDPA does); ``scale`` defaults to
    ``1/sqrt(d)``. Dropout is not applied.

    Args:
        query: The call's query.
        key: The call's key.
        attn_mask: The call's ``attn_mask``.
        is_causal: The call's ``is_causal``.
        scale: The call's ``scale``.
        max_queries: Query rows ``(batch element, position)`` drawn; ``None``: every row.
        generator: CPU generator of the draw.
        max_bytes: Bound on a chunk's temporaries.

    Returns:
        ``(sums, maxima)`` of shapes ``(heads, 5)`` and ``(heads, 2)``.
    """
    if query.dim() == 3:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    lead = tuple(query.shape[:-3])
    heads, tgt_len, head_dim = query.shape[-3:]
    key_heads, src_len = key.shape[-3], key.shape[-2]
    if heads % key_heads:
        raise ValueError(f"sdpa_row_summary: {heads} query heads are not a multiple of {key_heads} key heads")
    key = key.expand(*lead, key_heads, src_len, head_dim)
    dtype = _work_dtype(query, key)
    device = query.device
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    mask = canonical_mask(attn_mask, dtype, attend_where_true=True)
    if mask is not None:
        mask = mask.expand(*lead, heads, tgt_len, src_len)  # a view: rows are gathered from it
    batch = math.prod(lead)
    b_idx, t_idx = sample_query_rows(batch, tgt_len, max_queries, generator)
    b_idx, t_idx = b_idx.to(device), t_idx.to(device)
    total = _empty(heads, dtype, device) if b_idx.numel() == 0 else None
    item = torch.finfo(dtype).bits // 8
    per_row = item * src_len * (key_heads * head_dim + 4 * heads)
    for lo, hi in _chunks(b_idx.numel(), per_row, max_bytes):
        b, t = b_idx[lo:hi], t_idx[lo:hi]
        index: Sequence[torch.Tensor] = torch.unravel_index(b, lead) if lead else ()
        q = query[(*index, slice(None), t)].to(dtype)  # (R, H, d)
        k = key[tuple(index)].to(dtype)  # (R, H_k, S, d)
        if key_heads != heads:
            k = k.repeat_interleave(heads // key_heads, dim=1)
        logits = torch.einsum("rhd,rhsd->rhs", q, k) * scale  # (R, H, S)
        bias = None
        if mask is not None:
            bias = mask[(*index, slice(None), t)]  # (R, H, S)
        if is_causal:
            positions = torch.arange(src_len, device=device)
            causal = torch.zeros(t.numel(), 1, src_len, dtype=dtype, device=device).masked_fill_(
                positions.view(1, 1, -1) > t.view(-1, 1, 1), float("-inf"))
            bias = causal if bias is None else bias + causal
        total = _merge(total, attention_row_summary(logits, bias))
    return total
