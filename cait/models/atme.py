"""ATME on a timm DeiT (paper §III-B, docs/method.md: ATME): the thin patch that puts HTM/VTM merges at chosen blocks.

A merge sits at the *input* of a block (before ``norm1``), so the residual stream is merged as well.
:func:`apply_atme` swaps each chosen block's class to :class:`MergeBlock` and the model's to
:class:`ATMEVisionTransformer` (ToMe-style class swaps: timm's own forwards run unchanged, nothing is copied).
Worked example, DeiT-S with ``h4,v7``::

    >>> import timm
    >>> model = apply_atme(timm.create_model("deit_small_patch16_224"), "h4,v7")
    >>> get_layout(model), model_token_grids(model)[4], model_token_grids(model)[7]
    (Layout('h4,v7'), (14, 7), (7, 7))

The merged grid stays a grid, so a merged block's tokens map back onto the patch grid exactly
(:func:`upsample_to_patch_grid`): that is what dense transfer needs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from ..layers.token_merge import TokenMerge, pool_pairs
from .layout import Layout, LayoutLike, token_grids
from .rope import pooled_coords, rope_codes, rope_coords, rope_reason


def pool_to_block(x: torch.Tensor, layout: "LayoutLike", block: int) -> torch.Tensor:
    """Values on the full patch grid ``(B, H, W, C)`` pooled onto the grid block ``block`` sees: every merge of the
    layout at or before ``block`` is applied as :func:`pool_pairs`. Use it to compare an unmerged model's tokens (or
    a per-patch target) with a merged model's."""
    for i, direction in Layout.parse(layout).items():
        if i <= block:
            x = pool_pairs(x, direction)
    return x


def pool_tokens_to_block(x: torch.Tensor, grid: tuple[int, int], layout: "LayoutLike", block: int,
                         prefix: int = 1) -> torch.Tensor:
    """An unmerged model's tokens ``(B, P + H·W, C)`` as a merged model's block ``block`` sees them: the P prefix
    tokens as they are, the patch tokens pooled by every merge at or before ``block`` (:func:`pool_to_block`).

    Returns:
        ``(B, P + h·w, C)``.

    Raises:
        RuntimeError: if ``x`` does not hold ``P + H·W`` tokens (the reshape fails).

    >>> pool_tokens_to_block(torch.zeros(2, 5 + 4 * 4, 8), (4, 4), "h1,v2", 2, prefix=5).shape   # 4×4 → 4×2 → 2×2
    torch.Size([2, 9, 8])
    """
    B, _, C = x.shape
    patches = pool_to_block(x[:, prefix:].reshape(B, *grid, C), layout, block)
    return torch.cat([x[:, :prefix], patches.reshape(B, -1, C)], dim=1)


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

        def fix(items: list) -> list:
            return [(_on_grid(self, t[0], i, output_fmt, dense), t[1]) if isinstance(t, tuple)
                    else _on_grid(self, t, i, output_fmt, dense) for t, i in zip(items, blocks)]

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


def _on_grid(model: nn.Module, y: torch.Tensor, block: int, output_fmt: str, dense: bool) -> torch.Tensor:
    """Block ``block``'s patch tokens ``(B, h·w, C)`` on its own grid: ``NCHW`` ``(B, C, h, w)`` or ``NLC``; with
    ``dense``, mapped back onto the full patch grid first (:func:`upsample_to_patch_grid`)."""
    B, _, C = y.shape
    g = y.reshape(B, *model_token_grids(model)[block], C).permute(0, 3, 1, 2)      # (B, C, h, w)
    if dense:
        g = upsample_to_patch_grid(g, model, block=block)                           # (B, C, H, W)
    return g.flatten(2).transpose(1, 2) if output_fmt == "NLC" else g.contiguous()


class ATMEVisionTransformerDistilled(ATMEVisionTransformer, VisionTransformerDistilled):
    """A distilled DeiT (CLS + distillation token, timm's ``VisionTransformerDistilled``) with ATME merges: the
    grid-aware methods of :class:`ATMEVisionTransformer` over timm's distilled forward."""


