"""AugmentationInvarianceMonitor streams its views: the records equal NumPy on the same views, whatever the batch."""

import numpy as np
import pytest
import torch

import lightning_probes as lp
from lightning_probes import AugmentationInvarianceMonitor
from lightning_probes.callbacks.augmentation_invariance import estimated_bytes
from tests.helpers import RandomDataModule, read, small_mlp, trainer


class RecordingNoise:
    """A seeded-stream augmentation (noise from the global generator) that keeps every view it makes."""

    def __init__(self) -> None:
        self.views: list[torch.Tensor] = []

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        view = image + 0.3 * torch.randn_like(image)
        self.views.append(view.clone())
        return view


@pytest.mark.parametrize("max_memory_gb", [None, 3e-5], ids=["one_batch", "small_batches"])
def test_records_equal_numpy_on_the_same_views(tmp_path, max_memory_gb):
    model = small_mlp()
    model.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 10))
    augment = RecordingNoise()
    images, views = 3, 40
    probe = AugmentationInvarianceMonitor(transform=augment, num_images=images, num_views=views, matrix_views=6,
                                          batch_size=64, max_memory_gb=max_memory_gb, output_dir=str(tmp_path))
    t = trainer(tmp_path, [probe], max_epochs=1)
    t.fit(model, RandomDataModule())
    if max_memory_gb is None:
        assert probe.forward_batch == 64
    else:
        assert 1 <= probe.forward_batch < views  # several forward batches per image
        plan = lp.memory_plan(t)["augmentation_invariance"]
        assert plan["share"] == 30_000 and "forward batches of" in plan["reduced"]
    records = read(tmp_path / "augmentation_invariance.jsonl")
    last = [r for r in records if r["epoch"] == records[-1]["epoch"]]
    # NumPy on the views of the last analysis (image by image) through the final weights.
    x = torch.stack(augment.views[-images * views:]).reshape(images, views, -1).double().numpy()
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in (model.net[1].weight, model.net[1].bias,
                                                           model.net[3].weight, model.net[3].bias))
    h1 = x @ w1.T + b1
    features = {"net.1": h1, "net.2": np.tanh(h1), "net.3": np.tanh(h1) @ w2.T + b2}
    assert [r["layer"] for r in last] == ["net.2", "net.3"]  # the default selection of this net
    for r in last:
        f = features[r["layer"]]  # (images, views, features)
        within = f.var(axis=1).mean()
        across = f.mean(axis=1).var(axis=0).mean()
        assert r["within_variance"] == pytest.approx(within, rel=1e-5)
        assert r["across_variance"] == pytest.approx(across, rel=1e-5)
        assert r["invariance"] == pytest.approx(across / (within + across), rel=1e-5)
    with np.load(tmp_path / "augmentation_invariance" / "correlations.npz") as data:
        first = features["net.2"].reshape(images * views, -1)
        np.testing.assert_allclose(data["features_0"].astype(float), np.corrcoef(first.T), atol=2e-3)
        kept = features["net.3"][:, :6].reshape(images * 6, -1)
        kept = kept - kept.mean(axis=1, keepdims=True)
        kept /= np.linalg.norm(kept, axis=1, keepdims=True)
        np.testing.assert_allclose(data["views_1"].astype(float), kept @ kept.T, atol=2e-3)
    with np.load(tmp_path / "augmentation_invariance" / "views.npz") as data:  # the first analysis's, drawn once
        first_analysis = torch.stack(augment.views[2:2 + images * views]).reshape(images, views, 1, 8, 8)
        np.testing.assert_allclose(data["views"].astype(float), first_analysis[:, :6].numpy(), atol=5e-3)


def test_estimated_bytes_counts_each_accumulator():
    # Three layers (16, 16, 10), 2 images, 5 kept views each: the sums and squares of the current image and the
    # means of every image (16 bytes a feature, 3 copies), per end layer a float32 product sum and the kept rows,
    # the float64 covariance and correlation of the widest end layer, the view x view matrices.
    want = 16 * 3 * (16 + 16 + 10) + (4 * 16 * 16 + 4 * 10 * 16) + (4 * 10 * 10 + 4 * 10 * 10) + 16 * 16 * 16 \
        + 24 * 10 * 10
    assert estimated_bytes([16, 16, 10], 2, 5) == want


def test_max_memory_gb_is_checked():
    with pytest.raises(ValueError, match="`max_memory_gb`"):
        AugmentationInvarianceMonitor(max_memory_gb=-2)
