"""Checkpoint interop: timm ViT and Hugging Face ViTMAE (PyTorch / safetensors) <-> maskjax parameters, and the
official MaskGIT JAX checkpoints -> maskjax (`maskjax.convert.maskgit_official`).

    from maskjax.convert import timm_to_maskjax, maskjax_to_timm, hf_mae_to_maskjax, maskjax_to_hf_mae
    from maskjax.convert.maskgit_official import official_tokenizer_to_maskjax, official_transformer_to_maskjax

Inputs are state dicts (dicts of torch tensors or numpy arrays) or checkpoint paths (.safetensors, .pth); the
converters need numpy and, for torch tensors / .pth files / 'pt' outputs, torch. Every converter checks keys and
shapes before converting and raises ValueError naming the key and both shapes.
"""

from maskjax.convert.common import load_state_dict, save_state_dict
from maskjax.convert.timm_vit import maskjax_to_timm, timm_to_maskjax
from maskjax.convert.hf_vit_mae import (hf_mae_patch_targets, hf_mae_to_maskjax, hf_num_masked,
                                        maskjax_to_hf_mae)

__all__ = ["hf_mae_patch_targets", "hf_mae_to_maskjax", "hf_num_masked", "load_state_dict", "maskjax_to_hf_mae",
           "maskjax_to_timm", "save_state_dict", "timm_to_maskjax"]
