"""Representation probes on sequence models and large models at their defaults: token rows, automatic reduction."""

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.demos import Transformer
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes as lp
from lightning_probes import LayerCorrelationMonitor
from lightning_probes.callbacks.layer_correlation import estimated_bytes
from lightning_probes.errors import ProbeConfigurationError
from tests.helpers import RandomDataModule, read, small_mlp, trainer


class SequenceModel(pl.LightningModule):
    """Lightning's demo Transformer (the model of issue 21) on random tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=50, nlayers=2, nhid=64, ninp=32, nhead=2)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return torch.nn.functional.nll_loss(self.model(inputs, target), target.view(-1))

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tokens(n: int, seed: int) -> DataLoader:
    x = torch.randint(0, 50, (n, 16), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, torch.roll(x, -1, 1)), batch_size=16)


def _forward(module, batch):
    return module.model(batch[0], batch[1])


def _token_rows(model, batch, names, inputs=False):
    """Independent reference: each layer's output (or input) of a plain eval forward, as (batch * tokens, features)."""
    model.eval()
    found, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(m, args, output, name=name):
            value = args[0] if inputs else output
            found.setdefault(name, value.detach().double().reshape(-1, value.shape[-1]).numpy())
        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        _forward(model, batch)
    for handle in handles:
        handle.remove()
    return found


def _numpy_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _numpy_effective_rank(rows):
    eigenvalues = np.linalg.eigvalsh(np.cov(rows, rowvar=False))
    eigenvalues = np.where(eigenvalues > 1e-12 * eigenvalues.max(), eigenvalues, 0.0)
    p = np.sqrt(eigenvalues) / np.sqrt(eigenvalues).sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_demo_transformer_at_defaults_reads_tokens_as_samples(tmp_path):
    """Refused before ("about 5.92 GB for the float64 (13600 x 13600) covariance over 22 layers"): now every token
    is a sample of its layer's features; the statistics equal NumPy's over the batch * tokens rows."""
    common = dict(forward_fn=_forward, output_dir=str(tmp_path), every_n_epochs=2, plot_every_n_epochs=0)
    probes = [lp.LayerCorrelationMonitor(**common), lp.ActivationStatsMonitor(**common), lp.AlignmentMonitor(**common)]
    model = SequenceModel()
    untrained = copy.deepcopy(model.model)  # the analysis at epoch 0 sees the untrained network
    trainer(tmp_path, probes, max_epochs=1, limit_train_batches=1).fit(model, _tokens(16, 0), _tokens(32, 1))
    batch = probes[0]._probe.batch
    wrapped = torch.nn.Module()
    wrapped.model = untrained
    names = ["model.transformer.encoder.layers.0.linear1", "model.transformer.encoder.layers.1.norm2",
             "model.decoder"]
    rows = _token_rows(wrapped, batch, names)
    assert {n: r.shape for n, r in rows.items()} == {names[0]: (512, 64), names[1]: (512, 32), names[2]: (512, 50)}

    corr = {(r["layer_a"], r["layer_b"]): r for r in read(tmp_path / "layer_correlation.jsonl")}
    assert sum(probes[0]._widths.values()) < 13600 and len(probes[0]._widths) == 22
    for a, b in [(names[0], names[1]), (names[1], names[2])]:
        assert corr[a, b]["cka"] == pytest.approx(_numpy_cka(rows[a], rows[b]), abs=1e-5)
        full = np.corrcoef(rows[a], rows[b], rowvar=False)[: rows[a].shape[1], rows[a].shape[1]:]
        assert corr[a, b]["mean_abs_correlation"] == pytest.approx(np.nanmean(np.abs(full)), abs=1e-5)

    stats = {r["layer"]: r for r in read(tmp_path / "activation_stats.jsonl")}
    for name in names:
        assert stats[name]["effective_rank"] == pytest.approx(_numpy_effective_rank(rows[name]), rel=1e-6)
        assert stats[name]["mean"] == pytest.approx(rows[name].mean(), rel=1e-6, abs=1e-9)
        # A unit is a feature (the last dimension), dead when zero at every token of every sample.
        assert stats[name]["dead_units"] == int((np.abs(rows[name]).max(axis=0) == 0).sum())

    # AlignmentMonitor: a Linear on (batch, tokens, 32) inputs, covariance over the 512 token rows.
    align = {r["layer"]: r for r in read(tmp_path / "alignment.jsonl")}
    linear = "model.transformer.encoder.layers.0.linear1"
    x = _token_rows(wrapped, batch, [linear], inputs=True)[linear]
    cov = np.cov(x, rowvar=False)
    w = dict(wrapped.named_modules())[linear].weight.detach().double().numpy()
    expected = np.einsum("ud,de,ue->u", w, cov, w) / ((w**2).sum(1) * np.trace(cov))
    np.testing.assert_allclose(align[linear]["alignment"], expected, rtol=1e-6)
    assert align[linear]["features"] == align[linear]["kept_features"] == 32


