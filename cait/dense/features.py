"""A backbone's block outputs as maps on the full patch grid, ``(B, C, H, W)``, whatever the backbone is.

* a DeiT, CDCP-only or an ATME/CAIT twin: timm's ``forward_intermediates`` (an ATME model gives each merged token
  to the patches it covers, :class:`cait.models.atme.ATMEVisionTransformer`, ``dense=True``): exact, no guess;
* ToMe: each patch takes the value of the merged token that absorbed it
  (:func:`cait.baselines.tome.tome_dense_intermediates`);
* EViT-style token pruning: dropped positions keep their value from the last block where they were kept
  (:func:`cait.baselines.token_pruning.token_pruning_dense_intermediates`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..baselines.token_pruning import token_pruning_dense_intermediates
from ..baselines.tome import tome_dense_intermediates
from ..models.atme import get_layout


def default_blocks(depth: int) -> list[int]:
    """The four blocks a plain ViT's Semantic FPN reads: a quarter, half, three quarters in, and the last
    (12 → 2, 5, 8, 11; 6 → 0, 2, 3, 5)."""
    return [depth // 4 - 1 if depth >= 4 else 0, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]


def backbone_kind(model: nn.Module) -> str:
    """``"tome"``, ``"token_pruning"``, ``"atme"`` (merged grids) or ``"grid"`` (every block on the patch grid)."""
    if getattr(model, "tome", None) is not None:
        return "tome"
    if getattr(model, "pruning", None) is not None:
        return "token_pruning"
    return "atme" if get_layout(model) else "grid"


def dense_features(model: nn.Module, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Outputs of ``blocks`` for images ``x (B, 3, S, S)``, each ``(B, C, S/p, S/p)`` on the patch grid (no final
    norm), in the order of ``blocks``.

    Raises:
        ValueError: for a block index outside the model.
    """
    depth = len(model.blocks)
    if any(not -depth <= b < depth for b in blocks):
        raise ValueError(f"blocks {blocks} are outside 0..{depth - 1}")
    order = sorted(range(len(blocks)), key=lambda j: blocks[j] % depth)
    kind = backbone_kind(model)
    if kind == "tome":
        maps = tome_dense_intermediates(model, x, [blocks[j] for j in order])
    elif kind == "token_pruning":
        maps = token_pruning_dense_intermediates(model, x, [blocks[j] for j in order])
    else:
        kw = {"dense": True} if kind == "atme" else {}
        maps = model.forward_intermediates(x, indices=[blocks[j] % depth for j in order], intermediates_only=True,
                                           **kw)
    out: list[torch.Tensor] = [None] * len(blocks)
    for j, m in zip(order, maps):
        out[j] = m
    return out
