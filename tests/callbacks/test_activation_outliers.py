"""`ActivationOutlierMonitor`: every statistic against NumPy on the layer outputs captured by the test's own hooks;
no hook and no work on a step that is not watched; the training unchanged; DDP and FSDP2 equal to one process on
the union of the ranks' batches; resume; the pre-flight."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

import lightning_probes as lp
from lightning_probes.callbacks.activation_outliers import _first_float_tensor, default_outlier_layers
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional import activation_outliers, exceed_count, outlier_partials, outlier_stats
from tests.helpers import read, run_in_new_session
from tests.outliers_run import OutlierData, OutlierNet

ROOT = Path(__file__).parents[2]
LAYERS = ["net.conv", "net.embed", "net.norm", "net.blocks.0", "net.blocks.0.fc", "net.blocks.1",
          "net.blocks.1.fc", "net.head"]  # net.tagger gives indices only: no record
CHANNEL_FIRST = {"net.conv"}


def reference(x: np.ndarray, k: float, channel_first: bool) -> dict:
    """The statistics of one output, in NumPy (float64)."""
    x = x.astype(np.float64)
    rms = np.sqrt(np.mean(x ** 2))
    if channel_first:
        channel_max = np.abs(np.moveaxis(x, 1, 0)).reshape(x.shape[1], -1).max(axis=1)
    else:
        channel_max = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
    return {"rms": rms, "max_abs": np.abs(x).max(), "exceed_fraction": np.mean(np.abs(x) > k * rms),
            "channel_max_ratio": channel_max.max() / np.median(channel_max),
            "top_channel": int(np.argmax(channel_max)), "numel": x.size, "channels": channel_max.size}


def check(record: dict, want: dict, rel: float = 1e-6) -> None:
    for key, value in want.items():
        if key in ("top_channel", "numel", "channels"):
            assert record[key] == value, (record["layer"], key)
        elif key == "exceed_fraction":  # a count: one entry at most may sit on the threshold's rounding
            assert record[key] == pytest.approx(value, abs=1.01 / record["numel"]), (record["layer"], key)
        else:
            assert record[key] == pytest.approx(value, rel=rel), (record["layer"], key)


# -- the maths --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,channel_dim", [((5, 7), -1), ((3, 4, 6), -1), ((2, 5, 3, 4), 1), ((9,), None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_outliers_equal_numpy(shape, channel_dim, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    x.view(-1)[3] = 40.0  # an outlier
    stats = activation_outliers(x, k=2.5, channel_dim=channel_dim)
    a = x.double().numpy()
    rms = np.sqrt(np.mean(a ** 2))
    if channel_dim is None:
        channel_max = np.abs(a).max(keepdims=True).ravel()
    else:
        channel_max = np.abs(np.moveaxis(a, channel_dim, 0)).reshape(a.shape[channel_dim], -1).max(axis=1)
    assert stats["rms"] == pytest.approx(rms, rel=1e-6)
    assert stats["max_abs"] == pytest.approx(np.abs(a).max(), rel=1e-7)
    assert stats["exceed_fraction"] == np.mean(np.abs(a) > 2.5 * rms) > 0
    assert stats["channel_max_ratio"] == pytest.approx(channel_max.max() / np.median(channel_max), rel=1e-6)
    assert stats["top_channel"] == int(np.argmax(channel_max))
    assert stats["numel"] == a.size


def test_partials_of_pieces_combine_to_the_whole():
    """Sums add and per-channel maxima maximise over disjoint pieces (the ranks' batches); the count against the
    whole's RMS adds too, and an even number of channels takes NumPy's median (the mean of the middle two)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 5, 6, generator=g) * torch.tensor([1.0, 1.0, 8.0, 1.0, 1.0, 1.0])
    pieces = [x[:4], x[4:5], x[5:]]
    parts = [outlier_partials(p, -1) for p in pieces]
    sums = sum(s for s, _ in parts)
    channel_max = torch.stack([c for _, c in parts]).amax(0)
    rms = (sums[0] / sums[1]).sqrt()
    exceed = sum(exceed_count(p, 2.0 * rms) for p in pieces)
    combined = outlier_stats(sums, exceed, channel_max).tolist()
    whole = activation_outliers(x, k=2.0)
    assert combined[:4] == pytest.approx([whole["rms"], whole["max_abs"], whole["exceed_fraction"],
                                          whole["channel_max_ratio"]], rel=1e-6)
    assert int(combined[4]) == whole["top_channel"] == 2
    m = np.abs(x.numpy()).reshape(-1, 6).max(0)
    assert whole["channel_max_ratio"] == pytest.approx(m.max() / np.median(m), rel=1e-6)


