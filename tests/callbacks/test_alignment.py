import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_probes import AlignmentMonitor
from lightning_probes.errors import ProbeConfigurationError
from lightning_probes.functional import alignment, alignment_summary, conv2d_alignment
from tests.conftest import CaptureLogger
from tests.helpers import RandomDataModule, read, small_mlp, trainer


class Wrapped(pl.LightningModule):
    """Any network as a classifier: cross-entropy on ``(x, y)`` batches, SGD."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def tiny_conv() -> Wrapped:
    """Convolutions with every geometry option away from its default, then a Linear head."""
    return Wrapped(nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, kernel_size=(3, 2), padding=(2, 1), dilation=(2, 1), groups=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(6, 4, kernel_size=3, padding="same", bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 5, 10),
    ))


def _inputs(model: nn.Module, inputs: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Independent reference: the layers' inputs via a plain forward pre-hook of our own."""
    model.eval()
    seen, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].detach().clone().double())))
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return seen


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_records_equal_the_alignment_of_hooked_inputs(tmp_path):
    logger = CaptureLogger()
    probe = AlignmentMonitor(num_samples=32, batch_size=12, output_dir=str(tmp_path))
    model = small_mlp()
    fit = trainer(tmp_path, [probe], logger=logger, max_epochs=2)
    fit.fit(model, RandomDataModule())
    records = read(tmp_path / "alignment.jsonl")
    assert sorted({r["epoch"] for r in records}) == [0, 1, 2]  # 0: the untrained network
    last = [r for r in records if r["epoch"] == 2]
    assert [r["layer"] for r in last] == ["net.fc1", "net.fc2", "net.fc3", "net.fc4"]  # the classifier included
    seen = _inputs(model, probe._probe.inputs(), [r["layer"] for r in last])
    modules = dict(model.named_modules())
    for r in last:
        expected = alignment(seen[r["layer"]], modules[r["layer"]].weight)
        np.testing.assert_allclose(r["alignment"], expected.numpy(), rtol=1e-5, atol=1e-7)
        summary = alignment_summary(expected)
        for key in ("mean", "std", "q05", "q25", "q50", "q75", "q95"):
            assert r[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-7), key
        assert r["units"] == len(r["alignment"]) == modules[r["layer"]].out_features
        assert r["features"] == modules[r["layer"]].in_features and r["chance"] == 1 / r["features"]
        assert r["type"] == "Linear" and r["groups"] == 1 and r["nan_units"] == 0
    headline = np.mean([r["mean"] for r in last])
    assert fit.callback_metrics["alignment/mean"].item() == pytest.approx(headline, rel=1e-6)
    assert {"alignment/mean/net.fc1", "alignment/std/net.fc4", "alignment/mean"} <= logger.keys()
    assert "alignment/distributions" in logger.figures
    assert (tmp_path / "alignment" / "distributions.png").stat().st_size > 1000
    assert probe.history["epochs"] == [0, 1, 2]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_conv_records_equal_conv2d_alignment_of_hooked_inputs(tmp_path):
    probe = AlignmentMonitor(num_samples=20, batch_size=8, output_dir=str(tmp_path))
    model = tiny_conv()
    trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule(shape=(1, 8, 8)))
    records = {r["layer"]: r for r in read(tmp_path / "alignment.jsonl") if r["epoch"] == 1}
    assert list(records) == _layers(model)
    seen = _inputs(model, probe._probe.inputs(), list(records))
    for name, module in dict(model.named_modules()).items():
        if isinstance(module, nn.Conv2d):
            expected = conv2d_alignment(seen[name], module.weight.double(), module.stride, module.padding,
                                        module.dilation, module.groups, module.padding_mode)
            assert records[name]["features"] == module.in_channels // module.groups * module.weight[0, 0].numel()
        elif isinstance(module, nn.Linear):
            expected = alignment(seen[name], module.weight)
        else:
            continue
        np.testing.assert_allclose(records[name]["alignment"], expected.numpy(), rtol=1e-5, atol=1e-7)
    assert records["net.2"]["groups"] == 2 and records["net.2"]["type"] == "Conv2d"


def test_double_precision(tmp_path):
    probe = AlignmentMonitor(layers=["net.fc1", "net.fc4"], num_samples=24, batch_size=10, output_dir=str(tmp_path))
    model = small_mlp()
    trainer(tmp_path, [probe], max_epochs=1, precision="64-true").fit(model, RandomDataModule())
    records = [r for r in read(tmp_path / "alignment.jsonl") if r["epoch"] == 1]
    assert [r["layer"] for r in records] == ["net.fc1", "net.fc4"]
    seen = _inputs(model, probe._probe.inputs().double(), ["net.fc1", "net.fc4"])
    for r in records:
        expected = alignment(seen[r["layer"]], model.get_submodule(r["layer"]).weight)
        np.testing.assert_allclose(r["alignment"], expected.numpy(), rtol=1e-9)


