import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.functional.alignment import (
    AlignmentAccumulator,
    alignment,
    alignment_from_covariance,
    conv2d_alignment,
    conv_patches,
    layer_rows,
)


def _numpy_alignment(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Independent reference: share of the input variance along each weight row."""
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    return np.einsum("ud,de,ue->u", w, cov, w) / ((w * w).sum(1) * np.trace(cov))


def _patch_loop(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> np.ndarray:
    """Independent reference: receptive-field patches by explicit loops over samples and output positions."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    padded[:, :, ph:ph + h, pw:pw + w] = x
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(n):
        for oy in range(out_h):
            for ox in range(out_w):
                patch = [padded[i, ch, oy * sh + ky * dh, ox * sw + kx * dw]
                         for ch in range(c) for ky in range(kh) for kx in range(kw)]
                rows.append(patch)
    return np.array(rows)


def test_equals_numpy_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = alignment(x, w)
    assert got.dtype == torch.float64 and got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), _numpy_alignment(x.numpy(), w.numpy()), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.numpy(), _numpy_alignment(x.numpy(), w.numpy()), rtol=1e-10)
    assert ((got >= 0) & (got <= 1)).all()


def test_rank_one_inputs_give_one_along_their_direction_and_zero_across():
    g = torch.Generator().manual_seed(1)
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.randn(40, 1, generator=g, dtype=torch.float64) * direction + torch.tensor([3.0, 1.0, -1.0])
    across = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)  # orthogonal to `direction`
    got = alignment(x, torch.stack([direction, -4 * direction, across]))
    assert got.tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-12)


def test_eigenvectors_give_their_share_of_the_trace():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    x = x @ torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q  # rotate the axes
    cov = np.cov(x.numpy(), rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    got = alignment(x, torch.from_numpy(eigenvectors.T.copy()))
    np.testing.assert_allclose(got.numpy(), eigenvalues / eigenvalues.sum(), rtol=1e-9)
    assert got[0].item() == pytest.approx(eigenvalues.min() / np.trace(cov), rel=1e-9)  # the least variance


def test_undefined_cases_are_nan():
    x = torch.randn(10, 3, dtype=torch.float64)
    got = alignment(x, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert math.isnan(got[0]) and not math.isnan(got[1])
    assert alignment(torch.ones(10, 3), torch.eye(3)).isnan().all()  # constant inputs: no variance


def test_one_feature():
    assert alignment(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[3.0], [-1.0]])).tolist() == [1.0, 1.0]


def test_float32_inputs_are_computed_in_float64():
    x = torch.randn(64, 5)
    w = torch.randn(3, 5)
    np.testing.assert_allclose(alignment(x, w).numpy(), _numpy_alignment(x.double().numpy(), w.double().numpy()),
                               rtol=1e-9)


