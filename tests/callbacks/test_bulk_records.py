"""Records written in bulk: when the buffer reaches the file, what a checkpoint counts, deferred records, exit."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_probes as lp
from lightning_probes import record_buffer
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.io import JsonlWriter, read_jsonl
from lightning_probes.record_buffer import RecordBuffer
from tests.helpers import RandomDataModule, small_mlp, trainer

ROOT = Path(__file__).resolve().parents[2]
BATCHES = 6  # RandomDataModule: 96 samples in batches of 16


class StepProbe(ProbeCallback):
    """Writes one record ``{"step": s}`` at the start of every training batch (global step ``s``)."""

    probe_name = "steps"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.write_records(trainer, [{"step": trainer.global_step}])


class EpochWriter(ProbeCallback):
    """Writes one record in its own ``on_train_epoch_end``, without calling ``super()``."""

    probe_name = "epochs"

    def on_train_epoch_end(self, trainer, pl_module):
        self.write_records(trainer, [{"epoch": trainer.current_epoch}])


class DiskSpy(pl.Callback):
    """Records which steps of a probe's file are on disk at the end of every batch and start of every epoch."""

    def __init__(self, probe: ProbeCallback) -> None:
        self.probe = probe
        self.after_batch: dict[int, list] = {}
        self.at_epoch_start: dict[int, list] = {}

    def _on_disk(self) -> list:
        path = Path(self.probe.jsonl_path)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_batch[trainer.global_step - 1] = [r.get("step") for r in self._on_disk()]

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_epoch_start[trainer.current_epoch] = self._on_disk()


def _fit(tmp_path, callbacks, **kwargs):
    t = trainer(tmp_path, callbacks, **kwargs)
    t.fit(small_mlp(), RandomDataModule())
    return t


def test_records_reach_the_file_once_they_span_flush_every_n_steps_and_at_epoch_end(tmp_path):
    probe = StepProbe(output_dir=str(tmp_path / "probes"), flush_every_n_steps=4, flush_secs=None)
    spy = DiskSpy(probe)
    _fit(tmp_path, [probe, spy], max_epochs=2)
    # Epoch 0 (steps 0-5): steps 0-3 span 4 steps -> written at step 3; 4-5 wait for the epoch end.
    # Epoch 1 (steps 6-11): 6-9 written at step 9; 10-11 at the epoch end.
    expected = {0: [], 1: [], 2: [], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3], 5: [0, 1, 2, 3],
                6: list(range(6)), 7: list(range(6)), 8: list(range(6)), 9: list(range(10)),
                10: list(range(10)), 11: list(range(10))}
    assert spy.after_batch == expected
    assert [r["step"] for r in read_jsonl(probe.jsonl_path)] == list(range(2 * BATCHES))


def test_default_flush_follows_log_every_n_steps(tmp_path):
    probe = StepProbe(output_dir=str(tmp_path / "probes"), flush_secs=None)
    spy = DiskSpy(probe)
    _fit(tmp_path, [probe, spy], max_epochs=1, log_every_n_steps=2)
    assert spy.after_batch == {0: [], 1: [0, 1], 2: [0, 1], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3], 5: list(range(6))}
    probe = StepProbe(output_dir=str(tmp_path / "every"), flush_secs=None)
    spy = DiskSpy(probe)
    _fit(tmp_path, [probe, spy], max_epochs=1, log_every_n_steps=1)
    assert spy.after_batch == {s: list(range(s + 1)) for s in range(BATCHES)}


