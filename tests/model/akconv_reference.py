"""An independent AKConv reference for the tests: plain loops over output positions, written from the description
of the seed's algorithm (not from its file, nor from ``model.akconv``).

For output position (a, b) and point n the sampling coordinate is ``base + offset``, where, with R full rows of
``cols = round(sqrt(N))`` points and a remainder row:

- "ij": base row = a·s + n // cols, base col = b·s + n % cols (row-major points);
- "xy": the base grid is read from a (W', H')-shaped meshgrid as if it were (H', W'): with k = a·W' + b,
  base row = (k % H')·s + n % R, base col = (k // H')·s + n // R (column-major points);
- the remainder points sit at row R, columns 0, 1, ... in both.

Bilinear rule: q = floor(p); the two corners floor(p) and floor(p) + 1 are clamped to [0, size - 1], p itself is
clamped to [0, size - 1], and the weights are 1 + (q_low - p) and 1 - (q_high - p).
"""

import math

import numpy as np


def base_point(a: int, b: int, n: int, out_h: int, out_w: int, num_param: int, stride: int, indexing: str):
    cols = round(math.sqrt(num_param))
    full_rows = num_param // cols
    if n >= full_rows * cols:
        point_row, point_col = full_rows, n - full_rows * cols
    elif indexing == "ij":
        point_row, point_col = n // cols, n % cols
    else:
        point_row, point_col = n % full_rows, n // full_rows
    if indexing == "ij":
        grid_row, grid_col = a * stride, b * stride
    else:
        k = a * out_w + b
        grid_row, grid_col = (k % out_h) * stride, (k // out_h) * stride
    return grid_row + point_row, grid_col + point_col


def axis_weights(p: float, size: int) -> list[tuple[int, float]]:
    low = math.floor(p)
    high = low + 1
    low_c, high_c = min(max(low, 0), size - 1), min(max(high, 0), size - 1)
    p_c = min(max(p, 0), size - 1)
    return [(low_c, 1 + (low_c - p_c)), (high_c, 1 - (high_c - p_c))]


def sample(x: np.ndarray, offset: np.ndarray, num_param: int, stride: int, indexing: str) -> np.ndarray:
    """x (B, C, H, W), offset (B, 2N, H', W') -> samples (B, C, N, H', W') in float64."""
    batch, channels, height, width = x.shape
    _, _, out_h, out_w = offset.shape
    out = np.zeros((batch, channels, num_param, out_h, out_w))
    for bi in range(batch):
        for a in range(out_h):
            for b in range(out_w):
                for n in range(num_param):
                    row, col = base_point(a, b, n, out_h, out_w, num_param, stride, indexing)
                    p_row = row + float(offset[bi, n, a, b])
                    p_col = col + float(offset[bi, num_param + n, a, b])
                    for r, wr in axis_weights(p_row, height):
                        for c, wc in axis_weights(p_col, width):
                            out[bi, :, n, a, b] += wr * wc * x[bi, :, r, c]
    return out


def akconv_forward(module, x, indexing=None):
    """Full forward of an AKConv-shaped module (p_conv, conv[0..2]) in float64 numpy, via the loop sampler."""
    import torch

    with torch.no_grad():
        offset = module.p_conv(x).double().numpy()
        samples = sample(x.double().numpy(), offset, module.num_param, module.stride, indexing or module.indexing)
        mix = module.conv[0].weight.double().numpy()[..., 0]  # (c2, c1, N)
        mixed = np.einsum("ocn,bcnhw->bohw", mix, samples)
        if module.conv[0].bias is not None:
            mixed += module.conv[0].bias.double().numpy()[None, :, None, None]
        return module.conv[2](module.conv[1](torch.from_numpy(mixed).float()))
