import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes import NoiseRobustnessMonitor
from lightning_probes.callbacks.guard import ProbeSkippedWarning
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.probe_data import select_balanced
from tests.conftest import CaptureLogger
from tests.helpers import RandomDataModule, read, small_mlp, trainer


def test_writes_ratios_per_epoch(tmp_path):
    logger = CaptureLogger()
    probe = NoiseRobustnessMonitor(num_samples=20, num_draws=5, sigma=0.5, kl=True, output_dir=str(tmp_path))
    model = small_mlp()
    trainer(tmp_path, [probe], logger=logger, max_epochs=2).fit(model, RandomDataModule())
    assert model.training  # mode restored
    records = read(tmp_path / "noise_robustness.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    data = np.load(tmp_path / "noise_robustness" / "epoch1.npz")
    assert set(data.files) == {"sample_index", "label", "clean_pred", "ratio", "kl"}
    ratio = data["ratio"]
    assert ratio.shape == (20,) and ((ratio >= 0) & (ratio <= 1)).all()
    assert np.all(np.isclose(ratio * 5, np.round(ratio * 5)))  # multiples of 1/num_draws
    assert records[1]["stability_ratio_mean"] == pytest.approx(ratio.mean())
    assert records[1]["stability_ratio_median"] == pytest.approx(np.median(ratio))
    correct = data["clean_pred"] == data["label"]
    if correct.any():
        assert records[1]["stability_ratio_mean_correct"] == pytest.approx(ratio[correct].mean())
    assert records[1]["kl_mean"] >= 0
    # The subset is fixed across epochs.
    assert np.array_equal(np.load(tmp_path / "noise_robustness" / "epoch0.npz")["sample_index"], data["sample_index"])
    assert "noise_robustness/stability_ratio_mean" in logger.keys()
    assert (tmp_path / "noise_robustness" / "histogram.png").exists()


def test_sigma_zero_is_perfectly_stable(tmp_path):
    probe = NoiseRobustnessMonitor(num_samples=16, num_draws=3, sigma=0.0, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())
    assert read(tmp_path / "noise_robustness.jsonl")[0]["stability_ratio_mean"] == 1.0


def test_eval_mode_during_analysis(tmp_path):
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = small_mlp()
    model.net.add_module("spy", Spy())
    model.net.fc1.register_forward_pre_hook(lambda m, args: model.net.spy(args[0]))
    probe = NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(model, RandomDataModule())
    assert seen[-1] is False and True in seen and model.training


def test_select_balanced():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 45)
    chosen = select_balanced(labels, 30, seed=0)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert sum(counts) == 30 and counts[1] == 5 and abs(counts[0] - counts[2]) <= 1
    assert torch.equal(chosen, select_balanced(labels, 30, seed=0))
    assert not torch.equal(chosen, select_balanced(labels, 30, seed=1))
    assert len(select_balanced(labels, 500, seed=0)) == 100


