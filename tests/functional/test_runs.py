"""Training-dynamics formulas, Pareto membership, the PCA map, CKA between runs and classwise ECE against
hand-made inputs, NumPy and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_probes.functional import (
    cka_matrix,
    classwise_calibration_error,
    pareto_front,
    pca_map,
    training_dynamics,
)


def test_training_dynamics_on_a_hand_made_curve():
    epochs = list(range(9))
    train = [2.0, 1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05]
    val = [2.1, 1.2, 0.8, 0.7, 0.7, 0.75, 0.8, 0.9, 1.0]
    acc = [0.3, 0.6, 0.8, 0.86, 0.9, 0.91, 0.90, 0.89, 0.88]
    d = training_dynamics(epochs, train, val, acc)
    # 0.95 * 0.91 = 0.8645: epoch 4 (0.9) is the first at or above it (0.86 is below).
    assert d["epochs_to_convergence"] == 4
    # Last third from max(int(0.67 * 9), 1) = 6: epochs 6, 7, 8.
    assert d["overfitting_from_epoch"] == 6
    assert d["overfitting_index"] == pytest.approx(np.mean([0.8 - 0.15, 0.9 - 0.1, 1.0 - 0.05]))
    assert d["stability"] == pytest.approx(np.std(val)) and d["stability_epochs"] == 9
    assert d["peak_val_acc"] == 0.91 and d["peak_epoch"] == 5
    assert d["final_gap"] == pytest.approx(0.95)


def test_stability_uses_the_last_ten_and_nan_is_skipped():
    n = 14
    val = np.linspace(1.0, 0.2, n)
    train = val - 0.1
    acc = np.linspace(0.5, 0.9, n)
    acc[3] = np.nan
    d = training_dynamics(range(n), train, val, acc)
    assert d["stability"] == pytest.approx(np.std(val[-10:])) and d["stability_epochs"] == 10
    assert d["overfitting_index"] == pytest.approx(0.1)  # from int(0.67 * 14) = 9 on
    assert d["peak_epoch"] == n - 1
    one = training_dynamics([0], [1.0], [1.5], [0.4])
    assert one["overfitting_index"] == pytest.approx(0.5) and one["stability"] == 0.0 and one["stability_epochs"] == 1
    missing = training_dynamics([0, 1], [1.0, 0.5], [np.nan, np.nan], [np.nan, np.nan])
    assert missing["epochs_to_convergence"] is None and math.isnan(missing["overfitting_index"])
    with pytest.raises(ValueError, match="one length"):
        training_dynamics([0, 1], [1.0], [1.0, 2.0], [0.1, 0.2])


def test_pareto_front_on_a_hand_made_set():
    # (accuracy up, overfitting down)
    acc = [0.90, 0.95, 0.85, 0.95, 0.80, 0.97, np.nan]
    over = [0.10, 0.20, 0.05, 0.30, 0.05, 0.40, 0.0]
    front = pareto_front(acc, over)
    # 0: not dominated (only 1, 3, 5 beat its accuracy, all overfit more); 1 dominates 3; 4 is dominated by 2
    # (equal overfitting, better accuracy); 5 is the most accurate; NaN never on the front.
    assert front.tolist() == [True, True, True, False, False, True, False]
    # Brute force from the definition.
    pts = [(a, o) for a, o in zip(acc, over)]
    for i, (a, o) in enumerate(pts):
        if np.isnan(a):
            continue
        dominated = any(b >= a and p <= o and (b > a or p < o) for j, (b, p) in enumerate(pts) if j != i
                        and not np.isnan(b))
        assert front[i] == (not dominated)
    assert pareto_front([0.5, 0.5], [0.1, 0.1]).tolist() == [True, True]


def test_pca_map_equals_an_svd_of_the_standardised_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)) * [1, 10, 100, 0.1, 1]
    x[:, 4] = 3.0  # constant: left out
    out = pca_map(x)
    assert out["columns"] == [0, 1, 2, 3]
    z = (x[:, :4] - x[:, :4].mean(0)) / x[:, :4].std(0)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    expected = u[:, :2] * s[:2]
    # Components are defined up to sign.
    for k in range(2):
        sign = np.sign(expected[:, k] @ out["coords"][:, k])
        np.testing.assert_allclose(out["coords"][:, k], sign * expected[:, k], atol=1e-9)
    np.testing.assert_allclose(out["explained"], (s ** 2 / (s ** 2).sum())[:2], rtol=1e-9)
    two = pca_map(np.array([[1.0, 2.0], [3.0, 2.0]]))
    assert two["coords"].shape == (2, 2) and np.allclose(two["coords"][:, 1], 0)
    with pytest.raises(ValueError, match="runs >= 2"):
        pca_map(np.ones((1, 3)))
    with pytest.raises(ValueError, match="varies"):
        pca_map(np.ones((3, 3)))


def _cka_numpy(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_cka_matrix_equals_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    feats = [a, 2.5 * a @ q, torch.randn(40, 3, generator=g)]
    m = cka_matrix(feats)
    assert m.shape == (3, 3) and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    assert m[0, 1] == pytest.approx(1.0)  # rotation and scaling
    assert m[0, 2] == pytest.approx(_cka_numpy(a.double().numpy(), feats[2].double().numpy()), rel=1e-10)
    with pytest.raises(ValueError, match="same samples"):
        cka_matrix([a, a[:10]])


def test_classwise_ece_equals_a_loop():
    g = torch.Generator().manual_seed(3)
    probs = torch.randn(200, 4, generator=g).mul(2).softmax(1)
    target = torch.randint(0, 4, (200,), generator=g)
    out = classwise_calibration_error(probs, target, n_bins=10)
    p, y = probs.double().numpy(), target.numpy()
    for c in range(4):
        bins = np.minimum((p[:, c] * 10).astype(int), 10)  # bin k: k/10 <= p < (k+1)/10; p == 1 alone
        total = 0.0
        for b in np.unique(bins):
            sel = bins == b
            total += sel.mean() * abs(p[sel, c].mean() - (y[sel] == c).mean())
        assert out[c].item() == pytest.approx(total, abs=1e-12)
