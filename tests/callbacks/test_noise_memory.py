"""NoiseRobustnessMonitor inside its memory share: the forward batch is planned, and the ratios do not depend on it."""

import numpy as np
import pytest
import torch

import lightning_probes as lp
from lightning_probes import NoiseRobustnessMonitor
from tests.callbacks.test_noise_robustness import _Bag, _draws, _loader, _Net, _result
from tests.helpers import RandomDataModule, read, small_mlp, trainer


@pytest.mark.parametrize("chunk_size", [24, 5, 1])
def test_image_ratios_equal_numpy_whatever_the_forward_batch(tmp_path, chunk_size):
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _Net(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)))
    probe = NoiseRobustnessMonitor(num_samples=24, num_draws=15, sigma=0.8, kl=True, chunk_size=chunk_size,
                                   output_dir=str(tmp_path))
    t = trainer(tmp_path, [probe])
    t.validate(model, _loader(x), verbose=False)
    data, record = _result(tmp_path)
    assert record["forward_batch"] == chunk_size
    # NumPy: draw d is one (24, 1, 8, 8) noise tensor from the probe's seeded generator, whatever the batches.
    w, b = (p.detach().double().numpy() for p in model.net[1].parameters())
    order = data["sample_index"]
    inputs = x[order].reshape(24, -1).double().numpy()
    clean = inputs @ w.T + b
    draw = _draws(t)
    agree, kl = np.zeros(24), np.zeros(24)
    for _ in range(15):
        noisy = (inputs + 0.8 * draw((24, 1, 8, 8)).reshape(24, -1).double().numpy()) @ w.T + b
        agree += noisy.argmax(1) == clean.argmax(1)
        lp_, lq = (v - np.log(np.exp(v).sum(1, keepdims=True)) for v in (clean, noisy))
        kl += (np.exp(lp_) * (lp_ - lq)).sum(1)
    np.testing.assert_allclose(data["ratio"], agree / 15)
    np.testing.assert_allclose(data["kl"], kl / 15, rtol=1e-4, atol=1e-6)
    assert 0 < data["ratio"].mean() < 1


@pytest.mark.parametrize("chunk_size", [24, 7])
def test_embedding_ratios_equal_numpy_whatever_the_forward_batch(tmp_path, chunk_size):
    ids = torch.randint(0, 12, (24, 6), generator=torch.Generator().manual_seed(0))
    model = _Net(_Bag())
    probe = NoiseRobustnessMonitor(num_samples=24, num_draws=20, sigma=1.5, chunk_size=chunk_size,
                                   output_dir=str(tmp_path))
    t = trainer(tmp_path, [probe])
    t.validate(model, _loader(ids), verbose=False)
    data, _ = _result(tmp_path)
    embed = model.net.embed.weight.detach().double().numpy()
    head_w, head_b = (p.detach().double().numpy() for p in model.net.head.parameters())
    idx = ids.numpy()[data["sample_index"]]
    std = 1.5 * embed.std(ddof=1)
    clean = embed[idx].mean(1) @ head_w.T + head_b
    draw = _draws(t)
    agree = np.zeros(24)
    for _ in range(20):  # one (24, 6, 4) embedding noise per draw for the whole set
        noisy = (embed[idx] + std * draw((24, 6, 4)).double().numpy()).mean(1) @ head_w.T + head_b
        agree += noisy.argmax(1) == clean.argmax(1)
    np.testing.assert_allclose(data["ratio"], agree / 20)


def test_the_forward_batch_is_planned_inside_the_share(tmp_path):
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4096), torch.nn.ReLU(),
                               torch.nn.Linear(4096, 10))
    model = small_mlp()
    model.net = wide
    reference = NoiseRobustnessMonitor(num_samples=32, num_draws=3, output_dir=str(tmp_path), name="whole")
    small = NoiseRobustnessMonitor(num_samples=32, num_draws=3, max_memory_gb=2e-4, output_dir=str(tmp_path))
    t = trainer(tmp_path, [reference, small], max_epochs=1)
    t.fit(model, RandomDataModule())
    plan = lp.memory_plan(t)
    assert plan["noise_robustness"]["share"] == 200_000
    assert plan["noise_robustness"]["reduced"].startswith("forward batch ")
    assert plan["whole"]["reduced"] is None
    small_record, whole_record = read(tmp_path / "noise_robustness.jsonl")[-1], read(tmp_path / "whole.jsonl")[-1]
    assert whole_record["forward_batch"] == 32 > small_record["forward_batch"] >= 1
    # Each sample of a batch holds at least its 4096 float32 hidden units (16 KiB): the plan keeps them in the share.
    assert small_record["forward_batch"] * 4096 * 4 <= 200_000
    assert small_record["stability_ratio_mean"] == whole_record["stability_ratio_mean"]
    assert plan["noise_robustness"]["planned"] <= 200_000


def test_max_memory_gb_is_checked():
    with pytest.raises(ValueError, match="`max_memory_gb`"):
        NoiseRobustnessMonitor(max_memory_gb=0)
