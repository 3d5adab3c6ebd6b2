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
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [0, 2]
    for a, b in zip(single, multi):
        assert b["num_samples"] == a["num_samples"] == 16
        for key in ("loss", "lambda_max", "lambda_min", "trace", "trace_stderr"):
            assert math.isclose(a[key], b[key], rel_tol=1e-7, abs_tol=1e-10), key
