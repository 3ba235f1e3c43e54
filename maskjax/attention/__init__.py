"""Attention with masks: one entry point, `attention(q, k, v, mask=..., bias=...)`."""

from maskjax.attention.api import attention

__all__ = ["attention"]
