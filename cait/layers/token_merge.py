"""HTM and VTM, the token merges of ATME (paper §III-B, docs/method.md: ATME): a pure tensor core and one ``nn.Module``.

HTM concatenates horizontally adjacent patch tokens (columns 2j, 2j+1) along channels and fuses the pair with a
``Linear(2C, C)``; VTM does the same for vertically adjacent tokens (rows 2i, 2i+1). The CLS token bypasses the
merge, as do any other prefix tokens (a distillation token, registers). An odd side is padded by repeating its last
row/column, so a merged side is ``ceil(side / 2)``. Worked example, DeiT-S block 4 input (14×14 grid, C = 384)::

    >>> TokenMerge(384, "h", (14, 14))(torch.randn(2, 1 + 196, 384)).shape     # HTM: 1 + 14·7 tokens
    torch.Size([2, 99, 384])

Where merges sit in a model (the layout, ``h4,v8``) is :mod:`cait.models.layout` and :mod:`cait.models.atme`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def pair_tokens(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Concatenate neighbouring tokens of a grid along channels.

    Args:
        x: patch tokens as a grid, ``(B, H, W, C)``.
        direction: ``"h"`` pairs columns (2j, 2j+1) → ``(B, H, ceil(W/2), 2C)``; ``"v"`` pairs rows (2i, 2i+1) →
            ``(B, ceil(H/2), W, 2C)``. An odd side is padded by repeating its last row/column.

    Returns:
        The paired grid; channel block ``[:C]`` is the first token of each pair, ``[C:]`` the second.
    """
    B, H, W, C = x.shape
    if direction == "h":
        if W % 2:
            x = torch.cat([x, x[:, :, -1:]], dim=2)                      # (B, H, W+1, C)
        return x.reshape(B, H, x.shape[2] // 2, 2 * C)                   # row-major: columns 2j, 2j+1 are adjacent
    if direction == "v":
        if H % 2:
            x = torch.cat([x, x[:, -1:]], dim=1)                         # (B, H+1, W, C)
        x = x.reshape(B, x.shape[1] // 2, 2, W, C)                       # (B, H/2, 2, W, C)
        return x.transpose(2, 3).reshape(B, x.shape[1], W, 2 * C)        # (B, H/2, W, 2C)
    raise ValueError(f"merge direction must be 'h' or 'v', got {direction!r}")



def pool_pairs(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Mean of each pair a merge fuses: ``(B, H, W, C)`` → the merged grid (what HTM/VTM compute at their
    mean-of-pair initialisation; padding as :func:`pair_tokens`)."""
    pairs = pair_tokens(x, direction)
    C = x.shape[-1]
    return (pairs[..., :C] + pairs[..., C:]) / 2



def merged_grid(grid: tuple[int, int], direction: str) -> tuple[int, int]:
    """Grid ``(H, W)`` after one merge: HTM halves W, VTM halves H (ceil for odd sides)."""
    H, W = grid
    if direction == "h":
        return H, math.ceil(W / 2)
    if direction == "v":
        return math.ceil(H / 2), W
    raise ValueError(f"merge direction must be 'h' or 'v', got {direction!r}")



class TokenMerge(nn.Module):
    """HTM (``direction="h"``) or VTM (``"v"``) on ``(B, P + H·W, C)`` tokens; the P prefix tokens (CLS,
    distillation token, registers) pass untouched.

    The fusion ``Linear(2C, C)`` starts as the mean of the pair (weight ``[½I | ½I]``, bias 0, choice, docs/method.md:
    ATME), so a pretrained model starts from average pooling rather than noise.

    Args:
        dim: embedding dim C.
        direction: ``"h"`` or ``"v"``.
        grid: the input patch grid ``(H, W)``; the output grid is :func:`merged_grid` of it.
        prefix: P, the prefix tokens before the patches (timm's ``num_prefix_tokens``: 1 for DeiT, 2 for a distilled
            DeiT, 5 for DINOv2 with four registers, 0 without a class token).

    Raises:
        ValueError: for a direction other than ``"h"``/``"v"`` or a negative ``prefix``.

    >>> TokenMerge(8, "v", (4, 4), prefix=5)(torch.randn(2, 5 + 16, 8)).shape      # 5 prefix + 2·4 patches
    torch.Size([2, 13, 8])
    """

    def __init__(self, dim: int, direction: str, grid: tuple[int, int], prefix: int = 1) -> None:
        super().__init__()
        if direction not in ("h", "v"):
            raise ValueError(f"merge direction must be 'h' or 'v', got {direction!r}")
        if prefix < 0:
            raise ValueError(f"prefix tokens must be >= 0, got {prefix}")
        self.prefix = prefix
        self.direction = direction
        self.in_grid = tuple(grid)
        self.out_grid = merged_grid(self.in_grid, direction)
        self.fuse = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            eye = torch.eye(dim) / 2
            self.fuse.weight.copy_(torch.cat([eye, eye], dim=1))
            self.fuse.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, W = self.in_grid
        P = self.prefix
        if N != P + H * W:
            raise ValueError(f"{self.direction.upper()}TM expects {P} + {H}×{W} tokens, got {N}")
        prefix, patches = x[:, :P], x[:, P:].reshape(B, H, W, C)        # (B, P, C), (B, H, W, C)
        merged = self.fuse(pair_tokens(patches, self.direction))       # (B, H', W', C)
        return torch.cat([prefix, merged.reshape(B, -1, C)], dim=1)     # (B, P + H'W', C)

    def extra_repr(self) -> str:
        return f"{self.direction.upper()}TM {self.in_grid} -> {self.out_grid}, {self.prefix} prefix"
