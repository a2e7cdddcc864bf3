"""The attention of a compact (CDCP-pruned) block: per-head q/k width ≠ v width, the original scale (docs/method.md:
CDCP).

All heads of a block share one q/k width and one v width (head-level consistency), so the pruned attention is still
one batched ``scaled_dot_product_attention`` call. :func:`cait.compress.prune.prune` builds it from a folded
compactor block.

*The fast kernel* (choice): PyTorch's fused attention on the CPU needs q, k and v of one head width; with q/k ≠ v it
falls back to a path measured 3–5× slower here (batch 8, 3 heads, 785 tokens: 40/48 150 ms, the same padded to 48
31 ms). So the narrower of q/k and v is padded with zero channels for the call (``pad_to_kernel``, on by default):
zero q and k channels add nothing to ``q·kᵀ`` (the scale stays the original), and zero v channels give output
channels that are sliced off before ``proj``, so the output is the same. The padding is not multiply-adds of the
model: FLOPs are counted with it off (:func:`exact_widths`). Worked example, DeiT-S block 6 at 55% (q/k 40, v 48 per
head, 6 heads)::

    >>> attn = PrunedAttention(384, 6, qk_dim=40, v_dim=48, scale=64 ** -0.5)
    >>> attn.qkv, attn.proj
    (Linear(in_features=384, out_features=768, bias=True), Linear(in_features=288, out_features=384, bias=True))
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_rot_embed_cat


def rotate_patches(t: torch.Tensor, rope: torch.Tensor, prefix: int, half: bool) -> torch.Tensor:
    """q or k ``(B, H, N, d)`` with its patch tokens (all but the first ``prefix``) rotated by their rotary codes
    ``rope`` (``(N − prefix, 2·d)`` or broadcastable, ``[sin | cos]``), as timm's ``EvaAttention`` does; ``half``:
    timm's rotate-half layout (DINOv3) instead of interleaved pairs (EVA-02)."""
    return torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2)


class PrunedAttention(nn.Module):
    """Multi-head self-attention with per-head q/k width ``qk_dim`` and v width ``v_dim``.

    ``qkv`` is one ``Linear(C, H·(2·qk_dim + v_dim))`` laid out as ``[q (H, qk_dim) | k (H, qk_dim) | v (H, v_dim)]``,
    heads contiguous; ``proj`` is ``Linear(H·v_dim, C)``.

    Args:
        dim: embed dim C.
        num_heads: H.
        qk_dim: q/k channels kept per head (>= 1).
        v_dim: v channels kept per head (>= 1).
        scale: the attention scale, normally the original ``d_h^-1/2``; it is *not* recomputed from ``qk_dim``.
        qkv_bias, proj_bias: whether the Linears have biases.
        attn_drop, proj_drop: dropout probabilities.

    An Eva's compact attention also rotates q and k by the rotary codes its block passes (``rope``), after its
    ``rope_prefix`` prefix tokens, in timm's layout (``rotate_half``); its q/k keep their full width.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float, qkv_bias: bool = True,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if min(qk_dim, v_dim) < 1:
            raise ValueError(f"every head needs at least one q/k and one v channel, got {qk_dim}, {v_dim}")
        self.num_heads, self.qk_dim, self.v_dim, self.scale = num_heads, qk_dim, v_dim, scale
        self.fused_attn = True
        self.pad_to_kernel = True          # pad q/k or v to one width for the fused kernel (module docstring)
        self.rope_prefix = 0               # Eva: tokens before the patches, which get no rotary code
        self.rotate_half = False           # Eva: timm's rotary layout (half vs interleaved)
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, N, C)`` → q, k ``(B, H, N, qk_dim)`` and v ``(B, H, N, v_dim)``."""
        B, N, _ = x.shape
        H, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([H * dqk, H * dqk, H * dv], dim=-1)
        return (q.reshape(B, N, H, dqk).transpose(1, 2), k.reshape(B, N, H, dqk).transpose(1, 2),
                v.reshape(B, N, H, dv).transpose(1, 2))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``x`` ``(B, N, C)`` → ``(B, N, C)``. ``rope`` (Eva): rotary codes ``(N − P, 2·qk_dim)`` of the patch
        tokens, applied to q and k after the ``rope_prefix`` tokens as timm's ``EvaAttention`` does."""
        B, N, _ = x.shape
        q, k, v = self.qkv_heads(x)
        if rope is not None:
            q, k = rotate_patches(q, rope, self.rope_prefix, self.rotate_half).type_as(v), \
                rotate_patches(k, rope, self.rope_prefix, self.rotate_half).type_as(v)
        if self.fused_attn:
            d = max(self.qk_dim, self.v_dim) if self.pad_to_kernel else 0
            if d > self.qk_dim:                                                # zero q/k channels: q·kᵀ unchanged
                q, k = F.pad(q, (0, d - self.qk_dim)), F.pad(k, (0, d - self.qk_dim))
            if d > self.v_dim:                                                 # zero v channels: sliced off below
                v = F.pad(v, (0, d - self.v_dim))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
            x = x[..., : self.v_dim]                                           # (B, H, N, v_dim)
        else:
            if attn_mask is not None or is_causal:
                raise NotImplementedError("the manual attention path takes no mask; set fused_attn = True")
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)   # (B, H, N, N)
            x = self.attn_drop(attn) @ v                                       # (B, H, N, v_dim)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scale={self.scale:.4g}"


@contextlib.contextmanager
def exact_widths(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every :class:`PrunedAttention` of ``model`` attends at its own q/k and v widths (no kernel
    padding), so a traced FLOPs count sees the model's true multiply-adds; the setting is restored after."""
    attns = [m for m in model.modules() if isinstance(m, PrunedAttention)]
    before = [a.pad_to_kernel for a in attns]
    for a in attns:
        a.pad_to_kernel = False
    try:
        yield model
    finally:
        for a, b in zip(attns, before):
            a.pad_to_kernel = b
