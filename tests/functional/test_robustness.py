"""The layout-free pieces of `NoiseRobustnessMonitor`: class scores, agreement, KL, noise in the embedding space."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.functional.robustness import (
    agreement,
    class_scores,
    embedding_noise,
    embedding_std,
    find_input_embeddings,
    kl_per_position,
    resolve_class_dim,
)


def test_one_logit_scores_predict_the_sign_and_softmax_to_the_sigmoid():
    z = torch.tensor([-2.0, -0.0, 0.0, 0.5, 3.0])
    for logits in (z, z[:, None]):
        scores = class_scores(logits)
        assert scores.shape == (5, 2, 1)
        assert scores.argmax(1).flatten().tolist() == [0, 0, 0, 1, 1]  # class 1 exactly when z > 0
        p = scores.softmax(1)[:, 1, 0].numpy()
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-z.numpy())), rtol=1e-6)


def test_dense_scores_put_the_classes_on_axis_one_and_the_positions_last():
    logits = torch.randn(2, 3, 4, 5)
    scores = class_scores(logits)
    assert scores.shape == (2, 3, 20)
    np.testing.assert_array_equal(scores[1, :, 7].numpy(), logits[1, :, 1, 2].numpy())  # position 7 = (1, 2)
    seq = torch.randn(2, 6, 3)  # (N, T, C)
    np.testing.assert_array_equal(class_scores(seq, class_dim=-1)[0, :, 4].numpy(), seq[0, 4].numpy())
    assert class_scores(torch.randn(2, 1, 4, 4)).shape == (2, 2, 16)  # one-logit binary segmentation


def test_resolve_class_dim():
    assert resolve_class_dim(2, None) == 1 and resolve_class_dim(4, None) == 1 and resolve_class_dim(1, None) == 1
    assert resolve_class_dim(3, None) is None  # (N, C, L) or (N, T, C): ambiguous
    assert resolve_class_dim(3, -1) == 2 and resolve_class_dim(3, 1) == 1
    for bad in (0, 3, -3, True):
        with pytest.raises(ValueError, match="`class_dim`"):
            resolve_class_dim(3, bad)


def test_agreement_and_kl_against_numpy():
    g = torch.Generator().manual_seed(0)
    clean, noisy = torch.randn(4, 3, 10, generator=g), torch.randn(4, 3, 10, generator=g)
    c, n = clean.numpy().astype(float), noisy.numpy().astype(float)
    expected = (c.argmax(1) == n.argmax(1)).mean(1)
    np.testing.assert_allclose(agreement(clean.argmax(1), noisy).numpy(), expected)

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    lp, lq = log_softmax(c), log_softmax(n)
    np.testing.assert_allclose(kl_per_position(clean, noisy).numpy(), (np.exp(lp) * (lp - lq)).sum(1).mean(1),
                               rtol=1e-10)
    # One logit: the KL divergence of two Bernoulli distributions.
    z0, z1 = torch.tensor([0.3, -1.0]), torch.tensor([1.2, 0.4])
    p, q = 1 / (1 + np.exp(-z0.double().numpy())), 1 / (1 + np.exp(-z1.double().numpy()))
    bernoulli = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    np.testing.assert_allclose(kl_per_position(class_scores(z0), class_scores(z1)).numpy(), bernoulli, rtol=1e-10)


class _TwoUses(nn.Module):
    """One embedding called on the input ids twice and on other ids once; the output head is tied to it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.other = nn.Embedding(10, 4)

    def forward(self, ids):
        first, again = self.embed(ids), self.embed(ids)
        shifted = self.embed((ids + 1) % 10)
        return first, again, shifted, self.other((ids + 2) % 10)


def test_find_input_embeddings_records_only_embeddings_called_on_the_input():
    model, ids = _TwoUses(), torch.randint(0, 10, (3, 5))
    with find_input_embeddings(model, ids) as found:
        model(ids)
    assert [name for name, _ in found] == ["embed"]
    with find_input_embeddings(model, ids) as found:
        model(ids.clone())  # the same values in another tensor count too
    assert [name for name, _ in found] == ["embed"]
    assert not model.embed._forward_hooks  # hooks removed


def test_embedding_noise_perturbs_the_input_use_once_and_nothing_else():
    model, ids = _TwoUses(), torch.randint(0, 10, (3, 5))
    clean = model(ids)
    generator = torch.Generator().manual_seed(3)
    with embedding_noise(model.embed, ids, 0.5, generator):
        first, again, shifted, other = model(ids)
    expected = clean[0] + 0.5 * torch.randn((3, 5, 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(again, expected)  # the same input embedded again: the same noise
    torch.testing.assert_close(shifted, clean[2])  # other ids: untouched
    torch.testing.assert_close(other, clean[3])
    assert not model.embed._forward_hooks
    torch.testing.assert_close(model(ids)[0], clean[0])


def test_embedding_std():
    embedding = nn.Embedding(50, 8)
    assert embedding_std(embedding) == pytest.approx(float(embedding.weight.detach().double().std()))
