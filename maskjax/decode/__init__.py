"""Decoding algorithms of generative token models: MaskGIT parallel decoding (`parallel`)."""

from maskjax.decode.parallel import Guidance, box_to_token_mask, check_decode_args, decode

__all__ = ["Guidance", "decode", "check_decode_args", "box_to_token_mask"]
