import pytest
import torch

from lightning_probes.models import MLP, BaselineNet, BatchNormNet, DropoutNet, LeNet5

SHAPES = {"digits/mnist": (1, 28), "cifar": (3, 32)}
MODELS = [BaselineNet, DropoutNet, BatchNormNet, MLP, LeNet5]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_output_shape_and_backward(cls, shape):
    channels, side = shape
    model = cls(in_channels=channels, input_size=side, num_classes=7)
    x = torch.randn(4, channels, side, side)
    logits = model(x)
    assert logits.shape == (4, 7)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_named_submodules():
    names = dict(LeNet5().named_modules())
    for name in ("net.conv1", "net.pool1", "net.conv2", "net.pool2", "net.fc1", "net.fc2", "net.fc3"):
        assert name in names
    dropout = dict(DropoutNet(dropout=0.3).named_modules())["net.dropout"]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.3
    bn = dict(BatchNormNet().named_modules())
    assert isinstance(bn["net.bn1"], torch.nn.BatchNorm2d) and isinstance(bn["net.bn3"], torch.nn.BatchNorm1d)
    mlp = MLP()
    widths = [m.out_features for m in mlp.net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [512, 256, 128, 10]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in mlp.modules()) == 3


def test_tanh_lenet_uses_tanh():
    assert isinstance(LeNet5(activation="tanh").net.act1, torch.nn.Tanh)


@pytest.mark.parametrize(("padding", "pool2"), [(2, (16, 5, 5)), (1, (16, 4, 4)), (0, (16, 4, 4))])
def test_lenet5_padding_sets_the_pool2_maps(padding, pool2):
    # Worked by hand for 28x28: padding 2 gives 28 -> conv 28 -> pool 14 -> conv 10 -> pool 5; padding 0 gives
    # 24 -> 12 -> 8 -> 4 (the original meta-network study's 256 pool2 features); padding 1: 26 -> 13 -> 9 -> 4.
    model = LeNet5(padding=padding)
    seen = {}

    def hook(module, inputs, output):
        seen["pool2"] = tuple(output.shape[1:])

    model.net.pool2.register_forward_hook(hook)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert seen["pool2"] == pool2
    assert model.net.fc1.in_features == pool2[0] * pool2[1] * pool2[2]
    assert model.hparams.padding == padding


def test_lenet5_checkpoint_without_padding_loads_padded():
    # Checkpoints written before `padding` existed carry no such hyper-parameter: they were padded by 2.
    model = LeNet5()
    del model.hparams["padding"]
    assert model.build_network().conv1.padding == (2, 2)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (MLP, {"lr": 0.0}, "`lr`.*0.0"),
        (MLP, {"lr": -1.0}, "`lr`.*-1.0"),
        (DropoutNet, {"dropout": 1.0}, r"`dropout`.*\[0, 1\).*1.0"),
        (BaselineNet, {"lr_schedule": "cosine"}, "`lr_schedule`.*cosine"),
        (LeNet5, {"activation": "gelu"}, "`activation`.*gelu"),
        (LeNet5, {"padding": 3}, "`padding`.*0, 1 or 2.*3"),
        (MLP, {"momentum": 1.5}, "`momentum`"),
        (BaselineNet, {"num_classes": 0}, "`num_classes`"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(("schedule", "expected"), [("none", [1.0, 1.0, 1.0]), ("inverse_time", [1.0, 1 / 1.5, 0.5]),
                                                     ("step", [1.0, 0.25, 0.25])])
def test_lr_schedules(schedule, expected):
    model = MLP(lr=1.0, lr_schedule=schedule, lr_decay=0.5, step_size=1, gamma=0.25)
    config = model.configure_optimizers()
    if schedule == "none":
        assert isinstance(config, torch.optim.SGD)
        return
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    if schedule == "step":
        expected = [1.0, 0.25, 0.0625]
    assert lrs == pytest.approx(expected)


def test_eval_step_returns_logits_and_target():
    model = MLP()
    x, y = torch.randn(5, 1, 28, 28), torch.arange(5)
    out = model.validation_step((x, y), 0)
    assert set(out) == {"loss", "logits", "target"}
    assert out["logits"].shape == (5, 10) and torch.equal(out["target"], y)