@pytest.mark.parametrize(("cls", "shape"), [
    ("BaselineNet", (3, 32, 32)), ("DropoutNet", (3, 32, 32)), ("BatchNormNet", (3, 32, 32)), ("MLP", (1, 28, 28)),
    ("LeNet5", (1, 28, 28)),
])
def test_every_packaged_model(tmp_path, cls, shape):
    from lightning_probes import models

    model = getattr(models, cls)()
    probe = AlignmentMonitor(num_samples=16, batch_size=16, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1).fit(model, RandomDataModule(n=32, shape=shape))
    records = read(tmp_path / "alignment.jsonl")
    layers = _layers(model)
    assert layers and [r["layer"] for r in records] == layers * 2
    assert all(r["mean"] is not None and 0 <= r["q05"] <= r["q95"] <= 1 for r in records)


def test_resnet18_convolutions(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = Wrapped(torchvision.models.resnet18(num_classes=10))
    probe = AlignmentMonitor(num_samples=8, batch_size=8, every_n_epochs=2, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        model, RandomDataModule(n=8, batch_size=8, shape=(3, 32, 32)))
    records = read(tmp_path / "alignment.jsonl")
    assert [r["layer"] for r in records] == _layers(model)  # epoch 0 only (every_n_epochs=2)
    by_name = {r["layer"]: r for r in records}
    assert by_name["net.conv1"]["features"] == 3 * 7 * 7 and by_name["net.layer4.1.conv2"]["features"] == 512 * 9
    assert by_name["net.fc"]["units"] == 10
    assert all(r["nan_units"] == 0 and 0 < r["mean"] < 1 for r in records)


def test_training_random_stream_is_unchanged(tmp_path):
    seen = []

    class Draw(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(torch.rand(1).item())

    for probes in ([], [AlignmentMonitor(num_samples=8, output_dir=str(tmp_path))]):
        torch.manual_seed(0)
        trainer(tmp_path, [*probes, Draw()], max_epochs=2).fit(small_mlp(), RandomDataModule())
    assert seen[:2] == seen[2:4]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layers": "net.fc1"}, "`layers`"),
    ({"layers": []}, "`layers`"),
    ({"num_samples": 0}, "`num_samples`"),
    ({"every_n_epochs": 0}, "`every_n_epochs`"),
    ({"batch_size": -1}, "`batch_size`"),
    ({"max_memory_gb": 0}, "`max_memory_gb`"),
    ({"seed": 1.5}, "`seed`"),
    ({"forward_fn": 3}, "`forward_fn`"),
    ({"name": "bad/name"}, "`name`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlignmentMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layers": ["net.fc1", "net.relu1"]},
     r"^AlignmentMonitor: Expected `layers` to name nn.Linear, nn.Conv1d or nn.Conv2d layers .*but got "
     r"\{'net.relu1': 'ReLU'\}; choose such `layers`"),
    ({"layers": ["net.fc_1"]}, "did you mean 'net.fc1'"),
    ({"max_memory_gb": 1e-6, "layers": ["net.fc1", "net.fc2"]},
     r"above the .* its sums may take \(75% of `max_memory_gb`=1e-06.*\(`layers` is set.*"
     r"`lightning_probes.set_memory_budget.*net.fc1"),
])
def test_configuration_errors(tmp_path, kwargs, match):
    with pytest.raises(ProbeConfigurationError, match=match):
        trainer(tmp_path, [AlignmentMonitor(num_samples=8, **kwargs)], max_epochs=1).fit(small_mlp(),
                                                                                        RandomDataModule())


def test_history_survives_state_dict(tmp_path):
    probe = AlignmentMonitor(layers=["net.fc2"], num_samples=8, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(small_mlp(), RandomDataModule())
    restored = AlignmentMonitor(layers=["net.fc2"])
    restored.load_state_dict(probe.state_dict())
    assert restored.history == probe.history and restored.history["layers"]["net.fc2"]["epochs"] == [0, 1]
    assert "max_features" not in probe.hparams() and probe.hparams()["max_memory_gb"] is None


def test_token_inputs_through_forward_fn(tmp_path):
    from tests.callbacks.test_analysis_pass import TinyLM

    probe = AlignmentMonitor(num_samples=16, batch_size=8, forward_fn=lambda module, batch: module(*batch),
                             output_dir=str(tmp_path))
    model = TinyLM()
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=2).fit(model)
    records = read(tmp_path / "alignment.jsonl")
    layers = {r["layer"] for r in records}
    assert "model.decoder" in layers and not any(name.endswith("out_proj") for name in layers)  # never called
    decoder = next(r for r in records if r["layer"] == "model.decoder" and r["epoch"] == 1)
    assert decoder["units"] == 12 and decoder["features"] == 8 and decoder["nan_units"] == 0


def test_dict_batches_and_a_compiled_network(tmp_path):
    from tests.callbacks.test_analysis_pass import DictData, DictMLP

    model = DictMLP(hidden=(16, 12, 8), input_size=8)
    model.net = torch.compile(model.net, backend="eager")
    probe = AlignmentMonitor(num_samples=20, input_key="image", target_key="label", output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1, limit_train_batches=2).fit(model, DictData())
    records = read(tmp_path / "alignment.jsonl")
    assert [r["layer"] for r in records] == ["net.fc1", "net.fc2", "net.fc3", "net.fc4"] * 2
    assert hasattr(model.net, "_orig_mod")  # the compiled module is back in place


