"""Prune and fold: turn a (compactor) model and its masked set S into a compact model (docs/method.md: CDCP).

Folding uses ``W' = QW``, ``b' = Qb`` (exact: Q sits before any nonlinearity). Removing channel j deletes row j of
``W'``/``b'`` and, for v and FFN channels, column j of the consuming layer (``proj``, ``fc2``). A q/k pair removes
row j from both q and k: one term of the head's dot product. The attention scale stays the *original* ``d_h^-1/2``.

The compact block keeps timm's ``Block`` (norms, layer scale, drop path, Mlp) and swaps its attention for
:class:`cait.layers.pruned_attention.PrunedAttention`, whose heads share one q/k width and one v width, so it remains
a plain batched attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models.eva import EvaAttention

from ..layers.compactor import BiasedQKV, CompactorGLU, CompactorLinear, CompactorQKV
from ..layers.pruned_attention import PrunedAttention
from ..models.parts import attention_qkv, ffn_width, folded as _folded, prunable_reason
from .select import ChannelMask


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


def _prune_ffn(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep hidden channels ``keep`` (bool ``(D_f,)``) of an FFN, in place: their ``fc1`` rows (gate and value rows
    when gated) and ``fc2`` columns."""
    if isinstance(mlp, GluMlp):
        W1, b1 = _folded(mlp.fc1)
        both = torch.cat([keep, keep])
        mlp.fc1 = _linear(W1[both], None if b1 is None else b1[both])
    elif isinstance(mlp, SwiGLU):
        for name in ("fc1_g", "fc1_x"):
            W1, b1 = _folded(getattr(mlp, name))
            setattr(mlp, name, _linear(W1[keep], None if b1 is None else b1[keep]))
    else:
        W1, b1 = _folded(mlp.fc1)
        mlp.fc1 = _linear(W1[keep], None if b1 is None else b1[keep])
    mlp.fc2 = _linear(mlp.fc2.weight[:, keep], mlp.fc2.bias)


def _pruned_attention(attn: nn.Module, qk_dim: int, v_dim: int, like: torch.Tensor, qkv_bias: bool
                      ) -> PrunedAttention:
    """An empty :class:`PrunedAttention` with ``attn``'s heads, scale, dropout and (Eva) rotary settings."""
    new = PrunedAttention(attn.proj.out_features, attn.num_heads, qk_dim, v_dim, attn.scale, qkv_bias=qkv_bias,
                          proj_bias=attn.proj.bias is not None, attn_drop=attn.attn_drop.p,
                          proj_drop=attn.proj_drop.p).to(like.device, like.dtype)
    new.fused_attn = attn.fused_attn
    if isinstance(attn, EvaAttention):
        new.rope_prefix, new.rotate_half = attn.num_prefix_tokens, attn.rotate_half
    return new


@torch.no_grad()
def prune(model: nn.Module, mask: ChannelMask) -> nn.Module:
    """Fold compactors and remove every channel in S, in place (docs/method.md: folding and pruning).

    Args:
        model: a timm ViT or Eva (ATME allowed) whose blocks :func:`prunable_reason` accepts, with or without
            compactors.
        mask: the masked set S, head-consistent (:meth:`ChannelMask.check_consistency`).

    Returns:
        The same model object, now compact: ``blocks[l].attn`` is a :class:`PrunedAttention`, the FFN's Linears are
        narrowed, no compactor remains. Its output equals the compactor model's with S's rows zeroed.

    Raises:
        ValueError: if the mask is inconsistent, does not match the model's shape, removes every channel of a
            head or an FFN, or removes q/k channels of an Eva attention (they carry rotary codes).
        TypeError: if a block is already pruned or has layers CDCP cannot prune (:func:`prunable_reason`).
    """
    if len(mask.qk) != len(model.blocks):
        raise ValueError(f"mask covers {len(mask.qk)} blocks, the model has {len(model.blocks)}")
    mask.check_consistency()
    for l, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        if (reason := prunable_reason(attn, mlp)) is not None:
            raise TypeError(f"block {l} cannot be pruned: {reason}")
        H, d, D = attn.num_heads, attn.head_dim, ffn_width(mlp)[0]
        drop_qk, drop_v, drop_f = (m.to(attn.proj.weight.device) for m in (mask.qk[l], mask.v[l], mask.ffn[l]))
        if drop_qk.shape != (H, d) or drop_v.shape != (H, d) or drop_f.shape != (D,):
            raise ValueError(f"block {l}: mask shapes {tuple(drop_qk.shape)}, {tuple(drop_v.shape)}, "
                             f"{tuple(drop_f.shape)} do not fit {H} heads × {d} and FFN {D}")
        qk_dim, v_dim = int((~drop_qk[0]).sum()), int((~drop_v[0]).sum())
        if qk_dim == 0 or v_dim == 0 or bool(drop_f.all()):
            raise ValueError(f"block {l}: the mask removes every channel of a head or of the FFN")
        if isinstance(attn, EvaAttention) and bool(drop_qk.any()):
            raise ValueError(f"block {l}: q/k channels of a rotary (Eva) attention cannot be pruned")

        W, b = attention_qkv(attn)                             # (3·H·d, C), rows [q | k | v], heads contiguous
        keep = torch.cat([(~drop_qk).flatten(), (~drop_qk).flatten(), (~drop_v).flatten()])
        new = _pruned_attention(attn, qk_dim, v_dim, W, b is not None)
        new.qkv = _linear(W[keep], None if b is None else b[keep])
        new.proj = _linear(attn.proj.weight[:, (~drop_v).flatten()], attn.proj.bias)
        block.attn = new
        _prune_ffn(mlp, ~drop_f)
    return model


