"""`CurvatureMonitor` in a Trainer: its records against the exact Hessian of the probe batch at each step."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_probes import CurvatureMonitor
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional.curvature import flatten, unflatten
from tests.crash import EpochOrder
from tests.helpers import GradRecorder, RandomDataModule, read, small_mlp, trainer


class TanhNet(pl.LightningModule):
    """A tiny MLP without batch norm (its Hessian at a step depends on the parameters only)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _exact(model, params, x, y):
    names = list(params)
    like = [params[n] for n in names]

    def loss(vec):
        return nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, unflatten(vec, like))),
                                                                      (x,)), y)

    return torch.func.hessian(loss)(flatten(like)), float(loss(flatten(like)))


def test_records_equal_the_exact_hessian(tmp_path):
    data = RandomDataModule(n=48, batch_size=16)
    torch.manual_seed(0)
    model = TanhNet().double()
    probe = CurvatureMonitor(every_n_steps=2, num_samples=12, lanczos_iters=80, trace_samples=40,
                             output_dir=str(tmp_path))
    recorder = GradRecorder()
    trainer(tmp_path, [probe, recorder], max_epochs=1, precision="64-true").fit(model, data)
    records = read(tmp_path / "curvature.jsonl")
    assert [r["step"] for r in records] == [0, 2]
    x, y = data.x[:12].double(), data.y[:12]
    lr = 0.1
    for record in records:
        before = recorder.by_step()[record["step"]]["before"]
        params = {n: before[n] for n, _ in model.named_parameters()}
        hess, loss = _exact(model, params, x, y)
        eig = torch.linalg.eigvalsh(hess)
        assert math.isclose(record["loss"], loss, rel_tol=1e-9)
        assert math.isclose(record["lambda_max"], float(eig[-1]), rel_tol=1e-3)
        assert math.isclose(record["lambda_min"], float(eig[0]), rel_tol=1e-2)
        assert abs(record["trace"] - float(torch.trace(hess))) <= 3 * record["trace_stderr"]
        assert record["num_samples"] == 12 and record["hvps"] == 120
        assert math.isclose(record["two_over_lr"], 2 / lr)
        assert math.isclose(record["sharpness_ratio"], record["lambda_max"] * lr / 2)