def test_no_validation_data_is_a_clear_error(tmp_path):
    class NoVal(pl.LightningDataModule):
        def train_dataloader(self):
            return RandomDataModule().train_dataloader()

    probe = NoiseRobustnessMonitor()
    t = trainer(tmp_path, [probe], max_epochs=1)
    with pytest.warns(ProbeSkippedWarning, match="NoiseRobustnessMonitor 'noise_robustness' is skipped .* no "
                                                 "validation dataloader"):
        t.fit(small_mlp(), NoVal())  # no validation loop: skipped at the pre-flight, training goes on
    records = read(tmp_path / "probes" / "noise_robustness.jsonl")
    assert len(records) == 1 and records[0]["probe_status"] == "skipped" and "val_dataloader" in records[0]["reason"]
    assert t.global_step > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sigma": -0.1}, "`sigma`"),
    ({"num_draws": 0}, "`num_draws`"),
    ({"num_samples": 0}, "`num_samples`"),
    ({"every_n_epochs": 0}, "`every_n_epochs`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseRobustnessMonitor(**kwargs)


# -- layouts, token inputs and the pre-flight --------------------------------------------------------
class _Net(pl.LightningModule):
    """``net(x)`` with a loss that trains nothing in particular; ``validation_step`` returns nothing."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        out = self(batch[0])
        return (out.float().mean() if out.is_floating_point() else 0.0) + self.bias ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Steps(pl.Callback):
    """Counts the training batches started (a pre-flight failure must come before the first)."""

    batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


def _loader(x, n_classes=3):
    return DataLoader(TensorDataset(x, torch.arange(len(x)) % n_classes), batch_size=8)


def _draws(t, seed=0):
    """``draw(shape)``: the probe's noise stream (its seeded generator on the model's device), on the CPU."""
    device = t.strategy.root_device
    generator = torch.Generator(device=device).manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=generator, device=device).cpu()


def _result(tmp_path):
    return np.load(tmp_path / "noise_robustness" / "epoch0.npz"), read(tmp_path / "noise_robustness.jsonl")[-1]


class _Bag(torch.nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(12, 4)
        self.head = torch.nn.Linear(4, 3)
        self.tied = tied

    def forward(self, ids):
        h = self.embed(ids).mean(1)
        if not self.tied:
            return self.head(h)
        # A second use of the embedding on other ids (not perturbed) and an output tied to its weights.
        context = self.embed((ids + 1) % 12).mean(1)
        return (h + context) @ self.embed.weight[:3].T


@pytest.mark.parametrize("tied", [False, True])
def test_token_inputs_are_perturbed_in_the_embedding_space(tmp_path, tied):
    ids = torch.randint(0, 12, (24, 6), generator=torch.Generator().manual_seed(0))
    model = _Net(_Bag(tied))
    probe = NoiseRobustnessMonitor(num_samples=24, num_draws=20, sigma=1.5, kl=True, output_dir=str(tmp_path))
    t = trainer(tmp_path, [probe])
    t.validate(model, _loader(ids), verbose=False)
    data, record = _result(tmp_path)
    # Independent computation in NumPy: the noise (sigma * std of the embedding weights) drawn per draw in the
    # embedding output's shape from the probe's seeded generator, added to the input use of the embedding only.
    embed = model.net.embed.weight.detach().double().numpy()
    std = 1.5 * embed.std(ddof=1)
    idx = ids.numpy()

    def logits(emb):
        h = emb.mean(1)
        if not tied:
            return h @ model.net.head.weight.detach().double().numpy().T + model.net.head.bias.detach().double().numpy()
        return (h + embed[(idx + 1) % 12].mean(1)) @ embed[:3].T

    clean = logits(embed[idx])
    draw = _draws(t)
    agree, kl = np.zeros(24), np.zeros(24)
    for _ in range(20):
        noisy = logits(embed[idx] + std * draw((24, 6, 4)).double().numpy())
        agree += noisy.argmax(1) == clean.argmax(1)
        lp = clean - np.log(np.exp(clean).sum(1, keepdims=True))
        lq = noisy - np.log(np.exp(noisy).sum(1, keepdims=True))
        kl += (np.exp(lp) * (lp - lq)).sum(1)
    np.testing.assert_allclose(data["ratio"], agree / 20)
    np.testing.assert_allclose(data["kl"], kl / 20, rtol=1e-4, atol=1e-7)
    assert 0 < data["ratio"].mean() < 1  # the noise changes some predictions
    assert record["noise_space"] == "embedding" and record["noise_std"] == pytest.approx(std, rel=1e-5)
    np.testing.assert_array_equal(data["clean_pred"], clean.argmax(1))


def test_dense_logits_score_every_position_over_the_classes_axis(tmp_path):
    x = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = _Net(torch.nn.Conv2d(1, 3, 1))
    probe = NoiseRobustnessMonitor(num_samples=16, num_draws=10, sigma=0.5, kl=True, output_dir=str(tmp_path))
    t = trainer(tmp_path, [probe])
    t.validate(model, _loader(x), verbose=False)
    data, record = _result(tmp_path)
    w = model.net.weight.detach().double().numpy()[:, 0, 0, 0]
    b = model.net.bias.detach().double().numpy()

    def logits(inputs):  # (N, 1, 4, 4) -> (N, 3, 16)
        return w[None, :, None] * inputs.reshape(16, 1, 16) + b[None, :, None]

    clean = logits(x.double().numpy())
    draw = _draws(t)
    agree, kl = np.zeros(16), np.zeros(16)
    for _ in range(10):
        noisy = logits((x + 0.5 * draw(x.shape)).double().numpy())
        agree += (noisy.argmax(1) == clean.argmax(1)).mean(1)  # per-pixel, averaged over the pixels
        lp = clean - np.log(np.exp(clean).sum(1, keepdims=True))
        lq = noisy - np.log(np.exp(noisy).sum(1, keepdims=True))
        kl += (np.exp(lp) * (lp - lq)).sum(1).mean(1)
    np.testing.assert_allclose(data["ratio"], agree / 10, atol=1e-12)
    np.testing.assert_allclose(data["kl"], kl / 10, rtol=1e-4, atol=1e-7)
    assert 0 < data["ratio"].mean() < 1
    assert (data["clean_pred"] == -1).all() and (data["label"] == -1).all()  # no single prediction per sample
    assert record["clean_accuracy"] is None and record["stability_ratio_mean_correct"] is None
    assert record["noise_space"] == "input"


class _Sequence(torch.nn.Module):
    """(N, T, 5) features -> (N, T, 3) logits."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.linear(x)


