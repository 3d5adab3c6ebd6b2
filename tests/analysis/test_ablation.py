"""`lightning_probes.analysis.ablation`: units, drop points, masking hooks and the numbers of an ablation run,
checked against independent computations (own hooks, sklearn, numpy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss
from torch import nn

from lightning_probes.analysis.ablation import (
    AblationSettings,
    ablate,
    drop_units,
    evaluate,
    find_sites,
    measure_alignment,
)
from lightning_probes.analysis.ablation_checkpoints import compare_checkpoints, find_checkpoints
from lightning_probes.functional import random_orders, unit_mask
from lightning_probes.models import MLP, BaselineNet, BatchNormNet, DropoutNet, LeNet5

NUM_CLASSES = 10


def _batches(shape: tuple[int, ...], n: int = 24, batch: int = 12, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(hidden=(16, 12, 8), input_size=8).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for i in (1, 2, 3):
            bn = model.net.get_submodule(f"bn{i}")
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
        model.net.fc4.weight.mul_(20)  # confident predictions, so that the confidence thresholds split them
    return model


MLP_SHAPE = (1, 8, 8)
SMALL = AblationSettings(fractions=(0.0, 0.3, 0.6), random_repeats=2, seed=7, thresholds=(0.4, 0.6), min_count=2)


@pytest.fixture(scope="module")
def mlp_result():
    model = _mlp()
    batches = _batches(MLP_SHAPE)
    return model, batches, ablate(model, batches, SMALL)


# -- units and drop points -------------------------------------------------------------------------------------
def test_sites_of_the_mlp_drop_after_the_activation():
    sites = find_sites(_mlp())
    assert [(s.layer, s.drop_at, s.units, s.kind) for s in sites] == [
        ("net.fc1", "net.relu1", 16, "linear"), ("net.fc2", "net.relu2", 12, "linear"),
        ("net.fc3", "net.relu3", 8, "linear")]  # net.fc4, the classifier, is left alone


@pytest.mark.parametrize(("model", "expected"), [
    (LeNet5(input_size=12), [("net.conv1", "net.act1"), ("net.conv2", "net.act2"), ("net.fc1", "net.act3"),
                             ("net.fc2", "net.act4")]),
    (BatchNormNet(input_size=8), [("net.conv1", "net.relu1"), ("net.conv2", "net.relu2"), ("net.fc1", "net.relu3")]),
    (DropoutNet(input_size=8), [("net.conv1", "net.relu1"), ("net.conv2", "net.relu2"), ("net.fc1", "net.relu3")]),
], ids=["lenet5", "batchnorm", "dropout"])
def test_sites_of_the_project_models(model, expected):
    assert [(s.layer, s.drop_at) for s in find_sites(model)] == expected


def test_a_layer_without_a_following_activation_is_dropped_at_its_own_output():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    assert [(s.layer, s.drop_at) for s in find_sites(model)] == [("0", "0"), ("1", "2")]


def test_a_model_without_hidden_layers_is_rejected():
    with pytest.raises(ValueError, match="hidden"):
        find_sites(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# -- masking ---------------------------------------------------------------------------------------------------
def _record(module: nn.Module, store: list):
    return module.register_forward_hook(lambda m, args, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("rescale", ["none", "inverted"])
def test_dropping_zeroes_the_units_at_the_drop_module(rescale):
    model = _mlp()
    sites = find_sites(model)
    site = sites[1]  # net.fc2 -> net.relu2
    x = _batches(MLP_SHAPE)[0][0]
    intact: list = []
    handle = _record(site.drop_module, intact)
    model(x)
    handle.remove()
    order = torch.arange(site.units).flip(0)
    mask = unit_mask(order, 5, rescale)
    seen: list = []
    with drop_units(model, sites, {site.layer: mask}):
        handle = _record(site.drop_module, seen)  # registered after the masking hook: sees the masked output
        model(x)
        handle.remove()
    dropped, kept = order[:5], order[5:]
    assert torch.all(seen[0][:, dropped] == 0)
    scale = site.units / (site.units - 5) if rescale == "inverted" else 1.0
    torch.testing.assert_close(seen[0][:, kept], intact[0][:, kept] * scale)
    # The hooks are gone after the block.
    again: list = []
    handle = _record(site.drop_module, again)
    model(x)
    handle.remove()
    torch.testing.assert_close(again[0], intact[0])


def test_a_conv_unit_is_a_channel():
    model = BaselineNet(input_size=8).eval()
    sites = find_sites(model)
    site = sites[0]
    seen: list = []
    with drop_units(model, sites, {site.layer: unit_mask(torch.arange(site.units), 3)}):
        handle = _record(site.drop_module, seen)
        model(_batches((3, 8, 8), n=4, batch=4)[0][0])
        handle.remove()
    assert seen[0].shape[1] == site.units and seen[0].ndim == 4
    assert torch.all(seen[0][:, :3] == 0) and torch.any(seen[0][:, 3:] != 0)


def test_a_shared_activation_is_masked_only_after_its_layer():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    sites = {s.layer: s for s in find_sites(model)}
    site = sites["layer1.0.conv1"]
    assert site.drop_at == "layer1.0.relu"  # the block's ReLU, called twice: after bn1 and after the addition
    assert sites["layer1.0.conv2"].drop_at == "layer1.0.conv2"  # no activation before the next convolution
    assert "fc" not in sites
    calls: list = []
    with drop_units(model, list(sites.values()), {site.layer: unit_mask(torch.arange(64), 10)}):
        handle = _record(site.drop_module, calls)
        model(torch.randn(2, 3, 32, 32))
        handle.remove()
    assert len(calls) == 2
    assert torch.all(calls[0][:, :10] == 0)
    assert torch.any(calls[1][:, :10] != 0)  # after the residual addition: not this layer's units


# -- alignment -------------------------------------------------------------------------------------------------
def _inputs_of(model: nn.Module, module: nn.Module, batches: list) -> torch.Tensor:
    store: list = []
    handle = module.register_forward_hook(lambda m, args, out: store.append(args[0].detach().clone()))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    return torch.cat(store)


def _reference_alignment(rows: np.ndarray, weight: np.ndarray) -> np.ndarray:
    cov = np.cov(rows, rowvar=False)
    return np.einsum("ud,de,ue->u", weight, cov, weight) / ((weight**2).sum(1) * np.trace(cov))


def test_linear_alignment_matches_numpy(mlp_result):
    model, batches, result = mlp_result
    layer = model.net.fc2
    rows = _inputs_of(model, layer, batches).double().numpy()
    expected = _reference_alignment(rows, layer.weight.detach().double().numpy())
    np.testing.assert_allclose(result["layers"]["net.fc2"]["alignment"], expected, rtol=1e-5)


def test_conv_alignment_uses_the_input_patches():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    sites = [s for s in find_sites(model) if s.layer in ("conv1", "layer1.0.conv1", "layer2.0.downsample.0")]
    batches = _batches((3, 32, 32), n=4, batch=2)
    measured = measure_alignment(model, sites, batches)
    for site in sites:
        conv = site.layer_module
        x = _inputs_of(model, conv, batches).double()
        rows = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        rows = rows.transpose(1, 2).reshape(-1, rows.shape[1]).numpy()  # (N * positions, C * kh * kw)
        expected = _reference_alignment(rows, conv.weight.detach().double().flatten(1).numpy())
        np.testing.assert_allclose(measured[site.layer].numpy(), expected, rtol=1e-4, err_msg=site.layer)


# -- the numbers of a run --------------------------------------------------------------------------------------
def test_fraction_zero_reproduces_the_intact_network_exactly(mlp_result):
    _, _, result = mlp_result
    intact = result["intact"]
    for layer in result["layers"].values():
        assert layer["dropped"][0] == 0
        for order in ("high", "low"):
            assert layer[order]["acc"][0] == intact["acc"]
            assert layer[order]["loss"][0] == intact["loss"]
            assert layer[order]["acc_deviation"][0] == 0 and layer[order]["loss_deviation"][0] == 0
            assert layer[order]["confusion"][0] == intact["confusion"]
        assert layer["random"]["acc_mean"][0] == intact["acc"]
        assert all(run[0] == intact["acc"] for run in layer["random"]["acc"])
        assert layer["random"]["loss_mean"][0] == intact["loss"]


def test_orders_follow_the_alignment_and_the_seed(mlp_result):
    _, _, result = mlp_result
    for i, (name, layer) in enumerate(result["layers"].items()):
        alignment = np.asarray(layer["alignment"])
        assert np.all(np.diff(alignment[layer["orders"]["high"]]) <= 0)
        assert layer["orders"]["low"] == layer["orders"]["high"][::-1] or np.all(
            np.diff(alignment[layer["orders"]["low"]]) >= 0)
        assert layer["orders"]["random"] == random_orders(layer["units"], 2, seed=7 + i).tolist(), name


def test_random_order_is_reproducible_from_its_seed(mlp_result):
    model, batches, result = mlp_result
    again = ablate(model, batches, AblationSettings(fractions=(0.0, 0.3, 0.6), random_repeats=2, seed=7,
                                                    thresholds=(0.4, 0.6), min_count=2, mode="all_layers"))
    other = ablate(model, batches, AblationSettings(fractions=(0.0, 0.3, 0.6), random_repeats=2, seed=8,
                                                    mode="all_layers"))
    for name in result["layers"]:
        assert again["layers"][name]["orders"]["random"] == result["layers"][name]["orders"]["random"]
        assert other["layers"][name]["orders"]["random"] != result["layers"][name]["orders"]["random"]
    third = ablate(model, batches, AblationSettings(fractions=(0.0, 0.3, 0.6), random_repeats=2, seed=7,
                                                    thresholds=(0.4, 0.6), min_count=2, mode="all_layers"))
    assert json.dumps(third["all_layers"]["random"]) == json.dumps(again["all_layers"]["random"])  # NaN == NaN


def _masked_forward(model: nn.Module, batches: list, drops: dict[str, tuple[nn.Module, torch.Tensor]]):
    """Logits with the given units zeroed by this test's own hooks (``{layer: (drop module, mask)}``)."""
    handles = [module.register_forward_hook(lambda m, args, out, mask=mask: out * mask)
               for module, mask in drops.values()]
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    for handle in handles:
        handle.remove()
    return logits, torch.cat([y for _, y in batches])


