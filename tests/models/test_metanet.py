"""`ZooDataModule` and `MetaNet` on a small synthetic zoo data set written in the shards' real format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import average_precision_score, r2_score, roc_auc_score

from lightning_probes.datamodules import ZooDataModule
from lightning_probes.io import atomic_save_npz
from lightning_probes.models import MetaNet

DIMS = [24, 12, 8, 10]
LAYERS = ["pool2", "fc1", "fc2", "fc3"]
ROOT = Path(__file__).parents[2]


def write_zoo_dataset(directory: Path, models: int = 12, per_model: int = 40, seed: int = 0) -> Path:
    """Shards whose `correct` and `ratio` follow the fc3 margin, so a meta-network has something to learn."""
    rng = np.random.default_rng(seed)
    for shard, ids in enumerate(np.array_split(np.arange(models), 3)):
        n = len(ids) * per_model
        logits = rng.normal(0, 2, (n, 10)).astype(np.float32)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        top = np.sort(p, 1)
        margin = top[:, -1] - top[:, -2]
        correct = (rng.random(n) < 0.2 + 0.8 * margin).astype(np.int64)
        ratio = np.clip(margin + rng.normal(0, 0.05, n), 0, 1).astype(np.float32)
        arrays = {"model_id": np.repeat(ids, per_model).astype(np.int64), "sample_index": np.arange(n),
                  "label": rng.integers(0, 10, n), "pred": logits.argmax(1), "correct": correct, "ratio": ratio,
                  "fc3": logits}
        for name, width in zip(LAYERS[:3], DIMS[:3]):
            arrays[name] = (rng.normal(0, 1, (n, width)) * (1 + margin[:, None])).astype(np.float32)
        atomic_save_npz(str(directory / f"shard_{shard:04d}.npz"), **arrays)
    return directory


@pytest.fixture
def zoo_dir(tmp_path):
    return write_zoo_dataset(tmp_path)


def test_splits_are_model_disjoint_seeded_and_written(zoo_dir):
    dm = ZooDataModule(str(zoo_dir), split_seed=3, val_fraction=0.25, test_fraction=0.25, batch_size=16)
    dm.setup("fit")
    split = json.loads((zoo_dir / "splits_3.json").read_text())
    assert split == dm.splits and sorted(split) == ["test", "train", "val"]
    ids = [i for k in ("train", "val", "test") for i in split[k]]
    assert sorted(ids) == list(range(12)) and len(set(ids)) == 12
    for name in ("train", "val", "test"):
        assert set(np.unique(dm.arrays[name]["model_id"])) == set(split[name])
    again = ZooDataModule(str(zoo_dir), split_seed=3, val_fraction=0.25, test_fraction=0.25)
    again.setup("fit")
    other = ZooDataModule(str(zoo_dir), split_seed=4, val_fraction=0.25, test_fraction=0.25)
    other.setup("fit")
    assert again.splits == dm.splits and other.splits != dm.splits
    batch = next(iter(dm.train_dataloader()))
    assert [x.shape[1] for x in batch["layers"]] == DIMS == dm.layer_dims
    assert batch["target"].dtype == torch.float32 and batch["correct"].dtype == torch.int64
    assert torch.equal(batch["target"], batch["correct"].float())
    regression = ZooDataModule(str(zoo_dir), task="regression", split_seed=3, val_fraction=0.25, test_fraction=0.25)
    regression.setup("fit")
    assert torch.equal(next(iter(regression.val_dataloader()))["target"],
                       torch.as_tensor(regression.arrays["val"]["ratio"][:256]))


def test_sample_split_and_max_models(zoo_dir):
    dm = ZooDataModule(str(zoo_dir), split_by="sample", max_models=6, val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    assert not (zoo_dir / "splits_0.json").exists()
    sizes = {k: len(v["model_id"]) for k, v in dm.arrays.items()}
    assert sum(sizes.values()) == 6 * 40 and sizes["test"] == 48
    assert all(set(np.unique(dm.arrays[k]["model_id"])) <= set(range(6)) for k in dm.arrays)
    assert set(dm.splits["test"]) & set(dm.splits["train"])  # the same models on both sides


def test_pair_is_the_sample_split(zoo_dir):
    pair = ZooDataModule(str(zoo_dir), split_by="pair", val_fraction=0.2, test_fraction=0.2)
    sample = ZooDataModule(str(zoo_dir), split_by="sample", val_fraction=0.2, test_fraction=0.2)
    pair.setup("fit")
    sample.setup("fit")
    for k in ("train", "val", "test"):
        assert np.array_equal(pair.arrays[k]["sample_index"], sample.arrays[k]["sample_index"])
        assert np.array_equal(pair.arrays[k]["model_id"], sample.arrays[k]["model_id"])


def test_model_and_image_split_keeps_runs_and_images_on_one_side(tmp_path):
    # 12 models = 6 runs of 2 checkpoints (group), each on the same 40 images (sample_index 0..39).
    write_zoo_dataset(tmp_path, models=12, per_model=40)
    for path in sorted(tmp_path.glob("shard_*.npz")):
        data = dict(np.load(path))
        data["sample_index"] = np.tile(np.arange(40), len(np.unique(data["model_id"])))
        data["group"] = data["model_id"] // 2
        atomic_save_npz(str(path), **data)
    dm = ZooDataModule(str(tmp_path), split_by="model_and_image", val_fraction=0.2, test_fraction=0.2, split_seed=1)
    dm.setup("fit")
    a = dm.arrays
    runs = {k: set(np.unique(a[k]["model_id"] // 2)) for k in a}
    images = {k: set(np.unique(a[k]["sample_index"])) for k in a}
    models = {k: set(np.unique(a[k]["model_id"])) for k in a}
    for one, other in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not runs[one] & runs[other] and not images[one] & images[other] and not models[one] & models[other]
    # 6 runs -> 1 test run, 1 val run, 4 train runs; 40 images -> 8 test, 8 val, 24 train: rows = models x images.
    assert [len(runs[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert [len(images[k]) for k in ("train", "val", "test")] == [24, 8, 8]
    assert [len(a[k]["model_id"]) for k in ("train", "val", "test")] == [8 * 24, 2 * 8, 2 * 8]
    assert json.loads((tmp_path / "splits_1.json").read_text()) == dm.splits == {k: sorted(models[k]) for k in a}
    # Without a group array each model is its own run.
    for path in sorted(tmp_path.glob("shard_*.npz")):
        data = dict(np.load(path))
        del data["group"]
        atomic_save_npz(str(path), **data)
    alone = ZooDataModule(str(tmp_path), split_by="model_and_image", val_fraction=0.25, test_fraction=0.25)
    alone.setup("fit")
    assert [len(alone.splits[k]) for k in ("train", "val", "test")] == [6, 3, 3]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "ranking"}, "`task`"), ({"val_fraction": 0}, "`val_fraction`"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"), ({"split_by": "class"}, "`split_by`"),
    ({"max_models": 2}, "`max_models`"), ({"layers": "fc3"}, "`layers`")])
def test_bad_datamodule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZooDataModule("x", **kwargs)


def test_missing_layer_and_missing_data_set_are_clear(zoo_dir, tmp_path):
    with pytest.raises(ValueError, match="fc9"):
        ZooDataModule(str(zoo_dir), layers=["fc9"]).setup("fit")
    with pytest.raises(FileNotFoundError, match="zoo-dataset"):
        ZooDataModule(str(tmp_path / "empty")).setup("fit")


@pytest.mark.parametrize("encoder", ["rnn", "lstm", "transformer"])
def test_sorted_encoding_makes_the_meta_network_blind_to_unit_order(encoder):
    torch.manual_seed(0)
    model = MetaNet(encoder=encoder, layer_dims=DIMS, d_model=16, nhead=4).eval()
    layers = [torch.randn(5, d) for d in DIMS]
    permuted = [x[:, torch.randperm(x.shape[1])] for x in layers]
    with torch.no_grad():
        out = model(layers)
        assert out.shape == (5,)
        torch.testing.assert_close(model(permuted), out)
    raw = MetaNet(encoder=encoder, layer_dims=DIMS, d_model=16, encoding="raw").eval()
    with torch.no_grad():
        assert not torch.allclose(raw(permuted), raw(layers))
    with pytest.raises(ValueError, match="layer_dims"):
        model([torch.randn(5, d + 1) for d in DIMS])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"encoder": "gru"}, "`encoder`"), ({"task": "x"}, "`task`"), ({"encoding": "mean"}, "`encoding`"),
    ({"d_model": 0}, "`d_model`"), ({"encoder": "transformer", "d_model": 10, "nhead": 4}, "`nhead`"),
    ({"layer_dims": [1]}, "`layer_dims`"), ({"dropout": 1.0}, "`dropout`"), ({"aligned_dims": [0]}, "`aligned_dims`"),
    ({"loss": "l1"}, "`loss`")])
def test_bad_metanet_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaNet(**kwargs)


def _fit_and_test(zoo_dir, task, encoder="lstm", epochs=4):
    pl.seed_everything(0)
    dm = ZooDataModule(str(zoo_dir), task=task, split_seed=1, val_fraction=0.25, test_fraction=0.25, batch_size=32)
    model = MetaNet(encoder=encoder, task=task, layer_dims=DIMS, d_model=16, lr=3e-3)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    results = trainer.test(model, datamodule=dm, verbose=False)[0]
    model.eval()
    test = dm.arrays["test"]
    with torch.no_grad():
        scores = model.predict_scores([torch.as_tensor(test[n]) for n in LAYERS]).double().numpy()
    return dm, results, scores


def test_classification_metrics_and_baselines_equal_scikit_learn(zoo_dir):
    dm, results, scores = _fit_and_test(zoo_dir, "classification")
    test, train = dm.arrays["test"], dm.arrays["train"]
    correct = test["correct"]
    assert results["test/auroc"] == pytest.approx(roc_auc_score(correct, scores), abs=1e-4)
    assert results["test/aupr_err"] == pytest.approx(average_precision_score(1 - correct, 1 - scores), abs=1e-4)
    assert results["test/accuracy"] == pytest.approx(((scores >= 0.5) == correct).mean(), abs=1e-4)
    # The baselines, from NumPy on the same fc3 of the same test models.
    def msp(logits):
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).max(1)
    test_msp, train_msp = msp(test["fc3"].astype(np.float64)), msp(train["fc3"].astype(np.float64))
    assert results["test/baseline/max_softmax/auroc"] == pytest.approx(roc_auc_score(correct, test_msp), abs=1e-4)
    assert results["test/baseline/max_softmax/aupr_err"] == pytest.approx(
        average_precision_score(1 - correct, 1 - test_msp), abs=1e-4)
    candidates = [*np.unique(train_msp), np.inf]
    threshold = max(candidates, key=lambda t: (((train_msp >= t) == train["correct"]).mean(), -t))
    assert results["test/baseline/max_softmax/accuracy"] == pytest.approx(
        ((test_msp >= threshold) == correct).mean(), abs=1e-4)
    for name in ("entropy", "margin", "doctor"):
        assert 0.5 < results[f"test/baseline/{name}/auroc"] <= 1
    assert results["test/auroc"] > 0.6  # it learnt the margin's signal


def test_regression_metrics_and_isotonic_baseline_equal_scikit_learn(zoo_dir):
    dm, results, scores = _fit_and_test(zoo_dir, "regression", epochs=20)
    test, train = dm.arrays["test"], dm.arrays["train"]
    assert results["test/r2"] == pytest.approx(r2_score(test["ratio"], scores), abs=1e-4)
    wrong = test["correct"] == 0
    assert results["test/r2_wrong"] == pytest.approx(r2_score(test["ratio"][wrong], scores[wrong]), abs=1e-4)
    def msp(logits):
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).max(1)
    fit = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(msp(train["fc3"].astype(np.float64)),
                                                                        train["ratio"].astype(np.float64))
    iso = fit.predict(msp(test["fc3"].astype(np.float64)))
    assert results["test/baseline/isotonic_max_softmax/r2"] == pytest.approx(r2_score(test["ratio"], iso), abs=1e-4)
    assert results["test/r2"] > 0.3


def _add_aligned_arrays(directory, sigma=0.9, num_draws=20):
    """A boundary distance that decides the ratio, a probe with an unseen class, and the data set's settings."""
    from scipy.stats import norm

    rng = np.random.default_rng(5)
    for path in sorted(directory.glob("shard_*.npz")):
        data = dict(np.load(path))
        n = len(data["model_id"])
        distance = rng.gamma(2.0, 0.5, (n, 10))
        distance[np.arange(n), data["pred"]] = np.inf
        p = norm.cdf(distance.min(1) / sigma)
        data["ratio"] = (rng.binomial(num_draws, p) / num_draws).astype(np.float32)
        data["boundary_distance"] = distance.astype(np.float32)
        probe = np.log(rng.dirichlet(np.ones(10), n))
        probe[:, 3] = -np.inf
        data["probe_fc1"] = probe.astype(np.float32)
        profile = rng.random((n, 5))
        profile[:, 0] = np.clip(p + rng.normal(0, 0.1, n), 0, 1)  # a noisy self-calibrated stability
        data["noise_profile"] = profile.astype(np.float32)
        atomic_save_npz(str(path), **data)
    (directory / "dataset.json").write_text(json.dumps({"settings": {"sigma": sigma, "num_draws": num_draws}}))


