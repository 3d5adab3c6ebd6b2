import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_probes import ActivationStatsMonitor, AugmentationInvarianceMonitor, LayerCorrelationMonitor
from lightning_probes.functional.representations import linear_cka
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
    with pytest.raises(TypeError, match="'net.nothing' .* holds no tensor"):
        trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule())


def test_too_small_probe_set(tmp_path):
    probe = LayerCorrelationMonitor(layers=["net.fc1"], cka="minibatch_unbiased", batch_size=4)
    data = RandomDataModule(n=3, batch_size=3)
    data.val_dataloader = lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x[:3], data.y[:3]))
    with pytest.raises(ValueError, match="needs at least 4 probe samples"):
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
    with pytest.warns(UserWarning, match="ActivationStatsMonitor is skipped for this run: it needs validation data"):
        trainer(tmp_path, [probe], max_epochs=2, limit_val_batches=0).fit(small_mlp(), RandomDataModule())
    assert not (tmp_path / "activation_stats.jsonl").exists()


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
