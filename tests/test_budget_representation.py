"""The representation probes stream their analyses and plan them inside the shared memory budget (issue 31)."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import lightning_probes as lp
from lightning_probes import ActivationStatsMonitor, AlignmentMonitor, LayerCorrelationMonitor
from lightning_probes.budget import memory_plan
from lightning_probes.callbacks.analysis_base import AnalysisProbe
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional import MomentAccumulator, blockwise_layer_similarity
from lightning_probes.functional.representations import cka_from_covariances, correlation_from_covariance
from lightning_probes.probe_data import forward_peak_bytes
from tests.helpers import RandomDataModule, read, small_mlp, trainer


@pytest.fixture(autouse=True)
def _default_budget():
    lp.set_memory_budget(None)
    yield
    lp.set_memory_budget(None)


def _numpy_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_similarity_equals_numpy_and_the_whole_matrix(dtype):
    g = torch.Generator().manual_seed(0)
    widths = [5, 1, 7, 3]
    base = torch.randn(300, 4, generator=g, dtype=torch.float64)
    x = torch.cat([base @ torch.randn(4, w, generator=g, dtype=torch.float64)
                   + 0.3 * torch.randn(300, w, generator=g, dtype=torch.float64) for w in widths], dim=1) + 5.0
    x[:, 2] = 1.5  # a constant feature: NaN correlations, left out of the means
    moments = MomentAccumulator(sum(widths), dtype=dtype)
    for part in torch.split(x, 64):  # streamed in batches
        moments.update(part)
    corr, mean_abs, cka = blockwise_layer_similarity(moments, widths)
    # The old whole-matrix derivation from the same sums.
    whole = correlation_from_covariance(moments.covariance())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert corr.dtype == torch.float16
    finite = ~whole.isnan()
    assert torch.equal(corr.isnan(), ~finite)
    assert torch.allclose(corr.double()[finite], whole[finite], atol=1e-3)  # float16: 3 digits
    edges = np.cumsum([0, *widths])
    data = x.numpy()
    for i in range(len(widths)):
        for j in range(len(widths)):
            a, b = data[:, edges[i]:edges[i + 1]], data[:, edges[j]:edges[j + 1]]
            with np.errstate(invalid="ignore", divide="ignore"):
                reference = np.corrcoef(a, b, rowvar=False)[: a.shape[1], a.shape[1]:]
            assert mean_abs[i, j].item() == pytest.approx(np.nanmean(np.abs(reference)), abs=tolerance)
            assert cka[i, j].item() == pytest.approx(_numpy_cka(a, b), abs=tolerance)
            cov = moments.covariance()
            blocks = [slice(int(p), int(q)) for p, q in zip(edges[:-1], edges[1:])]
            old = cka_from_covariances(cov[blocks[i], blocks[j]], cov[blocks[i], blocks[i]], cov[blocks[j], blocks[j]])
            assert cka[i, j].item() == pytest.approx(old.item(), abs=1e-12)


def test_blockwise_similarity_rejects_widths_that_do_not_fit():
    moments = MomentAccumulator(4)
    moments.update(torch.randn(8, 4))
    with pytest.raises(ValueError, match="`widths`"):
        blockwise_layer_similarity(moments, [2, 3])


def test_forward_peak_bytes_counts_the_live_module_outputs():
    net = nn.Sequential(nn.Linear(8, 1000), nn.ReLU(), nn.Linear(1000, 10)).eval()
    x = torch.randn(50, 8)
    with torch.no_grad():
        peak = forward_peak_bytes(net, lambda: net(x), margin=1.0)
    # At the ReLU's hook the Linear's output and the ReLU's are alive (and the Sequential's own output later is
    # the last Linear's): 2 x 50 x 1000 float32 values.
    assert peak == 2 * 50 * 1000 * 4
    inplace = nn.Sequential(nn.Linear(8, 1000), nn.ReLU(inplace=True), nn.Linear(1000, 10)).eval()
    with torch.no_grad():
        assert forward_peak_bytes(inplace, lambda: inplace(x), margin=1.0) == 50 * 1000 * 4 + 50 * 10 * 4


def test_plan_forward_batch_caps_the_batch_inside_what_is_left():
    probe = AnalysisProbe()
    assert probe.plan_forward_batch(128, 1000.0, 50_000) == 50 == probe.forward_batch
    assert probe.plan_forward_batch(128, 1000.0, 10**9) == 128
    assert probe.plan_forward_batch(128, 1000.0, 10) == 1  # at least one sample
    assert probe.plan_forward_batch(16, 0.0, 0) == 16


def _fit(tmp_path, probes, **kwargs):
    trainer(tmp_path, probes, max_epochs=1, **kwargs).fit(small_mlp(), RandomDataModule())
    return trainer


def test_each_probe_plans_inside_its_share_and_logs_it_once(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr("lightning_probes.callbacks.memory.rank_zero_info", lines.append)
    probes = [LayerCorrelationMonitor(num_samples=32, output_dir=str(tmp_path)),
              ActivationStatsMonitor(num_samples=32, output_dir=str(tmp_path)),
              AlignmentMonitor(num_samples=32, output_dir=str(tmp_path), max_memory_gb=0.01)]
    fit = trainer(tmp_path, probes, max_epochs=1)
    fit.fit(small_mlp(), RandomDataModule())
    plan = memory_plan(fit)
    assert set(plan) == {"layer_correlation", "activation_stats", "alignment"}
    share = 64 * 2**20 // 2  # the floor of the budget (a tiny model), shared by the two probes without their own
    assert plan["layer_correlation"]["share"] == plan["activation_stats"]["share"] == share
    assert plan["alignment"] == {**plan["alignment"], "share": 10**7, "explicit": True}
    for entry in plan.values():
        assert 0 < entry["planned"] <= entry["share"] and entry["reduced"] is None
    assert len(lines) == 3 and all("memory plan" in line for line in lines)
    assert "AlignmentMonitor 'alignment' memory plan" in lines[2] and "(max_memory_gb)" in lines[2]


def test_a_small_share_caps_the_forward_batch_and_the_records_do_not_change(tmp_path):
    def records(directory, budget):
        lp.set_memory_budget(budget)
        probes = [LayerCorrelationMonitor(num_samples=32, batch_size=32, output_dir=str(directory)),
                  ActivationStatsMonitor(num_samples=32, batch_size=32, output_dir=str(directory)),
                  AlignmentMonitor(layers=["net.fc2", "net.fc3"], num_samples=32, batch_size=32,
                                   output_dir=str(directory), max_memory_gb=None if budget is None else 2.5e-5)]
        fit = trainer(directory, probes, max_epochs=1)
        torch.manual_seed(0)  # the same model in both fits
        fit.fit(small_mlp(), RandomDataModule())
        return probes, fit, {p.name: read(directory / f"{p.name}.jsonl") for p in probes}

    wide, _, full = records(tmp_path / "full", None)
    assert all(p.forward_batch == 32 for p in wide)
    # 35 kB each (25 kB for AlignmentMonitor): enough for the small sums, not for 32 samples of activations.
    narrow, fit, capped = records(tmp_path / "capped", 70_000)
    plan = memory_plan(fit)
    for p in narrow:  # no feature was left out
        assert plan[p.name]["reduced"] == f"forward batches of {p.forward_batch} samples (batch_size=32)", plan
    assert all(p.forward_batch < 32 for p in narrow)
    for name, rows in full.items():
        assert len(rows) == len(capped[name]) > 0
        for a, b in zip(rows, capped[name]):
            for key, value in a.items():
                if isinstance(value, float):
                    assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
                elif key != "alignment":
                    assert b[key] == value, (name, key)
            if "alignment" in a:
                np.testing.assert_allclose(np.array(b["alignment"], dtype=float),
                                           np.array(a["alignment"], dtype=float), rtol=1e-6, atol=1e-9)


def test_defaults_reduce_inside_the_share_and_explicit_settings_are_refused(tmp_path):
    lp.set_memory_budget(5_000)  # bytes, for all probes of a Trainer
    probe = ActivationStatsMonitor(num_samples=32, output_dir=str(tmp_path))
    fit = trainer(tmp_path, [probe], max_epochs=1)
    with pytest.warns(UserWarning, match=r"ActivationStatsMonitor: .*keep at most \d+ features"):
        fit.fit(small_mlp(), RandomDataModule())
    entry = memory_plan(fit)["activation_stats"]
    assert entry["share"] == 5_000 and "widest layer(s) keep at most" in entry["reduced"]
    assert sum(8 * w * w for w in probe._widths.values()) <= 0.75 * 5_000
    for cls, kwargs in ((ActivationStatsMonitor, {"max_features": 16}),
                        (LayerCorrelationMonitor, {"layers": ["net.fc1", "net.fc2"]}),
                        (AlignmentMonitor, {"layers": ["net.fc1", "net.fc2"]})):
        lp.set_memory_budget(2_000)
        with pytest.raises(ProbeConfigurationError,
                           match=r"its share of the probes' memory budget.*lightning_probes.set_memory_budget"):
            trainer(tmp_path, [cls(num_samples=16, output_dir=str(tmp_path), **kwargs)], max_epochs=1).fit(
                small_mlp(), RandomDataModule())


def test_an_inplace_activation_after_a_layer_does_not_change_what_was_read(tmp_path):
    """The pass reads each output inside its hook without a copy: a session that keeps rows past the hook keeps
    a copy, so the ReLU(inplace=True) after fc1 cannot change fc1's statistics."""
    model = small_mlp()
    model.net.relu1 = nn.ReLU(inplace=True)
    probe = LayerCorrelationMonitor(layers=["net.fc1", "net.fc2"], num_samples=32, batch_size=8,
                                    output_dir=str(tmp_path), every_n_epochs=2)
    stats = ActivationStatsMonitor(layers=["net.fc1"], num_samples=32, batch_size=8, output_dir=str(tmp_path),
                                   every_n_epochs=2)
    reference = {}
    handle = model.net.fc1.register_forward_hook(lambda m, a, o: reference.setdefault("fc1", o.detach().clone()))
    with torch.no_grad():
        model.eval()(RandomDataModule().x[:32])  # the probe set: all 32 validation samples
    handle.remove()
    model.train()
    trainer(tmp_path, [probe, stats], max_epochs=1).fit(model, RandomDataModule())
    fc1 = reference["fc1"].double().numpy()
    assert (fc1 < 0).any()  # the ReLU would have changed these
    record = next(r for r in read(tmp_path / "layer_correlation.jsonl")
                  if (r["layer_a"], r["layer_b"]) == ("net.fc1", "net.fc1"))
    corr = np.corrcoef(fc1, rowvar=False)
    assert record["mean_abs_correlation"] == pytest.approx(np.nanmean(np.abs(corr)), abs=1e-5)
    row = read(tmp_path / "activation_stats.jsonl")[0]
    assert row["mean"] == pytest.approx(fc1.mean(), abs=1e-6)
    assert row["positive_ratio"] == pytest.approx((fc1 > 0).mean())


