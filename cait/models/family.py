"""Which timm models CAIT compresses: a check of the model's own modules, never of its name.

CAIT needs a plain ViT at a fixed image size: timm's ``VisionTransformer`` (DeiT, DeiT III, distilled DeiT, DINOv2
with or without registers, CLIP, AugReg ViTs, ...) whose blocks are timm's ``Block`` with a fused ``qkv``
``Attention`` and an ``Mlp`` (``fc1`` → activation → ``fc2``), or timm's ``Eva`` (EVA-02, DINOv3) whose blocks are
``EvaBlock`` with an ``EvaAttention`` (fused or separate q/k/v, axial RoPE) and an ``Mlp``, ``GluMlp`` or ``SwiGLU``
without norms inside. Prefix tokens (a CLS token, a distillation token, registers, or none) are read from
``num_prefix_tokens`` (docs/method.md: models). What is refused says what is missing:

>>> import timm
>>> unsupported_reason(timm.create_model("deit_tiny_patch16_224", depth=2)) is None
True
>>> unsupported_reason(timm.create_model("vit_tiny_patch16_224", depth=2, dynamic_img_size=True))
'dynamic image size: ATME needs the token grid at every block (create the model with dynamic_img_size=False)'
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import Attention, AttentionPoolLatent, GluMlp, Mlp, SwiGLU
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from ..layers.pruned_attention import PrunedAttention
from .rope import rope_reason

TESTED: dict[str, tuple[str, ...]] = {
    "vit": ("vit_tiny_patch16_224", "vit_small_patch32_224", "vit_base_patch16_224.augreg_in21k_ft_in1k",
            "vit_small_patch16_224.dino", "vit_medium_patch16_gap_256"),
    "deit": ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_384"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224"),
    "deit3": ("deit3_small_patch16_224", "deit3_medium_patch16_224", "deit3_base_patch16_384"),
    "dinov2": ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2"),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2"),
    "clip": ("vit_base_patch16_clip_224.openai", "vit_base_patch32_clip_224", "vit_base_patch16_clip_quickgelu_224"),
    "siglip": ("vit_base_patch16_siglip_gap_224", "vit_base_patch32_siglip_gap_256", "vit_base_patch16_siglip_224",
               "vit_base_patch16_siglip_256"),
    "eva02": ("eva02_tiny_patch14_224", "eva02_small_patch14_224"),
    "dinov3": ("vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3", "vit_base_patch16_dinov3"),
}
"""The families CAIT supports, each with the timm names its contract matrix runs (``tests/test_model_contract.py``:
small configurations of the real classes). Support itself is decided by the model's modules
(:func:`unsupported_reason`), so other names of these classes work too; ``benchmarks/families.py`` checks every
timm ViT name."""

NOT_YET: dict[str, tuple[str, ...]] = {
    "eva02_scale_norm": ("eva02_base_patch14_224",),
    "beit3_qk_norm": ("beit3_base_patch16_224",),
}
"""Families refused today, each with a name whose refusal the tests check."""

NOT_PLAIN = {
    "SwinTransformer": "Swin: windowed attention on a feature pyramid, not a plain ViT",
    "SwinTransformerV2": "Swin V2: windowed attention on a feature pyramid, not a plain ViT",
    "Cait": "timm's CaiT (class-attention in image transformers, an unrelated model): class-attention blocks, not a "
            "plain ViT",
    "Beit": "BEiT: relative position bias in every block, not supported yet",
}
"""timm model classes that are refused by name of their class, with what they lack."""


def _block_reason(i: int, block: nn.Module) -> str | None:
    """Why block ``i`` cannot be compressed (None: it can)."""
    if not isinstance(block, (Block, EvaBlock)):
        return f"block {i} is {type(block).__name__}: CAIT patches timm's Block or EvaBlock (pre-norm attention + " \
               "MLP with residuals)"
    attn, mlp = block.attn, block.mlp
    if type(attn) not in (Attention, EvaAttention, PrunedAttention):
        return f"block {i}'s attention is {type(attn).__name__}: CAIT prunes timm's Attention or EvaAttention"
    if any(not isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm")):
        return f"block {i} normalises q/k or the attention output (qk_norm / scale_norm): not supported yet"
    if getattr(attn, "gate", None) is not None:
        return f"block {i} gates its attention output: not supported yet"
    if type(mlp) not in (Mlp, GluMlp, SwiGLU):
        return f"block {i}'s MLP is {type(mlp).__name__}: CDCP prunes timm's Mlp, GluMlp or SwiGLU"
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return f"block {i}'s MLP normalises its hidden layer (scale_norm): not supported yet"
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why CAIT cannot compress ``model`` (None: it can), from its modules.

    Args:
        model: any ``nn.Module``; an ATME, compactor or compact model of a supported ViT is supported too.

    Returns:
        None, or one sentence naming what is missing (the class, a dynamic image size, a block's attention or MLP,
        an attention-pooling head).
    """
    name = type(model).__name__
    if name in NOT_PLAIN:
        return NOT_PLAIN[name]
    if not isinstance(model, (VisionTransformer, Eva)):
        return f"{name}: not a plain ViT (timm's VisionTransformer or Eva)"
    if rope_reason(getattr(model, "rope", None)):
        return rope_reason(model.rope)
    if not isinstance(getattr(model, "patch_drop", None), (type(None), nn.Identity)):
        return "patch dropout: ATME needs every patch token (create the model with patch_drop_rate=0)"
    if getattr(model, "dynamic_img_size", False):
        return "dynamic image size: ATME needs the token grid at every block (create the model with " \
               "dynamic_img_size=False)"
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (type(pool) is not AttentionPoolLatent or pool.pos_embed is not None
                             or not isinstance(pool.q_norm, nn.Identity)):
        return f"attention-pooling head {type(pool).__name__} with a position embedding or q/k norm: not " \
               "supported yet (timm's plain AttentionPoolLatent, SigLIP's MAP head, is)"
    for i, block in enumerate(model.blocks):
        reason = _block_reason(i, block)
        if reason:
            return reason
    return None


def check_supported(model: nn.Module) -> None:
    """Raise if CAIT cannot compress ``model``.

    Raises:
        ValueError: naming what is missing (:func:`unsupported_reason`).
    """
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"CAIT compresses plain ViTs (timm's VisionTransformer family); this model is not one: "
                         f"{reason}")
