"""Token pruning, EViT-style — the unstructured baseline for dense transfer, written from the paper.

EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022, §3): at a few blocks, between the attention and
the MLP, keep the ``k`` patch tokens the CLS token attends to most (its attention averaged over heads) and *fuse*
the others into one token, their average weighted by that attention; the fused token travels on as a token. DeiT-S
prunes before the 4th, 7th and 10th blocks' MLPs (0-based blocks 3, 6, 9) with keep rate 0.7.

Dense outputs (CAIT §IV-B1, as for VTC-LFC's "structured" variant): a token dropped at block ``i`` leaves a hole in
the patch grid; the map of any later block fills it with that token's value from the last block where it was kept
(:func:`token_pruning_dense_intermediates`). The fused token maps to no position.

Worked example, DeiT-Tiny (196 patches), keep rate 0.5 at blocks 3, 6, 9: block 3's attention sees 197 tokens, its
MLP 1 + 98 + 1; block 6's MLP 1 + 49 + 1; block 9's MLP 1 + 24 + 1 (the fused token is re-fused each time).
FLOPs follow the convention of docs/method.md: FLOPs, with each block's attention and MLP on their own token counts,
plus the CLS-attention scores (``H·N·d_h``) and the fused average (``N_dropped·C``) at each pruning block;
:func:`token_pruning_flops` is the closed form and equals fvcore's count (tests).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import prod

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import Block

from ..models.atme import get_layout, prefix_tokens
from .tome import keep_output
from ..models.deit import block_outputs
from ..models.meta import meta_of
from ..models.spec import describe


def default_locations(depth: int) -> list[int]:
    """EViT's pruning blocks for a ``depth``-block ViT: a quarter, half and three quarters in (12 → 3, 6, 9)."""
    return sorted({depth // 4, depth // 2, 3 * depth // 4})


def kept_tokens(candidates: int, keep_rate: float) -> int:
    """Patch tokens kept out of ``candidates`` (at least one)."""
    return max(1, int(round(keep_rate * candidates)))


def token_counts(num_patches: int, depth: int, keep_rate: float, locations: list[int], prefix: int = 1
                 ) -> list[tuple[int, int, int]]:
    """Per block ``(attention tokens, MLP tokens, tokens dropped here)``, the ``prefix`` tokens (CLS, registers)
    and the fused token included.

    >>> token_counts(196, 12, 0.5, [3, 6, 9])[3]               # DeiT: CLS + 196 patches
    (197, 100, 98)
    >>> token_counts(196, 12, 0.5, [3, 6, 9], prefix=5)[3]     # CLS + 4 registers
    (201, 104, 98)
    """
    out, candidates, fused = [], num_patches, 0
    for i in range(depth):
        n_attn = prefix + candidates + fused
        if i in locations:
            k = kept_tokens(candidates, keep_rate)
            out.append((n_attn, prefix + k + 1, candidates - k))
            candidates, fused = k, 1
        else:
            out.append((n_attn, n_attn, 0))
    return out


@dataclass
class PruningState:
    """Shared by the blocks of one pruned model: where and how much to prune; during a forward pass the original
    patch position of each patch token, and (for dense outputs) the last value of every position."""

    keep_rate: float
    locations: list[int]
    prefix: int = 1                                         # CLS first, then any other prefix tokens; never pruned
    positions: torch.Tensor | None = None                   # (B, k) original patch index of each kept patch token
    trace_canvas: bool = False
    canvas: torch.Tensor | None = None                      # (B, P, C): last value of each patch position


class PrunedTokensBlock(Block):
    """A timm ``Block`` that may prune tokens between its attention and its MLP (EViT). Built by
    :func:`apply_token_pruning` by a class swap, so timm's attention, MLP, norms and layer scale run unchanged."""

    pruning: PruningState
    pruning_index: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        st, i, P = self.pruning, self.pruning_index, self.pruning.prefix
        if i == 0:                                                          # a new forward pass
            B, L = x.shape[0], x.shape[1] - P                               # L patch tokens
            st.positions = torch.arange(L, device=x.device).expand(B, L)
            st.canvas = x[:, P:].detach().clone() if st.trace_canvas else None
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        if i in st.locations:
            x = self._prune(x, self.attn.qkv.kept_output)
            self.attn.qkv.kept_output = None
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if st.canvas is not None:                                           # kept tokens: their newest value
            k = st.positions.shape[1]
            st.canvas = st.canvas.scatter(1, st.positions[..., None].expand(-1, -1, x.shape[-1]), x[:, P:P + k])
        return x

    def _prune(self, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Keep the most attended patch tokens, fuse the rest (and an earlier fused token) into one."""
        st, P = self.pruning, self.pruning.prefix
        B, N, C = x.shape
        H = self.attn.num_heads
        q, k = qkv.reshape(B, N, 3, H, -1)[:, :, 0], qkv.reshape(B, N, 3, H, -1)[:, :, 1]   # (B, N, H, d)
        scores = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) * self.attn.scale
        cls_attn = scores.softmax(dim=-1).mean(dim=1)                       # (B, N): CLS attention, mean over heads
        n_cand = int(st.positions.shape[1])                                 # patch tokens (the fused one follows)
        keep = kept_tokens(n_cand, st.keep_rate)
        order = cls_attn[:, P:P + n_cand].argsort(dim=-1, descending=True)
        top, rest = order[:, :keep].sort(dim=-1).values, order[:, keep:]   # kept in their order; dropped
        if int(N) > P + n_cand:                                             # re-fuse the earlier fused token
            rest = torch.cat([rest, rest.new_full((B, 1), n_cand)], dim=1)
        tokens, attn = x[:, P:], cls_attn[:, P:]

        def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

        w = attn.gather(1, rest)                                            # (B, n_rest)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = torch.einsum("bn,bnc->bc", w, rows(tokens, rest))[:, None]  # (B, 1, C) attention-weighted average
        st.positions = st.positions.gather(1, top)
        return torch.cat([x[:, :P], rows(tokens, top), fused], dim=1)      # (B, P + k + 1, C)


def apply_token_pruning(model: nn.Module, keep_rate: float, locations: list[int] | None = None) -> nn.Module:
    """Turn a timm DeiT into its EViT-style token-pruning version, in place (no training).

    Args:
        model: a timm ``VisionTransformer`` with a CLS token (it ranks the patches; other prefix tokens, a
            distillation token or registers, are kept like it), timm ``Block``s, no merges and no pruning.
        keep_rate: share of the patch tokens kept at each pruning block, in (0, 1].
        locations: 0-based blocks that prune (default :func:`default_locations`).

    Returns:
        The same model; ``model.pruning`` is its :class:`PruningState`.

    Raises:
        ValueError: for a keep rate outside (0, 1], locations outside the model, a model without a class token
            or with merges, or one already patched.
        TypeError: if a block is not a timm ``Block`` with timm's ``Attention`` (e.g. a pruned model).
    """
    depth = len(model.blocks)
    locations = sorted(set(default_locations(depth) if locations is None else locations))
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate}")
    if any(not 0 <= i < depth for i in locations):
        raise ValueError(f"pruning blocks {locations} are outside 0..{depth - 1}")
    if getattr(model, "pruning", None) is not None or getattr(model, "tome", None) is not None or get_layout(model):
        raise ValueError("token pruning is a baseline for the uncompressed model; this one is already patched")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("token pruning (EViT) ranks patches by the CLS token's attention; this model has no class "
                         "token")
    state = PruningState(float(keep_rate), locations, prefix=prefix_tokens(model))
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(f"block {i} is {type(block).__name__} with {type(block.attn).__name__}; token pruning "
                            "patches timm's Block with timm's Attention only (an uncompressed DeiT)")
        block.__class__ = PrunedTokensBlock
        block.pruning, block.pruning_index = state, i
        if i in locations:
            block.attn.qkv.register_forward_hook(keep_output)
    model.pruning = state
    model.cait_meta = dataclasses.replace(meta_of(model), extra={**meta_of(model).extra,
                                          "token_pruning": {"keep_rate": keep_rate, "locations": locations}})
    return model


def token_pruning_flops(model: nn.Module, keep_rate: float | None = None, locations: list[int] | None = None) -> int:
    """FLOPs (multiply-adds, one image) under token pruning, by the closed form of docs/method.md: FLOPs (module
    docstring).

    Args:
        model: a pruned model (its settings are used) or an uncompressed DeiT with ``keep_rate`` given.
        keep_rate, locations: as :func:`apply_token_pruning`.
    """
    state = getattr(model, "pruning", None)
    keep_rate = state.keep_rate if keep_rate is None else keep_rate
    spec = describe(model)                                   # describe() sees full grids
    locations = (state.locations if state is not None and locations is None else
                 locations if locations is not None else default_locations(len(spec.blocks)))
    P = spec.prefix
    counts = token_counts(prod(model.patch_embed.grid_size), len(spec.blocks), keep_rate, locations, P)
    total = spec.embed_flops + spec.head_flops
    for b, (n_attn, n_mlp, dropped) in zip(spec.blocks, counts):
        C, Dqk, Dv = b.dim, b.heads * b.qk_dim, b.heads * b.v_dim
        total += n_attn * C * (2 * Dqk + Dv) + n_attn ** 2 * (Dqk + Dv) + n_attn * Dv * C + 2 * n_mlp * C * b.ffn_dim
        if n_attn != n_mlp or dropped:                              # a pruning block
            # n_attn = P + candidates + earlier fused token (0 or 1); n_mlp = P + kept + 1; candidates = kept + dropped
            earlier_fused = n_attn - P - (n_mlp - P - 1) - dropped
            fused_in = dropped + earlier_fused                        # what the new fused token averages
            total += b.heads * n_attn * b.qk_dim + fused_in * C        # CLS-attention scores, the fused average
    return total


def token_pruning_schedule(model: nn.Module, flops_reduction: float, locations: list[int] | None = None) -> float:
    """The largest keep rate (to 1e-6) at which token pruning at ``locations`` removes at least ``flops_reduction``
    of the model's FLOPs (kept tokens are whole, so it may remove slightly more: 50.5% for 50% on 64 patches).

    Raises:
        ValueError: for a reduction outside [0, 1) or one that keeping a single token still cannot reach.
    """
    if not 0.0 <= flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be in [0, 1), got {flops_reduction}")
    base = describe(model).flops()

    def reduction(rate: float) -> float:
        return 1.0 - token_pruning_flops(model, rate, locations) / base

    if reduction(1e-6) < flops_reduction:
        raise ValueError(f"token pruning cannot remove {100 * flops_reduction:.1f}% of FLOPs from this model at "
                         f"blocks {locations or default_locations(len(model.blocks))}")
    lo, hi = 1e-6, 1.0                                        # reduction(lo) >= target > reduction(hi) unless R = 0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reduction(mid) >= flops_reduction else (lo, mid)
    return round(lo, 6)


def token_pruning_dense_intermediates(model: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Each listed block's output on the full patch grid ``(B, C, H, W)``: kept tokens at their positions, dropped
    positions holding their value from the last block where they were kept (module docstring)."""
    state, (H, W) = model.pruning, model.patch_embed.grid_size
    canvases: dict[int, torch.Tensor] = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: canvases.__setitem__(i, state.canvas))
             for i in sorted({i % len(model.blocks) for i in indices})]
    state.trace_canvas = True
    try:
        block_outputs(model, x, indices)
    finally:
        state.trace_canvas = False
        for h in hooks:
            h.remove()
    return [canvases[i].transpose(1, 2).reshape(x.shape[0], -1, H, W) for i in sorted(canvases)]
