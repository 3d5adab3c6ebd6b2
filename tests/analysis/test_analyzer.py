"""``lightning-probes analyze`` on tiny runs fitted here (digits, MLPs of two shapes), every number checked against
an independent computation (NumPy, scikit-learn, torchmetrics, the runs' own files)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_probes.analysis.analyzer import analyze_runs, prepare, write_outputs
from lightning_probes.analysis.runs import _curves_from_tensorboard, discover_runs
from lightning_probes.cli import main as cli_main
from lightning_probes.commands.analyze import analyze
from lightning_probes.io import import_class

FIT = """
seed_everything: {seed}
trainer:
  max_epochs: 3
  limit_train_batches: 4
  limit_val_batches: 2
  limit_test_batches: 2
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  logger:
    - class_path: pytorch_lightning.loggers.TensorBoardLogger
      init_args: {{save_dir: {root}, name: mlp, version: {version}}}
    - class_path: pytorch_lightning.loggers.CSVLogger
      init_args: {{save_dir: {root}, name: mlp, version: {csv_version}}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/mlp/{version}/checkpoints, save_top_k: -1, save_last: true}}
{probes}
model:
  class_path: lightning_probes.models.{model}
  init_args:
    {hidden}lr: {lr}
data:
  class_path: lightning_probes.datamodules.DigitsDataModule
  init_args:
    batch_size: 32
