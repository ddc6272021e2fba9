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


def _border_weight(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Per-axis factor of the seed's bilinear rule: 2 where ``coord`` is outside ``[0, size - 1)``, else 1."""
    outside = (coord < 0) | (coord >= size - 1)
    return 1 + outside.to(coord.dtype)


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
        _, _, out_h, out_w = offset.shape
        # Tracing (torch.compile, ONNX export) builds the grid in the graph: a cached traced tensor would leak out.
        grid = base_grid.__wrapped__ if torch.compiler.is_compiling() else base_grid
        coords = grid(self.num_param, self.stride, out_h, out_w, self.indexing, offset.device, offset.dtype)
        coords = coords + offset  # (B, 2N, H', W'): rows then columns, input pixels
        if self.training:
            return self._forward_exact(x, coords)
        return self._forward_fast(x, coords)

    def _forward_exact(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The seed's arithmetic (floor, clamp, four corner reads, bilinear weights), used for training.

        Corners are read as rows of a channels-last (B·H·W, C) view with one int64 index of B·H'·N·W' entries per
        corner (never one per channel), so the backward is a row-wise ``index_add``. Samples come out in the
        (B, C, H', N, W') order that the seed's ``rearrange('b c h w n -> b c (h n) w')`` produces.
        """
        batch, channels, height, width = x.shape
        n = self.num_param
        coords = coords.view(batch, 2, n, *coords.shape[2:]).transpose(2, 3)  # (B, 2, H', N, W')
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

    def _forward_fast(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Inference path: one ``grid_sample`` and one 1×1 convolution, same outputs as the exact path.

        ``grid_sample`` with border padding clamps coordinates like the seed does; the seed's doubled weights
        outside ``[0, size - 1)`` are applied as a per-sample factor. Samples are laid out (B, C, N, H', W') so that
        the (N, 1) mixing convolution becomes a 1×1 convolution over C·N channels (weight index c·N + n).
        """
        batch, channels, height, width = x.shape
        n = self.num_param
        out_h, out_w = coords.shape[2:]
        rows = coords[:, :n].reshape(batch, n * out_h, out_w)  # (B, N·H', W')
        cols = coords[:, n:].reshape(batch, n * out_h, out_w)
        factor = _border_weight(rows, height) * _border_weight(cols, width)  # (B, N·H', W')
        grid = torch.stack(
            [cols * (2 / max(width - 1, 1)) - 1, rows * (2 / max(height - 1, 1)) - 1], dim=-1
        )  # (B, N·H', W', 2), normalised (x, y)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
        sampled = (sampled * factor.unsqueeze(1)).view(batch, channels * n, out_h, out_w)  # (B, C·N, H', W')
        mix, norm, act = self.conv
        weight = mix.weight.reshape(mix.out_channels, -1, 1, 1)  # (c2, C·N, 1, 1), independent of x's shape
        return act(norm(F.conv2d(sampled, weight, mix.bias)))  # (B, c2, H', W')

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
