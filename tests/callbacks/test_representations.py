import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_probes import ActivationStatsMonitor, AugmentationInvarianceMonitor, LayerCorrelationMonitor
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.representations import linear_cka
from lightning_probes.models import MLP
from tests.conftest import CaptureLogger
from tests.helpers import RandomDataModule, read, small_mlp, trainer


def _features(model, inputs, names):
    """Independent reference: the same layers' outputs via a plain forward with hooks of our own."""
    model.eval()
    outputs, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_hook(
            lambda m, a, o, name=name: outputs.__setitem__(name, o.detach().clone().double())))
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return outputs


def test_layer_correlation_matches_one_shot_cka(tmp_path):
    logger = CaptureLogger()
    layers = ["net.fc1", "net.relu1", "net.fc2", "net.fc4"]
    probe = LayerCorrelationMonitor(layers=layers, num_samples=48, batch_size=16, output_dir=str(tmp_path))
    model = small_mlp()
    trainer(tmp_path, [probe], logger=logger, max_epochs=2).fit(model, RandomDataModule())
    records = read(tmp_path / "layer_correlation.jsonl")
    assert sorted({r["epoch"] for r in records}) == [0, 1, 2]  # 0: the untrained network
    last = {(r["layer_a"], r["layer_b"]): r for r in records if r["epoch"] == 2}
    assert len(last) == 10  # pairs i <= j of 4 layers
    feats = _features(model, probe._probe.inputs(), layers)
    for (a, b), r in last.items():
        assert r["cka"] == pytest.approx(linear_cka(feats[a], feats[b]).item(), abs=1e-5)
        corr = np.corrcoef(feats[a].numpy(), feats[b].numpy(), rowvar=False)[: feats[a].shape[1], feats[a].shape[1]:]
        assert r["mean_abs_correlation"] == pytest.approx(np.nanmean(np.abs(corr)), abs=1e-5)
        if a == b:
            assert r["cka"] == pytest.approx(1.0)
    means = (tmp_path / "layer_correlation" / "corr_means.json").read_text()
    assert '"epochs": [\n    0,\n    1,\n    2\n  ]' in means
    for name in ("correlation.png", "cka.png", "corr_means.png"):
        assert (tmp_path / "layer_correlation" / name).stat().st_size > 1000
    assert "layer_correlation/cka/net.fc1__net.fc2" in logger.keys()


def test_minibatch_unbiased_option(tmp_path):
    probe = LayerCorrelationMonitor(layers=["net.fc1", "net.fc2"], num_samples=48, batch_size=16,
                                    cka="minibatch_unbiased", output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())
    records = read(tmp_path / "layer_correlation.jsonl")
    assert all(r["cka"] == pytest.approx(1.0) for r in records if r["layer_a"] == r["layer_b"])


def test_activation_stats_match_a_plain_forward(tmp_path):
    probe = ActivationStatsMonitor(num_samples=48, batch_size=16, output_dir=str(tmp_path))
    model = small_mlp()
    trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule())
    records = [r for r in read(tmp_path / "activation_stats.jsonl") if r["epoch"] == 1]
    # The default selection: the signal as it leaves each block, and the classifier.
    assert [r["layer"] for r in records] == ["net.relu1", "net.relu2", "net.relu3", "net.fc4"]
    feats = _features(model, probe._probe.inputs(), [r["layer"] for r in records])
    for r in records:
        a = feats[r["layer"]].numpy()
        # The probe's float32 forward runs in batches of 16, the reference's on all 48 at once: the kernels may
        # round each value differently (about 1e-7 of it), so the bounds are relative.
        assert r["mean"] == pytest.approx(a.mean(), rel=1e-6, abs=1e-7)
        assert r["std"] == pytest.approx(a.std(), rel=1e-6)
        assert r["sparsity"] == pytest.approx((a == 0).mean())
        assert r["dead_units"] == int((~(a != 0).any(axis=0)).sum())
        s = np.linalg.svd(a - a.mean(0), compute_uv=False)
        p = s / s.sum()
        assert r["effective_rank"] == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-5)
    assert (tmp_path / "activation_stats" / "overview.png").exists()


