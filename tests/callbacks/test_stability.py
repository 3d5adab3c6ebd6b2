"""`StabilityMonitor`: records against NumPy on a real run, the skip and stop policies, resume, DDP and FSDP2."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision

import lightning_probes as lp
from lightning_probes.callbacks.guard import ProbeSkippedWarning
from tests.functional.test_stability import numpy_reference
from tests.helpers import read, run_in_new_session
from tests.stability_dist_run import NAN_STEP, SPIKE_STEP, SpikyData, SpikyNet

ROOT = Path(__file__).parents[2]


class Recorder(pl.Callback):
    """Independent reference: the loss Lightning returns from each batch and the gradient norm from ``.grad``."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.micro: list[float] = []
        self.norms: dict[int, float] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.micro.append(math.nan if loss is None else float(loss))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().double().flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.cat(grads).norm()) if grads else math.nan
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def fit(tmp_path: Path, probe, model=None, callbacks=(), **kwargs) -> pl.Trainer:
    """Fit ``model()`` (a factory, called once the seed is set) on `SpikyData` with ``probe``."""
    pl.seed_everything(0)
    model = model() if model is not None else SpikyNet({10: 30.0})
    settings = dict(max_steps=14, accelerator="cpu", default_root_dir=str(tmp_path), logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
    settings.update(kwargs)
    trainer = pl.Trainer(callbacks=[*callbacks, *([probe] if probe is not None else [])], **settings)
    trainer.fit(model, SpikyData(16))
    return trainer


def steps(records: list[dict], kind: str = "step") -> dict[int, dict]:
    return {r["step"]: r for r in records if r.get("kind") == kind}


# -- the numbers against NumPy ------------------------------------------------------------------------------------
def test_records_equal_a_numpy_recomputation_of_the_run(tmp_path):
    probe = lp.StabilityMonitor(every_n_steps=1, window=5, warmup=5, threshold=4.0, output_dir=str(tmp_path))
    recorder = Recorder()
    with pytest.warns(UserWarning, match="spike step"):
        fit(tmp_path, probe, callbacks=[recorder])
    records = read(tmp_path / "stability.jsonl")
    logged = steps(records)
    assert sorted(logged) == list(range(14))
    series = np.stack([recorder.micro, [recorder.norms[s] for s in range(14)]], axis=1)  # (T, 2)
    spikes = np.zeros(14, dtype=bool)
    for s, key in enumerate(("loss", "grad_norm")):
        want = numpy_reference(series[:, s], window=5, threshold=4.0, warmup=5, exclude_spikes=False)
        for step, record in logged.items():
            assert record[key] == pytest.approx(series[step, s], rel=1e-6)
            for field, ref in (("z", want["z"]), ("mean", want["mean"]), ("std", want["std"])):
                value = record[f"{key}_{field}"]
                assert (value is None) == bool(np.isnan(ref[step])), (key, field, step)
                if value is not None:
                    assert value == pytest.approx(ref[step], rel=1e-6), (key, field, step)
            assert record[f"{key}_n"] == min(step, 5)
        spikes |= want["spike"]
    assert np.flatnonzero(spikes).tolist() == [10]  # the x30 loss (and its gradient)
    assert [r["step"] for r in records if r.get("kind") == "spike"] == [10]
    spike = steps(records, "spike")[10]
    assert spike["loss_spike"] and spike["grad_norm_spike"] and spike["action"] == "warned"
    for step, record in logged.items():
        window = spikes[max(0, step - 4):step + 1]
        assert record["spike"] == bool(spikes[step])
        assert record["spikes"] == window.sum() and record["spike_score"] == pytest.approx(window.mean())
        assert record["spike_score_total"] == pytest.approx(spikes[:step + 1].mean())
        assert record["spikes_total"] == spikes[:step + 1].sum() and record["skipped_total"] == 0
    assert probe.decision_reads == 0  # "warn" never reads a flag on its own


def test_loss_is_the_mean_over_accumulated_micro_batches_and_unscaled_under_amp(tmp_path):
    probe = lp.StabilityMonitor(every_n_steps=1, window=4, output_dir=str(tmp_path))
    recorder = Recorder()
    fit(tmp_path, probe, lambda: SpikyNet(), callbacks=[recorder], max_steps=4, accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    logged = steps(read(tmp_path / "stability.jsonl"))
    micro = np.array(recorder.micro).reshape(4, 2)  # Lightning hands on_train_batch_end loss / accumulate
    assert [logged[s]["loss"] for s in range(4)] == pytest.approx(micro.sum(1).tolist(), rel=1e-6)
    assert [logged[s]["grad_norm"] for s in range(4)] == pytest.approx([recorder.norms[s] for s in range(4)],
                                                                         rel=1e-4)


def test_an_amp_overflow_is_not_a_spike_the_scaler_handles_it(tmp_path):
    probe = lp.StabilityMonitor(every_n_steps=1, window=4, warmup=100, on_spike="stop", output_dir=str(tmp_path))
    trainer = fit(tmp_path, probe, lambda: SpikyNet({2: 1e30}), max_steps=5,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    records = read(tmp_path / "stability.jsonl")
    logged = steps(records)
    assert not trainer.should_stop and trainer.global_step == 5
    assert logged[2]["grad_norm"] is None and logged[2]["amp_overflow_total"] == 1 and not logged[2]["spike"]
    assert not [r for r in records if r.get("kind") == "spike"]


# -- the policies --------------------------------------------------------------------------------------------------
def test_a_nan_loss_is_a_spike_from_the_first_step(tmp_path):
    probe = lp.StabilityMonitor(every_n_steps=4, output_dir=str(tmp_path))  # warm-up: a full window of 128
    with pytest.warns(UserWarning, match=r"spike step\(s\) of the loss or gradient norm at step\(s\) 2"):
        fit(tmp_path, probe, lambda: SpikyNet(nan_step=2), max_steps=3)
    spike = steps(read(tmp_path / "stability.jsonl"), "spike")[2]
    assert spike["nonfinite"] and spike["loss"] is None and spike["action"] == "warned"


def _adam_state(trainer: pl.Trainer) -> list[torch.Tensor]:
    optimizer = trainer.optimizers[0]
    return [t for p in optimizer.param_groups[0]["params"] for t in optimizer.state[p].values()]


def test_skip_leaves_weights_and_adam_state_exactly_as_a_run_without_that_step(tmp_path):
    probe = lp.StabilityMonitor(every_n_steps=5, window=8, warmup=8, on_spike="skip", watch=("loss",),
                                output_dir=str(tmp_path / "a"))
    recorder = Recorder()
    with pytest.warns(UserWarning, match="were not applied"):
        skipped = fit(tmp_path / "a", probe, lambda: SpikyNet({10: 100.0}), callbacks=[recorder])
    assert probe.skipped_steps == [10] and probe.decision_reads == 14
    assert skipped.global_step == 14  # the skipped step counts, as a GradScaler skip does
    # The reference: the same run where training_step returns None at step 10 (no backward: Adam leaves every
    # parameter and its state alone).
    plain = fit(tmp_path / "b", None, lambda: SpikyNet(none_at=(10,)))
    for a, b in zip(skipped.lightning_module.parameters(), plain.lightning_module.parameters()):
        assert torch.equal(a, b)
    state_a, state_b = _adam_state(skipped), _adam_state(plain)
    assert len(state_a) == len(state_b) > 0 and all(torch.equal(a, b) for a, b in zip(state_a, state_b))
    assert all(float(optimizer_step) == 13 for optimizer_step in state_a[::3])  # Adam's own step count: 14 - 1
    records = read(tmp_path / "a" / "stability.jsonl")
    assert steps(records, "spike")[10]["action"] == "skipped" and steps(records)[10]["skipped_total"] == 1
    assert "step" not in skipped.optimizers[0].__dict__  # the wrapper is gone after the fit


def test_stop_ends_the_fit_cleanly_with_a_checkpoint_of_the_weights_before_the_spike(tmp_path):
    probe = lp.StabilityMonitor(every_n_steps=5, on_spike="stop", output_dir=str(tmp_path))
    recorder = Recorder()
    with pytest.warns(UserWarning, match="training stops"):
        trainer = fit(tmp_path, probe, lambda: SpikyNet(nan_step=7), callbacks=[recorder], max_steps=-1,
                      max_epochs=3, enable_checkpointing=True)
    assert trainer.should_stop and trainer.global_step == 8
    checkpoints = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["epoch=0-step=8.ckpt"]  # Lightning's end of the first epoch
    checkpoint = torch.load(checkpoints[0], weights_only=False)
    assert checkpoint["global_step"] == 8
    for name, value in checkpoint["state_dict"].items():
        assert torch.isfinite(value).all() and torch.equal(value, recorder.weights[7][name]), name
    records = read(tmp_path / "stability.jsonl")
    assert steps(records, "spike")[7]["action"] == "stopped"  # written at the end of the fit
    assert probe.skipped_steps == [7]


# -- pre-flight, arguments, resume ---------------------------------------------------------------------------------
class ManualNet(SpikyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimisation_is_skipped_with_one_warning(tmp_path):
    probe = lp.StabilityMonitor(on_spike="skip", output_dir=str(tmp_path))
    with pytest.warns(ProbeSkippedWarning, match="manual optimisation"):
        trainer = fit(tmp_path, probe, lambda: ManualNet(), max_steps=2)
    assert read(tmp_path / "stability.jsonl")[0]["probe_status"] == "skipped"
    assert "step" not in trainer.optimizers[0].__dict__


@pytest.mark.parametrize("kwargs,match", [
    ({"on_spike": "raise"}, "on_spike"), ({"rule": "mad"}, "rule"), ({"window": 0}, "window"),
    ({"threshold": 0}, "threshold"), ({"watch": ("loss", "lr")}, "watch"), ({"watch": "loss"}, "watch"),
    ({"warmup": -1}, "warmup"), ({"mode": "up"}, "mode"), ({"exclude_spikes": 1}, "exclude_spikes"),
])
def test_bad_arguments_are_refused_in_init(kwargs, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        lp.StabilityMonitor(**kwargs)


def test_resume_keeps_the_windows_and_writes_every_record_once(tmp_path):
    def run(root: Path, ckpt_path=None, max_epochs=2) -> None:
        probe = lp.StabilityMonitor(every_n_steps=4, window=6, warmup=3, threshold=3.0, output_dir=str(root / "p"))
        checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1, every_n_epochs=1)
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=max_epochs, limit_train_batches=6, accelerator="cpu", logger=False,
                             callbacks=[probe, checkpoint], enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(root), num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(SpikyNet({5: 40.0, 9: 40.0}), SpikyData(16), ckpt_path=ckpt_path)

    run(tmp_path / "whole")
    whole = read(tmp_path / "whole" / "p" / "stability.jsonl")
    # The spike at step 5 comes after the last logged step (4) before the checkpoint at the epoch's end (step 6):
    # it is read at step 8, after the resume.
    assert [(r["kind"], r["step"]) for r in whole] == [("step", 0), ("step", 4), ("step", 8), ("spike", 5),
                                                       ("spike", 9)]
    run(tmp_path / "resumed", max_epochs=1)
    ckpt = next((tmp_path / "resumed" / "ckpt").glob("*.ckpt"))
    run(tmp_path / "resumed", ckpt_path=str(ckpt))
    resumed = read(tmp_path / "resumed" / "p" / "stability.jsonl")
    assert resumed == whole


# -- DDP and FSDP2 --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability_dist")
    run_in_new_session([sys.executable, str(ROOT / "tests" / "stability_dist_run.py"), str(out)], 300,
                       "the DDP + FSDP2 stability run")
    from tests.stability_dist_run import fit as run_fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_fit(str(out / "single"), "single", 16, 1)
    return out


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_ranks_decide_as_one_process_does(distributed, kind):
    for name in ("stability", "stability_relative"):
        single = read(distributed / "single" / f"{name}.jsonl")
        multi = read(distributed / kind / f"{name}.jsonl")
        assert [(r["kind"], r["step"]) for r in multi] == [(r["kind"], r["step"]) for r in single]
        assert {r["step"] for r in multi if r["kind"] == "spike"} == {SPIKE_STEP, NAN_STEP}
        for a, b in zip(single, multi):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, float):
                    assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (name, a["step"], key)
                else:
                    assert b[key] == value, (name, a["step"], key)
    actions = {r["step"]: r["action"] for r in read(distributed / kind / "stability.jsonl") if r["kind"] == "spike"}
    assert actions == {SPIKE_STEP: "skipped", NAN_STEP: "skipped"}
    for rank in (0, 1):  # the same decision on every rank
        assert (distributed / kind / f"skipped_rank{rank}.txt").read_text() == f"{SPIKE_STEP},{NAN_STEP}"
    assert steps(read(distributed / kind / "stability.jsonl"))[12]["loss"] is not None  # finite after the NaN