def test_low_precision_and_nonfinite_outputs():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    stats = activation_outliers(x, k=2.0)
    a = x.float().double().numpy()
    assert stats["rms"] == pytest.approx(np.sqrt(np.mean(a ** 2)), rel=1e-5)
    assert stats["exceed_fraction"] == np.mean(np.abs(a) > 2.0 * np.sqrt(np.mean(a ** 2)))
    x = torch.ones(4, 3)
    x[1, 1] = float("nan")
    stats = activation_outliers(x)  # a nan entry: every statistic nan (null in the records)
    assert all(np.isnan(stats[k]) for k in ("rms", "max_abs", "exceed_fraction", "channel_max_ratio"))
    assert stats["top_channel"] is None
    assert np.isnan(activation_outliers(torch.zeros(4, 3))["channel_max_ratio"])  # 0 / 0
    x = torch.zeros(4, 3)
    x[0, 0] = 1.0
    assert activation_outliers(x)["channel_max_ratio"] == float("inf")  # a zero median (null in the records)


def test_large_and_low_precision_outputs_are_reduced_in_pieces(monkeypatch):
    """Pieces of a reduction (a contiguous output's flat pieces, a strided one's slices of dim 0) give the same
    numbers, and a threshold between two bfloat16 values counts as the exact comparison does."""
    import lightning_probes.functional.outliers as outliers

    x = (torch.randn(6, 10, 7, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    whole = activation_outliers(x, k=1.7)
    monkeypatch.setattr(outliers, "_PIECE", 16)
    assert activation_outliers(x, k=1.7) == pytest.approx(whole, rel=1e-6)  # float32 sums of other pieces
    assert activation_outliers(x.transpose(1, 2), k=1.7) == pytest.approx(
        activation_outliers(x.transpose(1, 2).contiguous(), k=1.7), rel=1e-6)
    a = x.double().numpy()
    for t in (0.7, 1.0, 1.0039, 2.5):  # 1.0039: between the bfloat16 values 1.0 and 1.0078125
        assert float(exceed_count(x, torch.tensor(t, dtype=torch.float64))) == np.sum(np.abs(a) > t)
    y = torch.tensor([1.0, 1.0078125, -1.0078125], dtype=torch.bfloat16)
    assert float(exceed_count(y, torch.tensor(1.0039))) == 2


def test_first_float_tensor_of_structured_outputs():
    t = torch.ones(2)
    assert _first_float_tensor((torch.zeros(2, dtype=torch.long), {"a": t})) is t
    assert _first_float_tensor({"index": torch.zeros(2, dtype=torch.long)}) is None
    assert _first_float_tensor(None) is None


def test_default_selection():
    model = OutlierNet()
    assert list(default_outlier_layers(model)) == ["net.conv", "net.embed", "net.norm", "net.blocks.0",
                                                   "net.blocks.0.fc", "net.blocks.1", "net.blocks.1.fc",
                                                   "net.tagger", "net.head"]
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    chosen = default_outlier_layers(encoder)
    assert "layers.0" in chosen and "layers.1" in chosen and "layers.0.self_attn" in chosen
    assert "layers.0.self_attn.out_proj" not in chosen  # applied through its weight, never called
    assert "layers.0.norm1" in chosen and "layers.0.linear2" in chosen


# -- a training run -------------------------------------------------------------------------------------------------
class Capture(pl.Callback):
    """The test's own hooks: a clone of every selected layer's output at every training step, and how many forward
    hooks the layers carry during each step's forward (besides the test's own)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.outputs: dict[int, dict[str, np.ndarray]] = {}
        self.armed: dict[int, int] = {}

    def on_train_start(self, trainer, pl_module):
        modules = dict(pl_module.named_modules())
        self.modules = [modules[n] for n in self.names]
        for name, module in zip(self.names, self.modules):
            module.register_forward_hook(self._hook(trainer, name))

    def _hook(self, trainer, name):
        def hook(module, args, output):
            step = trainer.global_step
            if name == self.names[0]:
                self.armed[step] = sum(len(m._forward_hooks) - 1 for m in self.modules)
            tensor = output[0] if isinstance(output, tuple) else output  # the blocks' (stream, int); Tagger's dict
            if isinstance(tensor, torch.Tensor):
                self.outputs.setdefault(step, {}).setdefault(name, tensor.detach().clone().numpy())
        return hook


def fit(tmp_path, probes, inplace=True, max_epochs=2, batch_size=32, **kwargs):
    pl.seed_everything(0)
    model = OutlierNet(inplace=inplace)
    settings = dict(max_epochs=max_epochs, default_root_dir=str(tmp_path), enable_progress_bar=False,
                    enable_model_summary=False, logger=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer = pl.Trainer(callbacks=probes, **{**settings, **kwargs})
    trainer.fit(model, OutlierData(batch_size))
    return trainer, model


@pytest.mark.parametrize("hold", [False, True], ids=["count_in_hook", "held_until_forward_end"])
def test_records_equal_numpy_on_the_captured_outputs(tmp_path, hold):
    probe = lp.ActivationOutlierMonitor(every_n_steps=2, k=3.0, output_dir=tmp_path)
    probe._hold = hold  # True: the several-process path (outputs kept until the forward ends), in one process
    capture = Capture(LAYERS + ["net.tagger"])
    fit(tmp_path, [capture, probe])
    records = read(tmp_path / "activation_outliers.jsonl")
    assert sorted({r["step"] for r in records}) == [0, 2, 4]  # 6 steps, every 2nd watched
    assert [r["layer"] for r in records if r["step"] == 0] == LAYERS
    for record in records:
        want = reference(capture.outputs[record["step"]][record["layer"]], 3.0, record["layer"] in CHANNEL_FIRST)
        check(record, want)
        assert record["k"] == 3.0
        # The conv output is changed in place by ReLU(inplace=True) after its hook: the held path cannot count it
        # again and says so; its numbers are still those of the output before the ReLU (one process: local RMS =
        # global RMS).
        changed = hold and record["layer"] == "net.conv"
        assert record["exceed_rms"] == ("local" if changed else "global")
    embed = [r for r in records if r["layer"] == "net.embed"]
    assert all(r["top_channel"] == 3 and r["channel_max_ratio"] > 2 for r in embed)  # the massive channel
    assert any(r["exceed_fraction"] > 0 for r in records)
    conv = capture.outputs[0]["net.conv"]
    assert conv.min() < 0  # what the probe read: the conv output before the in-place ReLU
    # No hook and no work on a step that is not watched; one call per selected layer on a watched step.
    assert capture.armed == {0: 9, 1: 0, 2: 9, 3: 0, 4: 9, 5: 0}
    assert probe.hook_calls == 3 * 9
    # Held: the 8 float32 outputs of the last watched forward (distinct storages), none when counted in the hook.
    assert probe.last_held_bytes == (sum(capture.outputs[4][n].nbytes for n in LAYERS) if hold else 0)


def test_the_training_is_unchanged(tmp_path):
    _, bare = fit(tmp_path / "bare", [], max_epochs=1)
    probe = lp.ActivationOutlierMonitor(every_n_steps=1, output_dir=tmp_path / "probe")
    _, watched = fit(tmp_path / "probe", [probe], max_epochs=1)
    for (name, a), b in zip(bare.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(read(tmp_path / "probe" / "activation_outliers.jsonl")) == 3 * len(LAYERS)


def test_layers_include_exclude_and_gradient_accumulation(tmp_path):
    probe = lp.ActivationOutlierMonitor(every_n_steps=1, layers=["net.embed", "net.blocks.1", "net.tagger"],
                                        exclude="tagger", output_dir=tmp_path)
    capture = Capture(["net.embed"])
    fit(tmp_path, [capture, probe], max_epochs=1, batch_size=16, accumulate_grad_batches=2)
    records = read(tmp_path / "activation_outliers.jsonl")
    # 6 micro-batches, 3 optimiser steps: the first micro-batch of each step is watched.
    assert [(r["step"], r["layer"]) for r in records] == [(s, n) for s in range(3)
                                                          for n in ("net.embed", "net.blocks.1")]
    assert probe.hook_calls == 6
    for record in records[::2]:
        check(record, reference(capture.outputs[record["step"]]["net.embed"], 10.0, False))


def test_resume_writes_every_record_once(tmp_path):
    full = lp.ActivationOutlierMonitor(every_n_steps=2, output_dir=tmp_path / "full")
    fit(tmp_path / "full", [full], max_epochs=3)
    first = lp.ActivationOutlierMonitor(every_n_steps=2, output_dir=tmp_path / "resumed")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, _ = fit(tmp_path / "first", [first, checkpoint], max_epochs=1, enable_checkpointing=True)
    resumed = lp.ActivationOutlierMonitor(every_n_steps=2, output_dir=tmp_path / "resumed")
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, logger=False, num_sanity_val_steps=0, callbacks=[resumed])
    trainer.fit(OutlierNet(inplace=True), OutlierData(32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    want = read(tmp_path / "full" / "activation_outliers.jsonl")
    got = read(tmp_path / "resumed" / "activation_outliers.jsonl")
    assert [(r["step"], r["layer"]) for r in got] == [(r["step"], r["layer"]) for r in want]
    assert sorted({r["step"] for r in got}) == [0, 2, 4, 6, 8]
    for a, b in zip(want, got):
        assert a["rms"] == pytest.approx(b["rms"], rel=1e-6) and a["exceed_fraction"] == b["exceed_fraction"]


def test_preflight_refuses_unknown_layers_and_skips_a_model_without_layers(tmp_path):
    with pytest.raises(ProbeConfigurationError, match="net.embd.*did you mean 'net.embed'"):
        fit(tmp_path, [lp.ActivationOutlierMonitor(layers=["net.embd"], output_dir=tmp_path)])
    with pytest.raises(ProbeConfigurationError, match="no layer matching include"):
        fit(tmp_path, [lp.ActivationOutlierMonitor(include="nothing", output_dir=tmp_path)])

    class Functional(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 10) * 0.1)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(batch[0].flatten(1) @ self.w, batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = lp.ActivationOutlierMonitor(output_dir=tmp_path / "f")
    trainer = pl.Trainer(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[probe])
    with pytest.warns(lp.ProbeSkippedWarning, match="no module holding parameters"):
        trainer.fit(Functional(), OutlierData(32))
    assert read(tmp_path / "f" / "activation_outliers.jsonl")[0]["probe_status"] == "skipped"


@pytest.mark.parametrize("kwargs,match", [({"every_n_steps": 0}, "every_n_steps"), ({"k": 0}, "k"),
                                          ({"exceed_rms": "mean"}, "exceed_rms"), ({"layers": "net"}, "layers")])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lp.ActivationOutlierMonitor(**kwargs)


def test_a_failing_hook_disables_the_probe_and_training_goes_on(tmp_path, monkeypatch):
    import lightning_probes.callbacks.activation_outliers as module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "outlier_partials", broken)
    probe = lp.ActivationOutlierMonitor(every_n_steps=1, output_dir=tmp_path, on_error="warn")
    with pytest.warns(lp.ProbeDisabledWarning, match="boom"):
        trainer, _ = fit(tmp_path, [probe], max_epochs=1)
    assert trainer.global_step == 3 and probe.disabled
    assert not any(len(m._forward_hooks) for m in trainer.lightning_module.modules())


# -- DDP and FSDP2 ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("outliers_dist")
    run_in_new_session([sys.executable, str(ROOT / "tests" / "outliers_run.py"), str(out)], 400,
                       "the DDP + FSDP2 outlier run")
    single = out / "single"
    from tests.outliers_run import fit as run_fit

    run_fit(str(single), "single", 32, 1)
    return out


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_ranks_combined_equal_one_process_on_the_union_batch(distributed, kind):
    single = read(distributed / "single" / "activation_outliers.jsonl")
    multi = read(distributed / kind / "activation_outliers.jsonl")
    assert [(r["step"], r["layer"]) for r in multi] == [(r["step"], r["layer"]) for r in single]
    assert sorted({r["step"] for r in multi}) == [0, 2, 4] and {r["layer"] for r in multi} == set(LAYERS)
    for a, b in zip(single, multi):
        assert b["exceed_rms"] == "global"
        check(b, {key: a[key] for key in ("rms", "max_abs", "exceed_fraction", "channel_max_ratio", "top_channel",
                                          "numel", "channels")}, rel=1e-4)
    assert any(r["exceed_fraction"] > 0 for r in multi) and any(r["top_channel"] for r in multi)
    assert int((distributed / kind / "held_bytes.txt").read_text()) > 0
    # Against each rank's own RMS the counts differ (the ranks' batches differ 3x in scale), the rest does not.
    local = read(distributed / kind / "outliers_local.jsonl")
    assert all(r["exceed_rms"] == "local" for r in local)
    assert [r["rms"] for r in local] == pytest.approx([r["rms"] for r in multi], rel=1e-9)
    assert any(abs(a["exceed_fraction"] - b["exceed_fraction"]) > 2 / a["numel"] for a, b in zip(local, multi))
