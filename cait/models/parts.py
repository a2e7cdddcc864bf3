"""A block's parts read the same way across timm's ``VisionTransformer`` and ``Eva`` (EVA-02, DINOv3): the q/k/v
projection as one matrix, the FFN's hidden channels and whether CDCP can prune them (docs/method.md: CDCP).

timm writes the same computation several ways: ``Attention.qkv`` (one Linear), ``EvaAttention`` with a fused ``qkv``
whose q and v biases are separate parameters (and k has none), or three projections ``q_proj``/``k_proj``/``v_proj``;
an FFN as ``Mlp`` (``fc1`` → activation → ``fc2``), ``GluMlp`` (``fc1`` holds the gate rows, then the value rows) or
``SwiGLU`` (``fc1_g`` and ``fc1_x``). A SwiGLU hidden channel j is ``silu(g_j·x) · (v_j·x)``: CDCP removes it by
removing gate row j and value row j together, and column j of ``fc2``; its compactor sits after both input Linears,
where §2 of the method puts the FFN compactor (after ``fc1``, before the nonlinearity).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models.eva import EvaAttention

from ..layers.compactor import CompactorGLU, CompactorLinear, CompactorQKV


def folded(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', b')`` of a Linear, compactor folded in when there is one."""
    if isinstance(layer, (CompactorQKV, CompactorLinear, CompactorGLU)):
        return layer.folded()
    return layer.weight, layer.bias


def attention_qkv(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The q/k/v projection of an attention as one ``(W (3·H·d_h, C), b (3·H·d_h,) or None)``, rows ``[q | k | v]``
    with heads contiguous, compactors folded in: timm's ``Attention`` (``qkv``) and ``EvaAttention`` (a fused
    ``qkv`` with separate ``q_bias``/``v_bias`` and a zero k bias, or three projections ``q_proj``/``k_proj``/
    ``v_proj``, EVA-02 B/L)."""
    if isinstance(attn, EvaAttention) and attn.qkv is not None and attn.q_bias is not None:
        W = attn.qkv.weight
        return W, torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    if not isinstance(attn, EvaAttention) or attn.qkv is not None:
        return folded(attn.qkv)
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    W = torch.cat([p.weight for p in parts])
    if all(p.bias is None for p in parts):
        return W, None
    return W, torch.cat([p.bias if p.bias is not None else W.new_zeros(p.out_features) for p in parts])


def ffn_rows(mlp: nn.Module) -> torch.Tensor:
    """``(D_f, C·k)``: the input weights that produce each FFN hidden channel (``fc1``'s row; a gated FFN's gate row
    and value row side by side), compactors folded in."""
    if isinstance(mlp, GluMlp):
        return torch.cat(folded(mlp.fc1)[0].chunk(2), dim=1)
    if isinstance(mlp, SwiGLU):
        return torch.cat([mlp.fc1_g.weight, folded(mlp.fc1_x)[0]], dim=1)
    return folded(mlp.fc1)[0]


def prunable_reason(attn: nn.Module, mlp: nn.Module) -> str | None:
    """Why CDCP cannot prune a block with this attention and FFN (None: it can). Needs timm's ``Attention`` or a
    plain ``EvaAttention`` (no q/k norm, no norm of the attention output, no gate) and an ``Mlp``, ``GluMlp`` or
    ``SwiGLU`` without a norm over its hidden channels."""
    if type(attn) not in (Attention, EvaAttention) or type(mlp) not in (Mlp, GluMlp, SwiGLU):
        return f"{type(attn).__name__}/{type(mlp).__name__} (already pruned, or not timm's plain ViT layers)"
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return "q/k normalisation: pruning q/k channels would change the norm"
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or getattr(attn, "gate", None) is not None:
        return "a norm or gate on the attention output (scale_attn_inner / gated attention)"
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return "a norm over the FFN's hidden channels (scale_mlp): pruning them would change the norm"
    return None


def ffn_width(mlp: nn.Module) -> tuple[int, bool]:
    """``(D_f, gated)`` of an FFN: timm's ``Mlp`` (``fc1``), ``GluMlp`` (``fc1`` holds gate and value: half its
    rows) or ``SwiGLU`` (``fc1_g`` and ``fc1_x``)."""
    if isinstance(mlp, GluMlp):
        return mlp.fc1.out_features // 2, True
    if isinstance(mlp, SwiGLU):
        return mlp.fc1_g.out_features, True
    return mlp.fc1.out_features, False




@torch.no_grad()
def fuse_eva_qkv_bias_(attn: nn.Module) -> nn.Module:
    """Give an ``EvaAttention`` whose fused ``qkv`` keeps its q and v biases apart (EVA-02) one ``qkv`` Linear with
    the bias ``[q_bias | 0 | v_bias]``, in place, so that ``qkv`` runs as a module (hooks and compactors see it).
    The output is unchanged: timm computes ``F.linear(x, qkv.weight, cat(q_bias, 0, v_bias))`` either way. Any other
    attention is returned as it is."""
    if not isinstance(attn, EvaAttention) or attn.qkv is None or attn.q_bias is None:
        return attn
    W, b = attention_qkv(attn)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=True, device=W.device, dtype=W.dtype)
    lin.weight.copy_(W)
    lin.bias.copy_(b)
    attn.qkv, attn.q_bias, attn.v_bias, attn.k_bias = lin, None, None, None
    return attn
