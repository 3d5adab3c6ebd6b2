"""`PerSampleGradientMonitor` in a Trainer: records against a loop of single-sample backward passes and NumPy."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_probes import PerSampleGradientMonitor, memory_plan
from lightning_probes.callbacks.guard import ProbeSkippedWarning
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.curvature import hvp_operator
from lightning_probes.functional.gradient_tests import hutchinson_diagonal
from lightning_probes.functional.per_sample import cross_entropy_loss
from tests.helpers import GradRecorder, RandomDataModule, approx, read, trainer

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


class Net(pl.LightningModule):
    """A tiny classifier around ``body`` (plain SGD)."""

    def __init__(self, body: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net, self.lr = body, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def relu_net() -> Net:
    return Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 10)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):  # (N, 1, 8, 8) -> 8 tokens of 8 features
        h = self.embed(x.flatten(1, 2))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


class Recurrent(nn.Module):  # nn.GRU has no vmap batching rule: the loop fallback
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 6, batch_first=True)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        h, _ = self.rnn(x.flatten(1, 2))
        return self.head(h[:, -1])


def _loop_gradients(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-sample gradients by single-sample backward passes of a copy at ``params`` (its state, or a part of it;
    eval mode): (n, D)."""
    import copy

    clone = copy.deepcopy(model).eval()
    clone.load_state_dict({**clone.state_dict(), **params})
    rows = []
    for i in range(len(x)):
        clone.zero_grad()
        nn.functional.cross_entropy(clone(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in clone.parameters()]).double().numpy())
    return np.stack(rows)


def _numpy_tests(gs: np.ndarray, loss: float, lr: float) -> dict[str, float]:
    g = gs.mean(0)
    n, g2 = gs.shape[0], float(g @ g)
    return {"grad_norm": math.sqrt(g2),
            "norm_test": math.sqrt(((gs - g) ** 2).sum() / (n * (n - 1) * g2)),
            "inner_test": math.sqrt(((gs @ g - g2) ** 2).sum() / (n * (n - 1) * g2 ** 2)),
            "ortho_test": math.sqrt(((gs - np.outer(gs @ g / g2, g)) ** 2).sum() / (n * (n - 1) * g2)),
            "mean_gsnr": float(np.mean(g ** 2 / (gs.var(0) + 1e-5))),
            "early_stopping": 1 - n * float(np.mean(g ** 2 / (gs.var(0, ddof=1) + 1e-5))),
            "cabs": lr * float(gs.var(0).sum()) / loss}


