import pytest
import torch

from moe.units import make_grid, patchify, pool_units, unpatchify, valid_points


@pytest.mark.parametrize("h, w, p", [(8, 8, 4), (10, 13, 4), (5, 7, 8), (6, 6, 1)])
def test_roundtrip_and_patch_contents(h, w, p):
    x = torch.randn(2, h, w, 3)
    grid = make_grid(x, p)
    u = patchify(x, grid)
    assert u.shape == (grid.num_units, p * p, 3)
    assert torch.equal(unpatchify(u, grid), x)
    # unit n = (b, i, j) row-major holds exactly the points of that window
    n = 0
    for b in range(2):
        for i in range(grid.n_h):
            for j in range(grid.n_w):
                block = x[b, i * p:(i + 1) * p, j * p:(j + 1) * p]
                unit = u[n].reshape(p, p, 3)[: block.shape[0], : block.shape[1]]
                assert torch.equal(unit, block)
                n += 1


def test_pooling_ignores_padding():
    x = torch.randn(1, 5, 6, 2) + 10.0  # padding zeros would drag the mean toward 0
    grid = make_grid(x, 4)
    pooled = pool_units(patchify(x, grid), grid)
    assert torch.allclose(pooled[0], x[0, :4, :4].reshape(-1, 2).mean(0))
    assert torch.allclose(pooled[3], x[0, 4:5, 4:6].reshape(-1, 2).mean(0))
    assert valid_points(grid, x.device).sum() == 5 * 6


def test_pad_mode_error_names_sizes():
    with pytest.raises(ValueError, match=r"10x13 is not divisible by patch_size=4"):
        make_grid(torch.zeros(1, 10, 13, 3), 4, pad_mode="error")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        make_grid(torch.zeros(10, 13, 3), 4)
