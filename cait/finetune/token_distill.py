"""Token distillation: the dense label-free signal of ``--token-distill`` (ATME keeps the grid, so every merged token
has a teacher target).

Logit-only distillation gives the student one target per image; its last block's tokens, though, each stand for a
known set of patches (the ATME merges, docs/method.md: ATME), so the teacher's last-block tokens pooled by the same
merges (:func:`cait.models.atme.pool_tokens_to_block`) are a target for every one of them — the loss the calibrated
twin's refit (:mod:`cait.compress.refit`) minimises in closed form, here trained end to end. The loss is the relative mean squared
error of the final-norm features, CLS token included::

    L_tok = ‖f_s − pool(f_t)‖² / ‖pool(f_t)‖²       f: (B, 1 + h·w, C) after the model's final norm

Worked example, DeiT-Tiny with ``h4,v9`` (14×14 patches, last block on 7×7): the teacher's ``(B, 197, 192)``
features become ``(B, 1 + 49, 192)``, each of the 49 the mean of its 2×2 patches; the student's ``(B, 50, 192)``
are compared with them.

With ``--token-distill-blocks all`` every block's output is a target too (block b's pooled onto the grid block b
outputs: ``(B, 197, 192)`` for blocks 0–3, ``(B, 1 + 98, 192)`` for 4–8, ``(B, 50, 192)`` after), and the loss is the
mean of the relative errors of blocks 0…L−2 and of the final-norm features: the refit's per-block targets, kept
through training (a choice of ours, in the spirit of layer-wise distillation; not in the paper).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.atme import get_layout, patch_grid, pool_tokens_to_block, prefix_tokens


def forward_tokens(model: nn.Module, x: torch.Tensor, every_block: bool = False) -> list[torch.Tensor]:
    """``model.forward_features(x)`` (timm's own forward, hooks read the blocks): ``[features]``, the final-norm
    ``(B, 1 + h·w, C)``; with ``every_block``, ``[block 0 output, …, block L−2 output, features]``."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks[:-1]] if every_block else []
    try:
        feats = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return outs + [feats]


class WithTokens(nn.Module):
    """A DeiT that returns its tokens too: ``forward(x)`` → ``(logits (B, K), tokens)``, ``tokens`` the list of
    :func:`forward_tokens` (its last entry the features after the final norm, ``(B, 1 + h·w, C)``). Wrap this
    module, not the model, in DDP."""

    def __init__(self, model: nn.Module, every_block: bool = False) -> None:
        super().__init__()
        self.model, self.every_block = model, every_block

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens = forward_tokens(self.model, x, self.every_block)
        return self.model.forward_head(tokens[-1]), tokens


def tokens_loss(student_tokens: list[torch.Tensor], teacher_tokens: list[torch.Tensor], teacher: nn.Module,
                student: nn.Module) -> torch.Tensor:
    """Mean :func:`token_distill_loss` over matching :func:`forward_tokens` lists, the teacher's entry i pooled
    onto the grid of the student's block i (the last entry: its last block). One entry each: the final features'
    loss alone. Raises ``ValueError`` if the lists differ in length (or as :func:`pool_teacher_tokens`)."""
    if len(student_tokens) != len(teacher_tokens):
        raise ValueError(f"{len(student_tokens)} student token sets against {len(teacher_tokens)} of the teacher")
    last = len(student.blocks) - 1
    blocks = list(range(len(teacher_tokens) - 1)) + [last]
    losses = [token_distill_loss(s, pool_teacher_tokens(t, teacher, student, b))
              for s, t, b in zip(student_tokens, teacher_tokens, blocks)]
    return torch.stack(losses).mean()


def pool_teacher_tokens(feats: torch.Tensor, teacher: nn.Module, student: nn.Module, block: int | None = None
                        ) -> torch.Tensor:
    """The teacher's tokens pooled onto the grid the student's block ``block`` outputs (default: its last block).

    Args:
        feats: ``(B, P + H·W, C)`` teacher tokens (P prefix tokens: the CLS, a distillation token, registers).
        teacher: the unmerged DeiT they came from.
        student: the ATME DeiT made from it.
        block: index of the student's block whose output grid is the target's.

    Returns:
        ``(B, P + h·w, C)``: the prefix tokens as they are, the patch tokens averaged by the student's merges.

    Raises:
        ValueError: if the teacher's tokens are not its full patch grid, or the two grids differ.
    """
    H, W = patch_grid(teacher)
    B, N, C = feats.shape
    P = prefix_tokens(teacher)
    if N != P + H * W or patch_grid(student) != (H, W):
        raise ValueError(f"token distillation needs the teacher's {H}x{W} patch grid and a student made from it; "
                         f"got {N} tokens")
    block = len(student.blocks) - 1 if block is None else block
    return pool_tokens_to_block(feats, (H, W), get_layout(student), block, P)


def token_distill_loss(student_feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative mean squared error ``‖s − t‖² / ‖t‖²`` over the batch; both ``(B, T, C)``, computed in float32."""
    s, t = student_feats.float(), target.float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
