"""Baselines CAIT is compared against. ToMe — token merging by bipartite soft matching — written here from the paper.

ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, §3) merges ``r`` patch tokens in every block,
between the attention and the MLP, with no training:

1. *Bipartite soft matching.* The block's keys, averaged over heads, are the similarity metric. Patch tokens are split
   alternately into sets A (even positions) and B (odd positions); each A token's most similar B token (cosine) is
   its edge; the ``r`` A tokens with the most similar edges are merged into their B partners, the other A tokens and
   all B tokens are kept. The prefix tokens (CLS, a distillation token, registers) are never merged.
2. *Weighted merging.* Each token carries a size (how many patches it stands for); a merge is the size-weighted mean
   and the sizes add.
3. *Proportional attention.* ``softmax(q·kᵀ/√d + log s)``: a key that stands for ``s`` patches counts ``s`` times.

Worked example, DeiT-Tiny (197 tokens) with ``r = 13``: the attention of block i sees ``197 − 13·i`` tokens, its MLP
``197 − 13·(i + 1)``; block 11's MLP sees 41. Unlike ATME's fixed grid, which tokens merge depends on the image, so
the token grid (and dense outputs) is lost. ToMe's own code is CC-BY-NC and is not used.

FLOPs follow the convention of docs/method.md: FLOPs (one multiply-add = one FLOP, attention matmuls included) plus
ToMe's similarity matmul ``|A|·|B|·d_h`` per block; :func:`tome_flops` is the closed form and equals fvcore's count
(tests).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block

from ..models.atme import get_layout, prefix_tokens
from ..models.deit import block_outputs
from ..models.meta import meta_of
from ..models.parts import fuse_eva_qkv_bias_
from ..models.rope import rope_codes, rope_coords, rope_reason
from ..models.spec import describe


# ----------------------------------------------------------------------------------------------------------------
# Pure tensor core
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Matching:
    """One block's bipartite soft matching over ``N`` patch tokens: A = even positions, B = odd ones; ``src`` (B, r)
    are the A tokens merged into the B tokens ``dst`` (B, r); ``keep`` (B, |A| − r) the A tokens kept, in order."""

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``(B, N, c)`` per token → ``(B, N − r, c)``: kept A rows, then every B row plus the A rows merged into
        it (a sum: weight ``t`` first for a mean)."""
        def rows(u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # u (B, n, c), idx (B, k) → (B, k, c)
            return u.gather(1, idx[..., None].expand(-1, -1, u.shape[-1]))
        ta, tb = t[:, ::2], t[:, 1::2]
        tb = tb.scatter_add(1, self.dst[..., None].expand(-1, -1, t.shape[-1]), rows(ta, self.src))
        return torch.cat([rows(ta, self.keep), tb], dim=1)


def bipartite_match(metric: torch.Tensor, r: int) -> Matching | None:
    """ToMe §3's matching: each A token's most similar B token (cosine of ``metric`` ``(B, N, d)``, the keys averaged
    over heads); the ``r`` best-matched A tokens merge (``r`` capped at ``ceil(N / 2)``). None when ``r <= 0``."""
    N = metric.shape[1]
    r = min(int(r), (N + 1) // 2)
    if r <= 0:
        return None
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)                    # (B, |A|, |B|) cosine similarity
    best, partner = scores.max(dim=-1)                                 # (B, |A|)
    order = best.argsort(dim=-1, descending=True)
    src, keep = order[:, :r], order[:, r:].sort(dim=-1).values         # merged A tokens; kept A tokens, in order
    return Matching(keep, src, partner.gather(1, src))                 # dst: their B partners


def merge_tokens(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens by bipartite soft matching (ToMe §3), size-weighted.

    Args:
        x: patch tokens ``(B, N, C)`` (no CLS).
        size: ``(B, N, 1)``, how many patches each token stands for.
        metric: ``(B, N, d)`` similarity features (the keys, mean over heads).
        r: tokens to remove; capped at ``ceil(N / 2)`` (every A token merged).

    Returns:
        ``(x', size')`` with ``N − r`` tokens: the unmerged A tokens (in their original order), then all B tokens.
        ``size'`` sums to the same total as ``size``.
    """
    match = bipartite_match(metric, r)
    if match is None:
        return x, size
    size_out = match.merge(size)                                       # (B, N − r, 1)
    return match.merge(x * size) / size_out, size_out


def tome_token_counts(num_patches: int, schedule: Sequence[int], prefix: int = 1) -> list[tuple[int, int]]:
    """Tokens ``(attention, MLP)`` of each block, the ``prefix`` tokens included, for a per-block ``r`` schedule.

    >>> tome_token_counts(196, [13] * 12)[0]                  # DeiT: CLS + 196 patches
    (197, 184)
    >>> tome_token_counts(1369, [100] * 12, prefix=5)[0]     # DINOv2 with 4 registers at 518 px
    (1374, 1274)
    """
    out, n = [], num_patches
    for r in schedule:
        r = min(int(r), (n + 1) // 2)
        out.append((prefix + n, prefix + n - r))
        n -= r
    return out


# ----------------------------------------------------------------------------------------------------------------
# The timm patch
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ToMeState:
    """Shared by the blocks of one ToMe model: the ``r`` schedule and, during a forward pass, the token sizes."""

    schedule: list[int]
    prefix: int = 1                                                    # tokens before the patches, never merged
    size: torch.Tensor | None = None                                   # (B, N, 1), prefix tokens included
    trace_source: bool = False                                         # keep `source` (dense outputs need it)
    source: torch.Tensor | None = None                                 # (B, N − prefix, L): token n holds patch l
    rope: nn.Module | None = None                                      # Eva: the model's rotary module
    grid: tuple[int, int] = (0, 0)                                     # Eva: the patch grid (H, W)
    coords: torch.Tensor | None = None                                 # Eva: (B, N − prefix, 2) token positions


def keep_output(module: nn.Module, args, output: torch.Tensor) -> None:
    """Forward hook: keep a module's last output on the module (``module.kept_output``). Stateless, so a copy of a
    patched model (``copy.deepcopy``) keeps its own."""
    module.kept_output = output


class ToMeBlock(Block):
    """A timm ``Block`` that merges ``r`` tokens between its attention and its MLP (ToMe). Built by
    :func:`apply_tome` by a class swap, so timm's attention, MLP, norms, layer scale and drop path run unchanged;
    proportional attention goes in through timm's own ``attn_mask`` (an additive float mask ``log s``)."""

    tome: ToMeState
    tome_index: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        state, i = self.tome, self.tome_index
        if i == 0:                                                     # a new forward pass
            _start_pass(state, x, None)
        bias = _proportional_bias(state, attn_mask)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias, is_causal=is_causal)))
        if state.schedule[i] > 0:
            x = _merge_step(self, state, x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToMeEvaBlock(EvaBlock):
    """A timm ``EvaBlock`` (EVA-02, DINOv3) with ToMe, as :class:`ToMeBlock`. Each token also carries its position,
    the size-weighted mean of the patch coordinates it stands for (in the model's RoPE convention), and attends with
    the rotary code of that position (:func:`cait.models.rope.rope_codes`): a merged token is where its patches are,
    as ATME's merged tokens are."""

    tome: ToMeState
    tome_index: int

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        state, i = self.tome, self.tome_index
        if i == 0:
            _start_pass(state, x, rope)
        bias = _proportional_bias(state, attn_mask)
        codes = rope if state.coords is None or state.size is None else \
            rope_codes(state.rope, state.coords).to(rope.dtype)[:, None]                      # (B, 1, N − P, 2d)
        x_attn = self.attn(self.norm1(x), rope=codes, attn_mask=bias, is_causal=is_causal)
        x = x + self.drop_path1(x_attn if self.gamma_1 is None else self.gamma_1 * x_attn)
        if state.schedule[i] > 0:
            x = _merge_step(self, state, x)
        x_mlp = self.mlp(self.norm2(x))
        return x + self.drop_path2(x_mlp if self.gamma_2 is None else self.gamma_2 * x_mlp)


def _proportional_bias(state: ToMeState, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """ToMe's proportional attention as an additive mask ``log s`` ``(B, 1, 1, N)`` over the keys (None before any
    merge), plus the caller's ``attn_mask`` if any."""
    bias = None if state.size is None else state.size.log().transpose(1, 2)[:, None]
    if attn_mask is not None:
        bias = attn_mask if bias is None else bias + attn_mask
    return bias


def _start_pass(state: ToMeState, x: torch.Tensor, rope: torch.Tensor | None) -> None:
    """Reset ``state`` for a new forward pass of ``x`` ``(B, P + L, C)``: sizes, sources and (RoPE) coordinates."""
    state.size = None
    B, L = x.shape[0], x.shape[1] - state.prefix
    state.source = (torch.eye(L, device=x.device, dtype=x.dtype).expand(B, L, L) if state.trace_source else None)
    state.coords = None
    if rope is not None and state.rope is not None:
        coords = rope_coords(state.rope, state.grid).flatten(0, 1).to(x.device)                # (L, 2)
        state.coords = coords.expand(B, L, 2)


def _merge_step(block: nn.Module, state: ToMeState, x: torch.Tensor) -> torch.Tensor:
    """ToMe's merge of ``state.schedule[i]`` tokens of ``x`` ``(B, N, C)`` after ``block``'s attention, keys read
    from its ``qkv`` output (kept by :func:`keep_output`); sizes, sources and coordinates follow the merge."""
    P, r = state.prefix, state.schedule[block.tome_index]
    qkv = block.attn.qkv.kept_output                                   # (B, N, 3·H·d), kept by keep_output
    block.attn.qkv.kept_output = None
    B, N, _ = qkv.shape
    keys = qkv.reshape(B, N, 3, block.attn.num_heads, -1)[:, :, 1].mean(dim=2)   # (B, N, d): keys, mean over heads
    size = state.size if state.size is not None else x.new_ones(B, N, 1)
    match = bipartite_match(keys[:, P:], r)                           # the prefix tokens never merge
    psize = match.merge(size[:, P:])
    x = torch.cat([x[:, :P], match.merge(x[:, P:] * size[:, P:]) / psize], dim=1)   # (B, P + N' − r, C)
    if state.coords is not None:
        state.coords = match.merge(state.coords * size[:, P:].to(state.coords.dtype)) / psize.to(state.coords.dtype)
    state.size = torch.cat([size[:, :P], psize], dim=1)
    if state.source is not None:
        state.source = match.merge(state.source)                       # each patch stays in exactly one token
    return x


def apply_tome(model: nn.Module, r: int | Sequence[int]) -> nn.Module:
    """Turn a timm DeiT into its ToMe version, in place (no training; ToMe §3).

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (any prefix tokens: CLS, a distillation token, registers, or
            none; read from ``num_prefix_tokens``), timm ``Block``s or ``EvaBlock``s with a fused ``qkv``, no ATME
            merges and no pruning. An Eva's tokens carry their positions for RoPE (:class:`ToMeEvaBlock`). Without a class token, timm's
            average pooling averages the merged tokens, each once (ToMe's proportional attention only weighs keys).
        r: tokens merged per block: one int for every block (the paper's constant schedule), or one per block.

    Returns:
        The same model; ``model.tome`` is its :class:`ToMeState` and ``model.cait_meta.tome`` its schedule.

    Raises:
        ValueError: for a negative ``r``, a schedule of the wrong length, a model with merges, or one already
            patched.
        TypeError: if a block is not a timm ``Block`` with timm's ``Attention`` or an ``EvaBlock`` with a fused
            ``EvaAttention`` (e.g. a pruned model), or for a per-depth or multimodal RoPE.
    """
    depth = len(model.blocks)
    schedule = [int(r)] * depth if isinstance(r, (int, float)) else [int(v) for v in r]
    if len(schedule) != depth or any(v < 0 for v in schedule):
        raise ValueError(f"ToMe needs r >= 0 for each of the {depth} blocks, got {r!r}")
    if getattr(model, "tome", None) is not None:
        raise ValueError("model already has ToMe applied")
    if get_layout(model):
        raise ValueError("ToMe is a baseline for the uncompressed model; this one has an ATME layout")
    rope = getattr(model, "rope", None)
    if rope_reason(rope):
        raise TypeError(rope_reason(rope))
    state = ToMeState(schedule, prefix=prefix_tokens(model), rope=rope, grid=tuple(model.patch_embed.grid_size))
    for i, block in enumerate(model.blocks):
        if (type(block), type(block.attn)) not in ((Block, Attention), (EvaBlock, EvaAttention)) \
                or getattr(block.attn, "qkv", None) is None:
            raise TypeError(f"block {i} is {type(block).__name__} with {type(block.attn).__name__}; ToMe patches "
                            "timm's Block with timm's Attention, or EvaBlock with a fused EvaAttention, only (an "
                            "uncompressed ViT)")
        fuse_eva_qkv_bias_(block.attn)                                 # qkv runs as a module: its output is kept
        block.__class__ = ToMeEvaBlock if isinstance(block, EvaBlock) else ToMeBlock
        block.tome, block.tome_index = state, i
        if schedule[i] > 0:
            block.attn.qkv.register_forward_hook(keep_output)
    model.tome = state
    model.cait_meta = dataclasses.replace(meta_of(model), tome=list(schedule))
    return model


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and matching CAIT's budget
# ----------------------------------------------------------------------------------------------------------------
def tome_flops_by_block(model: nn.Module, schedule: Sequence[int] | None = None) -> dict[str, int]:
    """FLOPs (multiply-adds, one image) per part of a DeiT under a ToMe schedule, keyed as
    :func:`cait.measure.flops.flops_by_block` (``patch_embed``, ``blocks.0`` …, ``head``), by the closed form of the
    method page's FLOPs convention: the attention on each block's input tokens, the MLP on the merged ones, and
    ToMe's ``|A|·|B|·d_h`` similarity. Equal to fvcore's count (tested), without tracing the model.

    Args:
        model: a ToMe model (its schedule is used) or an uncompressed DeiT with ``schedule`` given.
        schedule: r per block; default: the model's.
    """
    schedule = list(schedule if schedule is not None else model.tome.schedule)
    spec = describe(model)                                             # describe() ignores ToMe: full grids
    patches = prod(model.patch_embed.grid_size)
    out = {"patch_embed": spec.embed_flops}
    counts = tome_token_counts(patches, schedule, spec.prefix)
    for i, (b, (n_attn, n_mlp), r) in enumerate(zip(spec.blocks, counts, schedule)):
        C, Dqk, Dv = b.dim, b.heads * b.qk_dim, b.heads * b.v_dim
        f = (n_attn * C * (2 * Dqk + Dv) + n_attn ** 2 * (Dqk + Dv) + n_attn * Dv * C
             + b.ffn_linears * n_mlp * C * b.ffn_dim)
        p = n_attn - spec.prefix                                       # patch tokens entering the merge
        if min(r, (p + 1) // 2) > 0:
            f += ((p + 1) // 2) * (p // 2) * b.qk_dim                      # |A|·|B|·d_h cosine similarities
        out[f"blocks.{i}"] = f
    out["head"] = spec.head_flops + spec.pool_flops(counts[-1][1] if counts else None)    # a MAP head: ToMe's tokens
    return out


def tome_flops(model: nn.Module, schedule: Sequence[int] | None = None) -> int:
    """FLOPs (multiply-adds, one image) of a DeiT under a ToMe schedule: the sum of :func:`tome_flops_by_block`.

    Args:
        model: a ToMe model (its schedule is used) or an uncompressed DeiT with ``schedule`` given.
        schedule: r per block; default: the model's.
    """
    return sum(tome_flops_by_block(model, schedule).values())


def tome_schedule(model: nn.Module, flops_reduction: float) -> list[int]:
    """The ToMe schedule that removes ``flops_reduction`` of the model's FLOPs as closely as integers allow: the
    paper's constant ``r`` (the largest that stays at or under the target), then one more token in the earliest
    blocks until the target is reached (never more than one step past it).

    Raises:
        ValueError: for a reduction outside [0, 1) or one that merging every token still cannot reach.
    """
    if not 0.0 <= flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be in [0, 1), got {flops_reduction}")
    depth = len(model.blocks)
    base = tome_flops(model, [0] * depth)

    def reduction(s: list[int]) -> float:
        return 1.0 - tome_flops(model, s) / base

    r = 0
    while reduction([r + 1] * depth) <= flops_reduction and r < prod(model.patch_embed.grid_size):
        r += 1
    schedule = [r] * depth
    for i in range(depth):
        if reduction(schedule) >= flops_reduction - 1e-12:
            break
        schedule[i] += 1
    if reduction(schedule) < flops_reduction - 0.005:
        raise ValueError(f"ToMe cannot remove {100 * flops_reduction:.1f}% of FLOPs from this model")
    return schedule


# ----------------------------------------------------------------------------------------------------------------
# Dense outputs: merges undone
# ----------------------------------------------------------------------------------------------------------------
def tome_dense_intermediates(model: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Each listed block's output on the full patch grid, ``(B, C, H, W)``: every patch position takes the value of
    the merged token that absorbed it (ToMe's source tracking, the paper's way to use ToMe for dense prediction).

    Args:
        model: a ToMe model (:func:`apply_tome`).
        x: images ``(B, 3, S, S)``.
        indices: blocks whose outputs to return.
    """
    state, (H, W) = model.tome, model.patch_embed.grid_size
    sources: dict[int, torch.Tensor] = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: sources.__setitem__(i, state.source))
             for i in sorted({i % len(model.blocks) for i in indices})]
    state.trace_source = True
    try:
        outs = block_outputs(model, x, indices)
    finally:
        state.trace_source = False
        for h in hooks:
            h.remove()
    maps = []
    for i, tokens in zip(sorted(sources), outs):
        patches = sources[i].transpose(1, 2) @ tokens[:, state.prefix:]       # (B, L, C): each patch its token's value
        maps.append(patches.transpose(1, 2).reshape(tokens.shape[0], -1, H, W))
    return maps