def test_aligned_inputs_binomial_loss_ceiling_and_linear_baseline(zoo_dir):
    from scipy.stats import norm

    from lightning_probes.datamodules.zoo import aligned_input
    from lightning_probes.functional import r2_ceiling

    _add_aligned_arrays(zoo_dir)
    pl.seed_everything(0)
    dm = ZooDataModule(str(zoo_dir), task="regression", split_seed=1, val_fraction=0.25, test_fraction=0.25,
                       batch_size=32, aligned=["boundary_distance", "probe_fc1"])
    dm.setup("fit")
    assert dm.aligned_dims == [10, 10]
    batch = next(iter(dm.train_dataloader()))
    assert [x.shape[1] for x in batch["aligned"]] == [10, 10]
    assert torch.isfinite(batch["aligned"][0]).all() and torch.isfinite(batch["aligned"][1]).all()
    # log of the clipped distance; the prediction's +inf becomes log(1e4); unseen probe classes -30.
    d = dm.arrays["train"]["boundary_distance"][:3]
    np.testing.assert_allclose(aligned_input("boundary_distance", d).numpy(),
                               np.log(np.clip(np.nan_to_num(d, posinf=1e4), 1e-4, 1e4)), rtol=1e-6)
    assert (aligned_input("probe_fc1", dm.arrays["train"]["probe_fc1"][:3])[:, 3] == -30).all()
    model = MetaNet(task="regression", layer_dims=DIMS, d_model=16, lr=3e-3, aligned_dims=dm.aligned_dims,
                    loss="binomial")
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    results = trainer.test(model, datamodule=dm, verbose=False)[0]
    test = dm.arrays["test"]
    assert results["test/r2_ceiling"] == pytest.approx(r2_ceiling(torch.as_tensor(test["ratio"]), 20), abs=1e-6)
    linear = norm.cdf(test["boundary_distance"].astype(np.float64).min(1) / 0.9)
    assert results["test/baseline/linear_stability/r2"] == pytest.approx(r2_score(test["ratio"], linear), abs=1e-4)
    assert results["test/baseline/self_calibrated/r2"] == pytest.approx(
        r2_score(test["ratio"], test["noise_profile"][:, 0].astype(np.float64)), abs=1e-4)
    with pytest.raises(ValueError, match="aligned_dims"):
        model([torch.randn(2, d) for d in DIMS], [torch.randn(2, 10)])