@pytest.mark.parametrize("rank_one", [True, False], ids=["rank_one_shortcut", "vmap"])
def test_records_equal_a_loop_of_single_sample_backward_passes(tmp_path, rank_one):
    data = RandomDataModule(n=48, batch_size=16)
    torch.manual_seed(0)
    model = relu_net().double()
    probe = PerSampleGradientMonitor(every_n_steps=2, num_samples=12, curvature_samples=3, tic_diag=True,
                                     rank_one=rank_one,
                                     histograms="both", hist_range_1d=(-0.2, 0.2),
                                     hist_range_2d=((-0.1, 0.1), (-0.3, 0.3)),
                                     max_memory_gb=0.0002, output_dir=str(tmp_path))  # 200 kB: chunks of a few
    recorder = GradRecorder()
    fit = trainer(tmp_path, [probe, recorder], max_epochs=1, precision="64-true")
    fit.fit(model, data)
    assert memory_plan(fit)["per_sample_gradients"]["reduced"].startswith("per-sample gradients in chunks of")
    records = read(tmp_path / "per_sample_gradients.jsonl")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    assert [r["step"] for r in records] == [0] * 5 + [2] * 5
    assert [r["layer"] for r in records[:5]] == names + ["__total__"]
    x, y = data.x[:12].double(), data.y[:12]
    for step in (0, 2):
        before = recorder.by_step()[step]["before"]
        gs = _loop_gradients(model, before, x, y)
        loss = float(nn.functional.cross_entropy(torch.func.functional_call(model, before, (x,)), y))
        rows = [r for r in records if r["step"] == step]
        bounds = np.cumsum([0, *sizes])
        for t, record in enumerate(rows):
            part = gs if record["layer"] == "__total__" else gs[:, bounds[t]:bounds[t + 1]]
            assert record["num_samples"] == 12 and record["numel"] == part.shape[1]
            for field, value in _numpy_tests(part, loss, 0.1).items():
                assert math.isclose(record[field], value, rel_tol=1e-8), (step, record["layer"], field)
        total = rows[-1]
        assert math.isclose(total["loss"], loss, rel_tol=1e-12) and total["lr"] == 0.1 and total["vectorized"]
        assert total["rank_one_tensors"] == (4 if rank_one else 0)  # both linear layers' weights and biases
        # curvature: the same Rademacher vectors through the exact Hessian-vector product of the probe batch
        hvp, _, _ = hvp_operator(model, (x, y), cross_entropy_loss, before)
        diag, forms = hutchinson_diagonal(hvp, sizes, 3, torch.Generator().manual_seed(step), torch.device("cpu"),
                                          torch.float64)
        trace = float(forms.sum(1).mean())
        assert math.isclose(total["hessian_trace"], trace, rel_tol=1e-9)
        assert math.isclose(total["tic_trace"], float((gs ** 2).sum(1).mean()) / (trace + 1e-7), rel_tol=1e-9)
        assert math.isclose(total["tic_diag"], float(((gs ** 2).mean(0) / (diag.numpy() + 1e-7)).sum()),
                            rel_tol=1e-9)
        # histograms against NumPy, per tensor and in total
        npz = np.load(tmp_path / total["histograms"])
        assert list(npz["layers"]) == names
        for t in range(len(names)):
            part = gs[:, bounds[t]:bounds[t + 1]]
            ref, _ = np.histogram(np.clip(part, -0.2, 0.2), bins=100, range=(-0.2, 0.2))
            np.testing.assert_array_equal(npz["hist_1d"][t], ref)
            w = np.broadcast_to(before[names[t]].reshape(1, -1).numpy(), part.shape)
            ref2, _, _ = np.histogram2d(np.clip(part, -0.1, 0.1).ravel(), np.clip(w, -0.3, 0.3).ravel(),
                                        bins=(40, 50), range=((-0.1, 0.1), (-0.3, 0.3)))
            np.testing.assert_array_equal(npz["hist_2d"][t], ref2)
            assert rows[t]["hist_outside_1d"] == float((np.abs(part) > 0.2).sum())
        assert npz["hist_1d_total"].sum() == gs.size and total["hist_outside_1d"] == float((np.abs(gs) > 0.2).sum())
        np.testing.assert_allclose(npz["edges_1d"], np.linspace(-0.2, 0.2, 101), atol=1e-15)


