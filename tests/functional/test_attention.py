"""Attention statistics of sampled query rows against a plain softmax computed by hand in NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.functional.attention import (
    attention_row_summary,
    attention_stats,
    mha_row_summary,
    sample_query_rows,
    sdpa_row_summary,
)


def reference(q: np.ndarray, k: np.ndarray, visible: np.ndarray, bias: np.ndarray | None = None,
              scale: float | None = None) -> dict[str, np.ndarray]:
    """Per-head statistics of every row, by hand: q (N, H, L, d), k (N, H, S, d), visible (N, H, L, S) bools."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("nhld,nhsd->nhls", q, k) * scale
    z = logits + (0.0 if bias is None else np.where(visible, bias, 0.0))
    z = np.where(visible, z, -np.inf)
    out = {k_: [] for k_ in ("entropy_mean", "entropy_min", "entropy_norm_mean", "max_logit", "sink_mass", "queries")}
    for h in range(q.shape[1]):
        ents, norms, sinks, maxes, mins = [], [], [], [], []
        for n in range(q.shape[0]):
            for t in range(q.shape[2]):
                vis = visible[n, h, t]
                if not vis.any():
                    continue
                e = np.exp(z[n, h, t] - z[n, h, t][vis].max())
                p = e / e.sum()
                ent = -sum(x * math.log(x) for x in p if x > 0)
                ents.append(ent)
                sinks.append(p[0])
                maxes.append(logits[n, h, t][vis].max())
                if vis.sum() > 1:
                    norms.append(ent / math.log(vis.sum()))
                    mins.append(ent)
        out["queries"].append(len(ents))
        out["entropy_mean"].append(np.mean(ents))
        out["entropy_min"].append(min(mins) if mins else np.nan)
        out["entropy_norm_mean"].append(np.mean(norms) if norms else np.nan)
        out["max_logit"].append(max(maxes))
        out["sink_mass"].append(np.mean(sinks))
    return {k_: np.array(v, dtype=float) for k_, v in out.items()}


def check(stats: dict[str, torch.Tensor], ref: dict[str, np.ndarray], rel: float = 1e-9) -> None:
    for key, want in ref.items():
        got = stats[key].numpy()
        np.testing.assert_allclose(got, want, rtol=rel, atol=1e-12, err_msg=key)


