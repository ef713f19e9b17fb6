"""Pallas kernels (fused, hardware-specific fast paths with XLA fallbacks)."""

from mmlm.kernels.compress_attention import compress_attention

__all__ = ["compress_attention"]