class StateRecorder(pl.Callback):
    """The whole state (parameters and batch-norm buffers) at each optimiser step, where the probe analyses."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_current_batch_and_batch_norm_in_eval_mode_leave_training_unchanged(tmp_path):
    """Eval mode: batch norm on its running statistics; weights, buffers and training equal a run without."""
    def bn_net():
        return Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)))

    data = RandomDataModule(n=48, batch_size=16)
    states, recorder = [], StateRecorder()
    for probes in ([], [PerSampleGradientMonitor(every_n_steps=1, num_samples=10, probe_batch="current",
                                                 curvature_samples=2, histograms="1d",
                                                 output_dir=str(tmp_path / "p")), recorder]):
        torch.manual_seed(0)
        model = bn_net().double()
        trainer(tmp_path, probes, max_epochs=1, precision="64-true").fit(model, data)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    records = [r for r in read(tmp_path / "p" / "per_sample_gradients.jsonl") if r["layer"] == "__total__"]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:  # the batch of the step, in eval mode with the running statistics of that moment
        x, y = data.x[16 * r["step"]:16 * r["step"] + 10].double(), data.y[16 * r["step"]:16 * r["step"] + 10]
        gs = _loop_gradients(model, recorder.states[r["step"]], x, y)
        assert math.isclose(r["grad_norm"], float(np.linalg.norm(gs.mean(0))), rel_tol=1e-9)
        assert math.isclose(r["inner_test"], _numpy_tests(gs, 1.0, 0.1)["inner_test"], rel_tol=1e-8)
        assert "hist_2d" not in np.load(tmp_path / "p" / r["histograms"])


@pytest.mark.parametrize("body", [Attention, Recurrent], ids=["layernorm_attention", "gru_loop_fallback"])
def test_layernorm_attention_and_a_recurrent_model_run(tmp_path, body):
    torch.manual_seed(0)
    model = Net(body()).double()
    probe = PerSampleGradientMonitor(every_n_steps=2, num_samples=6, curvature_samples=2, output_dir=str(tmp_path))
    recorder = GradRecorder()
    trainer(tmp_path, [probe, recorder], max_steps=3, precision="64-true").fit(model, RandomDataModule(n=32))
    records = read(tmp_path / "per_sample_gradients.jsonl")
    total = [r for r in records if r["layer"] == "__total__"]
    assert [r["step"] for r in total] == [0, 2]
    assert total[0]["vectorized"] is (body is Attention)
    assert total[0]["rank_one_tensors"] == 2  # the head (embed sees (n, 8, 8) tokens and goes through vmap)
    data = RandomDataModule(n=32)
    gs = _loop_gradients(model, recorder.by_step()[2]["before"], data.x[:6].double(), data.y[:6])
    assert math.isclose(total[1]["ortho_test"], _numpy_tests(gs, 1.0, 0.1)["ortho_test"], rel_tol=1e-7)


def test_resume_writes_every_record_once_and_keeps_the_probe_batch(tmp_path):
    def run(root, ckpt=None, epochs=2):
        torch.manual_seed(0)
        probe = PerSampleGradientMonitor(every_n_steps=2, num_samples=8, curvature_samples=2, histograms="1d",
                                         output_dir=str(root / "probes"))
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1)
        fit = trainer(root, [probe, checkpoint], max_epochs=epochs, enable_checkpointing=True,
                      precision="64-true")
        fit.fit(relu_net().double(), RandomDataModule(n=48, batch_size=16), ckpt_path=ckpt)
        return read(root / "probes" / "per_sample_gradients.jsonl")

    whole = run(tmp_path / "whole")
    run(tmp_path / "first", epochs=1)
    ckpt = next((tmp_path / "first" / "ckpt").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any("probe_batch" in v for v in state.values())
    resumed = run(tmp_path / "first", ckpt=str(ckpt))
    assert [(r["step"], r["layer"]) for r in resumed] == [(r["step"], r["layer"]) for r in whole]
    for a, b in zip(whole, resumed):
        for key in ("norm_test", "inner_test", "ortho_test", "mean_gsnr", "hessian_trace", "loss"):
            assert a.get(key) == approx(b.get(key), rel=1e-10, abs=1e-14), (a["step"], key)


def test_arguments_are_checked():
    for kwargs, match in (({"every_n_steps": 0}, "every_n_steps"), ({"probe_batch": "rotating"}, "probe_batch"),
                          ({"histograms": "3d"}, "histograms"), ({"curvature_samples": -1}, "curvature_samples"),
                          ({"hist_range_1d": (1, -1)}, "hist_range_1d"), ({"hist_bins_2d": (3,)}, "hist_bins_2d"),
                          ({"tic_diag": True, "curvature_samples": 0}, "tic_diag"), ({"loss_fn": 3}, "loss_fn"),
                          ({"max_memory_gb": 0}, "max_memory_gb")):
        with pytest.raises(ValueError, match=match):
            PerSampleGradientMonitor(**kwargs)


def test_model_parallel_strategy_is_refused_at_setup(tmp_path):
    from types import SimpleNamespace

    from pytorch_lightning.strategies import ModelParallelStrategy

    probe = PerSampleGradientMonitor(output_dir=str(tmp_path))
    fake = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(ProbeConfigurationError, match="ModelParallelStrategy"):
        probe.setup(fake, None, "fit")


class DictBatches(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = [{"x": torch.randn(4), "y": torch.tensor(i % 3)} for i in range(8)]
        return DataLoader(data, batch_size=4)


def test_a_batch_the_default_loss_does_not_fit_skips_and_a_loss_fn_runs(tmp_path):
    probe = PerSampleGradientMonitor(every_n_steps=1, output_dir=str(tmp_path / "a"))
    with pytest.warns(ProbeSkippedWarning, match="pass loss_fn"):
        trainer(tmp_path, [probe], max_steps=2).fit(DictBatches())
    assert read(tmp_path / "a" / "per_sample_gradients.jsonl")[0]["probe_status"] == "skipped"

    def loss_fn(call, batch):
        return nn.functional.cross_entropy(call(batch["x"]), batch["y"])

    class Wrapped(DictBatches):
        def forward(self, x):
            return self.net(x)

    probe = PerSampleGradientMonitor(every_n_steps=1, curvature_samples=0, histograms="none", loss_fn=loss_fn,
                                     output_dir=str(tmp_path / "b"))
    trainer(tmp_path, [probe], max_steps=2).fit(Wrapped())
    records = read(tmp_path / "b" / "per_sample_gradients.jsonl")
    assert [r["step"] for r in records if r["layer"] == "__total__"] == [0, 1]
    assert records[-1]["histograms"] is None and records[-1]["tic_trace"] is None



def test_a_probe_batch_saved_by_another_number_of_processes_is_taken_anew_with_one_warning(tmp_path):
    data = RandomDataModule(n=32, batch_size=16)
    probe = PerSampleGradientMonitor(every_n_steps=1, num_samples=8, curvature_samples=0, histograms="none",
                                     output_dir=str(tmp_path))
    probe.load_state_dict({"probe_batches": [(data.x[16:24], data.y[16:24])] * 2})  # a 2-rank DDP checkpoint's
    with pytest.warns(UserWarning, match=r"probe batch \(2 process\(es\)\) does not fit this run \(1") as caught:
        trainer(tmp_path, [probe], max_steps=2).fit(relu_net(), data)
    assert sum("does not fit this run" in str(w.message) for w in caught) == 1
    assert torch.equal(probe._batch[0], data.x[:8]) and "probe_batch" in probe.state_dict()

def test_ddp_equals_one_process_on_the_union_batch_and_fsdp2_is_refused(tmp_path):
    from tests.helpers import run_in_new_session
    from tests.per_sample_dist_run import Data, fit

    root = Path(__file__).parents[2]
    run_in_new_session([sys.executable, str(root / "tests" / "per_sample_dist_run.py"), str(tmp_path)], 240,
                       "the DDP per-sample gradient run")
    for rank in (0, 1):
        assert "does not support ModelParallelStrategy" in (tmp_path / f"fsdp_rank{rank}.txt").read_text()
    fit(str(tmp_path / "single"), 16, 1)
    single = read(tmp_path / "single" / "per_sample_gradients.jsonl")
    multi = read(tmp_path / "ddp" / "per_sample_gradients.jsonl")
    assert [(r["step"], r["layer"]) for r in multi] == [(r["step"], r["layer"]) for r in single]
    assert {r["step"] for r in single} == {0, 2, 4}
    # resumed from the checkpoint after epoch 1 (step 3): epoch 2 runs in reverse order, so its first batches are not
    # the probe batches; each rank's comes back from rank 0's checkpoint and the records equal the uninterrupted run's
    resumed = read(tmp_path / "resumed" / "per_sample_gradients.jsonl")
    assert [(r["step"], r["layer"]) for r in resumed] == [(r["step"], r["layer"]) for r in multi]
    for a, b in zip(multi, resumed):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert math.isclose(value, b[key], rel_tol=1e-12, abs_tol=1e-15), (a["step"], a["layer"], key)
            elif key != "histograms":
                assert value == b[key], (a["step"], a["layer"], key)
        if a["layer"] == "__total__":
            npz_a, npz_b = np.load(tmp_path / "ddp" / a["histograms"]), np.load(tmp_path / "resumed" / b["histograms"])
            np.testing.assert_array_equal(npz_a["hist_1d"], npz_b["hist_1d"])
            np.testing.assert_array_equal(npz_a["hist_2d"], npz_b["hist_2d"])
    state = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    (batches,) = [v["probe_batches"] for v in state.values() if "probe_batches" in v]
    x = Data(8).x
    assert len(batches) == 2 and all(torch.equal(batches[r][0], x[r::2][:8]) for r in (0, 1))
    for a, b in zip(single, multi):
        assert b["num_samples"] == a["num_samples"] == 16
        for key in ("grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping", "cabs",
                    "hessian_trace", "hessian_trace_stderr", "tic_trace", "tic_diag", "hist_outside_1d", "loss"):
            if key in a:
                assert a[key] == approx(b[key], rel=1e-7, abs=1e-10), (a["step"], a["layer"], key)
        if a["layer"] == "__total__":
            npz_a, npz_b = np.load(tmp_path / "single" / a["histograms"]), np.load(tmp_path / "ddp" / b["histograms"])
            np.testing.assert_array_equal(npz_a["hist_1d"], npz_b["hist_1d"])
            np.testing.assert_array_equal(npz_a["hist_2d"], npz_b["hist_2d"])


def test_a_failure_after_the_start_disables_the_probe_and_training_goes_on(tmp_path):
    def broken(call, batch):
        raise RuntimeError("a broken loss")

    weights = []
    for probes in ([], [PerSampleGradientMonitor(every_n_steps=1, loss_fn=broken, on_error="warn",
                                                 output_dir=str(tmp_path / "p"))]):
        torch.manual_seed(0)
        model = relu_net()
        if probes:
            with pytest.warns(UserWarning, match="a broken loss"):
                trainer(tmp_path, probes, max_steps=3).fit(model, RandomDataModule(n=48))
        else:
            trainer(tmp_path, probes, max_steps=3).fit(model, RandomDataModule(n=48))
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    records = read(tmp_path / "p" / "per_sample_gradients.jsonl")
    assert len(records) == 1 and records[0]["probe_status"] == "disabled" and "a broken loss" in records[0]["reason"]


@pytest.mark.parametrize("probe", ["per_sample", "curvature"])
def test_other_probes_hooks_do_not_see_the_probes_own_passes(tmp_path, probe):
    """AttentionMonitor's and ActivationOutlierMonitor's hooks stay on the model during their due steps: the
    probe's own passes (vmap; CurvatureMonitor's Hessian-vector products and alpha) run with them taken off
    (`ProbeCallback.probe_pass`), so their records equal a run without it. Without it, CurvatureMonitor's passes
    added its probe batch's rows to both."""
    from lightning_probes import ActivationOutlierMonitor, AttentionMonitor, CurvatureMonitor

    runs = []
    for with_probe in (False, True):
        out = tmp_path / str(with_probe)
        probes = [AttentionMonitor(every_n_steps=1, output_dir=str(out)),
                  ActivationOutlierMonitor(every_n_steps=1, output_dir=str(out))]
        if with_probe:
            probes.insert(0, PerSampleGradientMonitor(every_n_steps=1, num_samples=4, curvature_samples=1,
                                                      output_dir=str(out)) if probe == "per_sample"
                          else CurvatureMonitor(every_n_steps=1, num_samples=4, lanczos_iters=2, trace_samples=1,
                                                output_dir=str(out)))
            probes.append(PerSampleGradientMonitor(every_n_steps=1, num_samples=4, curvature_samples=0,
                                                   name="last", output_dir=str(out)) if probe == "per_sample"
                          else CurvatureMonitor(every_n_steps=1, num_samples=4, lanczos_iters=2, trace_samples=1,
                                                name="last", output_dir=str(out)))
        torch.manual_seed(0)
        trainer(tmp_path, probes, max_steps=2, precision="64-true").fit(Net(Attention()).double(),
                                                                        RandomDataModule(n=32))
        runs.append([read(out / "attention.jsonl"), read(out / "activation_outliers.jsonl")])
    assert runs[0] == runs[1] and len(runs[0][0]) > 0 and len(runs[0][1]) > 0