@pytest.mark.parametrize("order", ["high", "low"])
def test_metrics_at_a_fraction_match_sklearn(mlp_result, order):
    model, batches, result = mlp_result
    layer = result["layers"]["net.fc2"]
    index = 2  # fraction 0.6
    k = round(0.6 * layer["units"])
    assert layer["dropped"][index] == k
    alignment = np.asarray(layer["alignment"])
    ranking = np.argsort(-alignment if order == "high" else alignment, kind="stable")
    mask = torch.ones(layer["units"])
    mask[torch.as_tensor(ranking[:k].copy())] = 0
    logits, target = _masked_forward(model, batches, {"net.fc2": (model.net.relu2, mask)})
    probs = logits.double().softmax(1).numpy()
    predicted, y = probs.argmax(1), target.numpy()
    section = layer[order]
    assert section["acc"][index] == pytest.approx(accuracy_score(y, predicted))
    assert section["loss"][index] == pytest.approx(log_loss(y, probs, labels=range(NUM_CLASSES)), rel=1e-5)
    assert section["acc_deviation"][index] == pytest.approx(section["acc"][index] - result["intact"]["acc"])
    cm = confusion_matrix(y, predicted, labels=range(NUM_CLASSES))
    assert section["confusion"][index] == cm.tolist()
    confidence = probs.max(1)
    for row in range(NUM_CLASSES):
        for col in range(NUM_CLASSES):
            cell = (y == row) & (predicted == col)
            reported = section["confidence"][index][row][col]
            if cell.sum() >= SMALL.min_count:
                assert reported == pytest.approx(confidence[cell].mean())
            else:
                assert math.isnan(reported)
    for entry, threshold in zip(section["thresholded"][index], SMALL.thresholds):
        keep = confidence >= threshold
        assert entry["threshold"] == threshold
        assert entry["coverage"] == pytest.approx(keep.mean())
        expected = (confusion_matrix(y[keep], predicted[keep], labels=range(NUM_CLASSES)) if keep.any()
                    else np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int))
        assert entry["confusion"] == expected.tolist()
    histogram = np.bincount(predicted, minlength=NUM_CLASSES)
    collapse = section["collapse"][index]
    assert collapse["histogram"] == histogram.tolist()
    assert collapse["entropy"] == pytest.approx(entropy(histogram) / math.log(NUM_CLASSES))
    assert collapse["top_class"] == int(histogram.argmax())
    assert collapse["top_share"] == pytest.approx(histogram.max() / len(y))


