"""Position tables of the compressor against their PyTorch/MAE definitions."""

from __future__ import annotations

import numpy as np
import pytest

from mmlm.models.positions import (adaptive_avg_pool_matrix, key_position_table, matryoshka_order, sincos_2d)

torch = pytest.importorskip("torch")


def mae_sincos(dim: int, grid: int) -> np.ndarray:
    """The MAE reference as written in the LLaVA-Mini / MiniCPM resampler."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


@pytest.mark.parametrize("dim,grid", [(64, 1), (64, 3), (1024, 8)])
def test_sincos_matches_mae(dim, grid):
    np.testing.assert_allclose(sincos_2d(dim, grid), mae_sincos(dim, grid), atol=1e-6)


@pytest.mark.parametrize("query_grid,key_grid", [(1, 24), (3, 24), (8, 24), (8, 48), (2, 7), (4, 4)])
def test_key_table_is_torch_bicubic(query_grid, key_grid):
    dim = 32
    table = torch.tensor(sincos_2d(dim, query_grid)).reshape(1, query_grid, query_grid, dim).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(table, size=(key_grid, key_grid), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, dim).numpy()
    np.testing.assert_allclose(key_position_table(dim, query_grid, key_grid), ref, atol=2e-6)


def test_single_query_key_table_is_constant():
    table = key_position_table(16, 1, 24)
    np.testing.assert_allclose(table, np.broadcast_to(sincos_2d(16, 1), table.shape), atol=0)


def test_matryoshka_prefixes_are_nested_lattices():
    order = matryoshka_order(8, (1, 4, 16, 64))
    assert sorted(order.tolist()) == list(range(64))
    cells = [divmod(int(i), 8) for i in order]
    assert cells[0] == (4, 4)  # one token: the centre
    assert set(cells[:4]) == {(r, c) for r in (0, 4) for c in (0, 4)}
    assert set(cells[:16]) == {(r, c) for r in range(0, 8, 2) for c in range(0, 8, 2)}


def test_identity_order_without_budgets():
    np.testing.assert_array_equal(matryoshka_order(3, ()), np.arange(9))


def test_adaptive_pool_matrix_matches_torch():
    x = np.random.default_rng(0).normal(size=(1, 5, 7, 7)).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x), 3).reshape(5, 9).T.numpy()
    ours = adaptive_avg_pool_matrix(7, 3) @ x.reshape(5, 49).T
    np.testing.assert_allclose(ours, ref, atol=1e-6)
