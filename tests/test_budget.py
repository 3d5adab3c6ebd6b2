"""The memory budget shared by a Trainer's probes (`lightning_probes.budget`)."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

import lightning_probes as lp
from lightning_probes import budget as B
from lightning_probes.callbacks.memory import BudgetUser


@pytest.fixture(autouse=True)
def _default_budget(monkeypatch):
    monkeypatch.delenv(B.ENV, raising=False)
    lp.set_memory_budget(None)
    yield
    lp.set_memory_budget(None)


@pytest.mark.parametrize(("value", "expected"), [
    (1000, 1000), (0.05, 0.05), (1.0, 1.0), ("256MB", 256 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
    ("10%", 0.10), ("512 kib", 512 * 1024), ("2e9", 2 * 10**9), ("64MiB", 64 * 2**20), (None, None)])
def test_parse_budget_forms(value, expected):
    assert B.parse_budget(value) == expected


@pytest.mark.parametrize("value", [0, -5, 1.5, 0.0, float("nan"), True, "lots", "10 parsecs", "0%", "150%", "0MB",
                                   [1]])
def test_parse_budget_rejects_with_the_argument_and_value(value):
    with pytest.raises(ValueError, match=r"`budget`.*but got") as err:
        lp.set_memory_budget(value)
    assert repr(value) in str(err.value)


def test_budget_bytes_default_fraction_floor_and_explicit():
    assert B.budget_bytes(None, 10 * 2**30)[0] == 2**30  # 10% of 10 GiB
    assert B.budget_bytes(None, 100 * 2**20)[0] == B.FLOOR_BYTES  # 10 MiB is below the floor
    assert B.budget_bytes(0.5, 10 * 2**30)[0] == 5 * 2**30
    assert B.budget_bytes(0.01, 2**30)[0] == B.FLOOR_BYTES
    assert B.budget_bytes(1234, 10 * 2**30)[0] == 1234  # bytes are taken as given, no floor


def test_parameter_bytes_counts_each_tensor_once_in_its_dtype():
    lin = torch.nn.Linear(10, 20)
    tied = torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(20, 10).to(torch.float16))
    tied.append(lin)  # the same module twice: its parameters once
    assert B.parameter_bytes(tied) == (10 * 20 + 20) * 4 + (20 * 10 + 10) * 2


def test_environment_variable_is_read_unless_set(monkeypatch):
    monkeypatch.setenv(B.ENV, "3MB")
    assert B.get_memory_budget() == 3 * 10**6
    lp.set_memory_budget("5MB")
    assert B.get_memory_budget() == 5 * 10**6
    lp.set_memory_budget(None)
    monkeypatch.setenv(B.ENV, "nonsense")
    with pytest.raises(ValueError, match=r"\$LIGHTNING_PROBES_MEMORY_BUDGET"):
        B.get_memory_budget()


class _User(BudgetUser, Callback):
    uses_memory_budget = True

    def __init__(self, name, max_memory_gb=None):
        self.name, self.max_memory_gb = name, max_memory_gb

    def on_fit_start(self, trainer, pl_module):
        self.share = self.memory_share(trainer, pl_module)
        self.report_memory_plan(trainer, pl_module, self.share // 2, None if self.name == "a" else "fewer features")


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1000, 1000)  # 4,004,000 parameter bytes

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1000)), batch_size=2)
    trainer = pl.Trainer(max_steps=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Tiny(), data)
    return trainer


def test_equal_shares_explicit_override_and_the_plan(caplog):
    lp.set_memory_budget("90MB")
    users = [_User("a"), _User("b"), _User("c", max_memory_gb=0.5), Callback()]
    with caplog.at_level(logging.INFO, logger="lightning_probes.budget"):
        trainer = _fit(users)
    assert users[0].share == users[1].share == 45 * 10**6  # 90 MB among the two that share it
    assert users[2].share == 500 * 10**6  # its own allowance, outside the budget
    plan = lp.memory_plan(trainer)
    assert plan["a"] == {"share": 45 * 10**6, "planned": 45 * 10**6 // 2, "reduced": None, "explicit": False}
    assert plan["b"]["reduced"] == "fewer features" and plan["c"]["explicit"] is True
    assert "shared by 2 probe(s)" in caplog.text and "a, b" in caplog.text


def test_default_budget_is_the_floor_for_a_small_model():
    user = _User("a")
    _fit([user])
    assert user.share == B.FLOOR_BYTES


def test_fraction_budget_scales_with_the_parameters():
    lp.set_memory_budget(1.0)
    user = _User("a")
    _fit([user])
    assert user.share == B.FLOOR_BYTES  # 4 MB of parameters: the floor still applies to a fraction
    lp.set_memory_budget(int(8e6))
    _fit([user])
    assert user.share == 8 * 10**6


def test_format_bytes():
    assert B.format_bytes(64 * 2**20) == "64.0 MiB"
    assert B.format_bytes(1.5 * 2**30) == "1.50 GiB"
    assert B.format_bytes(12) == "12 B"
