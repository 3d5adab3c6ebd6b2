"""`lightning_probes.functional.ablation`: drop counts, orders, masks and collapse indicators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from lightning_probes.functional import (
    class_agreement,
    collapse_indicators,
    histogram_overlap,
    masked_mean_confidence,
    random_orders,
    ranked_order,
    unit_mask,
    units_to_drop,
)


@pytest.mark.parametrize(("fraction", "units", "expected"), [
    (0.0, 10, 0), (0.1, 30, 3), (0.25, 10, 2), (0.5, 7, 4), (0.3, 3, 1), (0.9, 4, 3), (0.95, 3, 2), (0.99, 1, 0),
])
def test_units_to_drop_rounds_and_keeps_one_unit(fraction, units, expected):
    assert units_to_drop(fraction, units) == expected


@pytest.mark.parametrize(("fraction", "units", "match"), [(1.0, 4, "fraction"), (-0.1, 4, "fraction"),
                                                          (0.5, 0, "units"), (0.5, True, "units")])
def test_units_to_drop_rejects_bad_values(fraction, units, match):
    with pytest.raises(ValueError, match=match):
        units_to_drop(fraction, units)


def test_ranked_order_high_low_ties_and_nan():
    scores = torch.tensor([0.2, 0.9, float("nan"), 0.5, 0.9])
    assert ranked_order(scores, "high").tolist() == [1, 4, 3, 0, 2]  # ties in unit order, NaN last
    assert ranked_order(scores, "low").tolist() == [2, 0, 3, 1, 4]  # NaN (no direction) first
    with pytest.raises(ValueError, match="order"):
        ranked_order(scores, "middle")


def test_random_orders_are_seeded_permutations():
    orders = random_orders(12, 4, seed=3)
    assert orders.shape == (4, 12)
    assert all(sorted(row.tolist()) == list(range(12)) for row in orders)
    assert torch.equal(orders, random_orders(12, 4, seed=3))
    assert not torch.equal(orders, random_orders(12, 4, seed=4))
    assert len({tuple(row.tolist()) for row in orders}) == 4
    with pytest.raises(ValueError, match="repeats"):
        random_orders(12, 0, seed=0)


@pytest.mark.parametrize("rescale", ["none", "inverted"])
def test_unit_mask_zeroes_the_first_units_of_the_order(rescale):
    order = torch.tensor([3, 0, 4, 1, 2])
    mask = unit_mask(order, 2, rescale)
    kept = 5 / 3 if rescale == "inverted" else 1.0
    assert mask.tolist() == pytest.approx([0.0, kept, kept, 0.0, kept])
    assert torch.equal(unit_mask(order, 0, rescale), torch.ones(5))
    with pytest.raises(ValueError, match="dropped"):
        unit_mask(order, 5)
    with pytest.raises(ValueError, match="rescale"):
        unit_mask(order, 1, "doubled")


def test_collapse_indicators_against_scipy():
    histogram = torch.tensor([3, 0, 10, 5])
    out = collapse_indicators(histogram)
    assert out["entropy"] == pytest.approx(entropy(histogram.numpy()) / math.log(4))
    assert out["top_share"] == pytest.approx(10 / 18)
    assert out["top_class"] == 2
    one_class = collapse_indicators(torch.tensor([0, 7, 0]))["entropy"]
    assert one_class == 0.0 and math.copysign(1.0, one_class) == 1.0  # 0.0, not -0.0, in ablation.json
    assert collapse_indicators(torch.tensor([4, 4, 4]))["entropy"] == pytest.approx(1.0)
    assert collapse_indicators(torch.tensor([4, 4, 4]))["top_class"] == 0  # lowest index among ties
    empty = collapse_indicators(torch.zeros(3, dtype=torch.int64))
    assert math.isnan(empty["entropy"]) and empty["top_class"] == -1


def test_masked_mean_confidence():
    counts = torch.tensor([[4, 1], [0, 2]])
    sums = torch.tensor([[2.0, 0.7], [0.0, 1.8]], dtype=torch.float64)
    out = masked_mean_confidence(counts, sums, min_count=2)
    expected = np.array([[0.5, np.nan], [np.nan, 0.9]])
    np.testing.assert_allclose(out.numpy(), expected)
    with pytest.raises(ValueError, match="min_count"):
        masked_mean_confidence(counts, sums, min_count=0)


def test_class_agreement():
    assert class_agreement([2, 2, 2]) == {"modal_class": 2, "agreement": 1.0}
    assert class_agreement([0, 1, 2, 3]) == {"modal_class": 0, "agreement": 0.25}
    assert class_agreement([5, -1, 5, 1]) == {"modal_class": 5, "agreement": 2 / 3}
    assert math.isnan(class_agreement([])["agreement"])


def test_histogram_overlap_against_numpy():
    histograms = torch.tensor([[5, 5, 0], [0, 2, 8], [1, 1, 1]])
    p = histograms.numpy() / histograms.numpy().sum(1, keepdims=True)
    expected = np.array([[np.minimum(a, b).sum() for b in p] for a in p])
    np.testing.assert_allclose(histogram_overlap(histograms).numpy(), expected)
    np.testing.assert_allclose(np.diag(expected), 1.0)