def test_configs_fit_and_test_from_the_command_line(zoo_dir, tmp_path):
    """`lightning fit` / `lightning test` with a shipped config on a data set directory, then its checkpoint."""
    config = ROOT / "configs" / "metanet" / "transformer_classification.yaml"
    common = ["--config", str(config), "--data.data_dir", str(zoo_dir), "--model.init_args.layer_dims",
              json.dumps(DIMS), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    fit = subprocess.run([sys.executable, "-m", "lightning_probes.cli", "fit", *common, "--trainer.max_epochs", "2",
                          "--trainer.enable_progress_bar", "false"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-2000:]
    last = tmp_path / "runs" / "transformer_classification" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    test = subprocess.run([sys.executable, "-m", "lightning_probes.cli", "test", *common, "--ckpt_path", str(last),
                           "--trainer.enable_progress_bar", "false"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert test.returncode == 0, test.stderr[-2000:]
    assert "test/baseline/max_softmax/auroc" in test.stdout and "test/auroc" in test.stdout
    probes = tmp_path / "runs" / "transformer_classification" / "version_0" / "probes"
    assert (probes / "gradient_stats.jsonl").is_file() and (probes / "activation_stats.jsonl").is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "metanet").glob("*.yaml")))
def test_every_metanet_config_parses(name):
    from lightning_probes.cli import build_cli

    cli = build_cli(["--config", str(ROOT / "configs" / "metanet" / name), "--data.data_dir", "unused"], run=False)
    encoder, task = name[:-5].split("_")
    assert cli.model.hparams.encoder == encoder and cli.model.hparams.task == task
    assert cli.datamodule.hparams.task == task


def test_metrics_under_ddp_cover_every_process(tmp_path):
    """Under DDP (2 processes, gloo) `test/auroc` is that of the whole test split, not of rank 0's half."""
    data = write_zoo_dataset(tmp_path / "data", models=12, per_model=40)
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "metanet_ddp_run.py"), str(data), str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    model = MetaNet.load_from_checkpoint(str(out / "model.ckpt"), map_location="cpu").eval()
    dm = ZooDataModule(str(data), split_seed=1, val_fraction=0.25, test_fraction=0.25)
    dm.setup("test")
    test = dm.arrays["test"]
    assert len(test["model_id"]) % 2 == 0  # no padding by the DistributedSampler: every sample counted once
    with torch.no_grad():
        scores = model.predict_scores([torch.as_tensor(test[n]) for n in LAYERS]).double().numpy()
    assert results["test/auroc"] == pytest.approx(roc_auc_score(test["correct"], scores), abs=1e-4)
    assert results["test/accuracy"] == pytest.approx(((scores >= 0.5) == test["correct"]).mean(), abs=1e-4)
    assert json.loads((data / "splits_1.json").read_text()) == dm.splits


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT / "configs" / "metanet"))
                                        for p in (ROOT / "configs" / "metanet").glob("*/*.yaml")
                                        if not p.name.startswith("zoo")))
