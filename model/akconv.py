"""AKConv: Alterable Kernel Convolution (Zhang et al., arXiv 2311.11587).

A convolution with an arbitrary number of sampling points ``num_param`` (N) instead of a k×k square. A 3×3
convolution (``p_conv``) predicts 2N offsets per output position; the features are resampled by bilinear
interpolation at ``p_0 + p_n + offset`` and the N samples of each position are mixed by a convolution with
kernel (N, 1) and stride (N, 1), followed by BatchNorm and SiLU.

This module keeps the parameters and ``state_dict`` keys of the module in the seed recipe (``p_conv.*``,
``conv.0.*``, ``conv.1.*``) so weights move between the two with ``load_state_dict``, and offers the two
sampling geometries found in the wild:

- ``indexing="xy"``: the seed recipe's code, which builds its grids with ``torch.meshgrid(..., indexing="xy")``.
  For a square output the base grid is transposed (output (a, b) samples around input row b·stride, column
  a·stride); for a non-square output the coordinates are scrambled. Checkpoints trained with that code expect
  exactly this, so it is reproduced as is.
- ``indexing="ij"``: the official repository's code (CV-ZhangXin/AKConv, ``torch.meshgrid`` default). Output
  (a, b) samples around input (a·stride, b·stride), where its offsets were predicted, and the N initial points are
  ordered row-major. The geometrically correct variant; used for models trained by this project.

Both keep the original bilinear border rule: coordinates are clamped to the image *after* the corner indices
are clamped, so a coordinate outside ``[0, size - 1)`` on one axis reads the border pixel with weight 2 on that
axis (4 at a corner). Trained weights expect it.

The seed registered a full backward hook ``_set_lr`` on ``p_conv`` meant to scale its gradients by 0.1; it
returned nothing, so it never changed a gradient. It is not carried over: the offset branch trains at the
model's learning rate, as it did in the seed recipe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Indexing = Literal["xy", "ij"]


def initial_points(num_param: int, indexing: Indexing) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial sampling points of the kernel, relative to its top-left point.

    ``round(sqrt(N))`` columns, as many full rows as fit, and a last row with the remainder. With ``"ij"`` the
    points are ordered row-major (point n sits at (n // cols, n % cols)); with ``"xy"`` the full rows are ordered
    column-major, as the seed's code does.

    Returns:
        (rows, cols): two int64 tensors of shape (N,).
    """
    columns = round(math.sqrt(num_param))
    full_rows, remainder = divmod(num_param, columns)
    rows, cols = torch.meshgrid(torch.arange(full_rows), torch.arange(columns), indexing=indexing)
    rows, cols = rows.flatten(), cols.flatten()
    if remainder:
        rows = torch.cat([rows, torch.full((remainder,), full_rows)])
        cols = torch.cat([cols, torch.arange(remainder)])
    return rows, cols


