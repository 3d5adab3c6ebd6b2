"""Per-sample gradients from `torch.func` against a loop of single-sample backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.functional.per_sample import (
    chunk_size_for,
    eval_mode,
    per_sample_bytes,
    per_sample_gradients,
    stack_chunks,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # (N, T, 3)
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


def _conv():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)), (6,)),
    "conv_groupnorm_batchnorm": (_conv, (1, 8, 8)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4)), (6,)),
    "attention": (Attention, (5, 3)),
}


def _loop(model, x, y):
    out = {n: [] for n, _ in model.named_parameters()}
    losses = []
    for i in range(len(x)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        losses.append(loss.detach())
        for n, p in model.named_parameters():
            out[n].append(p.grad.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}, torch.stack(losses)


@pytest.mark.parametrize("case", list(MODELS))
@pytest.mark.parametrize("chunk", [None, 3])
def test_per_sample_gradients_equal_a_loop(case, chunk):
    torch.manual_seed(0)
    make, shape = MODELS[case]
    model = make().double()
    x = torch.randn(7, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    model(x[:2])  # shape lazy layers; batch norm gets running statistics from a train-mode forward
    with eval_mode(model):
        grads, losses = stack_chunks(list(per_sample_gradients(model, (x, y), chunk_size=chunk)))
        ref, ref_losses = _loop(model, x, y)
    assert model.training  # the mode is restored
    torch.testing.assert_close(losses, ref_losses)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12)


def test_eval_mode_leaves_batch_norm_buffers_alone():
    model = _conv().double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model(x)
    before = {n: b.clone() for n, b in model.named_buffers()}
    with eval_mode(model):
        list(per_sample_gradients(model, (x, torch.zeros(4, dtype=torch.long))))
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_fixed_parameters_and_chunk_size():
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    params = {"weight": model.weight.detach()}
    grads, _ = stack_chunks(list(per_sample_gradients(model, (x, y), params=params, chunk_size=2)))
    assert list(grads) == ["weight"] and grads["weight"].shape == (5, 2, 3)
    per = per_sample_bytes(params)
    assert per == 3 * 6 * 4
    assert chunk_size_for(None, per, 5) == 5
    assert chunk_size_for(2 * per + 1, per, 5) == 2
    assert chunk_size_for(1, per, 5) == 1
    assert chunk_size_for(10**9, per, 5) == 5