def test_sequence_logits_need_class_dim(tmp_path):
    x = torch.randn(16, 7, 5, generator=torch.Generator().manual_seed(0))
    model = _Net(_Sequence())
    with pytest.warns(ProbeSkippedWarning, match=r"shape \(4, 7, 3\).*ambiguous.*`class_dim=-1`"):
        trainer(tmp_path / "a", [NoiseRobustnessMonitor(output_dir=str(tmp_path / "a"))]).validate(
            model, _loader(x), verbose=False)
    probe = NoiseRobustnessMonitor(num_samples=16, num_draws=8, sigma=0.7, class_dim=-1, output_dir=str(tmp_path))
    t = trainer(tmp_path, [probe])
    t.validate(model, _loader(x), verbose=False)
    data, _ = _result(tmp_path)
    w, b = model.net.linear.weight.detach().double().numpy(), model.net.linear.bias.detach().double().numpy()
    clean = (x.double().numpy() @ w.T + b).argmax(2)  # (N, T)
    draw = _draws(t)
    agree = np.zeros(16)
    for _ in range(8):
        noisy = (x + 0.7 * draw(x.shape)).double().numpy() @ w.T + b
        agree += (noisy.argmax(2) == clean).mean(1)
    np.testing.assert_allclose(data["ratio"], agree / 8, atol=1e-12)


class _OneLogit(torch.nn.Module):
    def __init__(self, flat):
        super().__init__()
        self.linear, self.flat = torch.nn.Linear(6, 1), flat

    def forward(self, x):
        z = self.linear(x)
        return z[:, 0] if self.flat else z


@pytest.mark.parametrize("flat", [False, True])
def test_one_logit_binary_predictions_are_the_sign_of_the_logit(tmp_path, flat):
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0)) * 0.3
    model = _Net(_OneLogit(flat))
    probe = NoiseRobustnessMonitor(num_samples=24, num_draws=16, sigma=0.5, kl=True, output_dir=str(tmp_path))
    t = trainer(tmp_path, [probe])
    t.validate(model, _loader(x, 2), verbose=False)
    data, record = _result(tmp_path)
    w, b = model.net.linear.weight.detach().double().numpy()[0], model.net.linear.bias.detach().double().item()
    z = x.double().numpy() @ w + b
    draw = _draws(t)
    agree, kl = np.zeros(24), np.zeros(24)
    p = 1 / (1 + np.exp(-z))
    for _ in range(16):
        zn = (x + 0.5 * draw(x.shape)).double().numpy() @ w + b
        agree += (zn > 0) == (z > 0)
        q = 1 / (1 + np.exp(-zn))
        kl += p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    np.testing.assert_allclose(data["ratio"], agree / 16)
    np.testing.assert_allclose(data["kl"], kl / 16, rtol=1e-4, atol=1e-7)
    assert data["ratio"].mean() < 1  # it was always 1.0: the argmax of one logit never changes
    np.testing.assert_array_equal(data["clean_pred"], (z > 0).astype(int))
    correct = (z > 0).astype(int) == np.arange(24) % 2
    assert record["clean_accuracy"] == pytest.approx(correct.mean())