class MergeEvaBlock(EvaBlock):
    """A timm ``EvaBlock`` (EVA-02, DINOv3) whose input is merged first, like :class:`MergeBlock`; the rotary codes it
    receives (``rope``) are those of its merged grid (:func:`block_ropes`)."""

    merge: TokenMerge

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        return super().forward(self.merge(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)


MERGE_BLOCKS = (MergeBlock, MergeEvaBlock)
"""The block classes that merge their input (one per timm block class :func:`apply_atme` patches)."""


def block_ropes(model: nn.Module, rope: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The rotary codes each block of an Eva model uses: ``rope`` (the model's own, ``(H·W, 2·d)``) up to the first
    merge, then the codes at each merged grid's pair centres (:mod:`cait.models.rope`), ``(h·w, 2·d)``, in
    ``rope``'s dtype and device. ``[None] * depth`` without RoPE."""
    if rope is None:
        return [None] * len(model.blocks)
    coords, codes, out = None, rope, []
    for block in model.blocks:
        if isinstance(block, MergeEvaBlock):
            coords = rope_coords(model.rope, patch_grid(model)) if coords is None else coords   # (H, W, 2)
            coords = pooled_coords(coords, block.merge.direction)                               # (h, w, 2)
            codes = rope_codes(model.rope, coords).flatten(0, 1).to(device=rope.device, dtype=rope.dtype)
        out.append(codes)
    return out


class ATMEEva(Eva):
    """A timm ``Eva`` (EVA-02, DINOv3) with ATME merges: each block gets the rotary codes of its own grid
    (:func:`block_ropes`: a merged token's code is its pair's centre), and intermediates come on each block's grid.
    :func:`apply_atme` swaps a model's class to it. Gradient checkpointing and patch dropout are not used here."""

    def _blocks(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, take=(), stop: int | None = None,
                norm: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embed ``x`` and run the blocks (up to ``stop``); also return the outputs of the blocks in ``take``."""
        x = self.patch_embed(x)
        x, rope = self._pos_embed(x)
        x = self.norm_pre(x)
        kept = []
        for i, (blk, codes) in enumerate(zip(self.blocks, block_ropes(self, rope))):
            if stop is not None and i > stop:
                break
            x = blk(x, rope=codes, attn_mask=attn_mask, is_causal=is_causal)
            if i in take:
                kept.append(self.norm(x) if norm else x)
        return x, kept

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                         ) -> torch.Tensor:
        return self.norm(self._blocks(x, attn_mask, is_causal)[0])

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, attn_mask=None, is_causal: bool = False,
                              dense: bool = False):
        """timm's ``forward_intermediates``, with each intermediate on its own block's grid (``dense=True``: on the
        full patch grid), as :meth:`ATMEVisionTransformer.forward_intermediates`.

        Raises:
            ValueError: for an ``output_fmt`` other than ``NCHW`` or ``NLC``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, inter = self._blocks(x, attn_mask, is_causal, set(take), max_index if stop_early else None, norm)
        P = self.num_prefix_tokens
        blocks = sorted(set(take))
        out = [_on_grid(self, y[:, P:], i, output_fmt, dense) if output_fmt == "NCHW" or dense else y[:, P:]
               for y, i in zip(inter, blocks)]
        if return_prefix_tokens:
            out = list(zip(out, [y[:, :P] for y in inter]))
        return out if intermediates_only else (self.norm(x), out)

    def set_input_size(self, *args, **kwargs) -> None:
        """Refused: a merged Eva keeps the image size it was merged at.

        Raises:
            ValueError: always.
        """
        raise ValueError("an Eva model with ATME merges keeps its image size; resize before merging")


ATME_CLASSES = {VisionTransformer: ATMEVisionTransformer, VisionTransformerDistilled: ATMEVisionTransformerDistilled,
                Eva: ATMEEva}
"""timm class → the class :func:`apply_atme` swaps it to."""

MERGE_CLASSES = {Block: MergeBlock, EvaBlock: MergeEvaBlock}
"""timm block class → the merging block class :func:`apply_atme` swaps it to."""


# ----------------------------------------------------------------------------------------------------------------
# A model's grids
# ----------------------------------------------------------------------------------------------------------------


def get_layout(model: nn.Module) -> Layout:
    """The merge layout applied to a model (``{}`` for none)."""
    return Layout({i: b.merge.direction for i, b in enumerate(model.blocks) if isinstance(b, MERGE_BLOCKS)})


def prefix_tokens(model: nn.Module) -> int:
    """P, the tokens before the patch grid: timm's ``num_prefix_tokens`` (1 for DeiT: the CLS token)."""
    return int(getattr(model, "num_prefix_tokens", 1))


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid ``(H, W)`` of the patch embedding (14×14 for DeiT at 224 px)."""
    return tuple(model.patch_embed.grid_size)


def model_token_grids(model: nn.Module) -> list[tuple[int, int]]:
    """The patch grid that each block of ``model`` sees, merges included."""
    return token_grids(patch_grid(model), len(model.blocks), get_layout(model))


def apply_atme(model: nn.Module, layout: LayoutLike) -> nn.Module:
    """Insert HTM/VTM merges into a timm ViT, in place. Its prefix tokens (``model.num_prefix_tokens``: a CLS token,
    a distillation token, registers, or none) pass every merge untouched.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (EVA-02, DINOv3: its rotary codes follow the merges,
            :func:`block_ropes`) without merges, at a fixed image size.
        layout: e.g. ``"h4,v8"`` or ``{4: "h", 8: "v"}`` (0-based block indices).

    Returns:
        The same model; ``model.blocks[i]`` is a :class:`MergeBlock` for each ``i`` in the layout.

    Raises:
        ValueError: if the model already has merges or a dynamic image size, or the layout does not fit the model
            (block out of range, side already 1).
        TypeError: if a block to merge is not a timm ``Block`` or ``EvaBlock``.
    """
    layout = Layout.parse(layout)
    if get_layout(model):
        raise ValueError(f"model already has an ATME layout ({get_layout(model)})")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("ATME needs a fixed image size (the token grid must be known at every block)")
    if not isinstance(getattr(model, "patch_drop", None), (type(None), nn.Identity)) \
            or rope_reason(getattr(model, "rope", None)):
        raise ValueError(rope_reason(getattr(model, "rope", None)) or "ATME needs every patch token: patch dropout "
                         "is on (create the model with patch_drop_rate=0)")
    grids_before = [patch_grid(model)] + token_grids(patch_grid(model), len(model.blocks), layout)[:-1]
    for i, direction in layout.items():
        block = model.blocks[i]
        if type(block) not in MERGE_CLASSES:
            raise TypeError(f"block {i} is {type(block).__name__}; ATME patches timm's Block and EvaBlock only")
        dim = block.norm1.normalized_shape[0]
        merge = TokenMerge(dim, direction, grids_before[i], prefix=prefix_tokens(model))
        ref = next(block.parameters())
        block.__class__ = MERGE_CLASSES[type(block)]
        block.merge = merge.to(device=ref.device, dtype=ref.dtype)
    if layout and type(model) in ATME_CLASSES:
        model.__class__ = ATME_CLASSES[type(model)]                      # grid-aware intermediates and resizing
    return model


def upsample_to_patch_grid(maps: torch.Tensor, model_or_layout, grid: tuple[int, int] | None = None,
                           block: int = -1) -> torch.Tensor:
    """Map per-token values on a block's merged grid back onto the full patch grid (dense transfer, docs/method.md:
    ATME).

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
        layout = Layout.parse(model_or_layout)
        if grid is None:
            raise ValueError("grid is required when a layout is given")
        if block < 0:                       # without a model, "from the end" means after every merge
            block = max(layout, default=0)
    fh = 2 ** sum(1 for i, d in layout.items() if i <= block and d == "v")
    fw = 2 ** sum(1 for i, d in layout.items() if i <= block and d == "h")
    out = maps.repeat_interleave(fh, dim=-2).repeat_interleave(fw, dim=-1)
    return out[..., : grid[0], : grid[1]]