def test_all_layers_drops_the_same_fraction_everywhere_and_rescales():
    model = _mlp(seed=1)
    batches = _batches(MLP_SHAPE)
    settings = AblationSettings(fractions=(0.0, 0.5), random_repeats=1, mode="all_layers", rescale="inverted")
    result = ablate(model, batches, settings)
    assert "high" not in result["layers"]["net.fc1"]
    section = result["all_layers"]
    assert section["dropped"] == [0, 8 + 6 + 4]
    drops = {}
    for name, module in (("net.fc1", model.net.relu1), ("net.fc2", model.net.relu2), ("net.fc3", model.net.relu3)):
        layer = result["layers"][name]
        k, units = layer["dropped"][1], layer["units"]
        mask = torch.full((units,), units / (units - k))
        mask[torch.tensor(layer["orders"]["random"][0][:k])] = 0
        drops[name] = (module, mask)
    logits, target = _masked_forward(model, batches, drops)
    assert section["random"]["acc"][0][1] == pytest.approx(accuracy_score(target.numpy(), logits.argmax(1).numpy()))
    assert section["random"]["loss"][0][1] == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-5)
    assert math.isnan(section["random"]["acc_std"][1])  # one repeat: no sample std


@pytest.mark.parametrize(("cls", "kwargs", "shape"), [
    (BaselineNet, {"input_size": 8}, (3, 8, 8)),
    (DropoutNet, {"input_size": 8, "dropout": 0.3}, (3, 8, 8)),
    (BatchNormNet, {"input_size": 8}, (3, 8, 8)),
    (MLP, {"hidden": (16, 12, 8), "input_size": 8}, (1, 8, 8)),
    (LeNet5, {"input_size": 12}, (1, 12, 12)),
], ids=["baseline", "dropout", "batchnorm", "mlp", "lenet5"])
def test_every_model_can_be_ablated(cls, kwargs, shape):
    torch.manual_seed(0)
    model = cls(**kwargs)
    model.train()  # ablate switches to eval mode itself
    settings = AblationSettings(fractions=(0.0, 0.5), random_repeats=1, mode="all_layers")
    result = ablate(model, _batches(shape, n=8, batch=8), settings)
    assert not model.training
    assert result["all_layers"]["high"]["acc"][0] == result["intact"]["acc"]
    for name, layer in result["layers"].items():
        assert len(layer["alignment"]) == layer["units"]
        finite = [a for a in layer["alignment"] if a == a]
        assert finite and all(0 <= a <= 1 for a in finite), name


