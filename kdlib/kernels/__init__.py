"""kdlib's kernels. Each op has a plain-PyTorch reference (the specification), a Triton and/or
native implementation, and a dispatcher that picks the best available backend.

Each op lives in the module of the same name and is imported here eagerly: a lazy export would be
shadowed by the submodule of the same name once anything imports that submodule directly. None of
these imports needs Triton or the native extension; they load on first use.
"""

from kdlib.kernels.attention_jvp import attention_jvp
from kdlib.kernels.block_layout import BlockLayout, block_layout, select_blocks
from kdlib.kernels.block_sparse_attention import block_sparse_attention
from kdlib.kernels.ema import ema_update_
from kdlib.kernels.fused_linear_divergence import fused_linear_divergence
from kdlib.kernels.masks import adaptive_block_mask, mask_density, tile_order, tile_window_mask

__all__ = ["attention_jvp", "ema_update_", "fused_linear_divergence", "BlockLayout", "block_layout",
           "select_blocks", "block_sparse_attention", "adaptive_block_mask", "mask_density", "tile_order",
           "tile_window_mask"]
