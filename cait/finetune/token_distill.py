"""Token distillation: the dense label-free signal of ``--token-distill`` (ATME keeps the grid, so every merged token
has a teacher target).

Logit-only distillation gives the student one target per image; its last block's tokens, though, each stand for a
known set of patches (the ATME merges, SPEC §1), so the teacher's last-block tokens pooled by the same merges
(:func:`cait.models.atme.pool_to_block`) are a target for every one of them — the loss the calibrated twin's refit
(:mod:`cait.compress.refit`) minimises in closed form, here trained end to end. The loss is the relative mean squared
error of the final-norm features, CLS token included::

    L_tok = ‖f_s − pool(f_t)‖² / ‖pool(f_t)‖²       f: (B, 1 + h·w, C) after the model's final norm

Worked example, DeiT-Tiny with ``h4,v9`` (14×14 patches, last block on 7×7): the teacher's ``(B, 197, 192)``
features become ``(B, 1 + 49, 192)``, each of the 49 the mean of its 2×2 patches; the student's ``(B, 50, 192)``
are compared with them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.atme import get_layout, patch_grid, pool_to_block


class WithTokens(nn.Module):
    """A DeiT that returns its tokens too: ``forward(x)`` → ``(logits (B, K), features (B, 1 + h·w, C))``, the
    features after the final norm. Wrap this module, not the model, in DDP."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)                                  # (B, 1 + h·w, C)
        return self.model.forward_head(feats), feats


def pool_teacher_tokens(feats: torch.Tensor, teacher: nn.Module, student: nn.Module) -> torch.Tensor:
    """The teacher's final features pooled onto the grid the student's last block outputs.

    Args:
        feats: ``(B, 1 + H·W, C)`` teacher features (one prefix token, the CLS).
        teacher: the unmerged DeiT they came from.
        student: the ATME DeiT made from it.

    Returns:
        ``(B, 1 + h·w, C)``: the CLS token as is, the patch tokens averaged by the student's merges.

    Raises:
        ValueError: if the teacher's tokens are not its full patch grid, or the two grids differ.
    """
    H, W = patch_grid(teacher)
    B, N, C = feats.shape
    if N != 1 + H * W or patch_grid(student) != (H, W):
        raise ValueError(f"token distillation needs the teacher's {H}x{W} patch grid and a student made from it; "
                         f"got {N} tokens")
    patches = pool_to_block(feats[:, 1:].reshape(B, H, W, C), get_layout(student), len(student.blocks) - 1)
    return torch.cat([feats[:, :1], patches.reshape(B, -1, C)], dim=1)


def token_distill_loss(student_feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative mean squared error ``‖s − t‖² / ‖t‖²`` over the batch; both ``(B, T, C)``, computed in float32."""
    s, t = student_feats.float(), target.float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
