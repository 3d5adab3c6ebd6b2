"""`lightning_probes.functional.stability` against NumPy and against Lightning Fabric's ``SpikeDetection``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_probes.functional import detect_spikes, ring_push, spike_flags, spike_score, window_moments


def synthetic(n: int = 160, seed: int = 0) -> np.ndarray:
    """A noisy decreasing loss with spikes of several sizes, a run of two, a NaN, an inf and a drop of level."""
    rng = np.random.default_rng(seed)
    series = 2.0 + 0.1 * rng.standard_normal(n) - np.linspace(0, 0.5, n)
    series[[15, 40, 41, 90, 130]] *= [4.0, 5.0, 3.5, 8.0, 4.2]
    series[60] = np.nan
    series[61] = np.inf
    series[100:] -= 0.8
    return series


def numpy_reference(series: np.ndarray, window: int, threshold: float, warmup: int, exclude_spikes: bool) -> dict:
    """The z-score rule step by step in plain NumPy: window of the last accepted values, population std."""
    kept: list[float] = []
    out = {"z": [], "mean": [], "std": [], "spike": []}
    for t, x in enumerate(series):
        w = np.array(kept[-window:])
        mean = w.mean() if len(w) else np.nan
        std = w.std() if len(w) else np.nan
        z = (x - mean) / std if len(w) >= 2 and std > 0 and np.isfinite(x) else np.nan
        spike = (not np.isfinite(x)) or (t >= warmup and z > threshold)
        if np.isfinite(x) and not (exclude_spikes and spike):
            kept.append(x)
        for key, value in (("z", z), ("mean", mean), ("std", std), ("spike", spike)):
            out[key].append(value)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("exclude_spikes", [False, True])
@pytest.mark.parametrize("window,threshold,warmup", [(10, 3.0, 10), (32, 6.0, 5), (3, 2.0, 0)])
def test_zscores_equal_a_numpy_recomputation(exclude_spikes, window, threshold, warmup):
    series = synthetic()
    got = detect_spikes(series, window, threshold=threshold, warmup=warmup, exclude_spikes=exclude_spikes)
    want = numpy_reference(series, window, threshold, warmup, exclude_spikes)
    np.testing.assert_allclose(got["z"], want["z"], rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["std"], want["std"], rtol=1e-10, equal_nan=True)
    np.testing.assert_array_equal(got["spike"], want["spike"])
    assert got["spike"][[60, 61]].all()  # non-finite values are always spikes
    assert got["spike"].sum() > 2


def test_spikes_left_in_the_window_raise_its_std():
    series = synthetic()
    kept_in = detect_spikes(series, 10, threshold=3.0, warmup=10)
    kept_out = detect_spikes(series, 10, threshold=3.0, warmup=10, exclude_spikes=True)
    assert kept_in["std"][45] > 3 * kept_out["std"][45]  # the spikes at 40-41 are in the window of step 45
    assert kept_out["spike"].sum() >= kept_in["spike"].sum()


# -- Lightning Fabric's SpikeDetection -------------------------------------------------------------------------
class _Strategy:
    root_device = torch.device("cpu")

    def barrier(self) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Fabric's name
        return decision


class _Fabric:
    strategy = _Strategy()
    global_rank = 0


def fabric_flags(series: np.ndarray, tmp_path, **settings) -> np.ndarray:
    """The steps Fabric's ``SpikeDetection`` flags: it raises at a spike (and keeps it out of its running mean);
    catching the exception and going on gives its decision at every step."""
    from lightning_fabric.utilities.spike import SpikeDetection, TrainingSpikeException

    detector = SpikeDetection(exclude_batches_path=str(tmp_path), **settings)
    flags = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, value in enumerate(series):
            try:
                detector.on_train_batch_end(_Fabric(), torch.tensor(value, dtype=torch.float32), None, i)
                flags.append(False)
            except TrainingSpikeException:
                flags.append(True)
    return np.array(flags)


@pytest.mark.parametrize("settings", [
    {},  # Fabric's defaults: window 10, warmup 1, rtol 2, mode "min"
    {"warmup": 5, "rtol": 0.3},
    {"atol": 0.5, "rtol": None},
    {"atol": 0.3, "rtol": 0.25, "window": 4},
    {"mode": "max", "rtol": 0.2},
], ids=["defaults", "warmup_rtol", "atol_only", "atol_and_rtol", "mode_max"])
def test_same_steps_flagged_as_fabric_spike_detection(settings, tmp_path):
    series = synthetic()
    series = series[np.isfinite(series)].astype(np.float32).astype(np.float64)  # Fabric's float32 values
    want = fabric_flags(series, tmp_path, **settings)
    got = detect_spikes(series, settings.get("window", 10), rule="relative", atol=settings.get("atol"),
                        rtol=settings.get("rtol", 2.0), mode=settings.get("mode", "min"),
                        warmup=settings.get("warmup", 1), exclude_spikes=True)["spike"]
    np.testing.assert_array_equal(got, want)
    assert want.sum() >= 1 and not want.all()


def test_a_nan_loss_is_flagged_as_fabric_flags_it(tmp_path):
    series = synthetic()[:80]
    series[61] = 2.0  # keep the NaN at 60 only
    want = fabric_flags(series, tmp_path)
    got = detect_spikes(series, 10, rule="relative", warmup=1, exclude_spikes=True)["spike"]
    np.testing.assert_array_equal(got, want)
    assert got[60]


# -- the step functions ---------------------------------------------------------------------------------------
def test_ring_push_keeps_the_last_window_values_per_series():
    values = np.zeros((2, 3))
    count = np.zeros(2, dtype=np.int64)
    history: list[list[float]] = [[], []]
    for t in range(8):
        x = np.array([float(t), 10.0 + t])
        accept = np.array([True, t % 2 == 0])
        values, count = ring_push(values, count, x, accept)
        for s in range(2):
            if accept[s]:
                history[s].append(float(x[s]))
        mean, std, n = window_moments(values, count)
        for s in range(2):
            w = np.array(history[s][-3:])
            assert n[s] == len(w)
            assert mean[s] == pytest.approx(w.mean()) and std[s] == pytest.approx(w.std())
    assert count.tolist() == [8, 4]


def test_an_empty_window_flags_only_nonfinite_values():
    mean, std, n = window_moments(np.zeros((2, 4)), np.zeros(2, dtype=np.int64))
    assert np.isnan(mean).all() and (n == 0).all()
    x = np.array([1e9, np.nan])
    for rule in ("zscore", "relative"):
        flags, z = spike_flags(x, mean, std, n, np.zeros(2), rule=rule)
        assert flags.tolist() == [False, True] and np.isnan(z).all()
    flags, _ = spike_flags(x, mean, std, n, np.zeros(2), countable=np.array([True, False]))
    assert flags.tolist() == [False, False]  # e.g. a gradient overflow the GradScaler handles


def test_unarmed_rule_flags_nothing_but_nonfinite_and_mode_max_flags_drops():
    mean, std, n = window_moments(np.array([[1.0, 1.1, 0.9, 1.0]]), np.array([4]))
    last = np.array([1.0])
    high, low = np.array([5.0]), np.array([-3.0])
    assert spike_flags(high, mean, std, n, last)[0][0]
    assert not spike_flags(high, mean, std, n, last, armed=False)[0][0]
    assert spike_flags(np.array([np.inf]), mean, std, n, last, armed=False)[0][0]
    assert not spike_flags(low, mean, std, n, last)[0][0]
    assert spike_flags(low, mean, std, n, last, mode="max")[0][0]


def test_spike_score_is_the_share_of_spike_steps_in_the_window():
    flags = np.array([1.0, 0.0, 1.0, 0.0])
    assert spike_score(flags, 3) == pytest.approx(2 / 3)
    assert spike_score(flags, 10) == pytest.approx(0.5)
    assert np.isnan(spike_score(flags, 0))


def test_an_unknown_rule_is_refused():
    t = np.zeros(1)
    with pytest.raises(ValueError, match="`rule`"):
        spike_flags(t, t, t, t, t, rule="median")