def test_token_mode_mean_gives_one_row_per_sample(tmp_path):
    probe = lp.ActivationStatsMonitor(forward_fn=_forward, token_mode="mean", output_dir=str(tmp_path),
                                      layers=["model.transformer.encoder.layers.0.linear1"], every_n_epochs=2)
    model = SequenceModel()
    untrained = copy.deepcopy(model.model)
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(model, _tokens(16, 0), _tokens(32, 1))
    wrapped = torch.nn.Module()
    wrapped.model = untrained
    name = "model.transformer.encoder.layers.0.linear1"
    rows = _token_rows(wrapped, probe._probe.batch, [name])[name].reshape(32, 16, 64).mean(axis=1)
    record = read(tmp_path / "activation_stats.jsonl")[0]
    assert record["effective_rank"] == pytest.approx(_numpy_effective_rank(rows), rel=1e-6)


def test_bad_token_mode():
    with pytest.raises(ValueError, match="`token_mode`"):
        lp.LayerCorrelationMonitor(token_mode="tokens")
    with pytest.raises(ValueError, match="`token_mode`.*'flatten'"):
        lp.AlignmentMonitor(token_mode="flatten")


def test_explicit_settings_that_do_not_fit_are_still_an_error(tmp_path):
    with pytest.raises(ProbeConfigurationError, match=r"`max_memory_gb`=1e-08.*the set `max_features` are not"):
        trainer(tmp_path, [lp.LayerCorrelationMonitor(max_features=64, max_memory_gb=1e-8, num_samples=16)],
                max_epochs=1).fit(small_mlp(), RandomDataModule())
    with pytest.raises(ProbeConfigurationError, match=r"the set `layers` are not"):
        trainer(tmp_path, [lp.LayerCorrelationMonitor(layers=["net.fc1", "net.fc2"], max_memory_gb=1e-8,
                                                      num_samples=16)], max_epochs=1).fit(small_mlp(),
                                                                                         RandomDataModule())


def test_defaults_reduce_the_widest_layers_with_one_warning(tmp_path, caplog):
    """At the defaults a selection above `max_memory_gb` is reduced (widest layers first); the records then equal
    the statistics of the kept features, computed with NumPy."""
    room = estimated_bytes(20) / LayerCorrelationMonitor.accumulator_fraction  # room for 20 features
    probe = lp.LayerCorrelationMonitor(max_memory_gb=room / 1e9, num_samples=32, output_dir=str(tmp_path),
                                       every_n_epochs=2)
    model = small_mlp()
    untrained = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"keep at most \d+ features") as warned:
        trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(model, RandomDataModule())
    assert len([w for w in warned if "keep at most" in str(w.message)]) == 1
    widths = probe._widths
    assert sum(widths.values()) <= 20 and max(widths.values()) < 16  # fc1/relu1 (16 wide) were cut
    inputs = probe._probe.inputs()
    untrained.eval()
    outputs = {}
    modules = dict(untrained.named_modules())
    def keep(name):
        def hook(module, args, output):
            outputs.setdefault(name, output.detach().clone().double())
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in widths]
    with torch.no_grad():
        untrained(inputs)
    for handle in handles:
        handle.remove()
    kept = {n: probe._reducers[n](outputs[n]).numpy() for n in widths}
    names = list(widths)
    record = next(r for r in read(tmp_path / "layer_correlation.jsonl")
                  if (r["layer_a"], r["layer_b"]) == (names[0], names[-1]))
    assert record["cka"] == pytest.approx(_numpy_cka(kept[names[0]], kept[names[-1]]), abs=1e-5)


