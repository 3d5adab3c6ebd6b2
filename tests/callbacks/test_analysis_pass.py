"""The analysis pass shared by the probes that run the model: forward_fn / input_key / logits_fn, lazily built
layers, dtype conversion after setup, the memory guard and the headline metrics."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.demos.transformer import LightningTransformer, Transformer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_probes import (
    ActivationStatsMonitor,
    AugmentationInvarianceMonitor,
    LayerCorrelationMonitor,
    NoiseRobustnessMonitor,
)
from lightning_probes.callbacks.layer_correlation import estimated_bytes
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.models import MLP
from tests.helpers import RandomDataModule, read, small_mlp, trainer


class TinyLM(LightningTransformer):
    """Lightning's demo language model (``forward(inputs, target)``) on random tokens: no download."""

    def __init__(self) -> None:
        super().__init__(vocab_size=12)
        self.model = Transformer(vocab_size=12, ninp=8, nhead=2, nhid=8, nlayers=1, dropout=0.1)

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self):
        tokens = torch.randint(0, 12, (24, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)

    def val_dataloader(self):
        return self.train_dataloader()


def _fit(tmp_path, model, probes, data=None, **kwargs):
    kwargs = {"max_epochs": 1, "limit_train_batches": 2, **kwargs}
    t = trainer(tmp_path, probes, **kwargs)
    t.fit(model, data)
    return t


def test_forward_fn_runs_a_model_with_two_inputs(tmp_path):
    forward = lambda module, batch: module(*batch)  # noqa: E731
    probes = [LayerCorrelationMonitor(num_samples=16, batch_size=8, forward_fn=forward, output_dir=str(tmp_path)),
              ActivationStatsMonitor(num_samples=16, batch_size=8, forward_fn=forward, output_dir=str(tmp_path))]
    t = _fit(tmp_path, TinyLM(), probes)
    stats = read(tmp_path / "activation_stats.jsonl")
    layers = {r["layer"] for r in stats}
    assert {"model.embedding", "model.decoder"} <= layers
    assert not any(name.endswith("out_proj") for name in layers)  # never called: left out of the default set
    assert {r["epoch"] for r in stats} == {0, 1}
    pairs = read(tmp_path / "layer_correlation.jsonl")
    assert {r["epoch"] for r in pairs} == {0, 1} and all(r["cka"] is not None for r in pairs)
    assert "layer_correlation/cka_adjacent_mean" in t.callback_metrics
    assert len(probes[0]._probe) == 16  # (N, T) targets are no class labels: the first 16 samples
    assert torch.equal(probes[0]._probe.indices, torch.arange(16))


@pytest.mark.parametrize("cls", [LayerCorrelationMonitor, ActivationStatsMonitor])
def test_default_forward_on_a_two_input_model_names_forward_fn(tmp_path, cls):
    model = TinyLM()
    with pytest.raises(ProbeConfigurationError, match=f"^{cls.__name__}: .*cannot be called with one input tensor"
                                                      ".*`forward_fn=`"):
        _fit(tmp_path, model, [cls(num_samples=8, output_dir=str(tmp_path))])
    assert model.trainer.global_step == 0  # the pre-flight's forward found it


class DictData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.inner = RandomDataModule(n=48)

    def _loader(self, x, y):
        class Samples(Dataset):
            def __len__(self):
                return len(y)

            def __getitem__(self, i):
                return {"image": x[i], "label": y[i], "id": i}

        return DataLoader(Samples(), batch_size=16)

    def train_dataloader(self):
        return self._loader(self.inner.x, self.inner.y)

    def val_dataloader(self):
        return self._loader(self.inner.x[:32], self.inner.y[:32])


class DictMLP(MLP):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["image"], batch["label"]), batch_idx)


