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
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block

from ..layers.compactor import CompactorLinear, CompactorQKV


def add_compactors(model: nn.Module) -> nn.Module:
    """Wrap every block's ``attn.qkv`` and ``mlp.fc1`` with identity compactors, in place.

    Outputs are unchanged until the compactors are trained (identity). Merged blocks (ATME) are handled too.

    Returns:
        The same model.

    Raises:
        TypeError: if a block's attention or MLP is not timm's ``Attention``/``Mlp`` (e.g. already pruned).
        ValueError: if the model already has compactors, or uses q/k normalisation (pruning q/k would change it).
    """
    for i, block in enumerate(model.blocks):
        if not isinstance(block, Block):
            raise TypeError(f"block {i} is {type(block).__name__}, not a timm Block")
        attn, mlp = block.attn, block.mlp
        if isinstance(attn.qkv if isinstance(attn, Attention) else None, CompactorQKV):
            raise ValueError(f"block {i} already has compactors")
        if type(attn) is not Attention or type(mlp) is not Mlp:
            raise TypeError(f"block {i} has {type(attn).__name__}/{type(mlp).__name__}; compactors need timm's "
                            "Attention and Mlp (a pruned model cannot take compactors)")
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            raise ValueError(f"block {i} normalises q/k; CDCP cannot prune q/k channels through a norm")
        attn.qkv = CompactorQKV(attn.qkv, attn.num_heads)
        mlp.fc1 = CompactorLinear(mlp.fc1)
    return model



def has_compactors(model: nn.Module) -> bool:
    """True if the model's blocks carry compactors."""
    return any(isinstance(m, (CompactorQKV, CompactorLinear)) for m in model.modules())



def iter_compactors(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every compactor parameter as ``(name, Q)``: ``(H, d_h, d_h)`` for q/k/v, ``(D, D)`` for the FFN.

    Use this for the compactor optimizer group (docs/method.md: the gradient rule; AdamW β₁ = 0.99, no weight decay).
    """
    for name, m in model.named_modules():
        if isinstance(m, CompactorQKV):
            yield from ((f"{name}.{t}", getattr(m, t)) for t in ("q", "k", "v"))
        elif isinstance(m, CompactorLinear):
            yield f"{name}.q", m.q