def test_tanh_saturation_is_reported(tmp_path):
    from lightning_probes.models import LeNet5

    probe = ActivationStatsMonitor(layers=["net.act1", "net.fc1"], num_samples=16, output_dir=str(tmp_path))
    data = RandomDataModule(n=32, shape=(1, 28, 28))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(LeNet5(activation="tanh"), data)
    records = {r["layer"]: r for r in read(tmp_path / "activation_stats.jsonl")}
    assert 0 <= records["net.act1"]["saturation"] <= 1 and records["net.fc1"]["saturation"] is None


def test_augmentation_invariance(tmp_path):
    probe = AugmentationInvarianceMonitor(num_images=3, num_views=12, matrix_views=5, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())
    records = read(tmp_path / "augmentation_invariance.jsonl")
    assert {r["epoch"] for r in records} == {0, 1}
    assert all(0 <= r["invariance"] <= 1 for r in records)
    for name in ("invariance.png", "correlations.png", "views.png"):
        assert (tmp_path / "augmentation_invariance" / name).exists()


def test_analysis_leaves_the_training_random_stream_alone(tmp_path):
    seen = []

    class Draw(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(torch.rand(1).item())

    from lightning_probes import NoiseRobustnessMonitor

    for probes in ([], [AugmentationInvarianceMonitor(num_images=2, num_views=4, output_dir=str(tmp_path))],
                   [NoiseRobustnessMonitor(num_samples=8, num_draws=2, output_dir=str(tmp_path))]):
        torch.manual_seed(0)
        trainer(tmp_path, [*probes, Draw()], max_epochs=2).fit(small_mlp(), RandomDataModule())
    assert seen[:2] == seen[2:4] == seen[4:6]


def test_identity_augmentation_is_perfectly_invariant(tmp_path):
    probe = AugmentationInvarianceMonitor(transform=lambda x: x, num_images=2, num_views=4, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())
    for r in read(tmp_path / "augmentation_invariance.jsonl"):
        assert r["within_variance"] == pytest.approx(0.0, abs=1e-12) and r["invariance"] == pytest.approx(1.0)


def test_hooks_removed_after_fit_and_after_an_exception(tmp_path):
    model = small_mlp()
    trainer(tmp_path, [ActivationStatsMonitor(num_samples=16, output_dir=str(tmp_path))], max_epochs=1).fit(
        model, RandomDataModule())
    assert all(not m._forward_hooks for m in model.modules())

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("broken layer")

    model = small_mlp()
    probe = ActivationStatsMonitor(num_samples=16, output_dir=str(tmp_path))
    model.net.fc1.register_forward_hook(lambda m, a, o: Broken()(o) if not m.training else None)
    with pytest.raises(RuntimeError, match="broken layer"):
        trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule())
    assert all(len(m._forward_hooks) <= 1 for m in model.modules())  # only the test's own hook is left
    assert model.training


def test_unknown_layer_is_a_clear_error(tmp_path):
    probe = LayerCorrelationMonitor(layers=["net.fc_1"])
    with pytest.raises(ValueError, match="did you mean 'net.fc1'"):
        trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())


def test_layer_without_tensor_output(tmp_path):
    class NoneLayer(torch.nn.Module):
        def forward(self, x):
            return None

    model = small_mlp()
    model.net.add_module("nothing", NoneLayer())
    model.net.fc1.register_forward_hook(lambda m, a, o: (model.net.nothing(o), o)[1])
    probe = ActivationStatsMonitor(layers=["net.nothing"], num_samples=8)
    with pytest.raises(ProbeConfigurationError, match=r"^ActivationStatsMonitor: Expected `layers` .*\['net.nothing'\] "
                       r"the layer\(s\) \{'net.nothing': 'NoneType'\} gave no tensor"):
        trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule())
    assert model.trainer.global_step == 0
    # With the default selection such a module is left out, and the others are analysed.
    probe = ActivationStatsMonitor(num_samples=8, output_dir=str(tmp_path / "default"))
    model.net.nothing.weight = torch.nn.Parameter(torch.zeros(1))  # a leaf with parameters: selected by default
    trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule())
    assert "net.nothing" not in probe._modules and read(tmp_path / "default" / "activation_stats.jsonl")