def test_passes_counts_every_forward_pass(mlp_result):
    model, batches, _ = mlp_result
    calls = []
    ablate(model, batches, SMALL, advance=calls.append)
    assert sum(calls) == SMALL.passes(3) == 2 + 3 * 3 * (2 + 2)


def test_evaluate_sums_over_batches():
    model = _mlp()
    batches = _batches(MLP_SHAPE)
    sums = evaluate(model.eval(), batches, thresholds=(0.0,))
    assert int(sums["n"]) == 24 and int(sums["counts"].sum()) == 24
    assert torch.equal(sums["thresholded"][0], sums["counts"])  # every prediction has confidence >= 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fractions": (0.0, 1.0)}, "fractions"), ({"fractions": (-0.1,)}, "fractions"), ({"fractions": ()}, "fractions"),
    ({"fractions": (0.1, 0.1)}, "fractions"), ({"random_repeats": 0}, "random_repeats"), ({"mode": "each"}, "mode"),
    ({"rescale": "up"}, "rescale"), ({"thresholds": (1.5,)}, "thresholds"), ({"min_count": 0}, "min_count"),
])
def test_settings_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AblationSettings(**kwargs)


def test_compare_checkpoints_collapse():
    def analysis(top: int) -> dict:
        hist = [0] * 3
        hist[top] = 4
        collapse = {"entropy": 0.0, "top_share": 1.0, "top_class": top, "histogram": hist}
        rand = {"entropy_mean": 0.0, "top_share_mean": 1.0, "top_class": top, "histogram": hist}
        orders = {"high": {"collapse": [collapse]}, "low": {"collapse": [collapse]}, "random": {"collapse": [rand]}}
        return {"fractions": [0.5], "layers": {"fc1": orders}}

    comparison = compare_checkpoints([analysis(1), analysis(1), analysis(2)], ["a", "b", "c"])
    high = comparison["targets"]["fc1"]["high"]
    assert high["top_class"] == [[1], [1], [2]]
    assert high["modal_class"] == [1] and high["agreement"] == [pytest.approx(2 / 3)]
    assert high["overlap"] == [pytest.approx(1 / 3)]  # pairs (a, b) 1, (a, c) 0, (b, c) 0


def test_find_checkpoints(tmp_path):
    for name in ("epoch=10-step=110.ckpt", "epoch=2-step=22.ckpt", "last.ckpt", "notes.txt"):
        (tmp_path / name).write_text("")
    found = [p.rsplit("/", 1)[-1] for p in find_checkpoints(str(tmp_path))]
    assert found == ["epoch=2-step=22.ckpt", "epoch=10-step=110.ckpt"]
    assert find_checkpoints(str(tmp_path / "last.ckpt")) == [str(tmp_path / "last.ckpt")]
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        find_checkpoints(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        find_checkpoints(str(tmp_path), pattern="*.pt")


def test_resnet18_can_be_ablated():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    settings = AblationSettings(fractions=(0.0, 0.5), random_repeats=1, mode="all_layers")
    result = ablate(model, _batches((3, 32, 32), n=8, batch=4), settings)
    assert len(result["layers"]) == 20 and "fc" not in result["layers"]
    assert result["layers"]["layer4.1.conv2"]["units"] == 512
    assert result["all_layers"]["low"]["acc"][0] == result["intact"]["acc"]
    assert result["all_layers"]["dropped"][1] == sum(round(0.5 * layer["units"]) for layer in result["layers"].values())