def mha_reference(m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, *, batch_first: bool,
                  attn_mask=None, key_padding_mask=None, causal: bool = False) -> dict[str, np.ndarray]:
    """q and k from the module's weights in NumPy; masks applied by hand (bool True = masked, float added)."""
    x, y = query.detach().numpy(), key.detach().numpy()
    if not batch_first:
        x, y = x.transpose(1, 0, 2), y.transpose(1, 0, 2)  # (N, L, E)
    e, h = m.embed_dim, m.num_heads
    w = m.in_proj_weight.detach().numpy()
    b = m.in_proj_bias.detach().numpy()
    q = x @ w[:e].T + b[:e]
    k = y @ w[e:2 * e].T + b[e:2 * e]
    n, length, _ = q.shape
    s = k.shape[1]
    q = q.reshape(n, length, h, e // h).transpose(0, 2, 1, 3)
    k = k.reshape(n, s, h, e // h).transpose(0, 2, 1, 3)
    visible = np.ones((n, h, length, s), dtype=bool)
    bias = np.zeros((n, h, length, s))
    if causal:
        visible &= np.tril(np.ones((length, s), dtype=bool))
    if attn_mask is not None:
        am = attn_mask.numpy()
        if am.dtype == bool:
            visible &= ~am
        else:
            visible &= am > -1e4
            bias = bias + np.where(am > -1e4, am, 0.0)
    if key_padding_mask is not None:
        visible &= ~key_padding_mask.numpy()[:, None, None, :]
    return reference(q, k, visible, bias)


def _mha(batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(8, 2, batch_first=batch_first).double()
    with torch.no_grad():
        m.in_proj_bias.normal_()
    return m


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal_bool", "causal_float", "padding", "causal_and_padding"])
def test_mha_statistics_equal_a_plain_softmax(batch_first, masks):
    m = _mha(batch_first)
    n, length = 3, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, length, 8, generator=g, dtype=torch.float64) * 2
    inputs = x if batch_first else x.transpose(0, 1)
    causal_bool = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    kwargs = {}
    if masks in ("causal_bool", "causal_and_padding"):
        kwargs["attn_mask"] = causal_bool
    if masks == "causal_float":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    if masks in ("padding", "causal_and_padding"):
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    sums, maxima = mha_row_summary(m, inputs, inputs, kwargs.get("key_padding_mask"), kwargs.get("attn_mask"))
    check(attention_stats(sums, maxima), mha_reference(m, inputs, inputs, batch_first=batch_first, **kwargs))
    # The module's own attention weights (need_weights=True) agree: the masks mean what PyTorch means by them.
    _, weights = m(inputs, inputs, inputs, need_weights=True, average_attn_weights=False, **kwargs)
    sink = weights[..., 0].mean(dim=(0, 2)).detach().numpy()
    np.testing.assert_allclose(attention_stats(sums, maxima)["sink_mass"].numpy(), sink, rtol=1e-10)


def test_mha_is_causal_hint_without_weights_uses_the_causal_mask():
    m = _mha(True)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    sums, maxima = mha_row_summary(m, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    check(attention_stats(sums, maxima), mha_reference(m, x, x, batch_first=True, causal=True))


def test_mha_cross_attention_with_separate_key_width_bias_k_and_zero_attention():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 4, kdim=6, vdim=6, add_bias_kv=True, add_zero_attn=True, batch_first=True).double()
    query, key = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    sums, maxima = mha_row_summary(m, query, key, key_padding_mask=padding)
    _, w = m(query, key, key, key_padding_mask=padding,
             average_attn_weights=False)  # (N, H, L, S + 2)
    w = w.detach().numpy()
    ent = -np.where(w > 0, w * np.log(np.where(w > 0, w, 1)), 0).sum(-1)
    stats = attention_stats(sums, maxima)
    np.testing.assert_allclose(stats["entropy_mean"].numpy(), ent.mean(axis=(0, 2)), rtol=1e-10)
    np.testing.assert_allclose(stats["sink_mass"].numpy(), w[..., 0].mean(axis=(0, 2)), rtol=1e-10)
    # The maximum logit by hand: q and k with the separate projections, bias_k appended, the zero key appended.
    q = query.numpy() @ m.q_proj_weight.detach().numpy().T + m.in_proj_bias.detach().numpy()[:8]
    k = key.numpy() @ m.k_proj_weight.detach().numpy().T + m.in_proj_bias.detach().numpy()[8:16]
    k = np.concatenate([k, np.broadcast_to(m.bias_k.detach().numpy(), (2, 1, 8)), np.zeros((2, 1, 8))], axis=1)
    logits = np.einsum("nlhd,nshd->nhls", q.reshape(2, 3, 4, 2), k.reshape(2, 9, 4, 2)) / math.sqrt(2)
    logits[1, :, :, 5:7] = -np.inf  # the padded keys
    np.testing.assert_allclose(stats["max_logit"].numpy(), logits.max(axis=(0, 2, 3)), rtol=1e-10)


def test_sampled_rows_and_chunks_give_the_statistics_of_those_rows():
    m = _mha(True)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    b, t = sample_query_rows(4, 6, 7, torch.Generator().manual_seed(5))
    assert len(b) == 7 and len(set(zip(b.tolist(), t.tolist()))) == 7
    whole = mha_row_summary(m, x, x, max_queries=7, generator=torch.Generator().manual_seed(5))
    chunked = mha_row_summary(m, x, x, max_queries=7, generator=torch.Generator().manual_seed(5), max_bytes=1)
    for a, c in zip(whole, chunked):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    # By hand on the drawn rows.
    e = 8
    w, bias = m.in_proj_weight.detach().numpy(), m.in_proj_bias.detach().numpy()
    q = (x.numpy() @ w[:e].T + bias[:e]).reshape(4, 6, 2, 4)
    k = (x.numpy() @ w[e:2 * e].T + bias[e:2 * e]).reshape(4, 6, 2, 4)
    rows = np.stack([q[i, j] for i, j in zip(b.tolist(), t.tolist())])[:, :, None, :]  # (R, H, 1, d)
    keys = np.stack([k[i] for i in b.tolist()]).transpose(0, 2, 1, 3)  # (R, H, S, d)
    want = reference(rows, keys, np.ones((7, 2, 1, 6), dtype=bool))
    check(attention_stats(*whole), want)


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa", "three_dims"])
def test_sdpa_statistics_equal_a_plain_softmax(case):
    g = torch.Generator().manual_seed(2)
    n, h, length, s, d = 2, 4, 5, 7, 3
    q = torch.randn(n, h, length, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(n, h, s, d, generator=g, dtype=torch.float64)
    visible = np.ones((n, h, length, s), dtype=bool)
    bias, mask, kwargs, scale = None, None, {}, None
    if case == "bool_mask":
        mask = torch.rand(n, 1, length, s, generator=g) > 0.3
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
        visible &= mask.numpy()
    elif case == "float_mask":
        mask = torch.randn(length, s, generator=g, dtype=torch.float64)
        mask[1, 2:] = float("-inf")
        kwargs["attn_mask"] = mask
        visible &= np.isfinite(mask.numpy())
        bias = np.broadcast_to(np.where(np.isfinite(mask.numpy()), mask.numpy(), 0.0), visible.shape)
    elif case == "causal":
        kwargs["is_causal"] = True
        visible &= np.tril(np.ones((length, s), dtype=bool))
    elif case == "scale":
        kwargs["scale"] = scale = 0.37
    sums, maxima = None, None
    if case == "gqa":
        k2 = torch.randn(n, 2, s, d, generator=g, dtype=torch.float64)
        sums, maxima = sdpa_row_summary(q, k2)
        k = k2.repeat_interleave(2, dim=1)  # query head j reads key head j // 2
    elif case == "three_dims":
        sums, maxima = sdpa_row_summary(q[:, 0], k[:, 0])
        q, k, visible = q[:, :1], k[:, :1], visible[:, :1]
    else:
        sums, maxima = sdpa_row_summary(q, k, kwargs.get("attn_mask"), kwargs.get("is_causal", False), scale)
    check(attention_stats(sums, maxima), reference(q.numpy(), k.numpy(), visible, bias, scale))
    if case in ("plain", "bool_mask", "causal"):  # the same attention as SDPA computes
        v = torch.eye(s, dtype=torch.float64).expand(n, h, s, s)
        p = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)  # (N, H, L, S): the weights
        np.testing.assert_allclose(attention_stats(sums, maxima)["sink_mass"].numpy(),
                                   p[..., 0].mean(dim=(0, 2)).numpy(), rtol=1e-10)


def test_masked_rows_and_large_negative_masks():
    logits = torch.tensor([[[1.0, 2.0, 3.0]], [[0.5, 9.0, 0.0]]], dtype=torch.float64)  # (R=2, H=1, S=3)
    bias = torch.tensor([[[0.0, 0.0, float("-inf")]], [[-1e9, -1e9, -1e9]]], dtype=torch.float64)
    sums, maxima = attention_row_summary(logits, bias)
    stats = attention_stats(sums, maxima)
    p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    assert stats["queries"].item() == 1  # the fully masked row is left out
    assert stats["entropy_mean"].item() == pytest.approx(-(p * np.log(p)).sum())
    assert stats["entropy_norm_mean"].item() == pytest.approx(-(p * np.log(p)).sum() / math.log(2))
    assert stats["max_logit"].item() == 2.0  # the masked key's logit (3) is not counted
    assert stats["sink_mass"].item() == pytest.approx(p[0])
    empty = attention_stats(*attention_row_summary(torch.zeros(0, 2, 4)))
    assert torch.isnan(empty["entropy_mean"]).all() and (empty["queries"] == 0).all()


def test_float32_inputs_are_computed_in_float32_and_agree():
    m = _mha(True).float()
    x = torch.randn(2, 5, 8)
    sums, _ = mha_row_summary(m, x.half().float(), x.half().float())
    assert sums.dtype == torch.float32
    sums64, _ = mha_row_summary(m.double(), x.half().double(), x.half().double())
    torch.testing.assert_close(sums.double(), sums64, rtol=1e-5, atol=1e-5)
