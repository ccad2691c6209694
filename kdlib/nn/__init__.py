"""Building blocks the domains share: the attention entry point (SDPA, and the fused JVP kernel
under forward-mode AD), a small DiT and timestep/position embeddings."""

from kdlib.nn.dit import DiT, DiTBlock, DiTConfig, SelfAttention, patchify, unpatchify
from kdlib.nn.embeddings import TimestepEmbedder, sincos_position_embedding, sinusoidal_embedding
from kdlib.nn.functional import attention, materialized_attention

__all__ = [
    "DiT", "DiTBlock", "DiTConfig", "SelfAttention", "patchify", "unpatchify",
    "TimestepEmbedder", "sincos_position_embedding", "sinusoidal_embedding",
    "attention", "materialized_attention",
]
