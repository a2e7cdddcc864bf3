"""FLOPs and parameters in the paper's convention (SPEC §4).

One FLOP is one multiply-add. Counted: every Linear (the ATME fusion Linears included), the patch-embedding
convolution, the classifier, and the two attention matmuls (q·kᵀ and attn·v). Not counted (choice, matching the
formula of SPEC §4): LayerNorm, GELU, softmax, additions.

Two independent counts that must agree:

* :func:`analytic_flops` — the closed form per block with N tokens (CLS included), embed dim C, q/k width D_qk and
  v width D_v (summed over heads) and FFN width D_f::

      N·C·(2·D_qk + D_v) + N²·(D_qk + D_v) + N·D_v·C + 2·N·C·D_f   (+ N_out·2C·C when the block merges)

  plus the patch embedding ``patches·(3·p²)·C`` and the head ``C·classes``. DeiT-S: 4.599 G.
* :func:`count_flops` — fvcore's jit trace, with a handle for ``aten::scaled_dot_product_attention`` (fvcore has
  none: without it DeiT-S counts 4.24 G) and LayerNorm switched off.

Compactors are not part of the analytic count: it describes the deployed model, into which they fold.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

import warnings

import torch
import torch.nn as nn

with warnings.catch_warnings():          # fvcore's import touches the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from .merge import MergeBlock, model_token_grids


@dataclass(frozen=True)
class BlockSpec:
    """The shape of one transformer block, enough to count its FLOPs.

    Attributes:
        tokens: N, tokens the block's attention and FFN see (CLS included, after this block's merge).
        dim: embed dim C.
        heads: number of heads H.
        qk_dim: q/k width per head (all heads of a block share it).
        v_dim: v width per head.
        ffn_dim: FFN hidden width D_f.
        merge_tokens: N_out, patch tokens produced by this block's merge (0 when it does not merge).
    """

    tokens: int
    dim: int
    heads: int
    qk_dim: int
    v_dim: int
    ffn_dim: int
    merge_tokens: int = 0

    def flops(self) -> int:
        """FLOPs (multiply-adds) of this block for one image, SPEC §4."""
        N, C, Dqk, Dv, Df = self.tokens, self.dim, self.heads * self.qk_dim, self.heads * self.v_dim, self.ffn_dim
        return (N * C * (2 * Dqk + Dv) + N * N * (Dqk + Dv) + N * Dv * C + 2 * N * C * Df
                + self.merge_tokens * 2 * C * C)

    # FLOPs removed by pruning one unit (used by the CDCP selection, SPEC §2).
    def qk_unit_flops(self) -> int:
        """FLOPs saved by removing one q/k channel pair from one head: its q and k rows, one term of q·kᵀ."""
        return 2 * self.tokens * self.dim + self.tokens ** 2

    def v_unit_flops(self) -> int:
        """FLOPs saved by removing one v channel from one head: its qkv row, its attn·v column, its proj column."""
        return 2 * self.tokens * self.dim + self.tokens ** 2

    def ffn_unit_flops(self) -> int:
        """FLOPs saved by removing one FFN channel: its fc1 row and fc2 column."""
        return 2 * self.tokens * self.dim


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a whole ViT: its blocks, patch embedding and head FLOPs, and its patch grid ``(H, W)``."""

    blocks: tuple[BlockSpec, ...]
    embed_flops: int
    head_flops: int
    grid: tuple[int, int] | None = None

    @property
    def merged(self) -> bool:
        """True if any block merges tokens (ATME applied)."""
        return any(b.merge_tokens for b in self.blocks)

    def flops(self) -> int:
        """Total FLOPs (multiply-adds) for one image."""
        return self.embed_flops + self.head_flops + sum(b.flops() for b in self.blocks)

    def with_widths(self, widths: list[tuple[int, int, int]]) -> "ModelSpec":
        """The same model with per-block ``(qk_dim, v_dim, ffn_dim)`` replaced (per-head dims for q/k and v)."""
        if len(widths) != len(self.blocks):
            raise ValueError(f"{len(widths)} widths for {len(self.blocks)} blocks")
        return replace(self, blocks=tuple(replace(b, qk_dim=q, v_dim=v, ffn_dim=f)
                                          for b, (q, v, f) in zip(self.blocks, widths)))


