"""Mask builders for block-sparse video attention, checked against brute-force Python definitions."""

import itertools
import math

import pytest
import torch

from kdlib.kernels.masks import (
    _block_mean,
    adaptive_block_mask,
    from_tile_order,
    inverse_order,
    mask_density,
    tile_order,
    tile_window_mask,
    to_tile_order,
)

GRIDS_TILES = [((4, 6, 8), (2, 3, 4)), ((3, 4, 4), (1, 4, 4)), ((2, 2, 2), (1, 1, 1)), ((5, 6, 6), (5, 2, 3))]


# ---------------------------------------------------------------------------------------------
# tile_order


@pytest.mark.parametrize("grid,tile", GRIDS_TILES)
def test_tile_order_is_a_permutation_with_contiguous_raster_tiles(grid, tile):
    (T, H, W), (tt, th, tw) = grid, tile
    perm = tile_order(grid, tile)
    n, vol = T * H * W, tt * th * tw
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))

    t, h, w = perm // (H * W), perm // W % H, perm % W
    tile_coords = torch.stack([t // tt, h // th, w // tw], dim=-1).view(n // vol, vol, 3)
    in_tile = ((t % tt) * th + h % th) * tw + w % tw
    # Each run of `vol` tokens is one tile ...
    assert (tile_coords == tile_coords[:, :1]).all()
    # ... tiles come in raster order over the tile grid ...
    expected = list(itertools.product(range(T // tt), range(H // th), range(W // tw)))
    assert tile_coords[:, 0].tolist() == [list(c) for c in expected]
    # ... and tokens within a tile in raster order.
    assert torch.equal(in_tile.view(-1, vol), torch.arange(vol).expand(n // vol, vol))


def test_inverse_order_round_trips_both_layouts():
    grid, tile = (4, 6, 8), (2, 3, 2)
    perm = tile_order(grid, tile)
    n = math.prod(grid)
    assert torch.equal(inverse_order(perm)[perm], torch.arange(n))
    x4 = torch.randn(2, 3, n, 5)
    x3 = torch.randn(2, n, 7)
    for x, dim in ((x4, -2), (x3, 1)):
        tiled = to_tile_order(x, perm, dim=dim)
        assert torch.equal(tiled, x.index_select(dim, perm))
        assert torch.equal(from_tile_order(tiled, perm, dim=dim), x)


def test_tile_order_rejects_a_grid_the_tile_does_not_divide():
    with pytest.raises(ValueError) as err:
        tile_order((4, 6, 8), (3, 3, 4))
    msg = str(err.value)
    assert "(4, 6, 8)" in msg and "(3, 3, 4)" in msg and "pad" in msg and "(6, 6, 8)" in msg
    with pytest.raises(ValueError, match="grid must be"):
        tile_order((4, 6), (1, 1, 1))


# ---------------------------------------------------------------------------------------------
# tile_window_mask


def brute_tile_window(grid, tile, window, sink):
    """Tile mask [M, M] by the STA rule, written as "clamp the window's centre into the grid"."""
    ntiles = [g // t for g, t in zip(grid, tile)]
    coords = list(itertools.product(*map(range, ntiles)))
    rows = []
    for qc in coords:
        row = []
        for j, kc in enumerate(coords):
            inside = True
            for a, b, w, n in zip(qc, kc, window, ntiles):
                if w < n:
                    centre = min(max(a, w // 2), n - 1 - w // 2)
                    inside &= abs(b - centre) <= w // 2
            row.append(inside or j < sink)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def brute_blocks(tile_mask, vol, block):
    """Token-level definition: block pair kept iff any token pair's tiles are kept."""
    n = tile_mask.shape[0] * vol
    m = -(-n // block)
    out = torch.zeros(m, m, dtype=torch.bool)
    for i in range(m):
        for j in range(m):
            qt = {t // vol for t in range(i * block, min((i + 1) * block, n))}
            kt = {t // vol for t in range(j * block, min((j + 1) * block, n))}
            out[i, j] = any(tile_mask[a, b] for a in qt for b in kt)
    return out


WINDOW_CASES = [
    ((4, 6, 8), (1, 2, 2), (3, 3, 3)),  # tile grid (4, 3, 4): borders shift the window
    ((4, 6, 8), (1, 2, 2), (1, 1, 1)),  # diagonal only
    ((4, 6, 8), (1, 2, 2), (5, 3, 1)),  # window 5 > 4 tiles in t: all frames
    ((4, 6, 8), (1, 2, 2), (9, 9, 9)),  # window >= grid: full attention
    ((6, 4, 4), (2, 2, 2), (3, 1, 3)),
    ((5, 4, 7), (1, 1, 1), (3, 3, 5)),
]


@pytest.mark.parametrize("grid,tile,window", WINDOW_CASES)
@pytest.mark.parametrize("sink", [0, 2, "frame"])
def test_tile_window_mask_matches_brute_force(grid, tile, window, sink):
    ntiles = [g // t for g, t in zip(grid, tile)]
    if sink == "frame":  # the first tile-row of frames: Efficient-vDiT's global first frame
        sink = ntiles[1] * ntiles[2]
    mask = tile_window_mask(grid, tile, window, sink_tiles=sink)
    ref = brute_tile_window(grid, tile, window, sink)
    m = math.prod(ntiles)
    assert mask.shape == (1, 1, m, m) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], ref)

    in_window = brute_tile_window(grid, tile, window, 0)
    per_row = math.prod(min(w, n) for w, n in zip(window, ntiles))
    assert (in_window.sum(1) == per_row).all()
    extra_sinks = (~in_window[:, :sink]).sum(1)
    assert torch.equal(mask[0, 0].sum(1), per_row + extra_sinks)


def test_tile_window_mask_is_the_plain_window_away_from_borders():
    grid, tile, window = (5, 5, 5), (1, 1, 1), (3, 3, 3)
    mask = tile_window_mask(grid, tile, window)[0, 0].view(5, 5, 5, 5, 5, 5)
    c = torch.arange(5)
    near = (c[:, None] - c[None, :]).abs() <= 1
    assert torch.equal(mask[2, 2, 2], near[2][:, None, None] & near[2][None, :, None] & near[2][None, None, :])
    # At the border the window is shifted inside: tile 0 attends 0, 1, 2 (not -1, 0, 1).
    assert mask[0, 2, 2, :, 2, 2].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize(
    "grid,tile,window,block",
    [
        ((4, 8, 8), (2, 4, 4), (1, 3, 1), 16),  # tile volume 32 = 2 blocks of 16
        ((4, 8, 8), (2, 4, 4), (1, 3, 1), 8),  # 4 blocks per tile
        ((3, 2, 2), (1, 2, 2), (1, 1, 1), 8),  # 2 tiles per block, 3 tiles: short last block
        ((5, 4, 4), (1, 2, 2), (3, 1, 1), 12),  # 3 tiles per block, 20 tiles: short last block
    ],
)
def test_tile_window_mask_block_size_split_and_merge(grid, tile, window, block):
    vol = math.prod(tile)
    mask = tile_window_mask(grid, tile, window, sink_tiles=1, block_size=block)
    ref = brute_blocks(brute_tile_window(grid, tile, window, 1), vol, block)
    m = -(-math.prod(grid) // block)
    assert mask.shape == (1, 1, m, m)
    assert torch.equal(mask[0, 0], ref)
    assert torch.equal(tile_window_mask(grid, tile, window, block_size=vol), tile_window_mask(grid, tile, window))


def test_tile_window_mask_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"not divisible by tile \(2, 4, 4\)"):
        tile_window_mask((3, 8, 8), (2, 4, 4), 3)
    with pytest.raises(ValueError, match=r"window \(3, 2, 3\) must be odd"):
        tile_window_mask((4, 8, 8), (2, 4, 4), (3, 2, 3))
    with pytest.raises(ValueError, match="window must be a positive int"):
        tile_window_mask((4, 8, 8), (2, 4, 4), (3, 0, 3))
    with pytest.raises(ValueError, match="block_size 24 and tile volume 32 must divide one another"):
        tile_window_mask((4, 8, 8), (2, 4, 4), 3, block_size=24)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        tile_window_mask((4, 8, 8), (2, 4, 4), 3, block_size=0)
    with pytest.raises(ValueError, match=r"sink_tiles must be in \[0, 8\]"):
        tile_window_mask((4, 8, 8), (2, 4, 4), 3, sink_tiles=9)


def test_mask_density():
    assert mask_density(torch.eye(4, dtype=torch.bool)[None, None]) == 0.25
    full = tile_window_mask((2, 4, 4), (1, 2, 2), 9)
    assert mask_density(full) == 1.0


# ---------------------------------------------------------------------------------------------
# adaptive_block_mask


def brute_pool(x, block):
    """x [B, H, N, D] → [B, H, M, D] float64, one block at a time."""
    n = x.shape[2]
    return torch.stack([x[:, :, s : s + block].double().mean(2) for s in range(0, n, block)], dim=2)


def brute_scores(q, k, bq, bk):
    return brute_pool(q, bq) @ brute_pool(k, bk).transpose(-1, -2) / math.sqrt(q.shape[-1])


def rand_qk(nq=100, nk=100, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, nq, d, generator=g), torch.randn(2, 3, nk, d, generator=g)


def test_block_mean_averages_only_valid_tokens_of_the_last_block():
    q, _ = rand_qk(nq=100)
    for block in (16, 25, 100, 128):
        torch.testing.assert_close(_block_mean(q, block), brute_pool(q, block).float())
    assert _block_mean(q.half(), 16).dtype == torch.float32


@pytest.mark.parametrize("block,nk", [(16, 100), ((16, 32), 90), (128, 300)])
def test_ratio_mode_matches_topk_reference(block, nk):
    q, k = rand_qk(nq=100, nk=nk, seed=1)
    bq, bk = (block, block) if isinstance(block, int) else block
    keep = 0.3
    mask = adaptive_block_mask(q, k, block_size=block, keep=keep, keep_diagonal=False)
    scores = brute_scores(q, k, bq, bk)
    mq, mk = scores.shape[-2:]
    assert mask.shape == (2, 3, mq, mk) and mask.dtype == torch.bool
    top = math.ceil(keep * mk)
    ref = torch.zeros_like(mask).scatter_(-1, scores.topk(top, dim=-1).indices, True)
    assert torch.equal(mask, ref)
    assert (mask.sum(-1) == top).all()


def test_mass_mode_matches_cumulative_softmax_reference():
    q, k = rand_qk(nq=160, nk=160, seed=2)
    q, k = 3 * q, 3 * k  # peakier scores, so the kept set size varies by row
    keep = 0.7
    mask = adaptive_block_mask(q, k, block_size=16, keep=keep, mode="mass", keep_diagonal=False)
    probs = brute_scores(q, k, 16, 16).softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # Smallest prefix whose mass reaches keep: count the blocks before it plus the one that crosses.
    count = (sorted_p.cumsum(-1) < keep).sum(-1, keepdim=True) + 1
    ranks = torch.arange(probs.shape[-1]).expand_as(probs)
    ref = torch.zeros_like(mask).scatter_(-1, order, ranks < count)
    assert torch.equal(mask, ref)
    assert len(set(mask.sum(-1).flatten().tolist())) > 1


@pytest.mark.parametrize("mode", ["ratio", "mass"])
def test_diagonal_and_sinks_always_kept(mode):
    q, k = rand_qk(nq=150, nk=150, seed=3)
    mask = adaptive_block_mask(q, k, block_size=16, keep=0.05, mode=mode, keep_diagonal=True, sink_blocks=2)
    m = mask.shape[-1]
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert mask[..., :2].all()
    # The diagonal and the sinks are added on top of the selection on merit.
    bare = adaptive_block_mask(q, k, block_size=16, keep=0.05, mode=mode, keep_diagonal=False)
    eye = torch.eye(m, dtype=torch.bool)
    assert not torch.equal(bare | eye, bare)  # the diagonal was not all selected on merit
    expected = bare | eye
    expected[..., :2] = True
    assert torch.equal(mask, expected)


def test_planted_block_pair_is_selected():
    g = torch.Generator().manual_seed(4)
    q = 0.01 * torch.randn(1, 2, 128, 32, generator=g)
    k = 0.01 * torch.randn(1, 2, 128, 32, generator=g)
    u = torch.randn(32, generator=g)
    q[:, :, 3 * 16 : 4 * 16] += u  # query block 3 and key block 5 share a strong direction
    k[:, :, 5 * 16 : 6 * 16] += u
    mask = adaptive_block_mask(q, k, block_size=16, keep=1 / 8, keep_diagonal=False)
    assert mask[:, :, 3].sum(-1).tolist() == [[1, 1]]
    assert mask[:, :, 3, 5].all()


def test_adaptive_block_mask_records_no_graph_and_takes_half_inputs():
    q, k = rand_qk(seed=5)
    q.requires_grad_(True)
    mask = adaptive_block_mask(q, k, block_size=32)
    assert not mask.requires_grad
    half = adaptive_block_mask(q.detach().half(), k.half(), block_size=32, keep_diagonal=False)
    ref = adaptive_block_mask(q.detach().half().float(), k.half().float(), block_size=32, keep_diagonal=False)
    assert torch.equal(half, ref)


def test_adaptive_block_mask_errors_say_what_is_wrong():
    q, k = rand_qk()
    with pytest.raises(ValueError, match="q must have 4 dims"):
        adaptive_block_mask(q[0], k)
    with pytest.raises(ValueError, match="must share B, H and D"):
        adaptive_block_mask(q, k[:, :2])
    with pytest.raises(ValueError, match="must share B, H and D"):
        adaptive_block_mask(q, k[..., :8])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
            adaptive_block_mask(q, k, keep=bad)
    with pytest.raises(ValueError, match="unknown mode 'topk'"):
        adaptive_block_mask(q, k, mode="topk")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        adaptive_block_mask(q, k, block_size=(16, 0))
    with pytest.raises(ValueError, match=r"sink_blocks must be in \[0, 1\]"):
        adaptive_block_mask(q, k, sink_blocks=2)
