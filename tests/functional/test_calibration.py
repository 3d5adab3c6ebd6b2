import numpy as np
import pytest
import scipy.stats
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from lightning_probes.callbacks.confidence import ConfidenceState, summarize
from lightning_probes.functional.calibration import (
    adaptive_bins_from_histogram,
    brier_score,
    calibration_error,
    calibration_error_from_sums,
    calibration_sums,
    classification_scores,
    confusion_confidence,
    flatten_class_dim,
    normalized_entropy,
    one_hot_to_index,
    prediction_terms,
    predictive_entropy,
    threshold_level,
    thresholded_confusion,
)
from lightning_probes.functional.robustness import kl_from_clean, noisy_logits, stability_ratio


def _random(seed, n=600, c=7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    logits[:20, 0] = 100.0  # saturated: confidence exactly 1.0 in float32
    return logits.softmax(1), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("norm", ["l1", "max", "l2"])
@pytest.mark.parametrize("n_bins", [5, 15])
def test_calibration_error_agrees_with_torchmetrics(seed, norm, n_bins):
    probs, target = _random(seed)
    assert (probs.max(1).values == 1.0).any()
    ours = calibration_error(probs, target, n_bins, norm).item()
    reference = multiclass_calibration_error(probs, target, probs.shape[1], n_bins, norm).item()
    assert ours == pytest.approx(reference, abs=1e-6)


def test_adaptive_calibration_error_matches_numpy_equal_count_bins():
    probs, target = _random(0, n=1000)
    conf, pred = probs.max(1)
    order = np.argsort(conf.numpy(), kind="stable")
    correct = (pred == target).numpy()[order]
    c = conf.numpy()[order].astype(np.float64)
    groups = np.arange(len(c)) * 10 // len(c)
    expected = sum(abs(correct[groups == k].mean() - c[groups == k].mean()) * (groups == k).mean() for k in range(10))
    assert calibration_error(probs, target, 10, adaptive=True).item() == pytest.approx(expected, abs=1e-9)


def test_streamed_adaptive_bins_approach_the_exact_ones():
    probs, target = _random(1, n=5000)
    conf, pred = probs.max(1)
    fine = calibration_sums(conf, pred == target, 2000)
    streamed = calibration_error_from_sums(adaptive_bins_from_histogram(fine, 15)).item()
    exact = calibration_error(probs, target, 15, adaptive=True).item()
    assert streamed == pytest.approx(exact, abs=0.01)


def test_confusion_confidence_matches_a_loop():
    probs, target = _random(2, n=300, c=4)
    counts, sums = confusion_confidence(probs, target)
    ref_counts, ref_sums = np.zeros((4, 4), int), np.zeros((4, 4))
    for p, t in zip(probs.numpy(), target.numpy()):
        ref_counts[t, p.argmax()] += 1
        ref_sums[t, p.argmax()] += p.max()
    np.testing.assert_array_equal(counts.numpy(), ref_counts)
    np.testing.assert_allclose(sums.numpy(), ref_sums, rtol=1e-6)
    thresholds = thresholded_confusion(probs, target, [0.5, 0.9])
    for i, t in enumerate([0.5, 0.9]):
        keep = probs.max(1).values.numpy() >= t
        ref = np.zeros((4, 4), int)
        for p, y in zip(probs.numpy()[keep], target.numpy()[keep]):
            ref[y, p.argmax()] += 1
        np.testing.assert_array_equal(thresholds[i].numpy(), ref)


def test_brier_and_entropy_against_references():
    probs, target = _random(3, n=50, c=5)
    one_hot = np.eye(5)[target.numpy()]
    assert brier_score(probs, target).item() == pytest.approx(((probs.numpy() - one_hot) ** 2).sum(1).mean(), rel=1e-6)
    np.testing.assert_allclose(predictive_entropy(probs).numpy(), scipy.stats.entropy(probs.numpy(), axis=1), rtol=1e-5)
    assert predictive_entropy(torch.tensor([[1.0, 0.0]])).item() == 0.0
    assert normalized_entropy(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([9, 0, 0])).item() == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(3))
def test_classification_scores_agree_with_torchmetrics(seed):
    probs, target = _random(seed, n=200, c=6)
    target[target == 5] = 4  # class 5 never appears as target...
    probs[:, 5] = 0  # ... nor as prediction: left out of the macro averages
    pred = probs.argmax(1)
    confusion = torch.zeros(6, 6, dtype=torch.long).index_put_((target, pred), torch.ones_like(target), accumulate=True)
    scores = classification_scores(confusion)
    assert scores["accuracy"] == pytest.approx(multiclass_accuracy(pred, target, 6, average="micro").item())
    for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
        torch.testing.assert_close(scores[name].float(), fn(pred, target, 6, average=None), rtol=1e-6, atol=1e-6)
        assert scores[f"macro_{name}"] == pytest.approx(fn(pred, target, 6, average="macro").item(), abs=1e-6)