def block_widths(block: nn.Module) -> tuple[int, int, int, int]:
    """``(heads, qk_dim, v_dim, ffn_dim)`` of a block: per-head q/k and v widths, FFN width.

    Works for timm's Attention (with or without compactors) and for the pruned attention of :mod:`cait.prune`.
    """
    attn = block.attn
    qk = getattr(attn, "qk_dim", None) or attn.head_dim
    v = getattr(attn, "v_dim", None) or attn.head_dim
    return attn.num_heads, qk, v, block.mlp.fc1.out_features


def describe(model: nn.Module) -> ModelSpec:
    """Read a model's :class:`ModelSpec` from its modules (original, ATME, compactor or pruned DeiT)."""
    grids = model_token_grids(model)
    pe = model.patch_embed.proj
    n_patches = prod(model.patch_embed.grid_size)
    embed = n_patches * (pe.weight.shape[1] * pe.weight.shape[2] * pe.weight.shape[3]) * pe.weight.shape[0]
    head = model.head.in_features * model.head.out_features if isinstance(model.head, nn.Linear) else 0
    blocks = []
    for block, (h, w) in zip(model.blocks, grids):
        heads, qk, v, ffn = block_widths(block)
        blocks.append(BlockSpec(tokens=1 + h * w, dim=block.norm1.normalized_shape[0], heads=heads, qk_dim=qk,
                                v_dim=v, ffn_dim=ffn, merge_tokens=h * w if isinstance(block, MergeBlock) else 0))
    return ModelSpec(tuple(blocks), embed, head, tuple(model.patch_embed.grid_size))


def analytic_flops(model: nn.Module | ModelSpec) -> int:
    """Total FLOPs (multiply-adds, one image) by the closed form of SPEC §4."""
    spec = model if isinstance(model, ModelSpec) else describe(model)
    return spec.flops()


def _sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q·kᵀ plus attn·v, as multiply-adds."""
    q, k, v = (get_shape(x) for x in inputs[:3])                    # (B, H, L, E), (B, H, S, E), (B, H, S, Ev)
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _not_counted(inputs, outputs) -> int:
    return 0


def flop_analysis(model: nn.Module, img_size: int | None = None) -> FlopCountAnalysis:
    """An fvcore ``FlopCountAnalysis`` of one image in the paper's convention (see module docstring).

    Args:
        model: any DeiT built by this package.
        img_size: input side in pixels; another size than the model's counts a resized copy (timm's
            ``set_input_size``: position embedding resampled, ATME grids moved).

    Raises:
        ValueError: if the model cannot take that size (not a multiple of the patch, or a layout that no longer fits).
    """
    size = img_size or model.patch_embed.img_size[0]
    if size != model.patch_embed.img_size[0]:                   # count a resized copy; the model is untouched
        import copy
        if size % model.patch_embed.patch_size[0]:
            raise ValueError(f"img_size {size} is not a multiple of the patch size {model.patch_embed.patch_size[0]}")
        model = copy.deepcopy(model)
        model.set_input_size(img_size=size)
    p = next(model.parameters())
    x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    fca = FlopCountAnalysis(model, (x,))
    fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
    # Zero, not None: fvcore's set_op_handle(name, None) leaves an existing default handle in place.
    fca.set_op_handle("aten::layer_norm", _not_counted)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    fca.total()                                                      # run the trace now, in eval mode
    model.train(was_training)
    return fca


def count_flops(model: nn.Module, img_size: int | None = None) -> int:
    """Total FLOPs (multiply-adds) of one image, counted by fvcore with attention matmuls included (SPEC §4).

    Args:
        model: any DeiT built by this package (original, ATME, compactor or compact).
        img_size: input side in pixels; default: the model's own (224 for DeiT). Another size counts a resized copy.

    Raises:
        ValueError: for a size that is not a multiple of the patch size, or at which the ATME layout does not fit.
    """
    return int(flop_analysis(model, img_size).total())


def flops_by_block(model: nn.Module, img_size: int | None = None) -> dict[str, int]:
    """fvcore FLOPs per top-level part: ``patch_embed``, ``blocks.0`` … ``blocks.{L-1}``, ``head``."""
    by_module = flop_analysis(model, img_size).by_module()
    names = ["patch_embed"] + [f"blocks.{i}" for i in range(len(model.blocks))] + ["head"]
    return {n: int(by_module.get(n, 0)) for n in names}


def count_params(model: nn.Module) -> int:
    """Number of parameters (compactors included if the model still has them)."""
    return sum(p.numel() for p in model.parameters())
