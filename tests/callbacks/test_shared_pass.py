"""Representation probes that analyse at the same moment share one forward pass over the probe set."""

import pytorch_lightning as pl

from lightning_probes import ActivationStatsMonitor, AlignmentMonitor, LayerCorrelationMonitor
from tests.helpers import RandomDataModule, approx, read, small_mlp, trainer

PROBES = {"layer_correlation": LayerCorrelationMonitor, "activation_stats": ActivationStatsMonitor,
          "alignment": AlignmentMonitor}


def _fit(tmp_path, names, **kwargs):
    """One fit (epochs 0 and 1 analysed) with the named probes; returns the forward calls of the model."""
    pl.seed_everything(0)
    model = small_mlp()
    calls = []
    model.net.fc1.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    probes = [PROBES[n](**{"num_samples": 32, "batch_size": 16, "output_dir": str(tmp_path),
                           "plot_every_n_epochs": 0, **kwargs.get(n, {})}) for n in names]
    trainer(tmp_path, probes, max_epochs=1, limit_val_batches=1).fit(model, RandomDataModule())
    return len(calls)


def test_one_pass_for_every_probe_and_the_same_records(tmp_path):
    bare = _fit(tmp_path / "bare", [])  # training and validation forwards
    together = _fit(tmp_path / "together", list(PROBES))
    # 2 analyses x 2 batches of 16 (the 32 validation samples) for all three probes, plus each layer check.
    assert together - bare == 2 * 2 + 3
    for name in PROBES:
        alone = _fit(tmp_path / name, [name])
        assert alone - bare == 2 * 2 + 1, name
        shared, separate = read(tmp_path / "together" / f"{name}.jsonl"), read(tmp_path / name / f"{name}.jsonl")
        assert len(shared) == len(separate) > 0
        for a, b in zip(shared, separate):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == approx(b[key], rel=1e-9, abs=1e-12), \
                    (name, key)


def test_different_settings_run_their_own_pass(tmp_path):
    bare = _fit(tmp_path / "bare", [])
    mixed = _fit(tmp_path / "mixed", ["layer_correlation", "activation_stats"],
                 activation_stats={"batch_size": 8})  # another batching: no sharing
    assert mixed - bare == (2 * 2 + 1) + (2 * 4 + 1)
    schedules = _fit(tmp_path / "schedules", ["layer_correlation", "activation_stats"],
                     activation_stats={"every_n_epochs": 2})
    assert schedules - bare == 2 + 2 + 2  # epoch 0 shared, epoch 1 alone, 2 checks
