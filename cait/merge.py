"""ATME — asymmetric token merging (paper §III-B, SPEC §1).

HTM concatenates horizontally adjacent patch tokens (columns 2j, 2j+1) along channels and fuses the pair with a
``Linear(2C, C)``; VTM does the same for vertically adjacent tokens (rows 2i, 2i+1). The CLS token bypasses the
merge. A merge sits at the *input* of a block (before ``norm1``), so the residual stream is merged as well.

A *layout* maps 0-based block indices to ``"h"`` or ``"v"``. The paper's "HTM at the 5th layer, VTM at the 9th" is
``{4: "h", 8: "v"}``, written ``"h4,v8"`` on the command line. Worked example, DeiT-S (14×14 patch grid)::

    >>> parse_layout("h4,v8")
    {4: 'h', 8: 'v'}
    >>> token_grids((14, 14), 12, {4: "h", 8: "v"})   # grid seen by the attention of each block
    [(14, 14)] * 4 + [(14, 7)] * 4 + [(7, 7)] * 4

An odd side is padded by repeating its last row/column, so a merged side is ``ceil(side / 2)``: DeiT-T's 3-merge
layout goes 14×14 → 14×7 → 7×7 → 7×4.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Union

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer

Layout = dict[int, str]
LayoutLike = Union[str, Mapping[int, str], None]
_ITEM = re.compile(r"^\s*([hv])\s*(\d+)\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------
# Pure tensor core
# ----------------------------------------------------------------------------------------------------------------
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


def pool_to_block(x: torch.Tensor, layout: "LayoutLike", block: int) -> torch.Tensor:
    """Values on the full patch grid ``(B, H, W, C)`` pooled onto the grid block ``block`` sees: every merge of the
    layout at or before ``block`` is applied as :func:`pool_pairs`. Use it to compare an unmerged model's tokens (or
    a per-patch target) with a merged model's."""
    for i, direction in parse_layout(layout).items():
        if i <= block:
            x = pool_pairs(x, direction)
    return x


def merged_grid(grid: tuple[int, int], direction: str) -> tuple[int, int]:
    """Grid ``(H, W)`` after one merge: HTM halves W, VTM halves H (ceil for odd sides)."""
    H, W = grid
    if direction == "h":
        return H, math.ceil(W / 2)
    if direction == "v":
        return math.ceil(H / 2), W
    raise ValueError(f"merge direction must be 'h' or 'v', got {direction!r}")


class TokenMerge(nn.Module):
    """HTM (``direction="h"``) or VTM (``"v"``) on ``(B, 1 + H·W, C)`` tokens; the CLS token passes untouched.

    The fusion ``Linear(2C, C)`` starts as the mean of the pair (weight ``[½I | ½I]``, bias 0, SPEC §1 choice), so a
    pretrained model starts from average pooling rather than noise.

    Args:
        dim: embedding dim C.
        direction: ``"h"`` or ``"v"``.
        grid: the input patch grid ``(H, W)``; the output grid is :func:`merged_grid` of it.
    """

    def __init__(self, dim: int, direction: str, grid: tuple[int, int]) -> None:
        super().__init__()
        if direction not in ("h", "v"):
            raise ValueError(f"merge direction must be 'h' or 'v', got {direction!r}")
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
        if N != 1 + H * W:
            raise ValueError(f"{self.direction.upper()}TM expects 1 + {H}×{W} tokens, got {N}")
        cls, patches = x[:, :1], x[:, 1:].reshape(B, H, W, C)           # (B, 1, C), (B, H, W, C)
        merged = self.fuse(pair_tokens(patches, self.direction))       # (B, H', W', C)
        return torch.cat([cls, merged.reshape(B, -1, C)], dim=1)        # (B, 1 + H'W', C)

    def extra_repr(self) -> str:
        return f"{self.direction.upper()}TM {self.in_grid} -> {self.out_grid}"


class MergeBlock(Block):
    """A timm ``Block`` whose input is merged first: ``forward(x) = Block.forward(merge(x))``.

    Built by :func:`apply_atme` from an existing block (ToMe-style class swap), so timm's own block forward, layer
    scale and drop path included, runs unchanged. ``self.merge`` is a :class:`TokenMerge`.
    """

    merge: TokenMerge

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super().forward(self.merge(x), *args, **kwargs)


