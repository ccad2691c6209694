"""Triton implementations of kdlib kernels (the default on GPU; CPU tests use TRITON_INTERPRET=1)."""