def test_dict_batches_with_input_and_target_keys(tmp_path):
    keys = {"input_key": "image", "target_key": "label"}
    stats = ActivationStatsMonitor(num_samples=20, layers=["net.fc1"], output_dir=str(tmp_path), **keys)
    noise = NoiseRobustnessMonitor(num_samples=20, num_draws=3, output_dir=str(tmp_path), **keys)
    model = DictMLP(hidden=(16, 12, 8), input_size=8)
    _fit(tmp_path, model, [stats, noise], DictData())
    assert len(read(tmp_path / "activation_stats.jsonl")) == 2
    probe = stats._probe
    assert set(probe.batch) == {"image", "label", "id"} and probe.batch["image"].shape == (20, 1, 8, 8)
    labels = DictData().inner.y[:32]
    counts = torch.bincount(labels[probe.indices], minlength=10)
    present = torch.bincount(labels, minlength=10) > 0
    assert counts[present].max() - counts[present].min() <= 1 or counts.sum() == 20  # spread over the classes
    assert torch.equal(probe.labels, labels[probe.indices]) and torch.equal(probe.batch["id"], probe.indices)
    data = np.load(tmp_path / "noise_robustness" / "epoch0.npz")
    assert np.array_equal(data["label"], labels[noise._probe.indices].numpy())


def test_dict_batch_without_input_key_is_a_clear_error(tmp_path):
    probe = ActivationStatsMonitor(num_samples=8, output_dir=str(tmp_path))
    with pytest.raises(ProbeConfigurationError, match="^ActivationStatsMonitor: .*pass `input_key=`.*`forward_fn=`"):
        _fit(tmp_path, DictMLP(hidden=(16, 12, 8), input_size=8), [probe], DictData())


class LazyNet(pl.LightningModule):
    """Layers built in `configure_model`, which Lightning calls after the callbacks' `setup`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_layers_built_in_configure_model(tmp_path):
    probes = [ActivationStatsMonitor(num_samples=16, output_dir=str(tmp_path)),
              LayerCorrelationMonitor(layers=["net.1", "net.3"], num_samples=16, output_dir=str(tmp_path)),
              AugmentationInvarianceMonitor(num_images=2, num_views=4, output_dir=str(tmp_path)),
              NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(tmp_path))]
    _fit(tmp_path, LazyNet(), probes, RandomDataModule())
    # The default selection, made after configure_model built the layers: the ReLU and the classifier.
    assert {r["layer"] for r in read(tmp_path / "activation_stats.jsonl")} == {"net.2", "net.3"}
    for name in ("layer_correlation", "augmentation_invariance", "noise_robustness"):
        assert read(tmp_path / f"{name}.jsonl"), name


class TupleMLP(MLP):
    """Returns ``(logits, features)``, as many models do."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.detach()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x)[0], y)

    def validation_step(self, batch, batch_idx):
        pass


def test_logits_fn_for_a_model_that_returns_a_tuple(tmp_path):
    model = TupleMLP(hidden=(16, 12, 8), input_size=8)
    with pytest.raises(ProbeConfigurationError, match="^NoiseRobustnessMonitor: Expected `logits_fn` to give floating "
                                                      "logits of .* but got a tuple"):
        _fit(tmp_path, model, [NoiseRobustnessMonitor(num_samples=32, num_draws=2, output_dir=str(tmp_path))],
             RandomDataModule())
    probe = NoiseRobustnessMonitor(num_samples=32, num_draws=2, sigma=0.0, logits_fn=lambda m, x: m(x)[0],
                                   output_dir=str(tmp_path / "ok"))
    _fit(tmp_path, TupleMLP(hidden=(16, 12, 8), input_size=8), [probe], RandomDataModule())
    assert read(tmp_path / "ok" / "noise_robustness.jsonl")[0]["stability_ratio_mean"] == 1.0


def test_noise_on_a_language_model_names_the_logits_layout(tmp_path):
    """Token inputs are perturbed in the embedding space; the demo language model's (samples * tokens, vocab)
    output is not per-sample logits: one error naming `forward_fn`, before any step."""
    probe = NoiseRobustnessMonitor(num_samples=8, num_draws=2, forward_fn=lambda m, b: m(*b),
                                   output_dir=str(tmp_path))
    model = TinyLM()
    with pytest.raises(ProbeConfigurationError, match="^NoiseRobustnessMonitor: Expected `forward_fn` to give "
                                                      "floating logits of .* samples"):
        _fit(tmp_path, model, [probe])
    assert model.trainer.global_step == 0
    with pytest.raises(ValueError, match="either `logits_fn`"):
        NoiseRobustnessMonitor(logits_fn=lambda m, x: m(x), forward_fn=lambda m, b: m(b[0]))