class _OneHot(torch.nn.Module):
    """Token ids one-hot encoded, no embedding module: nothing to perturb."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(12, 3)

    def forward(self, ids):
        return self.linear(torch.nn.functional.one_hot(ids, 12).float().mean(1))


@pytest.mark.parametrize(("net", "kwargs", "match"), [
    (_OneHot, {}, r"torch.int64 values \(token ids\?\).*no `nn.Embedding`"),
    (_Bag, {"token_noise": "skip"}, r"`token_noise='skip'`"),
])
def test_token_inputs_without_an_embedding_skip_before_the_first_step(tmp_path, net, kwargs, match):
    ids = torch.randint(0, 12, (32, 6), generator=torch.Generator().manual_seed(0))
    steps = _Steps()
    probe = NoiseRobustnessMonitor(output_dir=str(tmp_path), **kwargs)
    t = trainer(tmp_path, [steps, probe], max_epochs=1, limit_train_batches=2)
    with pytest.warns(ProbeSkippedWarning, match=match):
        t.fit(_Net(net()), _loader(ids), _loader(ids))
    records = read(tmp_path / "noise_robustness.jsonl")
    assert len(records) == 1 and records[0]["probe_status"] == "skipped" and records[0]["step"] == 0
    assert t.global_step == 2 and steps.batches == 2


class _IntLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.linear(x).argmax(1)


@pytest.mark.parametrize(("net", "kwargs", "match"), [
    (_IntLogits, {}, r"NoiseRobustnessMonitor.*floating logits.*torch.int64"),
    (lambda: torch.nn.Linear(6, 3), {"class_dim": 4}, r"NoiseRobustnessMonitor.*`class_dim`.*2-D logits.*got 4"),
])
def test_unreadable_logits_are_refused_before_the_first_step(tmp_path, net, kwargs, match):
    x = torch.randn(32, 6)
    steps = _Steps()
    t = trainer(tmp_path, [steps, NoiseRobustnessMonitor(output_dir=str(tmp_path), **kwargs)], max_epochs=1)
    with pytest.raises(ProbeConfigurationError, match=match):
        t.fit(_Net(net()), _loader(x), _loader(x))
    assert steps.batches == 0


def test_validate_runs_the_pre_flight(tmp_path):
    ids = torch.randint(0, 12, (16, 6))
    with pytest.warns(ProbeSkippedWarning, match="no `nn.Embedding`"):
        trainer(tmp_path, [NoiseRobustnessMonitor(output_dir=str(tmp_path))]).validate(
            _Net(_OneHot()), _loader(ids), verbose=False)
    assert read(tmp_path / "noise_robustness.jsonl")[0]["stage"] == "validate"


def test_a_reused_monitor_analyses_the_new_trainers_validation_samples(tmp_path):
    probe = NoiseRobustnessMonitor(num_samples=64, num_draws=2, output_dir=str(tmp_path))
    first = RandomDataModule()
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(small_mlp(), first)
    assert len(np.load(tmp_path / "noise_robustness" / "epoch0.npz")["ratio"]) == 32
    second = RandomDataModule(n=12, seed=5)  # 12 validation samples with other labels
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(small_mlp(), second)
    data = np.load(tmp_path / "noise_robustness" / "epoch0.npz")
    np.testing.assert_array_equal(data["sample_index"], np.arange(12))
    np.testing.assert_array_equal(data["label"], second.y[:12].numpy())