@functools.lru_cache(maxsize=64)
def base_grid(
    num_param: int, stride: int, height: int, width: int, indexing: Indexing, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Sampling coordinates with zero offsets, ``p_0 + p_n``, cached per shape so no call rebuilds them.

    Args:
        height, width: size of the output grid (the offset map), in output positions.

    Returns:
        Tensor of shape (1, 2N, height, width): rows of the N points in channels [0, N), columns in [N, 2N),
        in input pixels.
    """
    point_rows, point_cols = initial_points(num_param, indexing)
    grid_rows, grid_cols = torch.meshgrid(
        torch.arange(0, height * stride, stride), torch.arange(0, width * stride, stride), indexing=indexing
    )
    # "xy" yields (width, height) grids; the seed reads them back as (height, width), hence reshape, not transpose.
    grid_rows = grid_rows.reshape(1, 1, height, width)
    grid_cols = grid_cols.reshape(1, 1, height, width)
    rows = grid_rows + point_rows.view(1, num_param, 1, 1)
    cols = grid_cols + point_cols.view(1, num_param, 1, 1)
    return torch.cat([rows, cols], dim=1).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def sample_grid(
    num_param: int, stride: int, height: int, width: int, indexing: Indexing, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``base_grid`` laid out for the inference path, cached per shape.

    Returns:
        Tensor of shape (2, 1, height, width, N): rows, then columns, each in the (B, H', W', N) order of the samples.
    """
    grid = base_grid.__wrapped__(num_param, stride, height, width, indexing, device, dtype)  # (1, 2N, H', W')
    return grid.view(2, num_param, 1, height, width).permute(0, 2, 3, 4, 1).contiguous()


def _cached(grid_function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``grid_function``, uncached while tracing (torch.compile, ONNX export): a cached traced tensor would leak out."""
    return grid_function.__wrapped__ if torch.compiler.is_compiling() else grid_function


def _axis_reads(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed's bilinear rule on one axis: the two pixels each coordinate reads and their weights.

    As in the seed, both corner indices are clamped to ``[0, size - 1]`` and so is the coordinate, then the weights
    are ``1 + (near - coord)`` and ``1 - (far - coord)``. Inside ``[0, size - 1)`` that is plain linear
    interpolation; outside, both corners are the border pixel and both weights are 1: the seed's factor 2 comes out
    of the weights themselves, with no pass of its own.

    Args:
        coord: coordinates in input pixels, any shape.
        size: length of the input along this axis.

    Returns:
        (near, far, near_weight, far_weight), each of ``coord``'s shape and dtype.
    """
    floor = coord.detach().floor()  # corners carry no gradient, as in the seed
    near = floor.clamp(0, size - 1)
    far = floor.add_(1).clamp_(0, size - 1)
    coord = coord.clamp(0, size - 1)
    return near, far, (near - coord).add_(1), (coord - far).add_(1)


def corner_reads(coords: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four weighted pixel reads of each sample, for a weighted gather from a (B·H·W, C) pixel view.

    Args:
        coords: (2, B, H', W', N) rows, then columns, of the samples in input pixels.
        height, width: size of the input.

    Returns:
        (index, weight), both (B·H'·W'·N, 4): int64 rows of the (B·H·W, C) view and their weights, for the corners
        (top, left), (top, right), (bottom, left), (bottom, right). At the border the weights sum to 2 or 4.
    """
    batch = coords.shape[1]
    top, bottom, top_weight, bottom_weight = _axis_reads(coords[0], height)  # each (B, H', W', N)
    left, right, left_weight, right_weight = _axis_reads(coords[1], width)
    image_start = torch.arange(0, batch * height * width, height * width, device=coords.device).view(batch, 1, 1, 1)
    top = top.long().mul_(width).add_(image_start)
    bottom = bottom.long().mul_(width).add_(image_start)
    left, right = left.long(), right.long()
    index = coords.new_empty((*coords.shape[1:], 4), dtype=torch.long)  # (B, H', W', N, 4)
    # Indices are written in place into the last axis: one pass per corner, not a temporary per corner and a stack.
    # (The weights are stacked: ``out=`` has no autograd, and gradients reach ``p_conv`` through them.)
    for k, (row_start, col) in enumerate(((top, left), (top, right), (bottom, left), (bottom, right))):
        torch.add(row_start, col, out=index[..., k])
    weight = torch.stack(
        [
            top_weight * left_weight,
            top_weight * right_weight,
            bottom_weight * left_weight,
            bottom_weight * right_weight,
        ],
        dim=-1,
    )  # (B, H', W', N, 4)
    return index.view(-1, 4), weight.view(-1, 4)


class AKConv(nn.Module):
    """Alterable Kernel Convolution with a seed-compatible ``state_dict``.

    Args:
        c1: input channels.
        c2: output channels.
        num_param: number of sampling points N (>= 1).
        stride: stride of the offset convolution, hence of the output grid.
        bias: whether the (N, 1) mixing convolution has a bias (the seed passes ``None``, i.e. no bias).
        indexing: sampling geometry, ``"xy"`` (seed recipe) or ``"ij"`` (official repository, correct); see the
            module docstring.

    Shapes:
        input (B, c1, H, W) -> output (B, c2, H', W') with H' = (H - 1) // stride + 1, W' likewise.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        num_param: int,
        stride: int = 1,
        bias: bool | None = None,
        indexing: Indexing = "xy",
    ) -> None:
        super().__init__()
        if num_param < 1:
            raise ValueError(f"num_param must be >= 1, got {num_param}")
        if indexing not in ("xy", "ij"):
            raise ValueError(f"indexing must be 'xy' or 'ij', got {indexing!r}")
        self.num_param = num_param
        self.stride = stride
        self.indexing = indexing
        self.conv = nn.Sequential(
            nn.Conv2d(c1, c2, kernel_size=(num_param, 1), stride=(num_param, 1), bias=bool(bias)),
            nn.BatchNorm2d(c2),
            nn.SiLU(),
        )
        self.p_conv = nn.Conv2d(c1, 2 * num_param, kernel_size=3, padding=1, stride=stride)
        nn.init.constant_(self.p_conv.weight, 0)

    def extra_repr(self) -> str:
        return f"num_param={self.num_param}, stride={self.stride}, indexing={self.indexing!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, c1, H, W). Returns: (B, c2, H', W')."""
        offset = self.p_conv(x)  # (B, 2N, H', W')
        if self.training:
            return self._forward_exact(x, offset)
        return self._forward_fast(x, offset)

    def _forward_exact(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The seed's arithmetic (floor, clamp, four corner reads, bilinear weights), used for training.

        Corners are read as rows of a channels-last (B·H·W, C) view with one int64 index of B·H'·N·W' entries per
        corner (never one per channel), so the backward is a row-wise ``index_add``. Samples come out in the
        (B, C, H', N, W') order that the seed's ``rearrange('b c h w n -> b c (h n) w')`` produces.
        """
        batch, channels, height, width = x.shape
        n = self.num_param
        _, _, out_h, out_w = offset.shape
        grid = _cached(base_grid)(n, self.stride, out_h, out_w, self.indexing, offset.device, offset.dtype)
        coords = grid + offset  # (B, 2N, H', W'): rows then columns, input pixels
        coords = coords.view(batch, 2, n, out_h, out_w).transpose(2, 3)  # (B, 2, H', N, W')
        rows, cols = coords[:, 0].unsqueeze(-1), coords[:, 1].unsqueeze(-1)  # (B, H', N, W', 1)

        floor_rows, floor_cols = rows.detach().floor(), cols.detach().floor()
        top = floor_rows.clamp(0, height - 1)
        bottom = (floor_rows + 1).clamp(0, height - 1)
        left = floor_cols.clamp(0, width - 1)
        right = (floor_cols + 1).clamp(0, width - 1)
        rows = rows.clamp(0, height - 1)
        cols = cols.clamp(0, width - 1)

        pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # (B·H·W, C)
        image_start = (torch.arange(batch, device=x.device) * (height * width)).view(batch, 1, 1, 1, 1)

        def corner(corner_rows: torch.Tensor, corner_cols: torch.Tensor) -> torch.Tensor:
            index = image_start + corner_rows.long() * width + corner_cols.long()  # (B, H', N, W', 1)
            return pixels.index_select(0, index.flatten()).view(*index.shape[:4], channels)  # (B, H', N, W', C)

        weight_top, weight_bottom = 1 + (top - rows), 1 - (bottom - rows)  # (B, H', N, W', 1)
        weight_left, weight_right = 1 + (left - cols), 1 - (right - cols)
        sampled = (
            (weight_top * weight_left) * corner(top, left)
            + (weight_bottom * weight_right) * corner(bottom, right)
            + (weight_top * weight_right) * corner(top, right)
            + (weight_bottom * weight_left) * corner(bottom, left)
        )  # (B, H', N, W', C)
        sampled = sampled.permute(0, 4, 1, 2, 3).reshape(batch, channels, -1, sampled.shape[3])  # (B, C, H'·N, W')
        return self.conv(sampled)  # (B, c2, H', W')

    def _forward_fast(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Inference path: one weighted gather and one matrix product, same outputs as the exact path.

        ``embedding_bag`` reads the four corners of every sample from a channels-last (B·H·W, C) view of ``x`` and
        sums them with the seed's bilinear weights (border factor included, see ``corner_reads``) in one pass. The
        samples come out in (B, H', W', N, C) order, so the (N, 1) mixing convolution is one matrix product over
        N·C whose (B·H'·W', c2) result is the output in channels-last layout, as the model runs.
        """
        batch, channels, height, width = x.shape
        n = self.num_param
        _, _, out_h, out_w = offset.shape
        grid = _cached(sample_grid)(n, self.stride, out_h, out_w, self.indexing, offset.device, offset.dtype)
        coords = grid + offset.view(batch, 2, n, out_h, out_w).permute(1, 0, 3, 4, 2)  # (2, B, H', W', N)
        index, weight = corner_reads(coords, height, width)  # (B·H'·W'·N, 4) each
        pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view when x is channels-last
        samples = F.embedding_bag(index, pixels, per_sample_weights=weight, mode="sum")  # (B·H'·W'·N, C)
        mix, norm, act = self.conv
        mix_weight = mix.weight.squeeze(-1).transpose(1, 2).reshape(mix.out_channels, n * channels)  # (c2, N·C)
        out = F.linear(samples.view(batch * out_h * out_w, n * channels), mix_weight, mix.bias)  # (B·H'·W', c2)
        out = out.view(batch, out_h, out_w, -1).permute(0, 3, 1, 2)  # (B, c2, H', W'), channels-last
        return act(norm(out))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm into the (N, 1) convolution for inference; the module can no longer be trained."""
        mix, norm, act = self.conv
        if isinstance(norm, nn.Identity):
            return
        fused = nn.Conv2d(mix.in_channels, mix.out_channels, mix.kernel_size, mix.stride, bias=True).to(mix.weight)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (c2,)
        fused.weight.copy_(mix.weight * scale.view(-1, 1, 1, 1))
        mix_bias = mix.bias if mix.bias is not None else torch.zeros_like(norm.running_mean)
        fused.bias.copy_((mix_bias - norm.running_mean) * scale + norm.bias)
        self.conv = nn.Sequential(fused.requires_grad_(False), nn.Identity(), act)
