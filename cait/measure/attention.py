"""CLS attention maps, mapped back to image pixels through the merged grid (paper Fig. 8).

The CLS token's attention row in block l, over the patch tokens, says where the classifier "looks". With ATME, block
l sees a merged grid (e.g. 7×7 after ``h4,v7`` on DeiT-S); :func:`cait.models.atme.upsample_to_patch_grid` maps each
merged token back onto the 14×14 patches it covers, and :meth:`ClsAttention.to_pixels` onto the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.eva import EvaAttention

from ..data.synthetic import SyntheticShapes
from ..layers.pruned_attention import PrunedAttention, rotate_patches
from ..models.atme import model_token_grids, prefix_tokens, upsample_to_patch_grid
from ..models.parts import attention_qkv


def attention_probs(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities of one attention module for its input.

    Args:
        attn: timm ``Attention`` or ``EvaAttention`` (with or without compactors) or
            :class:`cait.layers.pruned_attention.PrunedAttention`.
        x: the module's input (after ``norm1``), ``(B, N, C)``.
        rope: an Eva block's rotary codes ``(N − P, 2·d_h)`` (what the block was called with), applied to q and k
            after the prefix tokens as the module does.

    Returns:
        ``(B, H, N, N)``; each row sums to 1.

    Raises:
        TypeError: for another attention type.
    """
    B, N, _ = x.shape
    if isinstance(attn, PrunedAttention):
        q, k, _ = attn.qkv_heads(x)
        P, half = attn.rope_prefix, attn.rotate_half
    elif isinstance(attn, (Attention, EvaAttention)):
        W, b = attention_qkv(attn)
        qkv = F.linear(x, W, b)
        head_dim = qkv.shape[-1] // (3 * attn.num_heads)   # from the output, not C // H
        q, k, _ = qkv.reshape(B, N, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        P, half = getattr(attn, "num_prefix_tokens", 0), getattr(attn, "rotate_half", False)
    else:
        raise TypeError(f"cannot read attention from {type(attn).__name__}")
    if rope is not None:
        q, k = rotate_patches(q, rope, P, half), rotate_patches(k, rope, P, half)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@dataclass
class ClsAttention:
    """CLS attention of one block for a batch of images.

    Attributes:
        maps: ``(B, H, h, w)``, CLS→patch attention on the block's (merged) grid; sums to ≤ 1 per head (the rest
            is the CLS token's attention to itself).
        patch_maps: ``(B, H, Hp, Wp)``, the same values on the full patch grid (each merged token repeated over the
            patches it covers).
        logits: ``(B, num_classes)``, the model's output for the images.
        block: the block index (non-negative).
        grid: ``(h, w)``.
        query: ``"cls"`` (the CLS token's row); without a class token, ``"map"`` at the last block of a model with
            an attention-pooling (MAP) head (its latent query's attention over the tokens it pools), else
            ``"mean"``: the attention each patch receives, averaged over every query token.
    """

    maps: torch.Tensor
    patch_maps: torch.Tensor
    logits: torch.Tensor
    block: int
    grid: tuple[int, int]
    query: str = "cls"

    def mean(self) -> torch.Tensor:
        """Head-mean on the patch grid, ``(B, Hp, Wp)``."""
        return self.patch_maps.mean(dim=1)

    def to_pixels(self, size: tuple[int, int], mode: str = "bilinear", heads: bool = True) -> torch.Tensor:
        """Maps resized to image pixels: ``(B, H, *size)`` (or ``(B, *size)`` with ``heads=False``, the head-mean)."""
        m = self.patch_maps if heads else self.mean()[:, None]
        kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        out = F.interpolate(m.float(), size=size, mode=mode, **kw)
        return out if heads else out[:, 0]


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor, block: int = -1) -> ClsAttention:
    """The CLS token's attention over the patches in one block, per head (docs/method.md: CLS attention).

    Prefix tokens (a distillation token, registers) are read from the model and left out of the maps, so a map covers
    the patches alone; registers take some of the CLS token's attention, so its patch maps sum to less. A model
    without a class token has no CLS row: at the last block of a model with an attention-pooling head (SigLIP's MAP)
    its maps are that head's query's attention over the tokens (``query="map"``, :func:`map_attention_probs`);
    otherwise the attention each patch receives, averaged over all queries (``query="mean"``).

    Args:
        model: any plain ViT or Eva built by this package (original, ATME, compactor or compact; an Eva's rotary
            codes are the ones its block was called with).
        images: ``(B, 3, S, S)``, normalised as the model expects (see :func:`cait.data.photos.preprocess`).
        block: block index, negative from the end (default: the last block).

    Returns:
        A :class:`ClsAttention` with the maps and the model's logits from the same forward pass.

    Raises:
        IndexError: if ``block`` is out of range.
    """
    depth = len(model.blocks)
    if not -depth <= block < depth:
        raise IndexError(f"block {block} out of range for a model with {depth} blocks")
    block %= depth
    attn, pool = model.blocks[block].attn, getattr(model, "attn_pool", None)
    P, has_cls = prefix_tokens(model), getattr(model, "cls_token", None) is not None
    query = "cls" if has_cls else "map" if pool is not None and block == depth - 1 else "mean"
    captured: dict[str, torch.Tensor] = {}
    handles = [attn.register_forward_hook(lambda mod, args, kwargs, out: captured.update(x=args[0], **kwargs),
                                          with_kwargs=True)]
    if query == "map":                                   # the MAP head reads the normed output of the last block
        handles.append(pool.register_forward_hook(lambda mod, args, out: captured.update(pooled=args[0])))
    try:
        logits = model(images)
    finally:
        for h in handles:
            h.remove()
    if query == "map":
        probs = map_attention_probs(pool, captured["pooled"])[:, :, :1]    # (B, H, 1, N): the first latent query
    else:
        probs = attention_probs(attn, captured["x"], captured.get("rope"))  # (B, H, N, N)
    h, w = model_token_grids(model)[block]
    rows = probs[:, :, 0, P:] if query in ("cls", "map") else probs[:, :, :, P:].mean(dim=2)   # (B, H, h·w)
    maps = rows.reshape(probs.shape[0], probs.shape[1], h, w)
    return ClsAttention(maps=maps, patch_maps=upsample_to_patch_grid(maps, model, block=block), logits=logits,
                        block=block, grid=(h, w), query=query)