def test_resnet50_at_defaults(tmp_path):
    """torchvision's resnet50 with every representation probe and the prediction probes at their memory defaults
    (LayerCorrelationMonitor at 0.06 GB instead of its share of the budget, so that its reduced covariance, about
    2,500 features, keeps the test in seconds): it runs, LayerCorrelationMonitor
    reduces its widest layers with one warning, and every probe writes records."""
    torchvision = pytest.importorskip("torchvision")

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet50(num_classes=10)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            return {"logits": self(batch[0]), "target": batch[1]}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.arange(16) % 10)
    out = str(tmp_path)
    schedule = dict(output_dir=out, every_n_epochs=2, plot_every_n_epochs=0)  # one analysis: epoch 0
    probes = [lp.LayerCorrelationMonitor(max_memory_gb=0.06, **schedule), lp.ActivationStatsMonitor(**schedule),
              lp.AlignmentMonitor(**schedule), lp.AugmentationInvarianceMonitor(num_views=8, **schedule),
              lp.ConfidenceMonitor(output_dir=out, plot_every_n_epochs=0),
              lp.NoiseRobustnessMonitor(num_draws=4, output_dir=out, plot_every_n_epochs=0)]
    with pytest.warns(UserWarning, match=r"LayerCorrelationMonitor: .* keep at most") as warned:
        trainer(tmp_path, probes, max_epochs=1, limit_train_batches=1).fit(
            Net(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert len([w for w in warned if str(w.message).startswith("LayerCorrelationMonitor: ")
                and "keep at most" in str(w.message)]) == 1
    for name in ("layer_correlation", "activation_stats", "alignment", "augmentation_invariance", "confidence",
                 "noise_robustness"):
        assert read(tmp_path / f"{name}.jsonl"), name
    assert len(probes[0]._widths) == 18  # 17 ReLU modules and the classifier
    widths = probes[0]._widths.values()
    assert estimated_bytes(sum(widths), max(widths)) <= LayerCorrelationMonitor.accumulator_fraction * 0.06e9


def test_augmentation_invariance_skips_token_inputs_at_its_default(tmp_path):
    """Token ids cannot be augmented as images: at the default augmentation the probe is skipped before any
    training step with one warning naming the fix (it used to refuse the run), and training goes on."""
    probe = lp.AugmentationInvarianceMonitor(forward_fn=_forward, output_dir=str(tmp_path / "probes"))
    model = SequenceModel()
    with pytest.warns(UserWarning, match="AugmentationInvarianceMonitor 'augmentation_invariance' is skipped for this "
                                         "run: its default augmentation .* is for images .* torch.int64 .*`transform`"):
        trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(model, _tokens(16, 0), _tokens(32, 1))
    assert model.trainer.global_step == 1
    assert [r.get("probe_status") for r in read(tmp_path / "probes" / "augmentation_invariance.jsonl")] == ["skipped"]


def test_augmentation_invariance_refuses_an_explicit_transform_that_cannot_work(tmp_path):
    """An explicit `transform` that fails on the probe inputs is the user's request: one error naming it, before
    any training step."""
    from torchvision.transforms import v2

    probe = lp.AugmentationInvarianceMonitor(transform=v2.RandomAffine(degrees=10), forward_fn=_forward,
                                             output_dir=str(tmp_path / "probes"))
    model = SequenceModel()
    with pytest.raises(ProbeConfigurationError, match=r"^AugmentationInvarianceMonitor: Expected `transform` to turn "
                       r"one probe input \(torch.int64, shape \(16,\)\) into a view the model takes, but "
                       r"`transform`=RandomAffine.* failed: .*; pass a transform for these inputs"):
        trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(model, _tokens(16, 0), _tokens(32, 1))
    assert model.trainer.global_step == 0