def test_training_is_unchanged(tmp_path):
    weights = []
    for probes in ([], [CurvatureMonitor(every_n_steps=1, num_samples=8, lanczos_iters=3, trace_samples=2,
                                         output_dir=str(tmp_path / "p"))]):
        torch.manual_seed(0)
        model = small_mlp()
        trainer(tmp_path, probes, max_steps=3).fit(model, RandomDataModule(n=48, batch_size=16))
        weights.append(flatten([p.detach() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        CurvatureMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="loss_fn"):
        CurvatureMonitor(loss_fn=3)
    assert issubclass(ProbeConfigurationError, Exception)


def test_model_parallel_strategy_is_refused_at_setup(tmp_path):
    from types import SimpleNamespace

    from pytorch_lightning.strategies import ModelParallelStrategy

    probe = CurvatureMonitor(output_dir=str(tmp_path))
    fake = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(ProbeConfigurationError, match="ModelParallelStrategy"):
        probe.setup(fake, None, "fit")


def test_ddp_equals_one_process_on_the_union_batch(tmp_path):
    import sys
    from pathlib import Path

    from tests.curvature_dist_run import fit
    from tests.helpers import run_in_new_session

    root = Path(__file__).parents[2]
    run_in_new_session([sys.executable, str(root / "tests" / "curvature_dist_run.py"), str(tmp_path)], 240,
                       "the DDP curvature run")
    fit(str(tmp_path / "single"), "single", 16, 1)
    single = read(tmp_path / "single" / "curvature.jsonl")
    multi = read(tmp_path / "ddp" / "curvature.jsonl")
    resumed = read(tmp_path / "resumed" / "curvature.jsonl")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [r["step"] for r in resumed] == [0, 2, 4]
    for a, b in [*zip(single, multi), *zip(multi, resumed)]:
        assert b["num_samples"] == a["num_samples"] == 16
        for key in ("loss", "lambda_max", "lambda_min", "trace", "trace_stderr", "alpha", "step_length", "loss_end",
                    "slope_start", "slope_end"):
            assert math.isclose(a[key], b[key], rel_tol=1e-7, abs_tol=1e-10), key


# -- alpha -------------------------------------------------------------------------------------------------------
def _cockpit():
    import sys
    import types

    if "pkg_resources" not in sys.modules:  # cockpit 1.0.2 imports it; setuptools >= 81 no longer ships it
        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = type("DistributionNotFound", (Exception,), {})
        shim.get_distribution = lambda name: (_ for _ in ()).throw(shim.DistributionNotFound())
        sys.modules["pkg_resources"] = shim
    return pytest.importorskip("cockpit")


class ReluNet(pl.LightningModule):
    """Linear/ReLU (what BackPACK supports), full-batch SGD: Cockpit's two ends of a step see the same batch."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_alpha_equals_cockpits_alpha_quantity(tmp_path):
    """Cockpit's `Alpha` in its own plain loop (BackPACK's BatchGrad projections) against the records: full-batch
    SGD on 16 samples, so Cockpit's start batch and end batch are the probe batch."""
    cockpit = _cockpit()
    from backpack import extend
    from cockpit.utils.schedules import linear

    data = RandomDataModule(n=16, batch_size=16)
    torch.manual_seed(0)
    model = ReluNet().double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    probe = CurvatureMonitor(every_n_steps=1, num_samples=16, lanczos_iters=2, trace_samples=2,
                             output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=4, precision="64-true").fit(model, data)
    records = read(tmp_path / "curvature.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]

    net = ReluNet().double().net
    net.load_state_dict({k[len("net."):]: v for k, v in init.items()})
    net = extend(net)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    pit = cockpit.Cockpit(net.parameters(), quantities=[cockpit.quantities.Alpha(linear(1))])
    x, y = data.x.double(), data.y
    lengths = []
    for step in range(5):
        opt.zero_grad()
        out = net(x)
        loss = loss_fn(out, y)
        losses = nn.functional.cross_entropy(out, y, reduction="none")
        before = [p.detach().clone() for p in net.parameters()]
        with pit(step, info={"batch_size": 16, "individual_losses": losses, "loss": loss, "optimizer": opt}):
            loss.backward(create_graph=pit.create_graph(step))
        opt.step()
        lengths.append(float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.parameters(),
                                                                                         before)))))
    theirs = {step: out["Alpha"] for step, out in pit.get_output().items() if "Alpha" in out}
    for record in records:
        assert math.isclose(record["alpha"], theirs[record["step"]], rel_tol=1e-6, abs_tol=1e-9), record["step"]
        assert math.isclose(record["step_length"], lengths[record["step"]], rel_tol=1e-9)
        assert math.isclose(record["loss_end"], records[record["step"] + 1]["loss"], rel_tol=1e-9) \
            if record["step"] < 3 else True
    assert len({round(r["alpha"], 6) for r in records}) == 4  # four different steps, not one value repeated


class Line(pl.LightningModule):
    """``w * x`` with a mean squared error: the probe loss is exactly quadratic in ``w``."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
        self.lr = lr

    def forward(self, x):
        return self.w * x

    def training_step(self, batch, batch_idx):
        return ((self(batch[0]) - batch[1]) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _mse(call, batch):
    return ((call(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.parametrize("lr_times_a", [0.5, 1.0, 1.5, 1.9])
def test_alpha_on_a_hand_worked_quadratic(tmp_path, lr_times_a):
    """f(w) = mean (w x_i - y_i)^2 = a/2 (w - w*)^2 + c with a = 2 mean x^2: a gradient step moves w to
    w* + (1 - lr a)(w - w*), so the step overshoots the minimum by (lr a - 1) of the way: alpha = lr a - 1."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    y = 3.0 * x + torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
    a = 2 * float((x * x).mean())
    lr = lr_times_a / a
    model = Line(lr)
    probe = CurvatureMonitor(every_n_steps=1, num_samples=4, lanczos_iters=1, trace_samples=2, loss_fn=_mse,
                             output_dir=str(tmp_path))

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=4)

    trainer(tmp_path, [probe], max_epochs=2, precision="64-true").fit(model, Data())
    records = read(tmp_path / "curvature.jsonl")
    assert len(records) == 2
    w_star = float((x * y).mean() / (x * x).mean())
    w = 0.0
    if lr_times_a == 1.0:  # the first step lands on the minimum; the second does not move: nothing to fit
        assert records[1]["step_length"] < 1e-12 and records[1]["alpha"] is None
        records = records[:1]
    for record in records:
        assert math.isclose(record["lambda_max"], a, rel_tol=1e-12)  # the 1 x 1 Hessian
        assert math.isclose(record["sharpness_ratio"], lr_times_a / 2, rel_tol=1e-12)
        assert math.isclose(record["alpha"], lr_times_a - 1, rel_tol=1e-7, abs_tol=1e-9)
        assert math.isclose(record["step_length"], lr * a * abs(w - w_star), rel_tol=1e-9)
        assert math.isclose(record["slope_start"], -a * abs(w - w_star), rel_tol=1e-9)  # downhill along the step
        w = w_star + (1 - lr * a) * (w - w_star)


