"""CDCP's compactors in a timm DeiT (paper §III-C, docs/method.md: CDCP): the thin patch that wraps every block's
``attn.qkv`` and ``mlp.fc1`` with identity compactors (:mod:`cait.layers.compactor`), so timm's Attention and Mlp run unchanged.

Worked example, DeiT-Tiny::

    >>> import timm
    >>> model = add_compactors(timm.create_model("deit_tiny_patch16_224"))
    >>> [name for name, q in iter_compactors(model)][:4], model.blocks[0].mlp.fc1.q.shape
    (['blocks.0.attn.qkv.q', 'blocks.0.attn.qkv.k', 'blocks.0.attn.qkv.v', 'blocks.0.mlp.fc1.q'],
     torch.Size([768, 768]))
"""
from __future__ import annotations

from collections.abc import Iterator

import torch.nn as nn
from timm.layers import GluMlp, SwiGLU
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block

from ..layers.compactor import BiasedQKV, CompactorGLU, CompactorLinear, CompactorQKV
from .parts import prunable_reason


def add_compactors(model: nn.Module) -> nn.Module:
    """Wrap every block's q/k/v projection and FFN input with identity compactors, in place.

    Outputs are unchanged until the compactors are trained (identity). Merged blocks (ATME) are handled too. Where
    they sit: per head after the fused ``qkv`` (an EVA-02 ``qkv`` with separate q/v biases is first made one module,
    :class:`cait.layers.compactor.BiasedQKV`); after ``fc1`` for an ``Mlp``; on the value rows of a gated FFN
    (``GluMlp``: :class:`cait.layers.compactor.CompactorGLU`; ``SwiGLU``: after ``fc1_x``), since a zero value
    zeroes the hidden channel whatever its gate. With RoPE the q/k compactors are fixed identities (CDCP keeps q/k).

    Returns:
        The same model.

    Raises:
        TypeError: if a block's attention or FFN cannot take compactors (already pruned, separate q/k/v
            projections, norms inside: :func:`cait.models.parts.prunable_reason`).
        ValueError: if the model already has compactors, or uses q/k normalisation (pruning q/k would change it).
    """
    rope = getattr(model, "rope", None) is not None
    for i, block in enumerate(model.blocks):
        if not isinstance(block, (Block, EvaBlock)):
            raise TypeError(f"block {i} is {type(block).__name__}, not a timm Block or EvaBlock")
        attn, mlp = block.attn, block.mlp
        if has_compactors(block):
            raise ValueError(f"block {i} already has compactors")
        if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) \
                or not isinstance(getattr(attn, "k_norm", nn.Identity()), nn.Identity):
            raise ValueError(f"block {i} normalises q/k; CDCP cannot prune q/k channels through a norm")
        reason = prunable_reason(attn, mlp) or (
            "separate q/k/v projections" if isinstance(attn, EvaAttention) and attn.qkv is None else None)
        if reason:
            raise TypeError(f"block {i} cannot take compactors: {reason} (a pruned model cannot take compactors)")
        if isinstance(attn, EvaAttention) and attn.q_bias is not None:
            attn.qkv = BiasedQKV(attn.qkv, attn.q_bias, attn.v_bias)
            attn.q_bias, attn.v_bias, attn.k_bias = None, None, None     # timm's forward now calls attn.qkv
        attn.qkv = CompactorQKV(attn.qkv, attn.num_heads, qk=not rope)
        if isinstance(mlp, GluMlp):
            mlp.fc1 = CompactorGLU(mlp.fc1, value_first=mlp.gate_last)
        elif isinstance(mlp, SwiGLU):
            mlp.fc1_x = CompactorLinear(mlp.fc1_x)
        else:
            mlp.fc1 = CompactorLinear(mlp.fc1)
    return model


def ffn_compactor(mlp: nn.Module) -> CompactorLinear | CompactorGLU | None:
    """The FFN's compactor module (on ``fc1``, ``GluMlp.fc1`` or ``SwiGLU.fc1_x``), None without one."""
    layer = mlp.fc1_x if isinstance(mlp, SwiGLU) else getattr(mlp, "fc1", None)
    return layer if isinstance(layer, (CompactorLinear, CompactorGLU)) else None


def has_compactors(model: nn.Module) -> bool:
    """True if the model's blocks carry compactors."""
    return any(isinstance(m, (CompactorQKV, CompactorLinear, CompactorGLU)) for m in model.modules())


def iter_compactors(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every trained compactor as ``(name, Q)``: ``(H, d_h, d_h)`` for q/k/v (v only with RoPE), ``(D, D)`` for
    the FFN.

    Use this for the compactor optimizer group (docs/method.md: the gradient rule; AdamW β₁ = 0.99, no weight decay).
    """
    for name, m in model.named_modules():
        if isinstance(m, CompactorQKV):
            yield from ((f"{name}.{t}", getattr(m, t)) for t in ("q", "k", "v")
                        if isinstance(getattr(m, t), nn.Parameter))
        elif isinstance(m, (CompactorLinear, CompactorGLU)):
            yield f"{name}.q", m.q