def test_too_small_probe_set(tmp_path):
    probe = LayerCorrelationMonitor(layers=["net.fc1"], cka="minibatch_unbiased", batch_size=4)
    data = RandomDataModule(n=3, batch_size=3)
    data.val_dataloader = lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x[:3], data.y[:3]))
    with pytest.warns(UserWarning, match="LayerCorrelationMonitor 'layer_correlation' is skipped for this run: it "
                                         "needs at least 4 probe samples, but the validation data gave 3"):
        trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), data)


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (LayerCorrelationMonitor, {"cka": "rbf"}, "`cka`"),
    (LayerCorrelationMonitor, {"layers": "net.fc1"}, "`layers`"),
    (LayerCorrelationMonitor, {"num_samples": 0}, "`num_samples`"),
    (ActivationStatsMonitor, {"max_features": 0}, "`max_features`"),
    (AugmentationInvarianceMonitor, {"num_images": 1}, "`num_images`"),
    (AugmentationInvarianceMonitor, {"transform": 3}, "`transform`"),
])
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_real_datamodule_augmentation_is_used(tmp_path, tiny_data):
    from lightning_probes.datamodules import MNISTDataModule
    from lightning_probes.models import LeNet5

    dm = MNISTDataModule(data_dir=str(tiny_data), batch_size=16)
    probe = AugmentationInvarianceMonitor(num_images=2, num_views=6, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(LeNet5(), dm)
    assert len(read(tmp_path / "augmentation_invariance.jsonl")) == 2 * len(probe._modules)
    views = probe._images[0]()
    assert views.shape == (1, 28, 28) and views.dtype == torch.float32  # raw uint8 -> augmented -> normalised


def test_no_validation_data_skips_with_a_warning(tmp_path):
    probe = ActivationStatsMonitor(output_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="ActivationStatsMonitor 'activation_stats' is skipped for this run: it "
                                         "analyses validation samples, but `limit_val_batches=0`"):
        trainer(tmp_path, [probe], max_epochs=2, limit_val_batches=0).fit(small_mlp(), RandomDataModule())
    assert [r.get("probe_status") for r in read(tmp_path / "activation_stats.jsonl")] == ["skipped"]


def test_compiled_network_is_captured_by_clean_names(tmp_path):
    model = small_mlp()
    model.net = torch.compile(model.net, backend="eager")
    probe = ActivationStatsMonitor(layers=["net.fc1", "net.relu1"], num_samples=16, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(model, RandomDataModule())
    records = read(tmp_path / "activation_stats.jsonl")
    assert {r["layer"] for r in records} == {"net.fc1", "net.relu1"}
    assert all(r["sparsity"] == 0 for r in records if r["layer"] == "net.fc1")
    assert hasattr(model.net, "_orig_mod")  # the compiled module is back in place


class _CountingLogger(CaptureLogger):
    """`CaptureLogger` that also keeps the step of every image."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, int]] = []

    def add_image(self, tag, image, global_step=None, dataformats="CHW") -> None:
        super().add_image(tag, image, global_step, dataformats)
        assert image.dtype == np.uint8
        self.images.append((tag, global_step))


@pytest.mark.parametrize("every", [0, 2])
def test_figures_follow_plot_every_n_epochs_and_heatmaps_go_to_the_logger_every_analysis(tmp_path, every):
    logger = _CountingLogger()
    probe = LayerCorrelationMonitor(layers=["net.fc1", "net.fc2"], num_samples=32, batch_size=16,
                                    plot_every_n_epochs=every, output_dir=str(tmp_path))
    drawn: list[tuple[str, int]] = []
    save_figure = probe.save_figure
    probe.save_figure = lambda trainer, fig, filename, tag, step: (drawn.append((filename, trainer.current_epoch)),
                                                                    save_figure(trainer, fig, filename, tag, step))
    trainer(tmp_path, [probe], logger=logger, max_epochs=3, limit_train_batches=2).fit(small_mlp(),
                                                                                       RandomDataModule())
    heatmaps = [s for tag, s in logger.images if tag == "layer_correlation/heatmap/correlation"]
    assert len(heatmaps) == 4  # epochs 0, 1, 2, 3: one colour-mapped image per analysis, whatever the cadence
    assert (tmp_path / "layer_correlation" / "correlation.npz").is_file()
    if every == 0:
        assert drawn == [] and not list((tmp_path / "layer_correlation").glob("*.png"))
    else:  # epoch 2 when due, then the last analysis (epoch 3) once, at the end of the fit
        correlation = [epoch for filename, epoch in drawn if filename == "correlation.png"]
        assert len(correlation) == 2
        assert sorted(f for f, _ in drawn) == sorted(["correlation.png", "cka.png", "corr_means.png"] * 2)
        with np.load(tmp_path / "layer_correlation" / "correlation.npz") as data:
            assert int(data["epoch"]) == 3


def test_plot_every_n_epochs_is_checked():
    with pytest.raises(ValueError, match="plot_every_n_epochs"):
        ActivationStatsMonitor(plot_every_n_epochs=-1)


# -- pre-flight, edge cases and reuse (issue 30: no probe ever breaks the run it watches) -----------------------
class Net(pl.LightningModule):
    """Any network as a classifier of ``RandomDataModule`` batches (cross-entropy, SGD)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.validation_batches = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.validation_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class OneTensor(torch.nn.Module):
    """A model that is one parameter tensor applied functionally (no Linear, no activation module)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 10) * 0.1)

    def forward(self, x):
        return x.flatten(1) @ self.weight


def _skip_warnings(caught):
    from lightning_probes.callbacks.guard import ProbeSkippedWarning

    return [str(w.message) for w in caught if issubclass(w.category, ProbeSkippedWarning)]


def test_default_selection_with_nothing_to_analyse_is_skipped_with_one_warning(tmp_path):
    """Matrix case one_big_tensor: AlignmentMonitor refused the run ("has no nn.Linear or nn.Conv2d layer"); its
    default has nothing to analyse there, so it is skipped with one warning and a skip record, and training goes
    on. The other probes read the one parametrised module's output."""
    from lightning_probes import AlignmentMonitor

    probes = [AlignmentMonitor(output_dir=str(tmp_path)), LayerCorrelationMonitor(output_dir=str(tmp_path)),
              ActivationStatsMonitor(output_dir=str(tmp_path))]
    model = Net(OneTensor())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, probes, max_epochs=1).fit(model, RandomDataModule())
    assert model.trainer.global_step > 0
    skips = _skip_warnings(caught)
    assert len(skips) == 1 and skips[0].startswith("AlignmentMonitor 'alignment' is skipped for this run: Net has no "
                                                    "nn.Linear, nn.Conv1d or nn.Conv2d layer")
    assert [r.get("probe_status") for r in read(tmp_path / "alignment.jsonl")] == ["skipped"]
    assert probes[0].skipped is not None and not probes[0].active
    assert {r["layer_a"] for r in read(tmp_path / "layer_correlation.jsonl")} == {"net"}
    assert {r["layer"] for r in read(tmp_path / "activation_stats.jsonl")} == {"net"}


def test_named_layers_that_cannot_work_are_refused_before_any_batch(tmp_path):
    """The layer check runs at the pre-flight, before the sanity check and step 0 (it used to run at the first
    analysis, after the sanity validation), with one error naming the probe, `layers`, the value and the fix."""
    model = small_mlp()
    model.net.add_module("unused", torch.nn.Linear(8, 8))
    probe = LayerCorrelationMonitor(layers=["net.fc1", "net.unused"], num_samples=8)
    net = Net(model.net)
    with pytest.raises(ProbeConfigurationError, match=r"^LayerCorrelationMonitor: Expected `layers` to name modules "
                       r"that the forward pass of Net calls .*\['net.fc1', 'net.unused'\].*\['net.unused'\] produced "
                       r"no output.*choose `layers`"):
        trainer(tmp_path, [probe], max_epochs=1, num_sanity_val_steps=2).fit(net, RandomDataModule())
    assert net.validation_batches == 0 and net.trainer.global_step == 0


def test_one_analysable_layer_draws_its_figures_and_plot_redraws_them(tmp_path):
    """Matrix cases one_big_tensor, spectral_norm, BoringModel: one layer trained, then LayerCorrelationMonitor
    raised at on_fit_end in `line_panels` ("Number of rows must be a positive integer, not 0"). Every probe draws
    what exists; `figures_from_files` (``lightning-probes plot``) too."""
    from lightning_probes import AlignmentMonitor
    from lightning_probes.plotting import line_panels

    common = dict(layers=["net.fc1"], output_dir=str(tmp_path))
    probes = [LayerCorrelationMonitor(num_samples=16, **common), ActivationStatsMonitor(num_samples=16, **common),
              AlignmentMonitor(num_samples=16, **common),
              AugmentationInvarianceMonitor(num_images=2, num_views=4, matrix_views=4, **common)]
    trainer(tmp_path, probes, max_epochs=2).fit(small_mlp(), RandomDataModule())
    for probe in probes:
        specs = type(probe).figures_from_files(str(tmp_path), probe.name, {})
        assert specs, probe.name
        for filename, _, draw in specs:
            assert (tmp_path / probe.name / filename).stat().st_size > 1000, filename
            draw()
    assert (tmp_path / "layer_correlation" / "corr_means.png").exists()
    assert len(line_panels([0, 1], {}, "epoch", "nothing").axes) == 1


def test_one_validation_sample(tmp_path):
    """Matrix case one_val_sample ("Expected at least 2 samples for an effective rank"): the statistics of one
    sample are defined (the effective rank is null), the covariance-based probes are skipped with one warning."""
    data = RandomDataModule()
    data.val_dataloader = lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x[:1], data.y[:1]))
    probes = [ActivationStatsMonitor(output_dir=str(tmp_path)), LayerCorrelationMonitor(output_dir=str(tmp_path))]
    model = small_mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, probes, max_epochs=1).fit(model, data)
    records = read(tmp_path / "activation_stats.jsonl")
    assert records and all(r["effective_rank"] is None for r in records)
    feats = _features(model, probes[0]._probe.inputs(), ["net.relu1"])["net.relu1"].numpy()
    first = next(r for r in records if r["layer"] == "net.relu1" and r["epoch"] == 1)
    assert first["mean"] == pytest.approx(feats.mean(), rel=1e-6, abs=1e-7)
    assert first["dead_units"] == int((feats == 0).all(axis=0).sum())
    assert _skip_warnings(caught) == ["LayerCorrelationMonitor 'layer_correlation' is skipped for this run: it needs "
                                      "at least 2 probe samples, but the validation data gave 1; give it more "
                                      "validation samples"]


