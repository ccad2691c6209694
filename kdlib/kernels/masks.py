"""Block masks for ``block_sparse_attention`` on video tokens.

Two families, both producing a bool ``block_mask [B or 1, H or 1, Mq, Mk]`` where entry
``(i, j)`` says query block i (tokens ``[i*bq, (i+1)*bq)``) attends key block j:

- **Static tile windows** (STA, "Fast Video Generation with Sliding Tile Attention"; the tile
  patterns of Efficient-vDiT). Video tokens arrive in raster order over a ``(T, H, W)`` grid; a
  3D tile of ``(tt, th, tw)`` tokens is scattered across that order. ``tile_order`` gives the
  permutation that makes every tile contiguous, so one tile is one (or a few) attention blocks,
  and ``tile_window_mask`` says which tiles each tile attends.
- **Content-aware selection** (Video-BLADE's Adaptive Block-Sparse Attention):
  ``adaptive_block_mask`` scores block pairs from mean-pooled Q and K and keeps the best ones.

Typical use::

    perm = tile_order(grid, tile, device=q.device)
    q, k, v = (to_tile_order(x, perm) for x in (q, k, v))       # [B, H, N, D], tile-major
    mask = tile_window_mask(grid, tile, window=(3, 3, 3), block_size=128, device=q.device)
    out = from_tile_order(block_sparse_attention(q, k, v, mask, block_size=128), perm)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kdlib.kernels._checks import check_same, check_tensor

_MODES = ("ratio", "mass")


def _triple(op: str, name: str, value: int | Sequence[int]) -> tuple[int, int, int]:
    """An int or a 3-sequence of positive ints, as a 3-tuple."""
    dims = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"{op}: {name} must be a positive int or 3 positive ints (t, h, w), got {value!r}")
    return dims


def _tile_grid(op: str, grid: Sequence[int], tile: int | Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tile dims, tile-grid dims) after checking that the tiles cover the grid exactly."""
    grid = _triple(op, "grid", grid)
    tile = _triple(op, "tile", tile)
    if any(g % t for g, t in zip(grid, tile)):
        raise ValueError(
            f"{op}: grid {grid} (T, H, W) is not divisible by tile {tile}; pad the latent grid to a multiple "
            f"of the tile in every dim (e.g. to {tuple(-(-g // t) * t for g, t in zip(grid, tile))}) or pick "
            "a tile that divides it"
        )
    return tile, tuple(g // t for g, t in zip(grid, tile))


def tile_order(
    grid: Sequence[int], tile: int | Sequence[int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Permutation from raster order over ``grid = (T, H, W)`` to tile-major order.

    Returns ``perm: LongTensor [N]``, ``N = T*H*W``, such that ``x[..., perm, :]`` lists the
    tokens tile by tile: tiles in raster order over the tile grid ``(T/tt, H/th, W/tw)``, tokens
    within a tile in raster order. ``perm[j]`` is the raster index of the j-th token in tile order.
    Every grid dim must be divisible by the matching tile dim (ValueError otherwise).
    """
    (tt, th, tw), (nt, nh, nw) = _tile_grid("tile_order", grid, tile)
    raster = torch.arange(nt * tt * nh * th * nw * tw, device=device).view(nt, tt, nh, th, nw, tw)
    # Tile-grid coordinates outermost, in-tile coordinates innermost.
    return raster.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def inverse_order(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: ``x[..., perm, :][..., inverse_order(perm), :] == x``. perm: [N]."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def to_tile_order(x: torch.Tensor, perm: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Raster → tile-major along ``dim`` (the token dim: -2 fits both [B, H, N, D] and [B, N, C])."""
    return x.index_select(dim, perm)


def from_tile_order(x: torch.Tensor, perm: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Tile-major → raster along ``dim``; undoes ``to_tile_order(x, perm, dim)``."""
    return x.index_select(dim, inverse_order(perm))


def _window_1d(n: int, w: int, device: torch.device | str | None) -> torch.Tensor:
    """bool [n, n]: query tile a attends key tile a' in one dim.

    The window of w tiles centred on a is shifted (not cropped) to stay inside [0, n), as STA
    does at the borders, so every row has exactly min(w, n) True entries.
    """
    pos = torch.arange(n, device=device)
    start = (pos - w // 2).clamp(min=0, max=max(n - w, 0))
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + min(w, n))


def tile_window_mask(
    grid: Sequence[int],
    tile: int | Sequence[int],
    window: int | Sequence[int],
    *,
    sink_tiles: int = 0,
    block_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sliding-tile-window block mask for tile-ordered tokens (see ``tile_order``).

    grid: (T, H, W) tokens; tile: (tt, th, tw) tokens; window: (wt, wh, ww) in tiles, odd.
    Query tile (a, b, c) attends key tile (a', b', c') iff, in every dim, a' lies in the window of
    w tiles centred on a, shifted to lie within the tile grid [0, n) at the borders (STA's border
    rule). Away from the borders this is |a - a'| <= w // 2; everywhere each query tile attends
    exactly prod(min(w, n)) tiles, and w >= 2n - 1 gives full attention.

    sink_tiles: the first ``sink_tiles`` tiles in tile order are attended by every query
    (attention sinks / Efficient-vDiT's global first frame). With tile = (1, H, W) a tile is a
    frame, so ``sink_tiles=1`` makes frame 0 global; with smaller tiles, the first tt frames are
    the first (H/th)*(W/tw) tiles.

    block_size: the kernel's block size in tokens, default the tile volume V = tt*th*tw. If V is a
    multiple of it, each tile is V/block_size consecutive blocks and the mask is expanded. If it
    is a multiple of V, each block holds block_size/V consecutive tiles (the last block possibly
    fewer) and a block pair is kept if any of its tile pairs is kept, a superset of the tile mask.

    Returns bool [1, 1, M, M] with M = ceil(N / block_size), N = T*H*W.
    """
    op = "tile_window_mask"
    tile, ntiles = _tile_grid(op, grid, tile)
    window = _triple(op, "window", window)
    if any(w % 2 == 0 for w in window):
        raise ValueError(f"{op}: window {window} must be odd in every dim so it can be centred on the query tile")
    num_tiles = math.prod(ntiles)
    if not 0 <= sink_tiles <= num_tiles:
        raise ValueError(f"{op}: sink_tiles must be in [0, {num_tiles}] (the number of tiles), got {sink_tiles}")

    # The 3D window is separable: the AND of one 1D window per dim, broadcast to [a, b, c, a', b', c'].
    mt, mh, mw = (_window_1d(n, w, device) for n, w in zip(ntiles, window))
    mask = mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]
    mask = mask.reshape(num_tiles, num_tiles)
    mask[:, :sink_tiles] = True
    return _tiles_to_blocks(op, mask, math.prod(tile), block_size)[None, None]


def _tiles_to_blocks(op: str, mask: torch.Tensor, volume: int, block_size: int | None) -> torch.Tensor:
    """Tile mask [M, M] → block mask for blocks of ``block_size`` tokens (tiles of ``volume``)."""
    if block_size is None or block_size == volume:
        return mask
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{op}: block_size must be a positive int, got {block_size!r}")
    if volume % block_size == 0:
        split = volume // block_size
        return mask.repeat_interleave(split, dim=0).repeat_interleave(split, dim=1)
    if block_size % volume == 0:
        merge = block_size // volume
        m = mask.shape[0]
        mb = -(-m // merge)
        # Pad with False so a short last block is judged on the tiles it really holds.
        padded = mask.new_zeros(mb * merge, mb * merge)
        padded[:m, :m] = mask
        return padded.view(mb, merge, mb, merge).any(dim=3).any(dim=1)
    raise ValueError(
        f"{op}: block_size {block_size} and tile volume {volume} must divide one another so that block "
        "boundaries fall on tile boundaries"
    )


def mask_density(block_mask: torch.Tensor) -> float:
    """Fraction of (query-block, key-block) tiles kept, over all of ``block_mask [..., Mq, Mk]``.

    Counts blocks, not tokens: a partial last block weighs as much as a full one.
    """
    return block_mask.float().mean().item() if block_mask.numel() else 0.0


def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of ``block`` tokens in fp32: x [B, H, N, D] → [B, H, ceil(N/block), D].

    The last partial block averages only its valid tokens.
    """
    b, h, n, d = x.shape
    full = n // block
    # Sum in fp32 without materialising an fp32 copy of x.
    parts = [x[:, :, : full * block].reshape(b, h, full, block, d).sum(dim=3, dtype=torch.float32) / block]
    if n > full * block:
        parts.append(x[:, :, full * block :].mean(dim=2, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, dim=2)


@torch.no_grad()
def adaptive_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int | tuple[int, int] = 128,
    keep: float = 0.1,
    mode: str = "ratio",
    keep_diagonal: bool = True,
    sink_blocks: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Content-aware block mask (Video-BLADE's Adaptive Block-Sparse Attention).

    q: [B, H, Nq, D], k: [B, H, Nk, D] (same B, H, D; any float dtype). Q and K are mean-pooled per
    block (bq, bk tokens; ``block_size`` an int or (bq, bk)), block pairs are scored by
    ``pooled_q @ pooled_k^T * scale`` in fp32 (scale default 1/sqrt(D)), and
    ``kdlib.kernels.block_layout.select_blocks(scores, keep, mode=mode, keep_diagonal=...)`` picks
    the tiles: ``mode="ratio"`` keeps the top ceil(keep * Mk) key blocks per query block,
    ``mode="mass"`` the fewest whose softmax mass reaches ``keep``. keep: in (0, 1].
    The first ``sink_blocks`` key blocks are always kept.

    Selection is a discrete choice, so it runs under no_grad: gradients flow through the
    attention over the chosen tiles, not through the choice.

    Returns bool [B, H, ceil(Nq/bq), ceil(Nk/bk)].
    """
    op = "adaptive_block_mask"
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "k", k, ndim=4)
    check_same(op, {"q": q, "k": k}, dtype=False)
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: q [B, H, Nq, D] and k [B, H, Nk, D] must share B, H and D, got q {tuple(q.shape)} and "
            f"k {tuple(k.shape)}"
        )
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if not all(isinstance(s, int) and s > 0 for s in (bq, bk)):
        raise ValueError(f"{op}: block_size must be a positive int or a pair (bq, bk) of them, got {block_size!r}")
    if mode not in _MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}; expected one of {_MODES}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"{op}: keep must be in (0, 1] (a fraction of key blocks or of softmax mass), got {keep}")
    mk = -(-k.shape[2] // bk)
    if not 0 <= sink_blocks <= mk:
        raise ValueError(f"{op}: sink_blocks must be in [0, {mk}] (the number of key blocks), got {sink_blocks}")

    # Imported on use: the static tile masks need nothing from block_layout, and no import cycle can form.
    from kdlib.kernels.block_layout import select_blocks

    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    scores = _block_mean(q, bq) @ _block_mean(k, bk).transpose(-1, -2) * scale
    mask = select_blocks(scores, keep, mode=mode, keep_diagonal=keep_diagonal)
    mask[..., :sink_blocks] = True
    return mask