def test_streamed_state_equals_one_shot():
    probs_all, target_all = _random(4, n=700, c=6)
    logits_all = probs_all.log()
    state = ConfidenceState(6, 15, (0.5, 0.9), 1000)
    for logits, target in zip(logits_all.split(64), target_all.split(64)):
        state.update(logits, target)
    streamed = state.compute()
    one_shot = ConfidenceState(6, 15, (0.5, 0.9), 1000)
    one_shot.update(logits_all, target_all)
    for key, value in one_shot.compute().items():
        torch.testing.assert_close(streamed[key], value, rtol=1e-9, atol=1e-9)
    p_all = logits_all.softmax(1)
    counts, sums = confusion_confidence(p_all, target_all)
    torch.testing.assert_close(streamed["confusion"], counts)
    torch.testing.assert_close(streamed["confidence_sums"], sums, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed["thresholded"], thresholded_confusion(p_all, target_all, [0.5, 0.9]))
    conf, pred = p_all.max(1)
    torch.testing.assert_close(streamed["fine"], calibration_sums(conf, pred == target_all, 1000), rtol=1e-6,
                               atol=1e-4)
    assert streamed["scalars"][0].item() / 700 == pytest.approx(brier_score(p_all, target_all).item(), rel=1e-5)
    assert streamed["scalars"][2].item() / 700 == pytest.approx(predictive_entropy(p_all).mean().item(), rel=1e-5)
    p = logits_all.softmax(1)
    reference = multiclass_calibration_error(p, target_all, 6, 15, "l1").item()
    assert calibration_error_from_sums(streamed["calibration"]).item() == pytest.approx(reference, abs=1e-6)
    nll = torch.nn.functional.cross_entropy(logits_all, target_all).item()
    assert streamed["scalars"][1].item() / 700 == pytest.approx(nll, rel=1e-6)


def test_summarize_headline_numbers():
    probs, target = _random(5, n=400, c=3)
    state = ConfidenceState(3, 10, (0.5,), 1000)
    state.update(probs.log(), target)
    out = summarize(state.compute(), (0.5,))
    pred = probs.argmax(1)
    assert out["n"] == 400
    assert out["top_class_share"] == pytest.approx(np.bincount(pred.numpy(), minlength=3).max() / 400)
    assert out["predicted_distribution"] == pytest.approx((np.bincount(pred.numpy(), minlength=3) / 400).tolist())
    assert out["mean_confidence"] == pytest.approx(probs.max(1).values.mean().item(), rel=1e-6)
    kept = probs.max(1).values >= 0.5
    assert out["thresholded"]["0.5"]["coverage"] == pytest.approx(kept.float().mean().item())


def test_prediction_terms_against_references():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(80, 5, generator=g) * 4
    logits[0, 1:] = -float("inf")  # a certain prediction: entropy 0, no NaN
    target = torch.randint(0, 5, (80,), generator=g)
    terms = prediction_terms(logits, target)
    probs = logits.softmax(1)
    torch.testing.assert_close(terms["confidence"], probs.max(1).values)
    torch.testing.assert_close(terms["predicted"], probs.argmax(1))
    torch.testing.assert_close(terms["correct"], (probs.argmax(1) == target).float())
    one_hot = np.eye(5)[target.numpy()]
    np.testing.assert_allclose(terms["brier"].numpy(), ((probs.numpy() - one_hot) ** 2).sum(1), atol=1e-5)
    np.testing.assert_allclose(terms["nll"].numpy(), torch.nn.functional.cross_entropy(
        logits, target, reduction="none").numpy(), rtol=1e-5)
    np.testing.assert_allclose(terms["entropy"].numpy(), scipy.stats.entropy(probs.numpy(), axis=1), atol=1e-5)
    assert terms["entropy"][0].item() == 0.0


def test_threshold_level_counts_reached_thresholds():
    confidence = torch.tensor([0.2, 0.5, 0.7, 0.9, 1.0])
    assert threshold_level(confidence, torch.tensor([0.5, 0.9])).tolist() == [0, 1, 1, 2, 2]