def test_read_history_includes_the_buffered_records(tmp_path):
    seen = []

    class Reader(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                seen.append([r["step"] for r in probe.read_history()])

    probe = StepProbe(output_dir=str(tmp_path / "probes"), flush_every_n_steps=100, flush_secs=None)
    _fit(tmp_path, [probe, Reader()], max_epochs=1)
    assert seen == [[0, 1, 2]]


def test_a_checkpoint_counts_exactly_the_records_on_disk(tmp_path):
    """Lightning calls `state_dict` before `on_save_checkpoint`: the probe writes its buffer there first."""
    checks = []

    class CheckpointSpy(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            state = checkpoint["callbacks"][probe.state_key]
            on_disk = [r["step"] for r in read_jsonl(probe.jsonl_path)]
            checks.append((trainer.global_step, state["records_written"], on_disk))

    probe = StepProbe(output_dir=str(tmp_path / "probes"), flush_every_n_steps=100, flush_secs=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _fit(tmp_path, [probe, CheckpointSpy(), ckpt], max_epochs=1, enable_checkpointing=True)
    # Mid-epoch at global step 4 (after steps 0-3), nothing else had written the buffer.
    assert checks[0] == (4, 4, [0, 1, 2, 3])
    assert all(count == len(on_disk) for _, count, on_disk in checks)


def test_an_epoch_end_override_without_super_still_writes(tmp_path):
    probe = EpochWriter(output_dir=str(tmp_path / "probes"), flush_every_n_steps=100, flush_secs=None)
    spy = DiskSpy(probe)
    _fit(tmp_path, [probe, spy], max_epochs=3)
    assert spy.at_epoch_start[1] == [{"epoch": 0}]
    assert spy.at_epoch_start[2] == [{"epoch": 0}, {"epoch": 1}]


def test_an_exception_writes_the_buffer_and_stays_the_exception(tmp_path):
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("boom at step 3")

    probe = StepProbe(output_dir=str(tmp_path / "probes"), flush_every_n_steps=100, flush_secs=None)
    with pytest.raises(RuntimeError, match="boom at step 3"):
        _fit(tmp_path, [probe, Boom()], max_epochs=1)
    assert [r["step"] for r in read_jsonl(probe.jsonl_path)] == [0, 1, 2]


def test_a_failing_producer_on_the_way_out_is_a_warning_not_a_new_exception(tmp_path, caplog):
    class BadProducer(ProbeCallback):
        probe_name = "bad"

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.write_records(trainer, [{"step": trainer.global_step}])
            if batch_idx == 1:
                self.defer_records(trainer, lambda: 1 / 0)
                raise KeyError("the training error")

    probe = BadProducer(output_dir=str(tmp_path / "probes"), flush_every_n_steps=100, flush_secs=None)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyError, match="the training error"):
        _fit(tmp_path, [probe], max_epochs=1)
    assert "could not write its buffered records" in caplog.text and "division by zero" in caplog.text


def test_deferred_records_keep_their_order_and_get_their_block_on_the_host(tmp_path):
    blocks = []

    class Deferring(ProbeCallback):
        probe_name = "deferring"

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            self.write_records(trainer, [{"step": step, "kind": "plain"}])
            block = torch.arange(6, dtype=torch.float32).reshape(2, 3) + step
            self.defer_records(trainer, lambda host: blocks.append(host) or
                               [{"step": step, "kind": "block", "values": host.tolist()}], block)
            self.defer_records(trainer, lambda: [{"step": step, "kind": "call"}])

    probe = Deferring(output_dir=str(tmp_path / "probes"), flush_every_n_steps=3, flush_secs=None)
    _fit(tmp_path, [probe], max_epochs=1)
    records = read_jsonl(probe.jsonl_path)
    assert [(r["step"], r["kind"]) for r in records] == [(s, k) for s in range(BATCHES)
                                                          for k in ("plain", "block", "call")]
    for r in records:
        if r["kind"] == "block":
            assert r["values"] == (torch.arange(6.0).reshape(2, 3) + r["step"]).tolist()
    assert all(b.device.type == "cpu" and b.shape == (2, 3) for b in blocks)


def test_blocks_of_one_device_go_to_the_host_in_one_copy(monkeypatch):
    """On an accelerator, all blocks pending at a flush of one (device, dtype) are concatenated and copied once.
    Here a CPU tensor subclass stands in for a device tensor: it reports device ``cuda`` and counts ``.cpu()``."""
    copies = []

    def to_host(blocks):
        fake = [b for b in blocks]
        monkeypatch.setattr(torch.Tensor, "cpu", lambda self: copies.append(self.shape) or self.clone())
        return list(record_buffer._to_host(fake))

    class FakeDevice:
        type = "cuda"

        def __hash__(self):
            return 1

        def __eq__(self, other):
            return isinstance(other, FakeDevice)

    class OnDevice(torch.Tensor):
        @property
        def device(self):
            return FakeDevice()

    blocks = [torch.full((2, 3), 1.0).as_subclass(OnDevice), torch.full((4,), 2.0).as_subclass(OnDevice),
              torch.full((1, 2), 3, dtype=torch.int64).as_subclass(OnDevice), torch.full((2,), 5.0)]
    hosts = to_host(blocks)
    assert sorted(copies) == sorted([torch.Size([10]), torch.Size([2])])  # one per dtype, none for the CPU block
    for block, host in zip(blocks, hosts):
        assert host.shape == block.shape and torch.equal(torch.as_tensor(host), torch.as_tensor(block))


def test_flush_secs_writes_once_the_oldest_record_is_that_old(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(record_buffer.time, "monotonic", lambda: clock[0])
    path = tmp_path / "x.jsonl"
    buffer = RecordBuffer(JsonlWriter(str(path)), flush_every_n_steps=None, flush_secs=10.0)
    assert not buffer.add([{"a": 1}], step=0)
    clock[0] = 109.9
    assert not buffer.add([{"a": 2}], step=1)
    clock[0] = 110.0
    assert buffer.add([{"a": 3}], step=1)
    assert [r["a"] for r in read_jsonl(str(path))] == [1, 2, 3]
    clock[0] = 200.0  # the next interval starts with the next record, not at the last write
    assert not buffer.add([{"a": 4}], step=2)
    buffer.writer.close()


def test_buffers_are_written_at_interpreter_exit(tmp_path):
    script = (f"from lightning_probes.io import JsonlWriter\n"
              f"from lightning_probes.record_buffer import RecordBuffer\n"
              f"b = RecordBuffer(JsonlWriter({str(tmp_path / 'exit.jsonl')!r}), None, None)\n"
              f"b.add([{{'a': 1}}, {{'a': 2}}], step=0)\n"
              f"b.defer(lambda: [{{'a': 3}}], step=0)\n")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
    assert [r["a"] for r in read_jsonl(str(tmp_path / "exit.jsonl"))] == [1, 2, 3]


def test_a_collected_probe_is_not_kept_alive_for_exit(tmp_path):
    import gc

    buffer = RecordBuffer(JsonlWriter(str(tmp_path / "x.jsonl")), None, None)
    assert buffer in record_buffer._LIVE
    del buffer
    gc.collect()
    assert all(b.writer.path != str(tmp_path / "x.jsonl") for b in record_buffer._LIVE)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"flush_every_n_steps": 0}, "`flush_every_n_steps` to be a positive integer or None, but got 0"),
    ({"flush_every_n_steps": 2.5}, "`flush_every_n_steps` to be a positive integer or None, but got 2.5"),
    ({"flush_secs": 0}, r"`flush_secs` to be a finite number in \(0, inf\), but got 0"),
    ({"flush_secs": float("nan")}, "`flush_secs` to be a finite number"),
])
def test_bad_flush_arguments_name_the_argument(kwargs, match):
    for cls in (lp.GradientStatsMonitor, lp.ConfidenceMonitor, lp.LayerCorrelationMonitor):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)