def test_memory_estimate_stops_before_allocating(tmp_path):
    class Wide(MLP):
        def __init__(self):
            super().__init__(hidden=(1024, 1024, 1024), input_size=8)

    # A cap the user set is never lowered: an error naming the estimate and the arguments.
    probe = LayerCorrelationMonitor(num_samples=8, max_memory_gb=0.05, max_features=1024, output_dir=str(tmp_path))
    with pytest.raises(ProbeConfigurationError,
                       match=r"about \d+\.\d+ MiB .*above .*`max_memory_gb`=0.05.*`layers`.*`max_features`"):
        _fit(tmp_path, Wide(), [probe], RandomDataModule())
    # At the defaults the widest layers are reduced to fit, with one warning (75% of 0.05 GB: about 2,300 features).
    probe = LayerCorrelationMonitor(num_samples=8, max_memory_gb=0.05, output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"keep at most \d+ features"):
        _fit(tmp_path, Wide(), [probe], RandomDataModule())
    widths = probe._widths.values()
    assert estimated_bytes(sum(widths), max(widths)) <= 0.75 * 0.05e9
    with pytest.raises(ValueError, match="`max_memory_gb`"):
        LayerCorrelationMonitor(max_memory_gb=0)


def test_every_probe_under_float64(tmp_path):
    probes = [LayerCorrelationMonitor(num_samples=16, output_dir=str(tmp_path)),
              ActivationStatsMonitor(num_samples=16, output_dir=str(tmp_path)),
              AugmentationInvarianceMonitor(num_images=2, num_views=4, output_dir=str(tmp_path)),
              NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(tmp_path))]
    model = small_mlp()
    _fit(tmp_path, model, probes, RandomDataModule(), precision="64-true")
    assert next(model.parameters()).dtype == torch.float64
    for name in ("layer_correlation", "activation_stats", "augmentation_invariance"):
        assert {r["epoch"] for r in read(tmp_path / f"{name}.jsonl")} == {0, 1}, name
    assert [r["epoch"] for r in read(tmp_path / "noise_robustness.jsonl")] == [0]


def test_headline_metrics_reach_callback_metrics_and_early_stopping(tmp_path):
    probes = [LayerCorrelationMonitor(layers=["net.fc1", "net.fc2", "net.fc3"], num_samples=16,
                                      output_dir=str(tmp_path)),
              ActivationStatsMonitor(num_samples=16, output_dir=str(tmp_path)),
              AugmentationInvarianceMonitor(num_images=2, num_views=4, output_dir=str(tmp_path)),
              NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(tmp_path))]
    stop = EarlyStopping(monitor="noise_robustness/stability_ratio_mean", mode="max", patience=5, strict=True)
    t = _fit(tmp_path, small_mlp(), [*probes, stop], RandomDataModule(), max_epochs=2)
    metrics = {k: float(v) for k, v in t.callback_metrics.items()}
    cka = {(r["layer_a"], r["layer_b"]): r["cka"] for r in read(tmp_path / "layer_correlation.jsonl")
           if r["epoch"] == 2}
    assert metrics["layer_correlation/cka_adjacent_mean"] == pytest.approx(
        np.mean([cka["net.fc1", "net.fc2"], cka["net.fc2", "net.fc3"]]), rel=1e-6)
    dead = [r["dead_fraction"] for r in read(tmp_path / "activation_stats.jsonl") if r["epoch"] == 2]
    assert metrics["activation_stats/dead_fraction"] == pytest.approx(np.mean(dead), rel=1e-6)
    invariance = [r["invariance"] for r in read(tmp_path / "augmentation_invariance.jsonl") if r["epoch"] == 2]
    assert metrics["augmentation_invariance/invariance_mean"] == pytest.approx(np.mean(invariance), rel=1e-6)
    noise = read(tmp_path / "noise_robustness.jsonl")[-1]
    assert metrics["noise_robustness/stability_ratio_mean"] == pytest.approx(noise["stability_ratio_mean"])
    assert stop.wait_count >= 0 and t.current_epoch == 2  # monitored without "metric not found"