class _Depthwise(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 5, padding=2, groups=32),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_alignment_leaves_out_grouped_layers_that_cannot_fit_at_the_defaults(tmp_path):
    # The depthwise conv's per-group sums (12 * 800 * 25 bytes) cannot be subsampled; 150 kB cannot hold them.
    lp.set_memory_budget(150_000)
    probe = AlignmentMonitor(num_samples=16, output_dir=str(tmp_path), plot_every_n_epochs=0)
    fit = trainer(tmp_path, [probe], max_epochs=1)
    with pytest.warns(UserWarning, match=r"1 grouped convolution\(s\).*left out: net.2"):
        fit.fit(_Depthwise(), RandomDataModule())
    assert list(probe._modules) == ["net.0", "net.5"]
    assert {r["layer"] for r in read(tmp_path / "alignment.jsonl")} == {"net.0", "net.5"}
    assert "1 grouped layer(s) left out" in memory_plan(fit)["alignment"]["reduced"]
    lp.set_memory_budget(150_000)
    with pytest.raises(ProbeConfigurationError, match=r"`layers` is set"):  # named layers are never left out
        trainer(tmp_path, [AlignmentMonitor(layers=["net.0", "net.2"], num_samples=16, output_dir=str(tmp_path))],
                max_epochs=1).fit(_Depthwise(), RandomDataModule())
