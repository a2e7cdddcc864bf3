"""Token labelling: dense auxiliary supervision that gets a DeiT trained from scratch off its plateau.

A ViT trained from random initialisation on the synthetic shapes sits at chance for thousands of images: early on
the CLS token averages every patch, and the object is ~5% of them. Token labelling (LV-ViT: Jiang et al., "All
Tokens Matter: Token Labeling for Training Better Vision Transformers", NeurIPS 2021) also asks every patch token to
predict a label of its own, through a linear head used only in training. Here the object masks of
:mod:`cait.data.synthetic` give exact token labels: a patch's target is the image's class with the share of the patch
the object covers, and a "background" class with the rest. Measured on DeiT-Tiny at 112 px, batch 64 (docs/bundled.md):
33% top-1 after 400 steps, against chance (12.5%) without it.

Worked example, a 2×2 patch grid, class 3 of 8, object covering patch (0, 0) fully and patch (0, 1) by 40%::

    token_targets(...)[0] → (4, 9): row 0 = one-hot 3, row 1 = 0.4 at 3 and 0.6 at 8 (background), rows 2, 3 = 8

With ATME the last block sees a merged grid; its targets are the patch targets pooled by the same merges
(:func:`cait.models.atme.pool_to_block`), so each merged token's target is the mean of the patches it stands for.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.atme import get_layout, patch_grid, pool_to_block
from .token_distill import WithTokens


def token_targets(masks: torch.Tensor, labels: torch.Tensor, num_classes: int, model: nn.Module) -> torch.Tensor:
    """Soft token labels for the tokens the model's last block outputs.

    Args:
        masks: ``(B, S, S)`` bool object masks at the model's input size.
        labels: ``(B,)`` image classes.
        num_classes: K; the background is class K.
        model: the (possibly merged) DeiT whose last-block patch tokens are supervised.

    Returns:
        ``(B, h·w, K + 1)`` probabilities (rows sum to 1), on the last block's grid, row-major.
    """
    B = masks.shape[0]
    grid = patch_grid(model)
    frac = F.adaptive_avg_pool2d(masks.float()[:, None], grid)[:, 0, :, :, None]          # (B, H, W, 1)
    frac = pool_to_block(frac, get_layout(model), len(model.blocks) - 1).reshape(B, -1)  # (B, h·w)
    target = torch.zeros(B, frac.shape[1], num_classes + 1, device=masks.device)
    target[..., num_classes] = 1 - frac
    target.scatter_(2, labels.to(masks.device)[:, None, None].expand(-1, frac.shape[1], 1), frac[..., None])
    return target


class TokenLabelled(WithTokens):
    """A DeiT with a training-only token head: ``forward(x)`` → ``(logits (B, K), token_logits (B, h·w, K + 1))``.

    The head lives on the model as ``model.token_head`` (so training states save and resume it); remove it with
    :func:`drop_token_head` before the model is pruned or saved as a checkpoint. Wrap this module, not the model, in
    DDP, so the head's gradients are all-reduced too.
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        p = next(model.parameters())
        model.token_head = nn.Linear(model.embed_dim, num_classes + 1).to(p.device, p.dtype)
        super().__init__(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tokens = super().forward(x)
        feats = tokens[-1]                                                      # (B, 1 + h·w, C)
        npre = getattr(self.model, "num_prefix_tokens", 1)
        return logits, self.model.token_head(feats[:, npre:])


def token_label_loss(token_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy over every token, averaged: ``(B, T, K+1)`` logits against ``(B, T, K+1)``."""
    return -(targets * token_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def drop_token_head(model: nn.Module) -> nn.Module:
    """Remove the training-only ``token_head``, if any, in place; the model is again a plain (CAIT) DeiT."""
    if hasattr(model, "token_head"):
        del model.token_head
    return model