class Symmetric(nn.Module):
    """A parametrization that changes every unit's direction: ``W + W^T`` (square weights)."""

    def forward(self, weight):
        return weight + weight.T


def test_parametrized_layers_use_their_effective_weight(tmp_path):
    """Matrix case spectral_norm: layers wrapped by `torch.nn.utils.parametrizations` (spectral_norm, weight_norm)
    were left out of the default selection ("has no nn.Linear or nn.Conv2d layer"). They are analysed like plain
    layers, with the weight their forward uses, computed here by hand from the parametrization's tensors."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), parametrizations.spectral_norm(nn.Linear(64, 16)), nn.ReLU(),
                        parametrizations.weight_norm(nn.Linear(16, 12), dim=1), nn.ReLU(), nn.Linear(12, 12),
                        nn.Tanh(), nn.Linear(12, 10))
    parametrize.register_parametrization(net[5], "weight", Symmetric())
    with torch.no_grad():  # a per-column gain that is not uniform: the effective rows point elsewhere than `v`'s
        net[3].parametrizations.weight.original0.copy_(torch.linspace(0.2, 3.0, 16)[None, :])
    model = Wrapped(net)
    probe = AlignmentMonitor(num_samples=32, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(model, RandomDataModule())
    assert list(probe._modules) == ["net.1", "net.3", "net.5", "net.7"]  # none of the parametrizations' modules
    records = {r["layer"]: r for r in read(tmp_path / "alignment.jsonl") if r["epoch"] == 1}
    spectral, norm, symmetric = net[1].parametrizations.weight, net[3].parametrizations.weight, \
        net[5].parametrizations.weight
    w = spectral.original.detach().double()
    u, v = spectral[0]._u.double(), spectral[0]._v.double()
    by_hand = {"net.1": w / (u @ w @ v),  # W / sigma, sigma = u^T W v from the stored power-iteration vectors
               "net.3": norm.original0.detach().double() * norm.original1.detach().double()
               / norm.original1.detach().double().norm(dim=0, keepdim=True),  # g_j v_:j / |v_:j|
               "net.5": symmetric.original.detach().double() + symmetric.original.detach().double().T,
               "net.7": net[7].weight.detach().double()}
    inputs = _inputs(model, probe._probe.inputs(), list(by_hand))
    for name, weight in by_hand.items():
        x = inputs[name].reshape(len(inputs[name]), -1).numpy()
        cov = np.cov(x, rowvar=False)
        w = weight.numpy()
        expected = np.einsum("ud,de,ue->u", w, cov, w) / ((w**2).sum(1) * np.trace(cov))
        np.testing.assert_allclose(records[name]["alignment"], expected, rtol=1e-5, atol=1e-7, err_msg=name)
    raw = norm.original1.detach().double().numpy()  # the stored direction `v` would give other numbers
    x = inputs["net.3"].numpy()
    cov = np.cov(x, rowvar=False)
    assert not np.allclose(records["net.3"]["alignment"],
                           np.einsum("ud,de,ue->u", raw, cov, raw) / ((raw**2).sum(1) * np.trace(cov)), rtol=1e-3)


def test_conv1d_layers(tmp_path):
    """Matrix case conv1d ("not enough values to unpack"): Conv1d layers are analysed, each filter against the
    covariance of its receptive-field patches, here unfolded by `F.unfold` on inputs of height 1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2),
                        nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 10))
    model = Wrapped(net)
    data = RandomDataModule(shape=(1, 64))
    probe = AlignmentMonitor(num_samples=32, output_dir=str(tmp_path))
    trainer(tmp_path, [probe], max_epochs=1).fit(model, data)
    assert list(probe._modules) == ["net.0", "net.2", "net.6"]
    records = {r["layer"]: r for r in read(tmp_path / "alignment.jsonl") if r["epoch"] == 1}
    inputs = _inputs(model, probe._probe.inputs(), ["net.0", "net.2"])
    for name in ("net.0", "net.2"):
        conv = dict(model.named_modules())[name]
        patches = nn.functional.unfold(inputs[name].unsqueeze(2), (1, conv.kernel_size[0]),
                                       dilation=(1, conv.dilation[0]), padding=(0, conv.padding[0]),
                                       stride=(1, conv.stride[0]))  # (N, C * k, L_out)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()
        per = rows.shape[1] // conv.groups
        w = conv.weight.detach().double().reshape(conv.out_channels, -1).numpy()
        expected = []
        for g in range(conv.groups):
            cov = np.cov(rows[:, g * per:(g + 1) * per], rowvar=False)
            units = w[g * (len(w) // conv.groups):(g + 1) * (len(w) // conv.groups)]
            expected.extend(np.einsum("ud,de,ue->u", units, cov, units) / ((units**2).sum(1) * np.trace(cov)))
        np.testing.assert_allclose(records[name]["alignment"], expected, rtol=1e-5, atol=1e-7, err_msg=name)
        assert records[name]["features"] == conv.in_channels // conv.groups * conv.kernel_size[0]
