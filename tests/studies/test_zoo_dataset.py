"""`lightning-probes zoo-dataset` on a tiny zoo built in the test: every stored value recomputed independently."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lightning_probes.commands.zoo_dataset import main, zoo_dataset
from lightning_probes.datamodules import DigitsDataModule
from lightning_probes.models import LeNet5
from lightning_probes.studies.zoo import load_shards

PER_CLASS, DRAWS, SIGMA = 3, 6, 0.8


@pytest.fixture(scope="module")
def dataset(tiny_zoo, tmp_path_factory):
    output = tmp_path_factory.mktemp("zoo_dataset")
    summary = zoo_dataset(str(tiny_zoo), str(output), sigma=SIGMA, num_draws=DRAWS, per_class=PER_CLASS,
                          min_accuracy=0.0, models_per_shard=2, progress=False)
    return output, summary


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _digits_test():
    dm = DigitsDataModule()
    dm.setup("test")
    return dm.test_set.normalize(dm.test_set.images), dm.test_set.targets


def test_stored_values_equal_a_fresh_forward_of_each_checkpoint(dataset):
    output, summary = dataset
    data = load_shards(str(output))
    models = _rows(output / "models.csv")
    assert summary["n_kept"] == len(models) == 3 and summary["n_samples"] == len(data["model_id"])
    assert sorted({int(m["model_id"]) for m in models}) == sorted(np.unique(data["model_id"]).tolist())
    inputs, labels = _digits_test()
    for row in models:
        model = LeNet5.load_from_checkpoint(row["checkpoint"], map_location="cpu").eval()
        with torch.no_grad():
            logits = model(inputs)
        assert float(row["test_accuracy"]) == pytest.approx(float((logits.argmax(1) == labels).float().mean()),
                                                            abs=1e-6)
        mine = data["model_id"] == int(row["model_id"])
        idx = torch.as_tensor(data["sample_index"][mine])
        np.testing.assert_allclose(data["fc3"][mine], logits[idx].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(data["label"][mine], labels[idx].numpy())
        pred = logits[idx].argmax(1).numpy()
        np.testing.assert_array_equal(data["pred"][mine], pred)
        np.testing.assert_array_equal(data["correct"][mine], (pred == labels[idx].numpy()).astype(int))
        # pool2 and fc1/fc2 are the modules' outputs: fc3 = fc3(act4(fc2)) must follow from the stored fc2.
        net = model.net
        with torch.no_grad():
            fc3_from_fc2 = net.fc3(net.act4(torch.as_tensor(data["fc2"][mine])))
            fc1_from_pool2 = net.fc1(torch.as_tensor(data["pool2"][mine]))
        np.testing.assert_allclose(fc3_from_fc2.numpy(), data["fc3"][mine], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fc1_from_pool2.numpy(), data["fc1"][mine], rtol=1e-4, atol=1e-4)
        # At most PER_CLASS of each kind per digit, and all there are when fewer.
        correct_all = (logits.argmax(1) == labels).numpy()
        for digit in range(10):
            for kind in (1, 0):
                available = int(((labels.numpy() == digit) & (correct_all == kind)).sum())
                taken = int(((data["label"][mine] == digit) & (data["correct"][mine] == kind)).sum())
                assert taken == min(PER_CLASS, available)
        # The stability ratio, recomputed with NumPy from the model's own noise stream.
        from lightning_probes.studies.zoo import seeded

        generator = seeded(0, int(row["model_id"]), "noise")
        x = inputs[idx]
        same = np.zeros(len(idx))
        for _ in range(DRAWS):
            noise = torch.randn(x.shape, generator=generator)
            with torch.no_grad():
                same += (model(x + SIGMA * noise).argmax(1).numpy() == pred)
        np.testing.assert_allclose(data["ratio"][mine], same / DRAWS, atol=1e-6)
        assert 0 < data["ratio"][mine].mean() <= 1


def test_min_accuracy_and_resume_keep_model_ids(tiny_zoo, dataset, tmp_path):
    output, _ = dataset
    accuracies = sorted(float(r["test_accuracy"]) for r in _rows(output / "models.csv"))
    cut = (accuracies[0] + accuracies[1]) / 2
    # A zoo with only its first two trials, then the third one "finishes": the data set grows, ids stay.
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo / "trials", zoo / "trials")
    last = sorted((zoo / "trials").iterdir())[-1]
    (last / "status.json").rename(last / "status.later")
    out = tmp_path / "ds"
    first = zoo_dataset(str(zoo), str(out), sigma=SIGMA, num_draws=DRAWS, per_class=PER_CLASS, min_accuracy=cut,
                        models_per_shard=1, progress=False)
    assert first["n_trials_finished"] == 2
    shards = sorted(p.name for p in out.glob("shard_*.npz"))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npz")}
    (last / "status.later").rename(last / "status.json")
    second = zoo_dataset(str(zoo), str(out), sigma=SIGMA, num_draws=DRAWS, per_class=PER_CLASS, min_accuracy=cut,
                         models_per_shard=1, progress=False)
    assert second["n_kept"] + second["n_excluded"] == 3 and second["n_excluded"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npz") if p.name in shards} == stamps
    kept = _rows(out / "models.csv")
    excluded = _rows(out / "excluded.csv")
    assert all(float(r["test_accuracy"]) >= cut for r in kept)
    assert all(float(r["test_accuracy"]) < cut for r in excluded)
    ids = sorted(int(r["model_id"]) for r in [*kept, *excluded])
    assert ids == [0, 1, 2]
    assert [r["trial_id"] for r in sorted([*kept, *excluded], key=lambda r: int(r["model_id"]))] == \
        sorted(p.name for p in (zoo / "trials").iterdir())
    for row in kept:  # hyper-parameters and seed of the trial
        assert {"lr", "activation", "dropout", "train_size", "seed", "shard", "n_samples"} <= set(row)
    third = zoo_dataset(str(zoo), str(out), sigma=SIGMA, num_draws=DRAWS, per_class=PER_CLASS, min_accuracy=cut,
                        models_per_shard=1, progress=False)
    assert third["n_samples"] == second["n_samples"]
    data = load_shards(str(out))
    assert len(np.unique(data["model_id"])) == second["n_kept"]


@pytest.mark.parametrize(("args", "message"), [
    (["--zoo", "/nonexistent", "--output", "x"], "`zoo`"),
    (["--output", "x"], "zoo"),
    (["--zoo", ".", "--output", "x", "--per_class", "0"], "`per_class`"),
    (["--zoo", ".", "--output", "x", "--sigma", "-1"], "`sigma`"),
    (["--zoo", ".", "--output", "x", "--data.data_dir", "/nonexistent"], "`data.data_dir`"),
])
def test_bad_arguments_give_one_error_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "x").exists()


def test_other_settings_on_an_existing_data_set_are_refused(dataset, tiny_zoo):
    output, _ = dataset
    with pytest.raises(ValueError, match="`sigma` is 0.5"):
        zoo_dataset(str(tiny_zoo), str(output), sigma=0.5, num_draws=DRAWS, per_class=PER_CLASS, min_accuracy=0.0,
                    progress=False)


def test_original_protocol_options_and_new_features(tiny_zoo, tmp_path):
    """--checkpoints epochs, --selection first, --noise_bank_seed and --features boundary,context, each value
    recomputed independently."""
    from lightning_probes.functional import boundary_distances
    from lightning_probes.studies.zoo import noise_bank

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo / "trials", zoo / "trials")
    trials = sorted((zoo / "trials").iterdir())
    for trial in trials:  # two "epoch checkpoints" per trial (copies of the last one)
        for epoch in (0, 1):
            shutil.copy(trial / "checkpoints" / "last.ckpt", trial / "checkpoints" / f"epoch={epoch}-step={epoch}.ckpt")
        for other in (trial / "checkpoints").glob("epoch=*"):
            if not other.name.startswith(("epoch=0-step=0", "epoch=1-step=1")):
                other.unlink()
    out = tmp_path / "ds"
    summary = zoo_dataset(str(zoo), str(out), sigma=SIGMA, num_draws=DRAWS, per_class=PER_CLASS, min_accuracy=0.0,
                          selection="first", noise_bank_seed=42, features="boundary,context,probes",
                          context_size=50, checkpoints="epochs", models_per_shard=4, probe_layers="pool2,fc2",
                          probe_train_size=300, progress=False)
    assert summary["n_kept"] == 2 * len(trials)
    data = load_shards(str(out))
    rows = sorted(_rows(out / "models.csv"), key=lambda r: int(r["model_id"]))
    assert [r["trial_id"] for r in rows] == [f"{t.name}/epoch={e}" for t in trials for e in (0, 1)]
    assert [r["epoch"] for r in rows] == ["0", "1"] * len(trials)
    inputs, labels = _digits_test()
    bank = noise_bank(42, DRAWS, inputs.shape[1:])
    for row in rows:
        mine = data["model_id"] == int(row["model_id"])
        # Both checkpoints of one run share the id of the run's first model as their group.
        assert set(data["group"][mine]) == {int(row["model_id"]) - int(row["trial_id"].endswith("epoch=1"))}
        model = LeNet5.load_from_checkpoint(row["checkpoint"], map_location="cpu").eval()
        with torch.no_grad():
            logits = model(inputs)
        pred_all = logits.argmax(1)
        correct_all = (pred_all == labels).numpy()
        # "first": for each digit and kind, the first PER_CLASS test indices in order.
        expected = []
        for digit in range(10):
            for kind in (1, 0):
                expected.extend(np.flatnonzero((labels.numpy() == digit) & (correct_all == kind))[:PER_CLASS])
        np.testing.assert_array_equal(data["sample_index"][mine], np.sort(expected))
        idx = torch.as_tensor(data["sample_index"][mine])
        x, pred = inputs[idx], pred_all[idx]
        same = np.zeros(len(idx))
        for d in range(DRAWS):  # the same bank draw d for every image
            with torch.no_grad():
                same += (model(x + SIGMA * bank[d]).argmax(1) == pred).numpy()
        np.testing.assert_allclose(data["ratio"][mine], same / DRAWS, atol=1e-6)
        ref = boundary_distances(model, x)["distance"].float().numpy()
        np.testing.assert_allclose(data["boundary_distance"][mine], ref, rtol=1e-5)
        assert np.isinf(data["boundary_distance"][mine][np.arange(len(idx)), pred.numpy()]).all()
        p = logits[:50].double().softmax(1)
        top2 = p.topk(2, dim=1).values
        ms, margin = top2[:, 0].numpy(), (top2[:, 0] - top2[:, 1]).numpy()
        context = [ms.mean(), *np.quantile(ms, [0.1, 0.5, 0.9]), margin.mean(), *np.quantile(margin, [0.1, 0.5, 0.9])]
        np.testing.assert_allclose(data["context"][mine], np.tile(context, (len(idx), 1)), rtol=1e-5, atol=1e-6)
        # Linear probes: refitted here with scikit-learn on the first 300 images of the trial's own training split.
        trial_dir = zoo / "trials" / row["trial_id"].split("/")[0]
        init_args = yaml.safe_load((trial_dir / "config.yaml").read_text())["data"]["init_args"]
        dm = DigitsDataModule(**init_args)
        dm.setup("fit")
        train_x = dm.train_set.normalize(dm.train_set.images[:300])
        train_y = dm.train_set.targets[:300].numpy()
        seen = {}
        hooks = [getattr(model.net, n).register_forward_hook(
            lambda m, i, o, n=n, seen=seen: seen.__setitem__(n, o.flatten(1).double().numpy()))
            for n in ("pool2", "fc2")]
        with torch.no_grad():
            model(train_x)
            fit = dict(seen)
            model(x)
        for h in hooks:
            h.remove()
        agree = np.full(len(idx), 2)
        for depth, name in reversed(list(enumerate(("pool2", "fc2")))):
            scaler = StandardScaler().fit(fit[name])
            reference = LogisticRegression(max_iter=10_000, tol=1e-12).fit(  # converged: see test_linear_probes
                    scaler.transform(fit[name]), train_y)
            expected = np.full((len(idx), 10), -np.inf)
            expected[:, reference.classes_] = reference.predict_log_proba(scaler.transform(seen[name]))
            finite = np.isfinite(expected)
            # The builder's float32 features come from other batches than these (another summation order), and a
            # low-probability class's log-probability moves by up to ~1e-2 with them (seen: -7.3586 against -7.3667
            # with one intra-op thread): 1% in probability.
            np.testing.assert_allclose(data[f"probe_{name}"][mine][finite], expected[finite], rtol=1e-3, atol=1e-2)
            agree[expected.argmax(1) == pred.numpy()] = depth
        np.testing.assert_array_equal(data["probe_agree"][mine], agree)


def test_features_added_to_a_built_data_set_equal_a_fresh_build(dataset, tiny_zoo, tmp_path):
    """A rerun with more --features fills in the shards built so far (and continues after a crash); the arrays equal
    a fresh build's, and the noise profile equals one recomputed from the trial's own training images."""
    from lightning_probes.functional import noise_profile_features
    from lightning_probes.io import atomic_save_npz

    output, _ = dataset
    grown = tmp_path / "grown"
    shutil.copytree(output, grown)
    kwargs = dict(sigma=SIGMA, num_draws=DRAWS, per_class=PER_CLASS, min_accuracy=0.0, models_per_shard=2,
                  progress=False, features="noise_profile,context", context_size=40, probe_train_size=200,
                  profile_draws=3)
    zoo_dataset(str(tiny_zoo), str(grown), **kwargs)
    fresh = tmp_path / "fresh"
    zoo_dataset(str(tiny_zoo), str(fresh), **kwargs)
    a, b = load_shards(str(grown)), load_shards(str(fresh))
    assert set(a) == set(b) and {"noise_profile", "context"} <= set(a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    inputs, _ = _digits_test()
    for row in _rows(grown / "models.csv"):
        model_id = int(row["model_id"])
        mine = a["model_id"] == model_id
        model = LeNet5.load_from_checkpoint(row["checkpoint"], map_location="cpu").eval()
        init_args = yaml.safe_load((tiny_zoo / "trials" / row["trial_id"] / "config.yaml").read_text())["data"][
            "init_args"]
        dm = DigitsDataModule(**init_args)
        dm.setup("fit")
        train_x = dm.train_set.normalize(dm.train_set.images[:200])
        generator = torch.Generator().manual_seed(0 * 1_000_003 + model_id + 750_001)  # seed 0, "profile"
        with torch.no_grad():
            noisy = torch.stack([model(train_x + SIGMA * torch.randn(train_x.shape, generator=generator)).argmax(1)
                                 for _ in range(3)])
            expected = noise_profile_features(model(train_x), noisy,
                                              model(inputs[torch.as_tensor(a["sample_index"][mine])]))
        np.testing.assert_allclose(a["noise_profile"][mine], expected, rtol=1e-6)

    # A crash after the first shard: the second lacks the new arrays; the rerun gives them back, the same.
    last = sorted(grown.glob("shard_*.npz"))[-1]
    with np.load(last) as data:
        kept = {k: data[k] for k in data.files if k not in ("noise_profile", "context")}
    atomic_save_npz(str(last), **kept)
    zoo_dataset(str(tiny_zoo), str(grown), **kwargs)
    again = load_shards(str(grown))
    for name in a:
        np.testing.assert_array_equal(again[name], a[name], err_msg=name)

    with pytest.raises(ValueError, match="`features`"):  # features are never removed
        zoo_dataset(str(tiny_zoo), str(grown), **{**kwargs, "features": "context"})
    with pytest.raises(ValueError, match="`sigma` is 0.5"):  # only the added features' own settings may change
        zoo_dataset(str(tiny_zoo), str(grown), **{**kwargs, "features": "noise_profile,context,boundary",
                                                  "sigma": 0.5})
    with pytest.raises(ValueError, match="`profile_draws` is 5"):  # ... and only while they are being added
        zoo_dataset(str(tiny_zoo), str(grown), **{**kwargs, "profile_draws": 5})


def test_new_settings_are_validated():
    with pytest.raises(ValueError, match="`selection`"):
        zoo_dataset(".", "x", selection="best", progress=False)
    with pytest.raises(ValueError, match="`features`"):
        zoo_dataset(".", "x", features="boundary,gradients", progress=False)
    with pytest.raises(ValueError, match="`checkpoints`"):
        zoo_dataset(".", "x", checkpoints="best", progress=False)
    with pytest.raises(ValueError, match="`noise_bank_seed`"):
        zoo_dataset(".", "x", noise_bank_seed=-1, progress=False)
    with pytest.raises(ValueError, match="`profile_draws`"):
        zoo_dataset(".", "x", profile_draws=0, progress=False)