# -- resume ------------------------------------------------------------------------------------------------------
class _EpochData(RandomDataModule):
    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, sampler=EpochOrder(len(self.x)))


def test_a_resumed_run_writes_the_records_of_an_uninterrupted_one(tmp_path):
    """2 epochs straight against 1 epoch, a checkpoint and a resume with a new probe instance: the same records
    (the probe batch comes back from the checkpoint: the resumed run's first batch holds other samples), each
    step once."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def probe(out):
        return CurvatureMonitor(every_n_steps=2, num_samples=8, lanczos_iters=6, trace_samples=3,
                                output_dir=str(out))

    def model():
        torch.manual_seed(0)
        return TanhNet().double()

    trainer(tmp_path, [probe(tmp_path / "full")], precision="64-true").fit(model(), _EpochData(n=48))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [probe(tmp_path / "resumed"), checkpoint], max_epochs=1, precision="64-true",
            enable_checkpointing=True).fit(model(), _EpochData(n=48))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("CurvatureMonitor")]
    assert state["next_due"] == 4 and len(state["probe_batches"]) == 1
    torch.testing.assert_close(state["probe_batches"][0][0], _EpochData(n=48).x[:8].double())
    trainer(tmp_path, [probe(tmp_path / "resumed")], precision="64-true").fit(
        model(), _EpochData(n=48), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    want = read(tmp_path / "full" / "curvature.jsonl")
    got = read(tmp_path / "resumed" / "curvature.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2, 4]
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


def test_alpha_only_and_the_default_loss_skip(tmp_path):
    """``lanczos_iters=0, trace_samples=0``: alpha without Hessian-vector products (the same alpha); a dict batch
    the default loss_fn cannot take: one skip record."""
    records = {}
    for name, kwargs in (("full", {}), ("alpha", {"lanczos_iters": 0, "trace_samples": 0})):
        torch.manual_seed(0)
        probe = CurvatureMonitor(every_n_steps=1, num_samples=8, output_dir=str(tmp_path / name), **kwargs)
        trainer(tmp_path, [probe], max_steps=2).fit(TanhNet(), RandomDataModule(n=32, batch_size=16))
        records[name] = read(tmp_path / name / "curvature.jsonl")
    for a, b in zip(records["full"], records["alpha"]):
        assert b["lambda_max"] is None and b["trace"] is None and b["hvps"] == 0
        assert math.isclose(a["alpha"], b["alpha"], rel_tol=1e-6) and math.isclose(a["loss"], b["loss"], rel_tol=1e-6)
    with pytest.raises(ValueError, match="nothing to compute"):
        CurvatureMonitor(lanczos_iters=0, trace_samples=0, alpha=False)

    class DictData(RandomDataModule):
        def train_dataloader(self):
            from torch.utils.data import DataLoader

            return DataLoader([{"x": x, "y": y} for x, y in zip(self.x[:16], self.y[:16])], batch_size=16)

    class DictNet(TanhNet):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    from lightning_probes import ProbeSkippedWarning

    with pytest.warns(ProbeSkippedWarning, match="default loss_fn.*dict"):
        trainer(tmp_path, [CurvatureMonitor(output_dir=str(tmp_path / "d"))], max_steps=1).fit(DictNet(), DictData())
    (record,) = read(tmp_path / "d" / "curvature.jsonl")
    assert record["probe_status"] == "skipped"
