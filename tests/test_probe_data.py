"""`lightning_probes.probe_data`: the probe set as a batch, the analysis mode and the default forward."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_probes.functional.robustness import noisy_logits
from lightning_probes.probe_data import (
    ProbeInputError,
    ProbeSet,
    analysis_mode,
    batch_labels,
    replace_inputs,
    run_forward,
    select_balanced,
)


class _Trainer:
    def __init__(self, loader):
        self.val_dataloaders = loader


def test_probe_set_keeps_dict_batches_and_balances_by_target_key():
    x, y = torch.randn(40, 3), torch.arange(40) % 4
    loader = DataLoader([{"x": x[i], "y": y[i], "extra": torch.tensor([i, i])} for i in range(40)], batch_size=8)
    probe = ProbeSet.collect(_Trainer(loader), num_samples=12, seed=0, search_batches=10, target_key="y")
    assert torch.equal(probe.indices, select_balanced(y, 12, 0))
    assert torch.equal(probe.batch["x"], x[probe.indices]) and torch.equal(probe.labels, y[probe.indices])
    assert torch.equal(probe.batch["extra"][:, 0], probe.indices)
    chunks = list(probe.chunks(5))
    assert [len(c["x"]) for c in chunks] == [5, 5, 2] and torch.equal(chunks[1]["y"], probe.labels[5:10])
    again = probe.select([3, 3])
    assert torch.equal(again.batch["x"], x[probe.indices[[3, 3]]])


def test_probe_set_without_labels_takes_the_first_samples_and_stops_early():
    tokens = torch.arange(60).reshape(30, 2)
    seen = []

    class Loader:
        def __iter__(self):
            for start in range(0, 30, 4):
                seen.append(start)
                yield tokens[start:start + 4], tokens[start:start + 4] + 1  # (N, T) targets: no class labels

    probe = ProbeSet.collect(_Trainer(Loader()), num_samples=6, seed=0, search_batches=100)
    assert probe.labels is None and torch.equal(probe.indices, torch.arange(6)) and seen == [0, 4]
    assert torch.equal(probe.batch[0], tokens[:6]) and torch.equal(probe.batch[1], tokens[:6] + 1)


def test_labels_and_inputs_of_batches():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    assert torch.equal(batch_labels((x, y)), y)
    assert batch_labels((x, y.float())) is None and batch_labels({"x": x, "y": y}) is None
    with pytest.raises(TypeError, match=r"batch\['y'\] \(`target_key`\) to be a 1-D integer"):
        batch_labels({"x": x, "y": x}, "y")
    new = torch.zeros(4, 2)
    assert replace_inputs((x, y), new)[0] is new and replace_inputs({"x": x, "y": y}, new, "x")["x"] is new


def test_analysis_mode_restores_each_module_and_the_random_state():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    net.train()
    net[1].eval()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="inside"), analysis_mode(net):
        assert not net.training and not torch.is_grad_enabled()
        torch.rand(5)
        raise RuntimeError("inside")
    assert torch.equal(torch.rand(3), expected)
    assert [m.training for m in net.modules()] == [True, True, False, True]


def test_default_forward_casts_to_the_module_dtype_and_names_forward_fn():
    net = nn.Linear(3, 2).double()
    out = run_forward(net, (torch.randn(4, 3, dtype=torch.float32), torch.zeros(4, dtype=torch.long)))
    assert out.dtype == torch.float64

    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a + b

    with pytest.raises(ProbeInputError, match="cannot be called with one input tensor.*`forward_fn=`"):
        run_forward(TwoInputs(), (torch.ones(2), torch.ones(2)))
    assert torch.equal(run_forward(TwoInputs(), (torch.ones(2), torch.ones(2)), lambda m, b: m(*b)),
                       torch.full((2,), 2.0))
    with pytest.raises(TypeError, match="`input_key=`.*`forward_fn=`"):
        run_forward(net, {"x": torch.ones(2, 3)})
    with pytest.raises(TypeError, match="first element to be the input tensor, but got list.*`forward_fn=`"):
        run_forward(net, ([torch.ones(2, 3)], torch.zeros(2)))
    assert run_forward(net, {"x": torch.ones(2, 3)}, input_key="x").shape == (2, 2)


def test_noisy_logits_with_a_logits_fn_and_its_errors():
    model = nn.Linear(3, 4)
    x = torch.randn(10, 3)
    direct = noisy_logits(model, x, 0.3, 5, torch.Generator().manual_seed(1), chunk_size=4)
    via = noisy_logits(lambda v: (model(v), None), x, 0.3, 5, torch.Generator().manual_seed(1), chunk_size=4,
                       logits_fn=lambda m, v: m(v)[0])
    torch.testing.assert_close(direct, via)
    # Reference: the same noise drawn by hand.
    g = torch.Generator().manual_seed(1)
    reference = torch.stack([model(x + 0.3 * torch.randn(x.shape, generator=g)) for _ in range(5)])
    torch.testing.assert_close(direct, reference)
    with pytest.raises(TypeError, match="`logits_fn` to give floating logits of shape \\(4, num_classes\\)"):
        noisy_logits(lambda v: (model(v), None), x, 0.3, 1, chunk_size=4)
    with pytest.raises(TypeError, match="floating-point inputs, but got torch.int64"):
        noisy_logits(model, torch.zeros(2, 3, dtype=torch.long), 0.3, 1)
