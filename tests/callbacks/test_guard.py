"""The fail-safe hooks (`lightning_probes.callbacks.guard`): a probe that fails after the start disables itself with
one warning and one record while training goes on (``on_error="warn"``), or raises naming itself (``"raise"``);
pre-flight skips and refusals; reused instances start clean."""

from __future__ import annotations

import warnings

import pytest

from lightning_probes import read_probes
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.guard import (
    ON_ERROR_ENV,
    ProbeDisabledWarning,
    ProbeSkippedWarning,
    resolve_on_error,
)
from lightning_probes.errors import ProbeConfigurationError
from tests.helpers import RandomDataModule, read, small_mlp, trainer


class Flaky(ProbeCallback):
    """Writes one record per training batch and raises at batch ``fail_at`` (a stand-in for a probe's bug)."""

    probe_name = "flaky"

    def __init__(self, fail_at: int = 3, error: type = ZeroDivisionError, **kwargs):
        super().__init__(**kwargs)
        self.fail_at, self.error = fail_at, error
        self.calls = 0
        self.disabled_calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls += 1
        if trainer.global_step >= self.fail_at:
            raise self.error("the probe's own bug")
        self.write_records(trainer, [{"step": trainer.global_step, "value": 1.0}])

    def on_disable(self, trainer):
        self.disabled_calls += 1


def test_a_failure_after_the_start_disables_the_probe_and_training_goes_on(tmp_path):
    probe = Flaky(on_error="warn")
    t = trainer(tmp_path, [probe], max_epochs=2)
    with pytest.warns(ProbeDisabledWarning, match=r"Flaky 'flaky' raised in `on_train_batch_end` .*"
                                                  r"ZeroDivisionError: the probe's own bug") as caught:
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert t.global_step == 12  # both epochs trained
    assert sum(issubclass(w.category, ProbeDisabledWarning) for w in caught) == 1
    assert "Traceback" in str(next(w.message for w in caught if issubclass(w.category, ProbeDisabledWarning)))
    assert probe.calls == 3 and probe.disabled_calls == 1  # no hook ran after the failure
    records = read(tmp_path / "probes" / "flaky.jsonl")
    assert [r["step"] for r in records[:-1]] == [1, 2]  # the batches before the failure at step 3
    last = records[-1]
    assert last["probe_status"] == "disabled" and last["disabled"] is True
    assert last["hook"] == "on_train_batch_end" and last["step"] == 3
    assert last["reason"] == "ZeroDivisionError: the probe's own bug"
    table = read_probes(tmp_path, "flaky")
    assert table["disabled"].iloc[-1] is True or table["disabled"].iloc[-1] == 1
    assert probe.disabled == last["reason"] and not probe.active


def test_on_error_raise_names_the_probe_and_the_hook(tmp_path):
    t = trainer(tmp_path, [Flaky(on_error="raise")], max_epochs=1)
    with pytest.raises(ZeroDivisionError) as info:
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert any("Flaky 'flaky', hook `on_train_batch_end`" in note for note in info.value.__notes__)


def test_the_environment_chooses_when_on_error_is_unset(monkeypatch):
    monkeypatch.setenv(ON_ERROR_ENV, "warn")
    assert Flaky().on_error_policy == "warn" and Flaky(on_error="raise").on_error_policy == "raise"
    monkeypatch.delenv(ON_ERROR_ENV)
    assert resolve_on_error(None) == "warn"
    monkeypatch.setenv(ON_ERROR_ENV, "ignore")
    with pytest.raises(ValueError, match=r"Expected \$LIGHTNING_PROBES_ON_ERROR to be one of \['warn', 'raise'\]"):
        resolve_on_error(None)
    with pytest.raises(ValueError, match=r"Expected `on_error` to be one of \['warn', 'raise'\] or None.*'always'"):
        Flaky(on_error="always")