def test_flatten_class_dim_scores_every_position():
    logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    flat_logits, flat_target = flatten_class_dim(logits, target)
    assert flat_logits.shape == (40, 3) and flat_target.shape == (40,)
    # position (n, h, w) is row n * 20 + h * 5 + w
    torch.testing.assert_close(flat_logits[1 * 20 + 2 * 5 + 3], logits[1, :, 2, 3])
    assert flat_target[1 * 20 + 2 * 5 + 3] == target[1, 2, 3]
    one_hot = torch.nn.functional.one_hot(target, 3).movedim(-1, 1)  # (2, 3, 4, 5)
    _, flat_one_hot = flatten_class_dim(logits, one_hot)
    torch.testing.assert_close(flat_one_hot.argmax(1), flat_target)
    same = torch.randn(6, 3)
    assert flatten_class_dim(same, target[0, 0, :1].expand(6))[0] is same  # (N, C) passes through
    with pytest.raises(ValueError, match=r"`logits` of shape \(N, C, \.\.\.\), but got shape \(6,\)"):
        flatten_class_dim(torch.randn(6), torch.zeros(6))
    with pytest.raises(ValueError, match=r"`target` of shape \(2, 4, 5\).*got shape \(2, 4\)"):
        flatten_class_dim(logits, target[:, :, 0])


def test_one_hot_to_index_flags_soft_rows():
    target = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.7, 0.1], [0.0, 1.0, 1.0]])
    index, one_hot = one_hot_to_index(target)
    assert index[:2].tolist() == [1, 0] and one_hot.tolist() == [True, True, False, False]
    index, one_hot = one_hot_to_index(torch.tensor([[False, True], [True, False]]))
    assert index.tolist() == [1, 0] and one_hot.all()


@pytest.mark.parametrize("ignore_index", [None, -100, 2])
def test_state_ignore_index_agrees_with_torchmetrics(ignore_index):
    probs, target = _random(7, n=500, c=5)
    if ignore_index is not None:
        target[::7] = ignore_index
    state = ConfidenceState(5, 10, (0.5,), 1000, ignore_index=ignore_index)
    for p, t in zip(probs.log().split(100), target.split(100)):
        state.update(p, t)
    out = state.compute()
    kwargs = {"ignore_index": ignore_index}
    reference = multiclass_calibration_error(probs, target, 5, 10, **kwargs).item()
    assert calibration_error_from_sums(out["calibration"]).item() == pytest.approx(reference, abs=1e-6)
    torch.testing.assert_close(out["confusion"], multiclass_confusion_matrix(probs, target, 5, **kwargs))
    kept = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    nll = torch.nn.functional.cross_entropy(probs.log()[kept], target[kept], reduction="sum").item()
    assert out["scalars"][1].item() == pytest.approx(nll, rel=1e-6)
    assert int(out["target_min"]) >= 0 and int(out["target_max"]) <= 4


def test_state_one_hot_targets_equal_index_targets_and_records_bad_targets():
    probs, target = _random(8, n=300, c=4)
    by_index, by_one_hot = ConfidenceState(4, 15, (0.9,), 1000), ConfidenceState(4, 15, (0.9,), 1000)
    by_index.update(probs.log(), target)
    by_one_hot.update(probs.log(), torch.nn.functional.one_hot(target, 4).float())
    for key, value in by_index.compute().items():
        torch.testing.assert_close(by_one_hot.compute()[key], value)
    soft = ConfidenceState(4, 15, (0.9,), 1000)
    soft.update(probs.log(), probs)  # probabilities as targets: every row is a soft label
    assert int(soft.compute()["soft_targets"]) == 300
    bad = ConfidenceState(4, 15, (0.9,), 1000)
    target = target.clone()
    target[3], target[5] = 7, -1
    bad.update(probs.log(), target)  # no IndexError: the bad samples add nothing, the range is recorded
    out = bad.compute()
    assert (int(out["target_min"]), int(out["target_max"])) == (-1, 7)
    assert int(out["confusion"].sum()) == 298


def test_stability_ratio():
    clean = torch.tensor([0, 1, 2])
    noisy = torch.tensor([[0, 1, 0], [0, 2, 0], [1, 1, 2], [0, 1, 2]])
    assert stability_ratio(clean, noisy).tolist() == [0.75, 0.75, 0.5]
    with pytest.raises(ValueError, match="noisy_pred"):
        stability_ratio(clean, noisy[:, :2])


def test_sigma_zero_gives_ratio_one_and_zero_kl():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    x = torch.randn(30, 1, 4, 4)
    clean = model(x)
    noisy = noisy_logits(model, x, 0.0, 7, torch.Generator().manual_seed(0), chunk_size=8)
    assert noisy.shape == (7, 30, 5)
    assert torch.equal(stability_ratio(clean.argmax(1), noisy.argmax(2)), torch.ones(30))
    assert kl_from_clean(clean, noisy).abs().max().item() < 1e-6
    large = noisy_logits(model, x, 100.0, 7, torch.Generator().manual_seed(0))
    assert stability_ratio(clean.argmax(1), large.argmax(2)).mean() < 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="`probs` of shape"):
        calibration_error(torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="`n_bins`"):
        calibration_error(torch.rand(3, 2), torch.zeros(3, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="`norm`"):
        calibration_error(torch.rand(3, 2), torch.zeros(3, dtype=torch.long), norm="l3")
