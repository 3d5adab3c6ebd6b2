"""`noise_profile_features` against a plain-Python recomputation (loops, a hand-written pool-adjacent-violators fit
with NumPy interpolation for the isotonic column)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_probes.functional import NOISE_PROFILE_COLUMNS, noise_profile_features


def _pava(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Increasing least-squares fit of y on x (ties of x pooled first), clipped to [0, 1]: (unique x, fitted y)."""
    xs = np.unique(x)
    blocks = [[float(y[x == v].mean()), int((x == v).sum())] for v in xs]  # [mean, weight] per distinct x
    members = [[i] for i in range(len(xs))]
    i = 0
    while i < len(blocks) - 1:
        if blocks[i][0] > blocks[i + 1][0]:
            (m1, w1), (m2, w2) = blocks[i], blocks[i + 1]
            blocks[i] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2]
            members[i] += members.pop(i + 1)
            blocks.pop(i + 1)
            i = max(i - 1, 0)
        else:
            i += 1
    fitted = np.empty(len(xs))
    for (mean, _), idx in zip(blocks, members):
        fitted[idx] = mean
    return xs, np.clip(fitted, 0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_columns_equal_a_plain_recomputation(seed):
    rng = np.random.default_rng(seed)
    m, d, c, n = 60, 5, 4, 25
    ref = torch.as_tensor(rng.normal(0, 2, (m, c)))
    ref[:, 3] -= 10  # class 3 is never predicted on the reference images: its class stability is the mean
    noisy = torch.as_tensor(rng.integers(0, c, (d, m)))
    noisy[:, :20] = ref[:20].argmax(1)  # the first 20 images keep their prediction under every draw
    samples = torch.as_tensor(rng.normal(0, 2, (n, c)))
    samples[0] = torch.tensor([0.0, 1.0, 0.0, 5.0])  # predicted class 3
    out = noise_profile_features(ref, noisy, samples)
    assert out.shape == (n, len(NOISE_PROFILE_COLUMNS)) and out.dtype == np.float32

    ref_np, noisy_np, s_np = ref.numpy(), noisy.numpy(), samples.numpy()
    pred = ref_np.argmax(1)
    stay = np.array([np.mean([noisy_np[k, i] == pred[i] for k in range(d)]) for i in range(m)])
    conf = np.exp(ref_np - ref_np.max(1, keepdims=True))
    conf = (conf / conf.sum(1, keepdims=True)).max(1)
    xs, fitted = _pava(conf, stay)
    for row in range(n):
        p = np.exp(s_np[row] - s_np[row].max())
        p /= p.sum()
        first, second = np.argsort(-p, kind="stable")[:2]
        cls = [stay[i] for i in range(m) if pred[i] == first]
        expected = [
            np.interp(p.max(), xs, fitted),
            np.mean(cls) if cls else stay.mean(),
            np.mean(noisy_np == first),
            np.mean(noisy_np == second),
            stay.mean(),
        ]
        np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-6)
    assert out[0, 1] == pytest.approx(stay.mean(), rel=1e-6)


def test_every_sample_of_a_perfectly_stable_model_scores_one():
    ref = torch.randn(30, 10, generator=torch.Generator().manual_seed(0))
    noisy = ref.argmax(1).expand(7, 30)
    out = noise_profile_features(ref, noisy, torch.randn(5, 10))
    np.testing.assert_allclose(out[:, [0, 1, 4]], 1.0)


@pytest.mark.parametrize("ref, noisy, samples, message", [
    (torch.zeros(5, 3), torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 3), "reference_noisy_pred"),
    (torch.zeros(5, 3), torch.zeros(0, 5, dtype=torch.long), torch.zeros(1, 3), "reference_noisy_pred"),
    (torch.zeros(5, 3), torch.zeros(2, 5, dtype=torch.long), torch.zeros(1, 4), "sample_logits"),
])
def test_bad_shapes_are_refused(ref, noisy, samples, message):
    with pytest.raises(ValueError, match=message):
        noise_profile_features(ref, noisy, samples)