@pytest.mark.parametrize(("stride", "padding", "dilation"), [
    (1, 0, 1),
    ((2, 1), (1, 2), (2, 1)),
    (3, 2, 2),
])
def test_conv2d_alignment_equals_an_explicit_patch_loop(stride, padding, dilation):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 2, 3, 2, generator=g, dtype=torch.float64)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    rows = _patch_loop(x.numpy(), (3, 2), pair(stride), pair(padding), pair(dilation))
    np.testing.assert_allclose(conv_patches(x, (3, 2), stride, padding, dilation).numpy(), rows)
    unfolded = nn.functional.unfold(x, (3, 2), dilation=pair(dilation), padding=pair(padding), stride=pair(stride))
    np.testing.assert_array_equal(unfolded.transpose(1, 2).reshape(-1, 2 * 3 * 2).numpy(), rows)
    expected = _numpy_alignment(rows, weight.reshape(4, -1).numpy())
    got = conv2d_alignment(x, weight, stride, padding, dilation)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_grouped_conv2d_uses_each_groups_channels():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    x[:, 2:] *= 10  # the second group's channels carry far more variance
    weight = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    got = conv2d_alignment(x, weight, padding=1, groups=2)
    for group in range(2):
        rows = _patch_loop(x[:, 2 * group:2 * group + 2].numpy(), (3, 3), (1, 1), (1, 1), (1, 1))
        expected = _numpy_alignment(rows, weight[3 * group:3 * group + 3].reshape(3, -1).numpy())
        np.testing.assert_allclose(got[3 * group:3 * group + 3].numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
    dict(kernel_size=4, padding="same", dilation=2),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=(2, 3), padding=(1, 2), padding_mode="circular"),
    dict(kernel_size=3, padding="same", padding_mode="replicate"),
])
def test_layer_rows_reproduce_the_convolution(kwargs):
    conv = nn.Conv2d(3, 5, bias=False, **kwargs).double()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    rows = layer_rows(conv, x)
    out = conv(x)  # (N, O, H_out, W_out)
    from_rows = (rows @ conv.weight.reshape(5, -1).T).reshape(2, out.shape[2], out.shape[3], 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(from_rows, out)


def test_linear_rows_flatten_leading_dimensions():
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    assert torch.equal(layer_rows(linear, x), x.reshape(10, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streamed_equals_one_shot(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(90, 6, generator=g, dtype=torch.float64) * 3 + 100).to(dtype)  # a large mean: shifted sums
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    acc = AlignmentAccumulator(6)
    for chunk in torch.split(x, [1, 30, 0, 17, 42]):
        acc.update(chunk)
    assert acc.n == 90
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=tolerance)
    np.testing.assert_allclose(acc.compute(w).numpy(), alignment(x, w).numpy(), rtol=tolerance)


@pytest.mark.parametrize("groups", [1, 2])
def test_few_rows_are_computed_from_the_rows_themselves(groups):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(18, 40, generator=g, dtype=torch.float64) + 5  # 18 rows < 40 / groups features
    w = torch.randn(6, 40 // groups, generator=g, dtype=torch.float64)
    w[1] = 0
    acc = AlignmentAccumulator(40, groups=groups)
    for chunk in torch.split(x, [7, 5, 6]):
        acc.update(chunk)
    got = acc.compute(w)
    assert acc.products is None  # the (d, d) sums were never formed
    width = 40 // groups
    expected = torch.cat([alignment(x[:, i * width:(i + 1) * width], w[i * 6 // groups:(i + 1) * 6 // groups])
                          for i in range(groups)])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-10)
    assert math.isnan(got[1])
    np.testing.assert_allclose(acc.compute(w).numpy(), got.numpy())  # computing twice gives the same
    covariance = acc.covariance()  # forms the sums now, and agrees
    np.testing.assert_allclose(alignment_from_covariance(covariance, w).numpy(), got.numpy(), rtol=1e-9)


def test_streamed_grouped_conv_equals_one_shot():
    g = torch.Generator().manual_seed(6)
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, dilation=2, groups=2).double()
    x = torch.randn(7, 4, 10, 10, generator=g, dtype=torch.float64)
    acc = AlignmentAccumulator.for_layer(conv)
    assert (acc.num_features, acc.groups) == (36, 2)
    for batch in torch.split(x, 3):
        acc.update(layer_rows(conv, batch))
    assert acc.covariance().shape == (2, 18, 18)
    expected = conv2d_alignment(x, conv.weight, stride=2, padding=1, dilation=2, groups=2)
    np.testing.assert_allclose(acc.compute(conv.weight).numpy(), expected.numpy(), rtol=1e-10)


def test_half_precision_rows_are_promoted():
    x = torch.randn(32, 4)
    acc = AlignmentAccumulator(4)
    acc.update(x.bfloat16())
    assert acc.products.dtype == torch.float64
    np.testing.assert_allclose(acc.compute(torch.eye(4)).numpy(), alignment(x.bfloat16().float(), torch.eye(4)),
                               rtol=1e-5)


def test_covariance_blocks_per_group():
    cov = torch.stack([torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 1.0]))])
    got = alignment_from_covariance(cov, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert got.tolist() == [0.75, 0.25, 0.5, 0.5]


@pytest.mark.parametrize(("call", "match"), [
    (lambda: alignment(torch.randn(5, 3), torch.randn(2, 4)), "weight"),
    (lambda: alignment(torch.randn(1, 3), torch.randn(2, 3)), "at least 2"),
    (lambda: alignment(torch.randn(5, 3, 1), torch.randn(2, 3)), "inputs"),
    (lambda: conv2d_alignment(torch.randn(2, 3, 5, 5), torch.randn(4, 2, 3, 3)), "channels"),
    (lambda: conv2d_alignment(torch.randn(2, 4, 5, 5), torch.randn(3, 2, 3, 3), groups=2), "divisible"),
    (lambda: conv_patches(torch.randn(2, 3, 5, 5), 3, stride=2, padding="same"), "stride 1"),
    (lambda: conv_patches(torch.randn(2, 3, 5, 5), 0), "kernel_size"),
    (lambda: conv_patches(torch.randn(2, 3, 5, 5), 3, padding="full"), "padding"),
    (lambda: conv_patches(torch.randn(2, 3, 5, 5), 3, padding_mode="mirror"), "padding_mode"),
    (lambda: conv_patches(torch.randn(2, 3, 5, 5), 4, dilation=2), "does not fit"),
    (lambda: AlignmentAccumulator(6, groups=4), "divide"),
    (lambda: AlignmentAccumulator(0), "num_features"),
    (lambda: AlignmentAccumulator(3).update(torch.randn(4, 2)), r"\(n, 3\)"),
    (lambda: AlignmentAccumulator(3).covariance(), "at least 2"),
    (lambda: AlignmentAccumulator.for_layer(nn.ReLU()), "nn.Linear, nn.Conv1d and nn.Conv2d"),
    (lambda: AlignmentAccumulator.for_layer(nn.Conv3d(2, 2, 3)), "nn.Linear, nn.Conv1d and nn.Conv2d"),
    (lambda: layer_rows(nn.Linear(3, 2), torch.randn(4, 5)), r"\(\.\.\., 3\)"),
    (lambda: layer_rows(nn.Conv1d(3, 2, 2), torch.randn(4, 5, 7)), r"\(N, 3, L\)"),
])
def test_bad_inputs_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("conv", [
    nn.Conv1d(3, 4, 5, stride=2, padding=2),
    nn.Conv1d(4, 6, 3, dilation=2, groups=2, padding_mode="circular", padding=2),
    nn.Conv1d(3, 2, 4, padding="same", bias=False),
])
def test_conv1d_rows_and_alignment_by_hand(conv):
    """A Conv1d (the matrix case conv1d: "not enough values to unpack" before) is read as its patches: the rows
    times the flattened weight give the convolution, and the alignment is NumPy's on those patches."""
    torch.manual_seed(0)
    x = torch.randn(6, conv.in_channels, 11, dtype=torch.float64)
    conv = conv.double()
    rows = layer_rows(conv, x)
    weight = conv.weight.detach()
    out = conv(x).detach() - (0 if conv.bias is None else conv.bias.detach()[None, :, None])
    groups, per = conv.groups, conv.in_channels // conv.groups
    k = conv.kernel_size[0]
    length = out.shape[-1]
    for g in range(groups):  # group g's filters see its channels' patches: columns g*per*k ... (g+1)*per*k
        block = rows[:, g * per * k:(g + 1) * per * k]
        units = weight[g * (conv.out_channels // groups):(g + 1) * (conv.out_channels // groups)].reshape(-1, per * k)
        mine = (block @ units.T).reshape(6, length, -1).permute(0, 2, 1)
        torch.testing.assert_close(mine, out[:, g * units.shape[0]:(g + 1) * units.shape[0]])
    accumulator = AlignmentAccumulator.for_layer(conv)
    accumulator.update_layer(conv, x[:4])
    accumulator.update_layer(conv, x[4:])
    got = accumulator.compute(weight).numpy()
    expected = []
    for g in range(groups):
        patches = rows[:, g * per * k:(g + 1) * per * k].numpy()
        cov = np.cov(patches, rowvar=False)
        units = weight[g * (conv.out_channels // groups):(g + 1) * (conv.out_channels // groups)].reshape(-1, per * k)
        w = units.numpy()
        expected.extend(np.einsum("ud,de,ue->u", w, cov, w) / ((w**2).sum(1) * np.trace(cov)))
    np.testing.assert_allclose(got, expected, rtol=1e-9)
