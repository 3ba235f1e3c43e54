"""Vision models (Flax linen, pure functional) whose parameters carry logical axis names for sharding."""

from maskjax.models.vit import ViT, decode_variant

__all__ = ["ViT", "decode_variant"]
