import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.akconv import AKConv, corner_reads, initial_points
from tests.model.akconv_reference import akconv_forward

SEED_DIR = Path(__file__).resolve().parents[3] / "shared" / "seed"


def make_layer(c1=3, c2=4, num_param=5, stride=1, indexing="ij", offset_scale=1.5, seed=0, bias=None):
    """An AKConv with non-trivial offsets (p_conv is zero-initialised) and BatchNorm statistics."""
    torch.manual_seed(seed)
    layer = AKConv(c1, c2, num_param, stride, bias=bias, indexing=indexing)
    torch.nn.init.normal_(layer.p_conv.weight, std=offset_scale / math.sqrt(9 * c1))
    torch.nn.init.normal_(layer.p_conv.bias, std=offset_scale)
    norm = layer.conv[1]
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.uniform_(-0.5, 0.5)
    return layer


def train_mode_with_fixed_norm(layer):
    """Training path (exact sampler) but BatchNorm on running statistics, so results are comparable."""
    layer.train()
    layer.conv[1].eval()
    return layer


SHAPES = [(7, 7), (6, 9), (9, 5)]


@pytest.mark.parametrize("indexing", ["ij", "xy"])
@pytest.mark.parametrize("num_param", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
class TestAgainstReference:
    def test_both_paths_match_the_loop_reference(self, indexing, num_param, stride, shape):
        layer = make_layer(num_param=num_param, stride=stride, indexing=indexing)
        x = torch.randn(2, 3, *shape)
        expected = akconv_forward(layer.eval(), x)
        with torch.no_grad():
            fast = layer.eval()(x)
            exact = train_mode_with_fixed_norm(layer)(x)
        assert fast.shape == (2, 4, (shape[0] - 1) // stride + 1, (shape[1] - 1) // stride + 1)
        torch.testing.assert_close(exact, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)

    def test_gradients_of_both_paths_agree(self, indexing, num_param, stride, shape):
        x = torch.randn(2, 3, *shape)
        grads = []
        for set_mode in (train_mode_with_fixed_norm, lambda m: m.eval()):
            layer = set_mode(make_layer(num_param=num_param, stride=stride, indexing=indexing))
            inputs = x.clone().requires_grad_()
            layer(inputs).square().sum().backward()
            grads.append((inputs.grad, layer.p_conv.weight.grad, layer.conv[0].weight.grad))
        assert grads[0][1].abs().sum() > 0, "no gradient reached p_conv"
        for exact, fast in zip(*grads, strict=True):
            torch.testing.assert_close(exact, fast, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("indexing", ["ij", "xy"])
@pytest.mark.parametrize("num_param,stride", [(3, 2), (5, 1), (4, 3)])
@pytest.mark.parametrize("shape", [(7, 7), (6, 9), (9, 5), (1, 6), (5, 1)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
class TestFastPath:
    """The inference path (eval) against the exact one, on odd, non-square and one-pixel inputs, in both layouts."""

    def test_fused_matches_the_exact_path(self, indexing, num_param, stride, shape, memory_format):
        layer = make_layer(num_param=num_param, stride=stride, indexing=indexing)
        x = torch.randn(3, 3, *shape).contiguous(memory_format=memory_format)
        with torch.no_grad():
            exact = train_mode_with_fixed_norm(layer)(x)
            layer.eval().fuse()
            fused = layer(x)
        torch.testing.assert_close(fused, exact, rtol=1e-4, atol=1e-5)

    def test_samples_far_past_the_border(self, indexing, num_param, stride, shape, memory_format):
        """Offsets of several pixels put most samples outside the input, where the seed weighs borders by 2 or 4."""
        layer = make_layer(num_param=num_param, stride=stride, indexing=indexing, offset_scale=6.0)
        x = torch.randn(2, 3, *shape).contiguous(memory_format=memory_format)
        with torch.no_grad():
            expected = akconv_forward(layer.eval(), x)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_corner_reads_weigh_the_border_by_two_per_axis():
    """Rows and columns at -0.5, 0, 0.25, 2.75, 3 and 4.5 on a 4×4 input: inside [0, 3) plain bilinear weights,
    on or past the last pixel, or before the first, both reads land on the border pixel with weight 1 each."""
    height = width = 4
    positions = torch.tensor([-0.5, 0.0, 0.25, 2.75, 3.0, 4.5])
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    coords = torch.stack([rows, cols]).view(2, 1, 6, 6, 1)  # (2, B, H', W', N)
    index, weight = corner_reads(coords, height, width)
    axis_reads = {  # position -> ((near, far), (near weight, far weight)) on a length-4 axis
        -0.5: ((0, 0), (1.0, 1.0)),
        0.0: ((0, 1), (1.0, 0.0)),
        0.25: ((0, 1), (0.75, 0.25)),
        2.75: ((2, 3), (0.25, 0.75)),
        3.0: ((3, 3), (1.0, 1.0)),
        4.5: ((3, 3), (1.0, 1.0)),
    }
    expected_index, expected_weight = [], []
    for row, col in zip(rows.flatten().tolist(), cols.flatten().tolist(), strict=True):
        (top, bottom), (top_weight, bottom_weight) = axis_reads[row]
        (left, right), (left_weight, right_weight) = axis_reads[col]
        expected_index.append([top * width + left, top * width + right, bottom * width + left, bottom * width + right])
        expected_weight.append(
            [
                top_weight * left_weight,
                top_weight * right_weight,
                bottom_weight * left_weight,
                bottom_weight * right_weight,
            ]
        )
    assert index.tolist() == expected_index
    torch.testing.assert_close(weight, torch.tensor(expected_weight))
    sums = weight.sum(dim=1).view(6, 6)
    assert sums[0, 0] == 4 and sums[0, 2] == 2 and sums[2, 3] == 1 and sums[4, 5] == 4


def test_corner_reads_index_each_image_of_the_batch():
    coords = torch.full((2, 3, 1, 1, 1), 1.0)  # every image samples pixel (1, 1) of a 2×3 input
    index, weight = corner_reads(coords, height=2, width=3)
    assert index.tolist() == [[4, 5, 4, 5], [10, 11, 10, 11], [16, 17, 16, 17]]
    assert weight.sum(dim=1).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_exact_path_gradient_is_the_numerical_gradient(indexing):
    layer = make_layer(c1=2, c2=3, num_param=3, stride=2, indexing=indexing).double()
    train_mode_with_fixed_norm(layer)
    x = torch.randn(1, 2, 6, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_ij_with_zero_offsets_is_a_kxk_convolution(k, stride, shape):
    """Point n sits at kernel position (n // k, n % k). The bottom/right border is replicated, and the seed's
    bilinear rule weighs any sample on or past the last row/column by 2 per axis (see the module docstring)."""
    layer = make_layer(c1=3, c2=4, num_param=k * k, stride=stride, indexing="ij", offset_scale=0.0).eval()
    x = torch.randn(2, 3, *shape)
    height, width = shape
    rows = torch.arange(height + k)
    cols = torch.arange(width + k)
    padded = x[:, :, rows.clamp(max=height - 1)][:, :, :, cols.clamp(max=width - 1)]
    padded = padded * (1 + (rows >= height - 1).float()).view(-1, 1) * (1 + (cols >= width - 1).float()).view(1, -1)
    kernel = layer.conv[0].weight.view(4, 3, k, k)  # weight n -> (n // k, n % k)
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    expected = F.conv2d(padded, kernel, stride=stride)[:, :, :out_h, :out_w]
    with torch.no_grad():
        expected = layer.conv[2](layer.conv[1](expected))
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_xy_base_grid_is_transposed_on_square_inputs():
    """With zero offsets and one point, output (a, b) of the seed geometry reads input (b, a) (stride 1)."""
    layer = make_layer(c1=1, c2=1, num_param=1, indexing="xy", offset_scale=0.0).eval()
    layer.conv[0].weight.data.fill_(1.0)
    layer.conv[1] = torch.nn.Identity()
    layer.conv[2] = torch.nn.Identity()
    x = torch.arange(36.0).view(1, 1, 6, 6) / 36  # interior reads are weight 1, last row/col weight 2
    out = layer(x)
    interior = out[0, 0, :5, :5]
    torch.testing.assert_close(interior, x[0, 0, :5, :5].T)


@pytest.mark.parametrize("num_param,indexing,expected", [
    (9, "ij", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]),
    (9, "xy", [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]),
    (5, "ij", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]),
    (3, "xy", [(0, 0), (0, 1), (1, 0)]),
])  # fmt: skip
def test_initial_points_order(num_param, indexing, expected):
    rows, cols = initial_points(num_param, indexing)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == expected


@pytest.mark.parametrize("bias", [None, True])
def test_fuse_keeps_outputs(bias):
    layer = make_layer(num_param=3, stride=2, bias=bias).eval()
    x = torch.randn(2, 3, 10, 12)
    with torch.no_grad():
        before = layer(x)
        layer.fuse()
        after = layer(x)
    assert isinstance(layer.conv[1], torch.nn.Identity)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_state_dict_keys_match_the_seed_module():
    assert list(AKConv(3, 4, 3).state_dict()) == [
        "conv.0.weight",
        "conv.1.weight",
        "conv.1.bias",
        "conv.1.running_mean",
        "conv.1.running_var",
        "conv.1.num_batches_tracked",
        "p_conv.weight",
        "p_conv.bias",
    ]
    assert "conv.0.bias" in AKConv(3, 4, 3, bias=True).state_dict()


def test_offset_branch_starts_at_zero_weight():
    assert AKConv(3, 4, 5).p_conv.weight.abs().sum() == 0


@pytest.mark.parametrize("kwargs", [{"num_param": 0}, {"num_param": 3, "indexing": "yx"}])
def test_invalid_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        AKConv(3, 4, **kwargs)


@pytest.mark.skipif(not (SEED_DIR / "akconv_seed.py").exists(), reason="../shared/seed is not beside the repo")
@pytest.mark.parametrize("num_param,stride,shape", [(3, 2, (12, 12)), (5, 1, (7, 10)), (9, 2, (9, 6)), (1, 1, (5, 5))])
def test_xy_reproduces_the_seed_module(num_param, stride, shape):
    sys.path.insert(0, str(SEED_DIR))
    try:
        from akconv_seed import AKConv as SeedAKConv
    finally:
        sys.path.remove(str(SEED_DIR))
    torch.manual_seed(1)
    seed = SeedAKConv(3, 4, num_param, stride)
    torch.nn.init.normal_(seed.p_conv.weight, std=0.5)
    ours = AKConv(3, 4, num_param, stride, indexing="xy")
    ours.load_state_dict(seed.state_dict())
    x = torch.randn(2, 3, *shape) * 2
    for mode, rtol in (("train", 1e-6), ("eval", 1e-4)):
        outputs, grads = [], []
        for module in (seed, ours):
            module.train(mode == "train")
            inputs = x.clone().requires_grad_()
            out = module(inputs)
            out.square().sum().backward()
            outputs.append(out)
            grads.append((inputs.grad, module.p_conv.weight.grad.clone(), module.conv[0].weight.grad.clone()))
            module.zero_grad()
        torch.testing.assert_close(outputs[1], outputs[0], rtol=rtol, atol=1e-5)
        for ours_grad, seed_grad in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(ours_grad, seed_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_path_on_cuda_matches_the_cpu(dtype):
    layer = make_layer(c1=16, c2=32, num_param=3, stride=2).eval()
    x = torch.randn(2, 16, 40, 48)
    with torch.no_grad():
        expected = layer(x)
        got = layer.to("cuda", dtype)(x.to("cuda", dtype)).float().cpu()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
