"""Pallas kernels (fused, hardware-specific fast paths with XLA fallbacks)."""

from mmlm.kernels.compression import compress_attention

__all__ = ["compress_attention"]