def test_a_second_fit_with_the_same_probe_instances_starts_clean(tmp_path):
    """Reused probes: the second fit reads the new model's layers and the new validation data (the augmented
    views came from the first run's images), and its history starts at epoch 0 again."""
    probes = [LayerCorrelationMonitor(num_samples=16),
              AugmentationInvarianceMonitor(transform=lambda x: x, num_images=2, num_views=3, matrix_views=3)]
    trainer(tmp_path / "a", probes, max_epochs=1).fit(small_mlp(), RandomDataModule(seed=0))
    second = MLP(hidden=(6, 5, 4), input_size=8)
    data = RandomDataModule(seed=1)
    trainer(tmp_path / "b", probes, max_epochs=1).fit(second, data)
    assert probes[0].history["epochs"] == [0, 1]
    assert probes[0]._widths == {"net.relu1": 6, "net.relu2": 5, "net.relu3": 4, "net.fc4": 10}
    assert set(probes[0]._modules) == {"net.relu1", "net.relu2", "net.relu3", "net.fc4"}
    records = read(tmp_path / "b" / "probes" / "layer_correlation.jsonl")
    assert {r["layer_a"] for r in records} == set(probes[0]._modules)
    view = probes[1]._images[0]()  # the identity transform: one of the new validation images itself
    assert any(torch.equal(view, x) for x in data.x[:32])