@torch.no_grad()
def fold_compactors(model: nn.Module) -> nn.Module:
    """Fold every compactor into its Linear (``W' = QW``, ``b' = Qb``) without removing channels, in place.

    The model keeps timm's layers in their own layout (an EVA-02 attention gets back its separate q and v biases),
    so it is again an ordinary (uncompressed or ATME) ViT or Eva.
    """
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, (CompactorQKV, BiasedQKV)):
            W, b = _folded(qkv) if isinstance(qkv, CompactorQKV) else (qkv.weight, qkv.bias)
            if isinstance(qkv, BiasedQKV) or isinstance(getattr(qkv, "linear", None), BiasedQKV):
                q_bias, _, v_bias = b.detach().chunk(3)                # the k part is a zero buffer, never trained
                attn.qkv = _linear(W, None)
                attn.q_bias, attn.v_bias = nn.Parameter(q_bias.clone()), nn.Parameter(v_bias.clone())
                attn.k_bias = torch.zeros_like(attn.q_bias)
            else:
                attn.qkv = _linear(W, b)
        for name in ("fc1", "fc1_x"):
            layer = getattr(mlp, name, None)
            if isinstance(layer, (CompactorLinear, CompactorGLU)):
                setattr(mlp, name, _linear(*layer.folded()))
    return model


def restructure(model: nn.Module, widths: list[tuple[int, int, int]]) -> nn.Module:
    """Give an unpruned ViT or Eva the compact shapes ``[(qk_dim, v_dim, ffn_dim), ...]`` (per-head q/k, v), in
    place.

    The new layers are freshly initialised on the model's device (``"meta"`` included: shapes only): this builds the
    skeleton that a compact checkpoint is loaded into.

    Raises:
        ValueError: if ``widths`` has the wrong length or a width exceeds the original.
        TypeError: if a block is already pruned or cannot be (:func:`cait.models.parts.prunable_reason`).
    """
    if len(widths) != len(model.blocks):
        raise ValueError(f"{len(widths)} block widths for a model with {len(model.blocks)} blocks")
    for l, (block, (qk, v, f)) in enumerate(zip(model.blocks, widths)):
        attn, mlp = block.attn, block.mlp
        if (reason := prunable_reason(attn, mlp)) is not None:
            raise TypeError(f"block {l} cannot be restructured: {reason}")
        H, d, D = attn.num_heads, attn.head_dim, ffn_width(mlp)[0]
        if not (1 <= qk <= d and 1 <= v <= d and 1 <= f <= D):
            raise ValueError(f"block {l}: widths (q/k {qk}, v {v}, ffn {f}) do not fit heads of {d} and FFN {D}")
        ref = attn.proj.weight
        with torch.device(ref.device):
            block.attn = _pruned_attention(attn, qk, v, ref, attention_qkv(attn)[1] is not None)
            _narrow_ffn(mlp, f, ref.dtype)
    return model


def _narrow_ffn(mlp: nn.Module, f: int, dtype: torch.dtype) -> None:
    """Fresh FFN Linears of hidden width ``f`` (gate and value rows when gated), in place, on the current device."""
    C = mlp.fc2.out_features

    def lin(n_in: int, n_out: int, like: nn.Linear) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=like.bias is not None, dtype=dtype)

    if isinstance(mlp, SwiGLU):
        mlp.fc1_g, mlp.fc1_x = lin(C, f, mlp.fc1_g), lin(C, f, mlp.fc1_x)
    else:
        mlp.fc1 = lin(C, 2 * f if isinstance(mlp, GluMlp) else f, mlp.fc1)
    mlp.fc2 = lin(f, C, mlp.fc2)


def is_pruned(model: nn.Module) -> bool:
    """True if the model's attention is :class:`PrunedAttention` (a compact model)."""
    return any(isinstance(b.attn, PrunedAttention) for b in model.blocks)