def test_protocol_configs_parse(path):
    from lightning_probes.cli import build_cli

    cli = build_cli(["--config", str(ROOT / "configs" / "metanet" / path), "--data.data_dir", "unused"], run=False)
    protocol, name = path.split("/")
    encoder, task = name[:-5].split("_")
    assert cli.model.hparams.encoder == encoder and cli.model.hparams.task == task
    dm = cli.datamodule.hparams
    assert dm.task == task and dm.split_by == {"original": "pair", "honest": "model_and_image"}[protocol]
    assert list(cli.model.hparams.layer_dims) == [256, 120, 84, 10]  # the unpadded LeNet5's pool2
    # One aligned width per aligned array: 10 class distances, 3 probes of 10 classes, 3 probe margins, 8 context,
    # 5 noise-profile columns.
    assert len(cli.model.hparams.aligned_dims) == len(dm.aligned)
    if protocol == "honest":
        assert list(cli.model.hparams.aligned_dims) == [10, 10, 10, 10, 3, 8, 5]


def test_original_zoo_study_trains_unpadded_lenet5s_and_keeps_every_epoch(tmp_path):
    from lightning_probes.studies.spec import load_study
    from lightning_probes.studies.trial_config import TrialConfigResolver
    from lightning_probes.studies.trials import expand_trials

    spec = load_study(str(ROOT / "configs" / "metanet" / "original" / "zoo.yaml"), output=str(tmp_path), num_samples=2)
    trials = expand_trials(spec)
    config = TrialConfigResolver(spec).resolve(trials[0], str(tmp_path / "t0"))
    assert config["model"]["init_args"]["padding"] == 0 and config["trainer"]["max_epochs"] == 4
    checkpoints = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoints) == 1 and checkpoints[0]["init_args"]["save_top_k"] == -1
    assert checkpoints[0]["init_args"]["every_n_epochs"] == 1
