"""Decoding algorithms of generative token models: MaskGIT parallel decoding (`parallel`), structure guidance
(`masksketch`), cached raster-order decoding (`autoregressive`) and M2T group decoding (`m2t`)."""

from maskjax.decode.masksketch import structure_distance, structure_guided_decode, structure_penalty
from maskjax.decode.parallel import Guidance, box_to_token_mask, check_decode_args, decode

__all__ = ["Guidance", "decode", "check_decode_args", "box_to_token_mask", "structure_distance", "structure_guided_decode",
           "structure_penalty"]
