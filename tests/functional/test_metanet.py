"""The meta-network maths against NumPy, SciPy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, r2_score, roc_auc_score, roc_curve

from lightning_probes.functional import (
    LAYER_STATS,
    baseline_scores,
    best_threshold,
    encode_layer,
    encoded_width,
    error_detection_metrics,
    fpr_at_tpr,
    regression_metrics,
    select_by_correctness,
)


def test_select_by_correctness_takes_at_most_per_class_of_each_kind():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    preds = torch.where(torch.rand(400, generator=g) < 0.8, labels, torch.randint(0, 5, (400,), generator=g))
    chosen = select_by_correctness(labels, preds, per_class=6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(chosen, chosen.sort().values) and len(chosen.unique()) == len(chosen)
    for cls in range(5):
        for kind in (True, False):
            available = int(((labels == cls) & ((preds == labels) == kind)).sum())
            taken = int(((labels[chosen] == cls) & ((preds[chosen] == labels[chosen]) == kind)).sum())
            assert taken == min(6, available)
    again = select_by_correctness(labels, preds, per_class=6, generator=torch.Generator().manual_seed(1))
    other = select_by_correctness(labels, preds, per_class=6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(chosen, again) and not torch.equal(chosen, other)
    with pytest.raises(ValueError, match="`per_class`"):
        select_by_correctness(labels, preds, per_class=0)


def test_sorted_and_stats_encodings_match_numpy_and_ignore_unit_order():
    x = torch.randn(7, 30, dtype=torch.float64) * 3
    perm = torch.randperm(30)
    sorted_ = encode_layer(x, "sorted")
    np.testing.assert_allclose(sorted_.numpy(), -np.sort(-x.numpy(), axis=1), rtol=1e-6)
    assert torch.equal(encode_layer(x[:, perm], "sorted"), sorted_)
    stats = encode_layer(x, "stats").numpy()
    a = x.numpy()
    expected = np.stack([a.mean(1), a.std(1), a.min(1), *np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9], axis=1),
                         a.max(1), (a > 0).mean(1)], axis=1)
    assert stats.shape == (7, len(LAYER_STATS)) == (7, encoded_width(30, "stats"))
    np.testing.assert_allclose(stats, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encode_layer(x[:, perm], "stats").numpy(), stats, rtol=1e-5, atol=1e-6)
    probs = encode_layer(x, "sorted", softmax=True).numpy()
    e = np.exp(a - a.max(1, keepdims=True))
    np.testing.assert_allclose(probs, -np.sort(-(e / e.sum(1, keepdims=True)), axis=1), rtol=1e-5)
    assert torch.equal(encode_layer(x, "raw"), x.float())
    with pytest.raises(ValueError, match="`encoding`"):
        encode_layer(x, "mean")


def test_baseline_scores_match_numpy():
    logits = torch.randn(50, 10, dtype=torch.float64) * 2
    p = np.exp(logits.numpy())
    p /= p.sum(1, keepdims=True)
    top = np.sort(p, axis=1)
    scores = baseline_scores(logits)
    np.testing.assert_allclose(scores["max_softmax"].numpy(), top[:, -1], rtol=1e-10)
    np.testing.assert_allclose(scores["margin"].numpy(), top[:, -1] - top[:, -2], rtol=1e-10)
    np.testing.assert_allclose(scores["entropy"].numpy(), (p * np.log(p)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(scores["doctor"].numpy(), -(1 - (p ** 2).sum(1)), rtol=1e-10)


def test_error_detection_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, 300)
    scores = np.clip(0.5 + 0.3 * (correct - 0.5) + rng.normal(0, 0.25, 300), 0, 1)
    out = error_detection_metrics(torch.as_tensor(scores), torch.as_tensor(correct), threshold=0.5)
    assert out["auroc"] == pytest.approx(roc_auc_score(correct, scores), abs=1e-6)
    assert out["aupr_err"] == pytest.approx(average_precision_score(1 - correct, 1 - scores), abs=1e-6)
    assert out["accuracy"] == pytest.approx(((scores >= 0.5) == correct).mean())
    fpr, tpr, _ = roc_curve(correct, scores)
    assert out["fpr_at_95tpr"] == pytest.approx(fpr[tpr >= 0.95].min(), abs=1e-6)
    assert float(fpr_at_tpr(torch.as_tensor(scores), torch.as_tensor(correct), 0.5)) == pytest.approx(
        fpr[tpr >= 0.5].min(), abs=1e-6)
    assert np.isnan(error_detection_metrics(torch.rand(5), torch.ones(5))["auroc"])


def test_best_threshold_is_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    for _ in range(5):
        correct = rng.integers(0, 2, 60)
        scores = np.round(rng.random(60) + 0.4 * correct, 1)  # ties on purpose
        t = best_threshold(torch.as_tensor(scores), torch.as_tensor(correct))
        candidates = [*np.unique(scores), np.inf]
        best = max(((scores >= c) == correct).mean() for c in candidates)
        assert ((scores >= t) == correct).mean() == pytest.approx(best)


def test_regression_metrics_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(1)
    target = rng.random(200)
    pred = np.clip(target + rng.normal(0, 0.2, 200), 0, 1)
    correct = rng.integers(0, 2, 200).astype(bool)
    out = regression_metrics(torch.as_tensor(pred), torch.as_tensor(target),
                             groups={"correct": torch.as_tensor(correct), "wrong": torch.as_tensor(~correct)})
    assert out["r2"] == pytest.approx(r2_score(target, pred), abs=1e-6)
    assert out["spearman"] == pytest.approx(spearmanr(pred, target).statistic, abs=1e-6)
    assert out["mse"] == pytest.approx(((pred - target) ** 2).mean(), abs=1e-12)
    assert out["r2_correct"] == pytest.approx(r2_score(target[correct], pred[correct]), abs=1e-6)
    assert out["r2_wrong"] == pytest.approx(r2_score(target[~correct], pred[~correct]), abs=1e-6)


def test_binomial_nll_is_scipy_binomial_log_likelihood_without_its_constant():
    from scipy.stats import binom

    from lightning_probes.functional import binomial_nll

    n = np.array([20, 20, 50, 50])
    k = np.array([0, 7, 50, 31])
    q = torch.tensor([0.1, 0.4, 0.9, 0.6], dtype=torch.float64, requires_grad=True)
    loss = binomial_nll(q, torch.as_tensor(k / n), torch.as_tensor(n))
    log_comb = np.log([float(__import__("math").comb(int(a), int(b))) for a, b in zip(n, k)])
    expected = -(binom.logpmf(k, n, q.detach().numpy()) - log_comb).sum() / n.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # d/dq of -(k log q + (n-k) log(1-q)) / sum(n): the gradient vanishes only at q = k/n.
    grad = -(k / q.detach().numpy() - (n - k) / (1 - q.detach().numpy())) / n.sum()
    np.testing.assert_allclose(q.grad.numpy(), grad, rtol=1e-10)
    best = torch.tensor(k / n, dtype=torch.float64)
    assert binomial_nll(best, best, torch.as_tensor(n)) < binomial_nll(q.detach(), best, torch.as_tensor(n))


def test_binomial_nll_rejects_bad_input():
    from lightning_probes.functional import binomial_nll

    with pytest.raises(ValueError, match="one shape"):
        binomial_nll(torch.zeros(3), torch.zeros(2), 10)
    with pytest.raises(ValueError, match="`num_draws`"):
        binomial_nll(torch.zeros(2), torch.zeros(2), 0)


def test_r2_ceiling_matches_a_simulated_perfect_predictor():
    from lightning_probes.functional import r2_ceiling

    rng = np.random.default_rng(0)
    p = rng.beta(2, 2, size=200_000)
    n = 50
    ratio = rng.binomial(n, p) / n
    ceiling = r2_ceiling(torch.as_tensor(ratio), n)
    # The r2 of the true p against the noisy labels is what the ceiling estimates (sampling error ~1e-3 here).
    assert ceiling == pytest.approx(r2_score(ratio, p), abs=0.01)
    # Worked by hand: labels 0.2 and 0.8 with n = 5: Var = 0.09, noise = 0.16 / 4 = 0.04 -> 1 - 0.04 / 0.09.
    assert r2_ceiling(torch.tensor([0.2, 0.8]), 5) == pytest.approx(1 - 0.04 / 0.09)
    assert np.isnan(r2_ceiling(torch.tensor([0.5, 0.5]), 5))
    with pytest.raises(ValueError, match="`num_draws`"):
        r2_ceiling(torch.tensor([0.2, 0.8]), 1)


def test_select_first_takes_the_first_of_each_kind_in_index_order():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0])
    preds = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    # class 0 correct at 0, 2, 7; wrong at 1, 3; class 1 correct at 4, 6; wrong at 5.
    chosen = select_by_correctness(labels, preds, per_class=2, order="first")
    assert chosen.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert select_by_correctness(labels, preds, per_class=1, order="first").tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="`order`"):
        select_by_correctness(labels, preds, per_class=1, order="last")


def test_noisy_logits_with_a_noise_bank_uses_the_same_draw_for_every_input():
    from lightning_probes.functional import noisy_logits

    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    bank = torch.randn(5, 3)
    out = noisy_logits(model, x, sigma=0.5, num_draws=5, noise_bank=bank)
    with torch.no_grad():
        expected = torch.stack([model(x + 0.5 * bank[d]) for d in range(5)])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="`noise_bank`"):
        noisy_logits(model, x, sigma=0.5, num_draws=4, noise_bank=bank)
