"""Rotary position codes (RoPE) at merged positions: what ATME gives a merged token of an Eva model (EVA-02, DINOv3).

timm's axial RoPE modules compute a code from a coordinate grid ``(H, W, 2)``: the angle of each frequency band is
linear in the coordinate (``RotaryEmbeddingCat``: ``angle = coord · band``, on index or pixel coordinates, rescaled
to a reference grid for EVA-02; ``RotaryEmbeddingDinoV3``: ``angle = 2π · coord / period`` on centred coordinates
normalised to [-1, 1]). A merged token stands for a pair of neighbours, so its position is the pair's centre: the
mean of the pair's coordinates (:func:`cait.layers.token_merge.pool_pairs`, which pads an odd side by repeating its
last row/column exactly as the merge does its tokens). Its code is the model's own rotary module evaluated there.

On DINOv3's normalised coordinates the centres of an even side's pairs are exactly the coordinates the module gives
a grid of half that side; on EVA-02's index coordinates they are not (index ``2j + ½`` of the full grid, rescaled),
so the codes are always computed from the pooled coordinates, never from the merged grid's size. Worked example,
DINOv3 (4 × 4 grid, centred coordinates; one HTM halves the columns)::

    >>> from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
    >>> rope = RotaryEmbeddingDinoV3(dim=16, feat_shape=[4, 4])
    >>> c = rope_coords(rope, (4, 4))
    >>> c[0, :, 1].tolist(), pooled_coords(c, "h")[0, :, 1].tolist()
    ([-0.75, -0.25, 0.25, 0.75], [-0.5, 0.5])
    >>> torch.allclose(rope_codes(rope, pooled_coords(c, "h")).flatten(0, 1), rope.get_embed(shape=[4, 2]))
    True

Training-time coordinate augmentation (DINOv3's shift/jitter/rescale) is not applied to merged codes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, _build_grid, _rope_layout

from ..layers.token_merge import pool_pairs

ROPE_MODULES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3)
"""The rotary modules whose codes can be moved to merged positions (EVA-02, DINOv3 and timm's other Eva ViTs)."""


def rope_reason(rope: nn.Module | None) -> str | None:
    """Why a model's rotary module cannot follow ATME's merges (None: it can, or there is none)."""
    if rope is None or type(rope) in ROPE_MODULES:
        return None
    return (f"rotary embedding {type(rope).__name__}: per-depth or multimodal RoPE is not supported (axial "
            "RoPE only: EVA-02, DINOv3)")


def rope_coords(rope: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The coordinates ``(H, W, 2)`` (float32, CPU) that ``rope`` computes its codes from on a ``grid`` of patches,
    in the module's own convention (index / pixel / centred, reference-grid rescaling, ``ij``/``xy`` channel order).

    Raises:
        TypeError: for a rotary module other than timm's ``RotaryEmbeddingCat`` / ``RotaryEmbeddingDinoV3``.
    """
    if isinstance(rope, RotaryEmbeddingDinoV3):
        return _build_grid(list(grid), grid_type="centered", grid_offset=rope.grid_offset,
                           grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords, ndim=2)
    if isinstance(rope, RotaryEmbeddingCat):
        return _build_grid(list(grid), grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape,
                           grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                           normalize_coords=rope.normalize_coords)
    raise TypeError(rope_reason(rope))


def pooled_coords(coords: torch.Tensor, direction: str) -> torch.Tensor:
    """The coordinates ``(H, W, 2)`` of the grid after one merge (``"h"``: HTM, ``"v"``: VTM): each pair's centre."""
    return pool_pairs(coords[None], direction)[0]


def rope_codes(rope: nn.Module, coords: torch.Tensor) -> torch.Tensor:
    """``rope``'s concatenated ``[sin | cos]`` codes at ``coords`` ``(..., 2)``: ``(..., 2·d)`` with ``d`` the
    module's dim (the head dim), in the layout timm's ``apply_rot_embed_cat`` expects. At a module's own grid
    coordinates it equals ``rope.get_embed()`` (tested); float32 unless the module computes in another dtype.

    Raises:
        TypeError: for a rotary module other than timm's ``RotaryEmbeddingCat`` / ``RotaryEmbeddingDinoV3``.
    """
    lead = coords.shape[:-1]
    flat = coords.reshape(-1, coords.shape[-1])
    if isinstance(rope, RotaryEmbeddingDinoV3):
        sin, cos = rope._get_pos_embed_from_coords(flat)
    elif isinstance(rope, RotaryEmbeddingCat):
        pos = flat.to(rope.bands.device).unsqueeze(-1) * rope.bands             # (n, 2, bands)
        sin = _rope_layout(pos.sin().flatten(-2), rope.rotate_half)
        cos = _rope_layout(pos.cos().flatten(-2), rope.rotate_half)
    else:
        raise TypeError(rope_reason(rope))
    return torch.cat([sin, cos], dim=-1).reshape(*lead, -1)