def map_attention_probs(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention of an attention-pooling (MAP) head's latent queries over the tokens it pools.

    Args:
        pool: timm's ``AttentionPoolLatent`` (SigLIP's MAP head).
        x: its input, the model's normed output tokens ``(B, N, C)``.

    Returns:
        ``(B, H, L, N)`` for L latent queries; each row sums to 1.
    """
    B, N, C = x.shape
    H, d, L = pool.num_heads, pool.head_dim, pool.latent_len
    q = pool.q(pool.latent).reshape(1, L, H, d).transpose(1, 2)                    # (1, H, L, d)
    k = pool.kv(x).reshape(B, N, 2, H, d)[:, :, 0].transpose(1, 2)                 # (B, H, N, d)
    q, k = pool.q_norm(q), pool.k_norm(k)
    return ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


__all__ = ["ClsAttention", "attention_in_mask", "attention_probs", "cls_attention", "localisation_score",
           "map_attention_probs"]


def attention_in_mask(att: ClsAttention, masks: torch.Tensor, heads: bool = False) -> torch.Tensor:
    """Share of the CLS attention mass that falls inside the object (the paper's Fig. 8 claim, made a number).

    The CLS→patch attention is renormalised to sum to 1 over the patches; each patch counts with the fraction of
    its pixels inside the mask. A model that attends uniformly scores the object's area fraction; one that attends
    only to object patches scores 1.

    Args:
        att: from :func:`cls_attention` on images whose pixels align with ``masks``.
        masks: ``(B, S, S)`` bool object masks at the model's input resolution.
        heads: per head ``(B, H)`` instead of the head-mean ``(B,)``.

    Raises:
        ValueError: if the masks' batch size differs from the maps'.
    """
    if masks.shape[0] != att.patch_maps.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks for {att.patch_maps.shape[0]} attention maps")
    maps = att.patch_maps if heads else att.mean()[:, None]                     # (B, H or 1, Hp, Wp)
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    frac = F.adaptive_avg_pool2d(masks.float()[:, None], maps.shape[-2:])        # (B, 1, Hp, Wp) object share
    inside = (maps * frac).sum(dim=(-2, -1))                                      # (B, H or 1)
    return inside if heads else inside[:, 0]


@torch.no_grad()
def localisation_score(model: nn.Module, images: int = 1000, seed: int = 0, split: str = "val", block: int = -1,
                       batch_size: int = 50, device: str | torch.device = "cpu") -> dict:
    """Mean share of CLS attention inside the object over synthetic images (:mod:`cait.data.synthetic`, which knows
    each object's mask), rendered at the model's input size: the paper's Fig. 8 claim as one number.

    Args:
        model: any DeiT built by this package, trained on (or at least shown) the synthetic shapes.
        images: how many images of the split (indices ``0..images-1``).
        seed, split: the synthetic set's seed and split (``"val"`` is held out from training).
        block: whose CLS attention (default: the last block's).
        batch_size: images per forward pass.
        device: where to run.

    Returns:
        ``{"attention_in_object": float, "object_area": float, "ratio": float, "images": int, "block": int}``:
        the mean of :func:`attention_in_mask` (head-mean), the mean object area fraction (what uniform attention
        scores), their ratio, and the 1-based block.
    """
    ds = SyntheticShapes(images, int(model.patch_embed.img_size[0]), seed, split)
    model = model.to(device).eval()
    inside, area = [], []
    for start in range(0, images, batch_size):
        xs, masks = zip(*((x, m) for x, _, m in (ds.tensor(i) for i in range(start, min(images, start + batch_size)))))
        att = cls_attention(model, torch.stack(xs).to(device), block)
        m = torch.stack(masks).to(device)
        inside.append(attention_in_mask(att, m).cpu())
        area.append(m.float().mean(dim=(1, 2)).cpu())
    i, a = torch.cat(inside).mean().item(), torch.cat(area).mean().item()
    return {"attention_in_object": round(i, 4), "object_area": round(a, 4), "ratio": round(i / a, 2),
            "images": images, "block": att.block + 1}
