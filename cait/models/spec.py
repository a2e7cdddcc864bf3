"""A model's shape: per block its tokens, heads, q/k, v and FFN widths, and its FLOPs by the closed form
(docs/method.md: FLOPs).

:func:`describe` reads the shape of any DeiT this package builds (original, ATME, compactor or compact) once;
planning (:mod:`cait.compress.plan`) and selection (:mod:`cait.compress.select`) then work on the
:class:`ModelSpec` instead of walking the model. One FLOP is one multiply-add; per block with N tokens (CLS
included), embed dim C, q/k width D_qk and v width D_v (summed over heads) and FFN width D_f::

    N·C·(2·D_qk + D_v) + N²·(D_qk + D_v) + N·D_v·C + 2·N·C·D_f   (+ N_out·2C·C when the block merges)

plus the patch embedding ``patches·(3·p²)·C`` and the head ``C·classes``. Worked example: ``describe(deit_small)``
has 12 blocks of ``BlockSpec(tokens=197, dim=384, heads=6, qk_dim=64, v_dim=64, ffn_dim=1536)`` and
``.flops() == 4_598_882_304``; fvcore's count (:func:`cait.measure.flops.count_flops`) agrees exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

import torch.nn as nn

from .atme import MERGE_BLOCKS, model_token_grids, prefix_tokens
from .parts import ffn_width


@dataclass(frozen=True)
class BlockSpec:
    """The shape of one transformer block, enough to count its FLOPs.

    Attributes:
        tokens: N, tokens the block's attention and FFN see (prefix tokens included, after this block's merge).
        dim: embed dim C.
        heads: number of heads H.
        qk_dim: q/k width per head (all heads of a block share it).
        v_dim: v width per head.
        ffn_dim: FFN hidden width D_f.
        merge_tokens: N_out, patch tokens produced by this block's merge (0 when it does not merge).
        ffn_gated: a gated FFN (SwiGLU, EVA-02): two Linears ``C → D_f`` (gate and value) and ``D_f → C``, so
            ``3·N·C·D_f`` instead of ``2·N·C·D_f``.
        rope: q and k carry rotary position codes (Eva): CDCP keeps every q/k channel (a channel pairs with its
            rotary partner; pruning in pairs is not implemented), and prunes v and the FFN.
    """

    tokens: int
    dim: int
    heads: int
    qk_dim: int
    v_dim: int
    ffn_dim: int
    merge_tokens: int = 0
    ffn_gated: bool = False
    rope: bool = False

    @property
    def ffn_linears(self) -> int:
        """Linears of width D_f in the FFN: 2 (``fc1``, ``fc2``), 3 when gated."""
        return 3 if self.ffn_gated else 2

    def flops(self) -> int:
        """FLOPs (multiply-adds) of this block for one image, docs/method.md: FLOPs."""
        N, C, Dqk, Dv, Df = self.tokens, self.dim, self.heads * self.qk_dim, self.heads * self.v_dim, self.ffn_dim
        return (N * C * (2 * Dqk + Dv) + N * N * (Dqk + Dv) + N * Dv * C + self.ffn_linears * N * C * Df
                + self.merge_tokens * 2 * C * C)

    # FLOPs removed by pruning one unit (used by the CDCP selection, docs/method.md: CDCP).
    def qk_unit_flops(self) -> int:
        """FLOPs saved by removing one q/k channel pair from one head: its q and k rows, one term of q·kᵀ."""
        return 2 * self.tokens * self.dim + self.tokens ** 2

    def v_unit_flops(self) -> int:
        """FLOPs saved by removing one v channel from one head: its qkv row, its attn·v column, its proj column."""
        return 2 * self.tokens * self.dim + self.tokens ** 2

    def ffn_unit_flops(self) -> int:
        """FLOPs saved by removing one FFN channel: its fc1 row (gate and value rows when gated) and fc2 column."""
        return self.ffn_linears * self.tokens * self.dim



@dataclass(frozen=True)
class ModelSpec:
    """The shape of a whole ViT: its blocks, patch embedding and head FLOPs, its patch grid ``(H, W)``, its
    prefix tokens P (CLS, distillation token, registers: every block sees ``P + h·w`` tokens) and, for an
    attention-pooling (MAP) head, its shape (:meth:`pool_flops`)."""

    blocks: tuple[BlockSpec, ...]
    embed_flops: int
    head_flops: int
    grid: tuple[int, int] | None = None
    prefix: int = 1
    pool: tuple[int, int, int] | None = None

    def pool_flops(self, tokens: int | None = None) -> int:
        """FLOPs of an attention-pooling (MAP) head over ``tokens`` tokens (default: the last block's): with
        ``pool = (L, C, D)`` (latent queries, width, MLP width), ``L·(2C² + 2·C·D) + 2N·C² + 2·L·N·C`` (its q and kv
        projections, the two attention matmuls, ``proj`` and its MLP). 0 without one."""
        if self.pool is None:
            return 0
        L, C, D = self.pool
        N = self.blocks[-1].tokens if tokens is None else tokens
        return L * (2 * C * C + 2 * C * D) + 2 * N * C * C + 2 * L * N * C

    @property
    def merged(self) -> bool:
        """True if any block merges tokens (ATME applied)."""
        return any(b.merge_tokens for b in self.blocks)

    def flops(self) -> int:
        """Total FLOPs (multiply-adds) for one image."""
        return self.embed_flops + self.head_flops + self.pool_flops() + sum(b.flops() for b in self.blocks)

    def with_widths(self, widths: list[tuple[int, int, int]]) -> "ModelSpec":
        """The same model with per-block ``(qk_dim, v_dim, ffn_dim)`` replaced (per-head dims for q/k and v)."""
        if len(widths) != len(self.blocks):
            raise ValueError(f"{len(widths)} widths for {len(self.blocks)} blocks")
        return replace(self, blocks=tuple(replace(b, qk_dim=q, v_dim=v, ffn_dim=f)
                                          for b, (q, v, f) in zip(self.blocks, widths)))



def block_widths(block: nn.Module) -> tuple[int, int, int, int]:
    """``(heads, qk_dim, v_dim, ffn_dim)`` of a block: per-head q/k and v widths, FFN width.

    Works for timm's Attention and EvaAttention (with or without compactors) and for the pruned attention of
    :mod:`cait.prune`.
    """
    attn = block.attn
    qk = getattr(attn, "qk_dim", None) or attn.head_dim
    v = getattr(attn, "v_dim", None) or attn.head_dim
    return attn.num_heads, qk, v, ffn_width(block.mlp)[0]



def describe(model: nn.Module) -> ModelSpec:
    """Read a model's :class:`ModelSpec` from its modules (original, ATME, compactor or pruned; timm
    ``VisionTransformer`` or ``Eva``)."""
    grids = model_token_grids(model)
    pe = model.patch_embed.proj
    n_patches = prod(model.patch_embed.grid_size)
    embed = n_patches * (pe.weight.shape[1] * pe.weight.shape[2] * pe.weight.shape[3]) * pe.weight.shape[0]
    head = sum(h.in_features * h.out_features for h in (model.head, getattr(model, "head_dist", None))
               if isinstance(h, nn.Linear))                   # a distilled DeiT has two heads
    P, blocks, rope = prefix_tokens(model), [], getattr(model, "rope", None) is not None
    for block, (h, w) in zip(model.blocks, grids):
        heads, qk, v, ffn = block_widths(block)
        blocks.append(BlockSpec(tokens=P + h * w, dim=block.norm1.normalized_shape[0], heads=heads, qk_dim=qk,
                                v_dim=v, ffn_dim=ffn, merge_tokens=h * w if isinstance(block, MERGE_BLOCKS) else 0,
                                ffn_gated=ffn_width(block.mlp)[1], rope=rope))
    return ModelSpec(tuple(blocks), embed, head, tuple(model.patch_embed.grid_size), P, map_pool(model))


def map_pool(model: nn.Module) -> tuple[int, int, int] | None:
    """``(latent queries, width, MLP width)`` of a model's attention-pooling (MAP) head, None without one."""
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return None
    mlp = getattr(pool, "mlp", None)
    return int(pool.latent_len), int(pool.kv.in_features), 0 if mlp is None else int(mlp.fc1.out_features)
