"""Fixed 2-D position tables of the query compressor (numpy, built at trace time).

* `sincos_2d(dim, grid)`: the MAE table used by the LLaVA-Mini resampler: the
  first half of the channels encodes the column (x), the second half the row
  (y), each half `[sin | cos]` with frequencies 1/10000^(2i/(dim/2)).
* `key_position_table(dim, query_grid, key_grid)`: the C x C table stretched
  onto the key grid with `bicubic_matrix`, what torch's
  `F.interpolate(mode="bicubic", align_corners=False)` computes (cubic
  convolution a=-0.75, clamped borders, no antialiasing), which differs from
  `jax.image.resize` (a=-0.5). `resize_position_table` does the same to a
  stored table (a release's, read from its weights) on device.
* `matryoshka_order(grid, budgets)`: the query permutation that makes square
  prefixes spatially meaningful (see the function).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmlm.models.config import is_square


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=64)
def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) float32, rows in raster order (row-major)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos table needs a width divisible by 4, got {dim}")
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], axis=1)
    return emb.astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's 4-tap cubic convolution coefficients for fractional offset t."""

    def conv1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def conv2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch bicubic interpolation along one axis (align_corners=False)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5  # no clamp for cubic
    base = np.floor(src)
    w = _cubic_weights(src - base)
    mat = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(mat, (np.arange(out_size), idx), w[:, tap])
    return mat


def resize_position_table(table: jax.Array, query_grid: int, key_grid: int) -> jax.Array:
    """A stored (query_grid^2, D) table resized to the key grid with torch's bicubic kernel, fp32."""
    table = jnp.asarray(table, jnp.float32)
    if key_grid == query_grid:
        return table
    m = jnp.asarray(bicubic_matrix(query_grid, key_grid), jnp.float32)
    grid = table.reshape(query_grid, query_grid, -1)
    return jnp.einsum("yi,xj,ijd->yxd", m, m, grid).reshape(key_grid * key_grid, -1)


@functools.lru_cache(maxsize=64)
def key_position_table(dim: int, query_grid: int, key_grid: int) -> np.ndarray:
    """The C x C sin-cos table resized to the key grid: (key_grid^2, dim) float32."""
    table = sincos_2d(dim, query_grid).reshape(query_grid, query_grid, dim).astype(np.float64)
    if key_grid == query_grid:
        return sincos_2d(dim, query_grid)
    m = bicubic_matrix(query_grid, key_grid)
    out = np.einsum("yi,xj,ijd->yxd", m, m, table)
    return out.reshape(key_grid * key_grid, dim).astype(np.float32)


@functools.lru_cache(maxsize=64)
def matryoshka_order(grid: int, budgets: tuple[int, ...]) -> np.ndarray:
    """Permutation of the C x C query cells, coarse to fine.

    Scheme: every square budget s^2 with s dividing C defines a lattice of
    stride C/s through the centre cell (C//2, C//2). A cell's level is the
    smallest such s whose lattice contains it (C itself is always a level);
    cells are ordered by level, then raster. Because the lattices are nested
    whenever consecutive sides divide each other (1, 2, 4, 8 for M=64), the
    first s^2 queries are exactly the stride-C/s lattice: an evenly spaced
    s x s sub-grid of the query grid, so a 1-token budget gets the centre
    cell, 4 tokens one cell per quadrant, 16 one per 2x2 block, and so on.
    Non-square budgets still take a prefix (the queries never attend to each
    other, so any prefix is exact); it is merely not a full lattice.
    """
    sides = sorted({math.isqrt(b) for b in budgets if is_square(b)} | {grid})
    sides = [s for s in sides if grid % s == 0]
    centre = grid // 2
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    level = np.full((grid, grid), len(sides), np.int64)
    for i, s in reversed(list(enumerate(sides))):
        stride = grid // s
        on = ((rows - centre) % stride == 0) & ((cols - centre) % stride == 0)
        level = np.where(on, i, level)
    raster = rows * grid + cols
    return np.lexsort((raster.reshape(-1), level.reshape(-1))).astype(np.int64)


def adaptive_avg_pool_matrix(in_grid: int, out_grid: int) -> np.ndarray:
    """(out^2, in^2) matrix of torch `adaptive_avg_pool2d` on a square grid."""
    m = np.zeros((out_grid, in_grid), np.float64)
    for i in range(out_grid):
        start, end = (i * in_grid) // out_grid, -((-(i + 1) * in_grid) // out_grid)
        m[i, start:end] = 1.0 / (end - start)
    return np.einsum("yi,xj->yxij", m, m).reshape(out_grid**2, in_grid**2).astype(np.float32)
