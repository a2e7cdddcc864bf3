"""How much each prunable unit matters: the scores CDCP's selection (:mod:`cait.compress.select`) walks.

Three importances, one :class:`ChannelScores` shape (per block: ``q``, ``k``, ``v`` of ``(H, d_h)``, ``ffn`` of
``(D_f,)``):

* :func:`compactor_scores` — CDCP's own: the compactor row norms ``s_j = ‖Q[j, :]‖₂`` (docs/method.md: CDCP),
  read during fine-tuning.
* :func:`weight_scores` — the weight-norm preview: with identity compactors every compactor score is 1, so an
  untrained twin scores channel j by the norm of the weight row that produces it.
* :func:`fisher_scores` — training-free calibration (Kwon et al., NeurIPS 2022, §4.1): the empirical Fisher of a mask
  on each unit, ``½ Σ_images (∂L_i/∂m)²`` with the original's own predictions as labels; for a channel with
  activations ``a`` and gradients ``g`` on the N tokens of image i, ``∂L_i/∂m = Σ_n a·g``. Removing the pair
  (q_j, k_j) removes one term of ``q·kᵀ``, the same as masking q_j, so the pair's score is the q channel's.
  :func:`per_flop` divides any score by the FLOPs its unit's removal saves.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.eva import EvaAttention

from ..layers.compactor import CompactorQKV
from ..models.compactors import ffn_compactor
from ..models.parts import attention_qkv, ffn_rows, fuse_eva_qkv_bias_
from ..models.spec import ModelSpec

Progress = Callable[[str], None] | None
"""Called with a short status string while a long computation runs."""


def tensor_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``images[i:i + batch_size]`` for i = 0, batch_size, …: consecutive batches of a ``(n, ...)`` tensor."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


@dataclass
class ChannelScores:
    """Importance per channel: ``q``, ``k``, ``v`` are lists (one per block) of ``(H, d_h)``; ``ffn`` of ``(D_f,)``."""

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    ffn: list[torch.Tensor]

    def qk(self) -> list[torch.Tensor]:
        """Scores of q/k pairs: the mean of s^q and s^k (attention-level consistency)."""
        return [(a + b) / 2 for a, b in zip(self.q, self.k)]



def _check_blocks(model: nn.Module) -> None:
    if not len(model.blocks):
        raise ValueError("model has no blocks")



def compactor_scores(model: nn.Module) -> ChannelScores:
    """Scores from compactor rows, ``s_j = ‖Q[j, :]‖₂`` (docs/method.md: CDCP). Needs :func:`cait.add_compactors` first.

    Raises:
        ValueError: if a block has no compactors.
    """
    _check_blocks(model)
    q, k, v, f = [], [], [], []
    for i, block in enumerate(model.blocks):
        qkv, fc1 = block.attn.qkv, ffn_compactor(block.mlp)
        if not isinstance(qkv, CompactorQKV) or fc1 is None:
            raise ValueError(f"block {i} has no compactors; call cait.add_compactors(model) first")
        with torch.no_grad():
            q.append(qkv.q.norm(dim=-1).float().cpu())
            k.append(qkv.k.norm(dim=-1).float().cpu())
            v.append(qkv.v.norm(dim=-1).float().cpu())
            f.append(fc1.q.norm(dim=-1).float().cpu())
    return ChannelScores(q, k, v, f)



def weight_scores(model: nn.Module) -> ChannelScores:
    """Scores from the (folded) weight rows, for one-shot compression with no training.

    With identity compactors every compactor score is 1, so the untrained preview scores channel j by the L2 norm of
    the row of ``qkv`` (q, k, v) or ``fc1`` (FFN; a gated FFN's gate and value rows together) that produces it,
    compactors folded in if present (:func:`cait.models.parts.attention_qkv`, :func:`~cait.models.parts.ffn_rows`).
    """
    _check_blocks(model)
    q, k, v, f = [], [], [], []
    for block in model.blocks:
        attn = block.attn
        H = attn.num_heads
        with torch.no_grad():
            rows = attention_qkv(attn)[0].norm(dim=1).float().cpu().reshape(3, H, -1)   # (3, H, d_h)
            q.append(rows[0]); k.append(rows[1]); v.append(rows[2])
            f.append(ffn_rows(block.mlp).norm(dim=1).float().cpu())                  # (D_f,)
    return ChannelScores(q, k, v, f)


def fisher_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 32,
                  progress: Progress = None) -> ChannelScores:
    """Empirical Fisher of each prunable unit's mask (see module docstring), summed over the images.

    Args:
        model: an unpruned ViT or Eva (ATME allowed) with timm ``Attention``/``EvaAttention``, no compactors. An
            EVA-02 attention whose q and v biases are separate gets one ``qkv`` Linear first, in place
            (:func:`cait.models.parts.fuse_eva_qkv_bias_`: the same function).
        images: ``(n, 3, S, S)`` calibration images, normalised for the model.
        labels: ``(n,)`` the labels to score against (the original model's predictions).
        batch_size: images per backward pass.
        progress: called with a short message after each batch.

    Returns:
        :class:`ChannelScores` with ``q = k`` = the q/k pair's Fisher ``(H, d_h)``, ``v`` ``(H, d_h)``, ``ffn``
        ``(D_f,)`` per block (units: squared nats).

    Raises:
        TypeError: if a block's attention is not timm's ``Attention``/``EvaAttention`` (a pruned model, or
            compactors).
    """
    device = next(model.parameters()).device
    blocks = _fisher_blocks(model)
    acts: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key):
        def hook(t: torch.Tensor) -> None:
            acts[key] = t
            t.register_hook(lambda g: acts.__setitem__(key + ("grad",), g))
        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.attn.qkv.register_forward_hook(lambda m, a, out, k=keep((i, "qkv")): k(out)))
        handles.append(b.mlp.fc2.register_forward_pre_hook(lambda m, a, k=keep((i, "ffn")): k(a[0])))
    sums: list[list[torch.Tensor | None]] = [[None, None, None] for _ in blocks]   # per block: qk, v, ffn
    was_training = model.training
    model.eval()
    try:
        for k, (x, y) in enumerate(zip(tensor_batches(images, batch_size), tensor_batches(labels, batch_size))):
            with torch.enable_grad():
                x = x.to(device).requires_grad_(False)
                loss = F.cross_entropy(model(x), y.to(device), reduction="sum")   # a sum: per-image gradients
                model.zero_grad(set_to_none=True)
                loss.backward()
            _add_fisher(sums, blocks, acts, len(x))
            acts.clear()
            if progress:
                progress(f"Fisher scores: batch {k + 1}/{-(-len(images) // batch_size)}")
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    qk = [s[0] for s in sums]
    return ChannelScores(q=qk, k=[t.clone() for t in qk], v=[s[1] for s in sums], ffn=[s[2] for s in sums])



def _fisher_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks, each with one fused ``qkv`` Linear whose output a hook can read (an EVA-02 attention's
    separate q/v biases folded into it first: :func:`cait.models.parts.fuse_eva_qkv_bias_`, the same function).

    Raises:
        TypeError: for another attention, or a ``qkv`` that is not a plain Linear (compactors, a pruned model).
    """
    blocks = list(model.blocks)
    for i, b in enumerate(blocks):
        fuse_eva_qkv_bias_(b.attn)
        if type(b.attn) not in (Attention, EvaAttention) or type(b.attn.qkv) is not nn.Linear:
            raise TypeError(f"block {i}: Fisher scores need timm's Attention or EvaAttention with a plain fused "
                            "qkv Linear")
    return blocks


@torch.no_grad()
def _add_fisher(sums: list, blocks: list, acts: dict, B: int) -> None:
    """Add one batch's ``Σ_i (∂L_i/∂m)²`` per unit to ``sums`` (per block: q/k pair, v, FFN), from the hooked
    activations and gradients in ``acts``."""
    for i, b in enumerate(blocks):
        H = b.attn.num_heads
        qkv, g = acts[(i, "qkv")], acts[(i, "qkv", "grad")]                      # (B, N, 3·H·d)
        per = (qkv * g).sum(dim=1)                                                # (B, 3·H·d): ∂L_i/∂m
        per = per.reshape(B, 3, H, -1).pow(2).sum(dim=0).float().cpu()           # (3, H, d)
        h, hg = acts[(i, "ffn")], acts[(i, "ffn", "grad")]                        # (B, N, D_f)
        f = (h * hg).sum(dim=1).pow(2).sum(dim=0).float().cpu()
        for j, s in enumerate((per[0], per[2], f)):
            sums[i][j] = s if sums[i][j] is None else sums[i][j] + s


def per_flop(scores: ChannelScores, spec: ModelSpec) -> ChannelScores:
    """Scores divided by the FLOPs each unit's removal saves (:class:`cait.models.spec.BlockSpec` unit costs), so the
    selection walk removes the cheapest loss per FLOP first."""
    qk = [s / b.qk_unit_flops() for s, b in zip(scores.qk(), spec.blocks)]
    v = [s / b.v_unit_flops() for s, b in zip(scores.v, spec.blocks)]
    ffn = [s / b.ffn_unit_flops() for s, b in zip(scores.ffn, spec.blocks)]
    return ChannelScores(q=qk, k=[t.clone() for t in qk], v=v, ffn=ffn)