def test_two_noise_monitors_with_their_own_names(tmp_path):
    from tests.conftest import CaptureLogger

    logger = CaptureLogger()
    probes = [NoiseRobustnessMonitor(num_samples=8, num_draws=3, sigma=0.0, name="noise_zero",
                                     output_dir=str(tmp_path)),
              NoiseRobustnessMonitor(num_samples=8, num_draws=3, sigma=5.0, name="noise_large",
                                     output_dir=str(tmp_path))]
    t = _fit(tmp_path, small_mlp(), probes, RandomDataModule(), logger=logger)
    zero, large = read(tmp_path / "noise_zero.jsonl"), read(tmp_path / "noise_large.jsonl")
    assert [r["sigma"] for r in zero] == [0.0] and [r["sigma"] for r in large] == [5.0]
    assert (tmp_path / "noise_zero" / "epoch0.npz").exists() and (tmp_path / "noise_large" / "histogram.png").exists()
    assert float(t.callback_metrics["noise_zero/stability_ratio_mean"]) == 1.0
    assert "noise_large/stability_ratio_mean" in t.callback_metrics
    assert {"noise_zero/stability_ratio_median", "noise_large/stability_ratio_mean"} <= logger.keys()


def test_analysis_keeps_each_module_mode_and_the_random_stream(tmp_path):
    seen = []

    class Draw(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(torch.rand(1).item())

    class FrozenBatchNorm(MLP):
        def on_train_epoch_start(self):
            self.net.bn1.eval()  # a frozen part: the probes must leave it in eval mode

    modes = []

    class Modes(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            modes.append((pl_module.training, pl_module.net.bn1.training, pl_module.net.bn2.training))

    for probes in ([], [LayerCorrelationMonitor(num_samples=16, output_dir=str(tmp_path)),
                        ActivationStatsMonitor(num_samples=16, output_dir=str(tmp_path))]):
        torch.manual_seed(0)
        _fit(tmp_path, FrozenBatchNorm(hidden=(16, 12, 8), input_size=8), [*probes, Draw(), Modes()],
             RandomDataModule(), max_epochs=2)
    assert seen[:2] == seen[2:]
    assert modes == [(True, False, True)] * 4


class LazyLayers(LazyNet):
    """``nn.LazyLinear`` layers (shaped by the first forward) and dropout (the random stream matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), nn.Dropout(0.3), nn.LazyLinear(10))


def test_lazy_modules_are_read_once_built_and_training_is_unchanged(tmp_path):
    """Matrix case lazy_modules: the layer check's forward at the start initialised the lazy layers from the
    probes' forked random state, so training started from other weights than without probes. Now the layer check
    and the epoch-0 analysis wait for the first optimiser step: the weights are those training built, untrained."""
    from lightning_probes import AlignmentMonitor

    untrained = {}

    class Untrained(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            untrained.setdefault("net", {k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    weights = []
    for probes in ([], [ActivationStatsMonitor(num_samples=16, output_dir=str(tmp_path)),
                        LayerCorrelationMonitor(num_samples=16, output_dir=str(tmp_path)),
                        AlignmentMonitor(num_samples=16, output_dir=str(tmp_path))]):
        pl.seed_everything(0)
        model = LazyLayers()
        _fit(tmp_path, model, [Untrained(), *probes], RandomDataModule(), max_epochs=2)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    stats = [r for r in read(tmp_path / "activation_stats.jsonl") if r["epoch"] == 0]
    assert [(r["layer"], r["step"]) for r in stats] == [("net.2", 0), ("net.4", 0)]
    reference = LazyLayers()
    reference(torch.zeros(1, 64))  # shape the lazy layers, then load the untrained weights
    reference.load_state_dict(untrained["net"])
    reference.eval()
    inputs = probes[0]._probe.inputs()
    with torch.no_grad():
        hidden = reference.net[2](reference.net[1](reference.net[0](inputs))).double().numpy()
    assert stats[0]["mean"] == pytest.approx(hidden.mean(), rel=1e-6)
    assert stats[0]["dead_units"] == int((hidden == 0).all(axis=0).sum())
    assert {r["layer"] for r in read(tmp_path / "alignment.jsonl")} == {"net.1", "net.4"}