def test_a_configuration_error_before_the_first_batch_still_stops_the_run(tmp_path):
    class BadContract(Flaky):
        def on_sanity_check_end(self, trainer, pl_module):
            raise ProbeConfigurationError("BadContract: `logits_key='logits'` is not in the step's output")

    t = trainer(tmp_path, [BadContract(on_error="warn")], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(ProbeConfigurationError, match="BadContract: `logits_key='logits'`"):
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert t.global_step == 0


def test_a_configuration_error_after_the_start_disables(tmp_path):
    probe = Flaky(fail_at=2, error=ProbeConfigurationError, on_error="warn")
    t = trainer(tmp_path, [probe], max_epochs=1)
    with pytest.warns(ProbeDisabledWarning):
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert t.global_step == 6 and probe.disabled.startswith("ProbeConfigurationError")


class Inapplicable(Flaky):
    def preflight(self, trainer, pl_module):
        self.preflights = getattr(self, "preflights", 0) + 1
        return "the model has no layer pair to compare; give it two layers to run it"


def test_a_preflight_skip_warns_once_and_writes_one_record(tmp_path):
    probe = Inapplicable()
    t = trainer(tmp_path, [probe], max_epochs=2)
    with pytest.warns(ProbeSkippedWarning, match="Inapplicable 'flaky' is skipped for this run: the model has no "
                                                 "layer pair") as caught:
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert sum(issubclass(w.category, ProbeSkippedWarning) for w in caught) == 1
    assert probe.calls == 0 and probe.preflights == 1 and probe.disabled_calls == 1
    (record,) = read(tmp_path / "probes" / "flaky.jsonl")
    assert record["probe_status"] == "skipped" and record["stage"] == "fit" and record["step"] == 0
    assert t.global_step == 12


def test_a_preflight_refusal_stops_before_any_step(tmp_path):
    class Refusing(Flaky):
        def preflight(self, trainer, pl_module):
            raise ProbeConfigurationError("Refusing: `layers=['nope']` names no module; modules: net.0, net.1")

    t = trainer(tmp_path, [Refusing(on_error="warn")], max_epochs=1)
    with pytest.raises(ProbeConfigurationError, match=r"Refusing: `layers=\['nope'\]`"):
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert t.global_step == 0


def test_a_reused_probe_starts_clean_in_the_next_run(tmp_path):
    probe = Flaky(fail_at=2, on_error="warn")
    with pytest.warns(ProbeDisabledWarning):
        trainer(tmp_path / "a", [probe], max_epochs=1).fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert probe.disabled is not None
    probe.fail_at = 100
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeDisabledWarning)
        trainer(tmp_path / "b", [probe], max_epochs=1).fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert probe.active
    assert [r["step"] for r in read(tmp_path / "b" / "probes" / "flaky.jsonl")] == [1, 2, 3, 4, 5, 6]
    first = read(tmp_path / "a" / "probes" / "flaky.jsonl")
    assert first[-1]["disabled"] is True  # the first run's file is left as it was


def test_a_failure_on_one_rank_disables_the_probe_on_every_rank_without_a_hang(tmp_path):
    import json
    import sys
    from pathlib import Path

    from tests.helpers import run_in_new_session

    script = Path(__file__).resolve().parents[2] / "tests" / "guard_ddp_run.py"
    run_in_new_session([sys.executable, str(script), str(tmp_path)], 300, "the DDP run with a one-rank failure")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [9, 9]  # 3 epochs of 3 batches per rank, training finished
    assert ranks[1]["confidence"].startswith("ValueError: ConfidenceMonitor: `target`")
    assert ranks[0]["confidence"] == "disabled on another rank after a failure there"
    assert ranks[0]["noise"] == "RuntimeError: logits_fn failed on this rank"
    assert ranks[1]["noise"].startswith("RemoteProbeError: the analysis failed on global rank 0: RuntimeError")
    confidence = read(tmp_path / "confidence.jsonl")
    assert confidence[-1]["disabled"] is True and confidence[-1]["hook"] == "agreement"
    assert [r["stage"] for r in confidence[:-1]] == ["val"]  # epoch 0's validation, before the failure
    noise = read(tmp_path / "noise_robustness.jsonl")
    assert [r.get("disabled", False) for r in noise] == [False, True]


def test_a_real_probe_disabled_mid_run_keeps_its_history_and_plot_redraws_it(tmp_path):
    from lightning_probes import LayerCorrelationMonitor
    from lightning_probes.commands.plot import plot

    probe = LayerCorrelationMonitor(num_samples=32, plot_every_n_epochs=0, on_error="warn")
    analyse = probe.analyse_layers

    def breaks_at_epoch_two(trainer, pl_module, epoch):
        if epoch == 2:
            raise RuntimeError("out of memory (simulated)")
        return analyse(trainer, pl_module, epoch)

    probe.analyse_layers = breaks_at_epoch_two
    t = trainer(tmp_path, [probe], max_epochs=3)
    with pytest.warns(ProbeDisabledWarning, match="LayerCorrelationMonitor 'layer_correlation' raised in "
                                                  "`on_train_epoch_end`.*out of memory"):
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert t.global_step == 18
    records = read(tmp_path / "probes" / "layer_correlation.jsonl")
    assert records[-1]["probe_status"] == "disabled" and records[-1]["epoch"] == 1  # labelled by the Trainer's epoch
    assert {r["epoch"] for r in records[:-1]} == {0, 1}  # the analyses before the failure are kept
    table = read_probes(tmp_path, "layer_correlation")
    assert list(table["probe_status"].dropna()) == ["disabled"]
    drawn = plot(str(tmp_path), str(tmp_path / "figures"), progress=False)  # the disable record is left out
    assert any(path.endswith("corr_means.png") for path in drawn)


def test_a_disabled_probe_whose_teardown_also_fails_warns_once(tmp_path):
    class FlakyTeardown(Flaky):
        def teardown(self, trainer, pl_module, stage):
            raise OSError("the disk went away")

    t = trainer(tmp_path, [FlakyTeardown(on_error="warn")], max_epochs=1)
    with pytest.warns(ProbeDisabledWarning) as caught:
        t.fit(small_mlp(), RandomDataModule(n=96, batch_size=16))
    assert [str(w.message).split(" and is disabled")[0] for w in caught
            if issubclass(w.category, ProbeDisabledWarning)] == ["FlakyTeardown 'flaky' raised in `on_train_batch_end`"]