class ATMEVisionTransformer(VisionTransformer):
    """A timm ``VisionTransformer`` with ATME merges; :func:`apply_atme` swaps a model's class to it (ToMe-style), so
    every timm method runs unchanged except the two that must know each block's grid.

    Worked example, DeiT-S with ``h4,v7``: ``forward_intermediates(x)`` gives ``(B, 384, 14, 14)`` for blocks 0–3,
    ``(B, 384, 14, 7)`` for 4–6 and ``(B, 384, 7, 7)`` for 7–11; with ``dense=True`` every one is ``(B, 384, 14, 14)``
    (each merged token repeated over the patches it covers, :func:`upsample_to_patch_grid`).
    """

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False, dense: bool = False,
                              **kwargs):
        """timm's ``forward_intermediates``, with each intermediate on its own block's grid.

        Args:
            dense: map every intermediate back onto the full patch grid (``NCHW``: ``(B, C, H, W)``; ``NLC``:
                ``(B, H·W, C)``) instead of its block's merged grid.
            (others): as timm's.

        Raises:
            ValueError: for an ``output_fmt`` other than ``NCHW`` or ``NLC``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        out = super().forward_intermediates(x, indices, return_prefix_tokens, norm, stop_early, "NLC",
                                            intermediates_only, output_dict, **kwargs)
        if output_fmt == "NLC" and not dense:
            return out
        blocks = sorted(set(feature_take_indices(len(self.blocks), indices)[0]))
        grids = model_token_grids(self)

        def reshape(y: torch.Tensor, i: int) -> torch.Tensor:           # (B, h·w, C) on block i's grid
            B, _, C = y.shape
            g = y.reshape(B, *grids[i], C).permute(0, 3, 1, 2)         # (B, C, h, w)
            if dense:
                g = upsample_to_patch_grid(g, self, block=i)           # (B, C, H, W)
            return g.flatten(2).transpose(1, 2) if output_fmt == "NLC" else g.contiguous()

        def fix(items: list) -> list:
            return [(reshape(t[0], i), t[1]) if isinstance(t, tuple) else reshape(t, i) for t, i in zip(items, blocks)]

        if output_dict:
            out["image_intermediates"] = fix(out["image_intermediates"])
            return out
        if intermediates_only:
            return fix(out)
        final, inter = out
        return final, fix(inter)

    def set_input_size(self, img_size=None, patch_size=None, **kwargs) -> None:
        """Resize as timm does (position embedding resampled), then move every merge onto the new grids.

        Raises:
            ValueError: for a new patch size, or a size at which the layout no longer fits (a side already 1);
                the model is left unchanged then.
        """
        if patch_size is not None:
            raise ValueError("an ATME model keeps its patch size; resize the image only")
        layout = get_layout(self)
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            p = self.patch_embed.patch_size
            new_grid = (size[0] // p[0], size[1] // p[1])
            token_grids(new_grid, len(self.blocks), layout)           # raises before anything changes
        super().set_input_size(img_size=img_size, **kwargs)
        grids = token_grids(patch_grid(self), len(self.blocks), layout)
        for i in layout:
            self.blocks[i].merge.in_grid = patch_grid(self) if i == 0 else grids[i - 1]
            self.blocks[i].merge.out_grid = grids[i]


# ----------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------
def parse_layout(layout: LayoutLike) -> Layout:
    """Normalise a layout: ``"h4,v8"``, ``{4: "h", 8: "v"}``, ``""`` or ``None`` → ``{4: "h", 8: "v"}`` / ``{}``.

    Raises:
        ValueError: for an item that is not ``h<int>`` / ``v<int>``, a negative index, a block named twice, or a
            layout that is neither a string nor a mapping (e.g. ``[4, 7]``, which says no direction).
    """
    if layout is None:
        return {}
    if not isinstance(layout, (str, Mapping)):
        raise ValueError(f"a merge layout is a string such as 'h4,v7' or a mapping such as {{4: 'h', 7: 'v'}}, "
                         f"got {type(layout).__name__} {layout!r}")
    if isinstance(layout, str):
        out: Layout = {}
        problems = []
        for item in filter(None, (s.strip() for s in layout.split(","))):
            m = _ITEM.match(item)
            if not m:
                problems.append(f"{item!r} is not hN or vN")
                continue
            direction, idx = m.group(1).lower(), int(m.group(2))
            if idx in out:
                problems.append(f"block {idx} is named twice")
            out[idx] = direction
        if problems:                     # every problem at once; no angle brackets (an HTML toast would eat them)
            raise ValueError(f"bad merge layout {layout!r}: {'; '.join(problems)} (write e.g. 'h4,v8': HTM before "
                             "block 4, VTM before block 8, 0-based)")
        return dict(sorted(out.items()))
    out = {}
    for idx, direction in layout.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError(f"merge layout block index must be a non-negative int, got {idx!r}")
        d = str(direction).lower()
        if d not in ("h", "v"):
            raise ValueError(f"merge direction for block {idx} must be 'h' or 'v', got {direction!r}")
        out[idx] = d
    return dict(sorted(out.items()))


def format_layout(layout: LayoutLike) -> str:
    """``{4: "h", 8: "v"}`` → ``"h4,v8"`` (``""`` for no merge)."""
    return ",".join(f"{d}{i}" for i, d in parse_layout(layout).items())


def token_grids(grid: tuple[int, int], depth: int, layout: LayoutLike) -> list[tuple[int, int]]:
    """The patch grid ``(H, W)`` that each block's attention sees (after that block's merge, if any).

    Raises:
        ValueError: if the layout names a block ``>= depth`` or merges a side that is already 1.
    """
    layout = parse_layout(layout)
    bad = [i for i in layout if i >= depth]
    if bad:
        raise ValueError(f"merge layout names block{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}, but the "
                         f"model has {depth} blocks (0..{depth - 1})")
    grids, g = [], tuple(grid)
    for i in range(depth):
        if i in layout:
            side = g[1] if layout[i] == "h" else g[0]
            if side < 2:
                raise ValueError(f"cannot merge at block {i}: the {'width' if layout[i] == 'h' else 'height'} "
                                 f"of the {g[0]}×{g[1]} grid is already 1")
            g = merged_grid(g, layout[i])
        grids.append(g)
    return grids


def get_layout(model: nn.Module) -> Layout:
    """The merge layout applied to a model (``{}`` for none)."""
    return {i: b.merge.direction for i, b in enumerate(model.blocks) if isinstance(b, MergeBlock)}


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid ``(H, W)`` of the patch embedding (14×14 for DeiT at 224 px)."""
    return tuple(model.patch_embed.grid_size)