"""
PROBES = """    - class_path: lightning_probes.ConfidenceMonitor
    - class_path: lightning_probes.ActivationStatsMonitor
      init_args: {num_samples: 40, search_batches: 2}"""


def _fit(root: Path, version: str, hidden, lr: float, seed: int, probes: bool = True, test: bool = True,
         model: str = "MLP") -> Path:
    """``lightning fit`` (TensorBoard and CSV logs in ``mlp/<version>``), then ``lightning test`` of ``last.ckpt``
    (its CSV in ``mlp/<version>/test``, as a study's trials)."""
    run = root / "mlp" / version
    for stage, csv_version in (("fit", version), ("test", f"{version}/test")):
        config = root / f"{version}_{stage}.yaml"
        config.write_text(FIT.format(root=root, version=version, csv_version=csv_version, model=model, lr=lr, seed=seed,
                                     hidden=f"hidden: {list(hidden)}\n    " if hidden else "",
                                     probes=PROBES if probes else ""))
        if stage == "fit":
            cli_main(["fit", "--config", str(config)])
        elif test:
            cli_main(["test", "--config", str(config), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``mlp/version_0`` and ``version_1`` (MLPs, two learning rates, probes on, tested) and ``version_2`` (a LeNet5:
    another architecture, no probes, not tested)."""
    root = tmp_path_factory.mktemp("analyze")
    _fit(root, "version_0", (16, 12, 8), 0.1, 1)
    _fit(root, "version_1", (16, 12, 8), 0.02, 2)
    _fit(root, "version_2", None, 0.05, 3, probes=False, test=False, model="LeNet5")
    (root / "data.yaml").write_text(FIT.format(root=root, version="x", csv_version="x", model="MLP", hidden="",
                                               lr=0.1, seed=0, probes=""))
    return root


@pytest.fixture(scope="module")
def with_data(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out_data")
    results = analyze([str(runs / "mlp")], output=str(out), config=str(runs / "data.yaml"), num_samples=100,
                      progress=False)
    return results, out


def _model(checkpoint: Path) -> torch.nn.Module:
    """Rebuilt independently of the analyzer: class and hyper-parameters from the checkpoint, weights loaded."""
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in loaded["hyper_parameters"].items() if not k.startswith("_")}
    model = import_class(loaded["hyper_parameters"]["_class_path"])(**hparams)
    model.load_state_dict(loaded["state_dict"])
    return model.eval()


def _samples(runs: Path, n: int = 100, seed: int = 0):
    from lightning_probes.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=32)
    dm.setup("test")
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    y = torch.cat([b[1] for b in dm.test_dataloader()])
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[chosen], y[chosen]


def test_runs_found_and_named(runs):
    found, skipped = discover_runs([str(runs / "mlp")])
    assert [r.name for r in found] == ["mlp/version_0", "mlp/version_1", "mlp/version_2"] and not skipped
    assert found[0].last_checkpoint.endswith("last.ckpt") and len(found[0].checkpoints) == 4  # 3 epochs + last
    assert found[2].probes is None
    named, _ = discover_runs([str(runs / "mlp" / "version_1"), str(runs / "mlp" / "version_0")], names=["b", "a"])
    assert [(r.name, Path(r.path).name) for r in named] == [("b", "version_1"), ("a", "version_0")]
    twice, _ = discover_runs([str(runs / "mlp" / "version_0"), str(runs / "mlp" / "version_0")])
    assert len({r.name for r in twice}) == 2
    with pytest.raises(ValueError, match="one name per run found"):
        discover_runs([str(runs / "mlp")], names=["a"])


def test_tensorboard_curves_equal_the_csv_logger(runs):
    run = runs / "mlp" / "version_0"
    tb, test = _curves_from_tensorboard(str(run))
    csv = pd.read_csv(run / "metrics.csv")
    test_csv = pd.read_csv(run / "test" / "metrics.csv")
    for column in ("train/loss", "val/loss", "val/acc"):
        expected = csv.dropna(subset=[column]).groupby("epoch")[column].last()
        np.testing.assert_allclose(tb[column].to_numpy(), expected.to_numpy(), rtol=1e-6)
    assert test["test/acc"] == pytest.approx(test_csv["test/acc"].dropna().iloc[-1], rel=1e-6)


def test_files_and_headline(with_data):
    results, out = with_data
    for name in ("analysis_results.json", "report.html", "summary_dashboard.png", "weights.png",
                 "weight_evolution.png", "calibration.png", "confidence.png", "information_flow.png",
                 "training_dynamics.png", "similarity.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    stored = json.loads((out / "analysis_results.json").read_text())
    assert [row["run"] for row in stored["headline"]] == ["mlp/version_0", "mlp/version_1", "mlp/version_2"]
    assert "sqrt(fan_in)" in stored["weights"]["health_formula"]
    assert stored["data"]["num_samples"] == 100
    # An MLP and a LeNet5 share no layer of one shape: the map uses each model's layer means and maxima.
    assert stored["similarity"]["pca"]["basis"].startswith("layer means and maxima")
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(stored["figures"]) == 9
    assert "http://" not in report and "https://" not in report


def test_weights_equal_numpy(runs, with_data):
    results, _ = with_data
    for version in ("version_0", "version_2"):
        name = f"mlp/{version}"
        state = torch.load(runs / "mlp" / version / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        layers = results["weights"]["per_model"][name]["layers"]
        assert set(layers) == {k[:-7] for k, v in state.items() if k.endswith(".weight") and v.ndim >= 2}
        for layer, stats in layers.items():
            w = state[f"{layer}.weight"].double().flatten(1).numpy()
            assert stats["spectral_norm"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-9)
            assert stats["l2"] == pytest.approx(np.linalg.norm(w), rel=1e-12)
            assert stats["stable_rank"] == pytest.approx(np.linalg.norm(w) ** 2 / np.linalg.norm(w, 2) ** 2,
                                                         rel=1e-9)
            d = w.ravel() - w.mean()
            assert stats["kurtosis"] == pytest.approx((d ** 4).mean() / (d ** 2).mean() ** 2 - 3, rel=1e-9)
    # Evolution: one entry per epoch checkpoint (last.ckpt repeats epoch 2), norms of each.
    evolution = results["weights"]["evolution"]["mlp/version_0"]
    assert [e["epoch"] for e in evolution] == [0, 1, 2]
    first = torch.load(next((runs / "mlp/version_0/checkpoints").glob("epoch=0-*.ckpt")), weights_only=True)
    w = first["state_dict"]["net.fc1.weight"].double().numpy()
    assert evolution[0]["layers"]["net.fc1"]["spectral_norm"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-9)


def test_calibration_and_cka_equal_independent_computations(runs, with_data):
    results, _ = with_data
    x, y = _samples(runs)
    features = {}
    for version in ("version_0", "version_1", "version_2"):
        model = _model(runs / "mlp" / version / "checkpoints" / "last.ckpt")
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        seen: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].detach().double()))
        with torch.no_grad():
            logits = model(x).double()
        handle.remove()
        features[version] = torch.cat(seen).numpy()
        probs = logits.softmax(1)
        cal = results["calibration"]["per_model"][f"mlp/{version}"]
        assert cal["source"] == "data" and cal["n"] == 100
        assert cal["ece"] == pytest.approx(float(multiclass_calibration_error(probs, y, 10, n_bins=15)), abs=1e-6)
        p = probs.numpy()
        assert cal["brier"] == pytest.approx(((p - np.eye(10)[y.numpy()]) ** 2).sum(1).mean(), rel=1e-6)
        assert cal["nll"] == pytest.approx(log_loss(y.numpy(), p, labels=range(10)), rel=1e-5)
        assert cal["mean_confidence"] == pytest.approx(p.max(1).mean(), rel=1e-6)
        assert cal["accuracy"] == pytest.approx((p.argmax(1) == y.numpy()).mean())
        assert len(cal["per_class_ece"]) == 10 and cal["classwise_ece"] == pytest.approx(np.mean(cal["per_class_ece"]))
        flow = results["information_flow"]["per_model"][f"mlp/{version}"]["layers"]
        head_name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        assert head_name in flow and len(flow) >= 3
    cka = results["similarity"]["cka"]
    order = cka["models"]
    assert order == ["mlp/version_0", "mlp/version_1", "mlp/version_2"]

    def cka_np(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        return np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))

    assert cka["matrix"][0][2] == pytest.approx(cka_np(features["version_0"], features["version_2"]), rel=1e-8)
    assert cka["matrix"][0][1] == pytest.approx(cka_np(features["version_0"], features["version_1"]), rel=1e-8)


def test_dynamics_and_pareto_follow_their_formulas(runs, with_data):
    results, _ = with_data
    points = {}
    for version in ("version_0", "version_1", "version_2"):
        csv = pd.read_csv(runs / "mlp" / version / "metrics.csv")
        curves = ("train/loss", "val/loss", "val/acc")
        train, val, acc = (csv.dropna(subset=[c]).groupby("epoch")[c].last().to_numpy() for c in curves)
        d = results["training_dynamics"]["per_model"][f"mlp/{version}"]
        n = len(val)
        start = max(int(0.67 * n), 1)
        assert d["overfitting_index"] == pytest.approx(np.mean(val[start:] - train[start:]), rel=1e-9)
        assert d["stability"] == pytest.approx(np.std(val[-10:]), rel=1e-9) and d["stability_epochs"] == n
        assert d["peak_val_acc"] == pytest.approx(acc.max()) and d["peak_epoch"] == int(np.argmax(acc))
        assert d["epochs_to_convergence"] == int(np.argmax(acc >= 0.95 * acc.max()))
        assert d["final_gap"] == pytest.approx(val[-1] - train[-1], rel=1e-9)
        points[f"mlp/{version}"] = (acc.max(), d["overfitting_index"])
    front = results["pareto"]["front"]
    for name, (a, o) in points.items():
        dominated = any(b >= a and q <= o and (b > a or q < o) for other, (b, q) in points.items() if other != name)
        assert (name in front) == (not dominated)


def test_without_data_reads_the_probes_and_says_what_was_skipped(runs, tmp_path):
    results = analyze([str(runs / "mlp")], output=str(tmp_path), progress=False)
    records = [json.loads(line) for line in (runs / "mlp/version_0/probes/confidence.jsonl").read_text().splitlines()]
    test_record = [r for r in records if r["stage"] == "test"][-1]
    cal = results["calibration"]["per_model"]["mlp/version_0"]
    assert cal["ece"] == test_record["ece"] and cal["brier"] == test_record["brier"] and "test" in cal["source"]
    flow_records = [json.loads(line) for line in
                    (runs / "mlp/version_0/probes/activation_stats.jsonl").read_text().splitlines()]
    last = max(r["epoch"] for r in flow_records)
    flow = results["information_flow"]["per_model"]["mlp/version_0"]["layers"]
    assert {r["layer"]: r["dead_fraction"] for r in flow_records if r["epoch"] == last} == \
        {k: v["dead_fraction"] for k, v in flow.items()}
    per_run = results["skipped"]["per_run"]
    assert "per_class_ece" in per_run and "no --config" in per_run["per_class_ece"]["mlp/version_0"]
    assert "ConfidenceMonitor was not attached" in per_run["calibration"]["mlp/version_2"]
    assert "similarity_cka" in results["skipped"]["analyses"]
    assert results["similarity"]["pca"] is not None and results["similarity"]["cka"] is None
    assert "ConfidenceMonitor was not attached" in (tmp_path / "report.html").read_text()


def test_runs_without_checkpoints_are_compared_on_what_they_share(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs / "mlp/version_1/metrics.csv", bare / "metrics.csv")
    results = analyze([str(bare), str(runs / "mlp/version_0")], output=str(tmp_path / "out"),
                      config=str(runs / "data.yaml"), num_samples=50, progress=False)
    assert "bare" in results["training_dynamics"]["per_model"]
    assert results["skipped"]["per_run"]["weights"]["bare"] == "no checkpoint in checkpoints/"
    assert "bare" not in results["calibration"]["per_model"]
    assert results["similarity"]["pca"] is None  # one run with weights
    assert set(results["pareto"]["points"]) == {"bare", "mlp/version_0"}


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_opens_in_a_headless_browser(with_data, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's `chromium` package (apt-get install chromium)")
    _, out = with_data
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    stored = json.loads((out / "analysis_results.json").read_text())
    assert f'data-images="{len(stored["figures"])}"' in done.stdout
    assert f'data-images-loaded="{len(stored["figures"])}"' in done.stdout


def test_prepare_reads_every_checkpoint_before_any_work(runs, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(runs / "mlp/version_2", bad)
    checkpoint = torch.load(bad / "checkpoints/last.ckpt", weights_only=True)
    checkpoint["extra"] = _Pickled()  # e.g. a callback state of some class
    torch.save(checkpoint, bad / "checkpoints/last.ckpt")
    with pytest.raises(ValueError, match="--trust_checkpoints"):
        prepare([str(bad)], output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    p = prepare([str(bad)], output=str(tmp_path / "out"), config=str(runs / "data.yaml"), num_samples=20,
                trust_checkpoints=True, progress=False)
    results = analyze_runs(p)
    write_outputs(results, p.output)
    assert results["calibration"]["per_model"]["run"]["n"] == 20 and not math.isnan(
        results["weights"]["per_model"]["run"]["summary"]["mean_health"])


class _Pickled:
    """An object only full unpickling can rebuild."""