def model_token_grids(model: nn.Module) -> list[tuple[int, int]]:
    """The patch grid that each block of ``model`` sees, merges included."""
    return token_grids(patch_grid(model), len(model.blocks), get_layout(model))


def apply_atme(model: nn.Module, layout: LayoutLike) -> nn.Module:
    """Insert HTM/VTM merges into a timm ViT with one CLS token, in place.

    Args:
        model: a timm ``VisionTransformer`` (DeiT) without merges, fixed image size, CLS token only.
        layout: e.g. ``"h4,v8"`` or ``{4: "h", 8: "v"}`` (0-based block indices).

    Returns:
        The same model; ``model.blocks[i]`` is a :class:`MergeBlock` for each ``i`` in the layout.

    Raises:
        ValueError: if the model already has merges, has register tokens or a dynamic image size, or the layout does
            not fit the model (block out of range, side already 1).
        TypeError: if a block to merge is not a timm ``Block``.
    """
    layout = parse_layout(layout)
    if get_layout(model):
        raise ValueError(f"model already has an ATME layout ({format_layout(get_layout(model))})")
    if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "cls_token", None) is None:
        raise ValueError("ATME needs a ViT with exactly one CLS token and no register tokens")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("ATME needs a fixed image size (the token grid must be known at every block)")
    grids_before = [patch_grid(model)] + token_grids(patch_grid(model), len(model.blocks), layout)[:-1]
    for i, direction in layout.items():
        block = model.blocks[i]
        if type(block) is not Block:
            raise TypeError(f"block {i} is {type(block).__name__}; ATME patches timm's Block only")
        dim = block.norm1.normalized_shape[0]
        merge = TokenMerge(dim, direction, grids_before[i])
        ref = next(block.parameters())
        block.__class__ = MergeBlock
        block.merge = merge.to(device=ref.device, dtype=ref.dtype)
    if layout and type(model) is VisionTransformer:
        model.__class__ = ATMEVisionTransformer                          # grid-aware intermediates and resizing
    return model


def upsample_to_patch_grid(maps: torch.Tensor, model_or_layout, grid: tuple[int, int] | None = None,
                           block: int = -1) -> torch.Tensor:
    """Map per-token values on a block's merged grid back onto the full patch grid (dense transfer, SPEC §1).

    Each merged token covers 2 columns per HTM and 2 rows per VTM before it; padded (repeated) rows/columns are
    cropped, so the map is exact, not interpolated.

    Args:
        maps: ``(..., H', W')`` values on the merged grid of block ``block``.
        model_or_layout: a model (its patch grid and layout are used) or a layout (then ``grid`` is required).
        grid: the patch grid ``(H, W)`` when a layout is given.
        block: the block whose grid ``maps`` lives on (default: the last; with a bare layout, a negative index
            means after every merge).

    Returns:
        ``(..., H, W)``.
    """
    if isinstance(model_or_layout, nn.Module):
        grid, layout = patch_grid(model_or_layout), get_layout(model_or_layout)
        block %= len(model_or_layout.blocks)
    else:
        layout = parse_layout(model_or_layout)
        if grid is None:
            raise ValueError("grid is required when a layout is given")
        if block < 0:                       # without a model, "from the end" means after every merge
            block = max(layout, default=0)
    fh = 2 ** sum(1 for i, d in layout.items() if i <= block and d == "v")
    fw = 2 ** sum(1 for i, d in layout.items() if i <= block and d == "h")
    out = maps.repeat_interleave(fh, dim=-2).repeat_interleave(fw, dim=-1)
    return out[..., : grid[0], : grid[1]]
