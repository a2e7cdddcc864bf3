"""CDCP compactors (paper §III-C after ResRep [70], docs/method.md: CDCP).

A compactor is a learnable square matrix Q, initialised to the identity, applied to a linear layer's output:
``y = Q(Wx + b)``. CDCP places one per head on each of q, k and v (``d_h × d_h``, after the fused ``qkv`` Linear)
and one per block on the FFN hidden layer (``4C × 4C``, after ``fc1``, before the activation). Channel j of a
compactor is row j of Q; its importance is ``‖Q[j, :]‖₂``.

The compactors wrap timm's own ``attn.qkv`` and ``mlp.fc1`` Linears, so timm's Attention and Mlp forwards run
unchanged (layer scale, dropout and the fused attention kernel included); :func:`cait.models.compactors.add_compactors`
puts them into a DeiT. Worked example, DeiT-Tiny block 0::

    attn.qkv   = CompactorQKV(Linear(192, 576), num_heads=3)
                 .q, .k, .v : Parameter (3, 64, 64)      # (heads, d_h, d_h), each head's Q is eye(64)
    mlp.fc1    = CompactorLinear(Linear(192, 768))
                 .q         : Parameter (768, 768)
"""
from __future__ import annotations

import torch
import torch.nn as nn


class _CompactedLinear(nn.Module):
    """A wrapped ``self.linear`` that looks like a Linear from outside (in/out features)."""

    linear: nn.Linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features


class CompactorQKV(_CompactedLinear):
    """The fused ``qkv`` Linear followed by per-head q, k and v compactors.

    Args:
        linear: timm's ``attn.qkv``, ``Linear(C, 3·H·d_h)`` with output laid out as ``[q | k | v]``, heads contiguous
            (or a :class:`BiasedQKV`).
        num_heads: H.
        qk: train q and k compactors; False (rotary attention, whose q/k CDCP keeps whole) makes ``q`` and ``k``
            fixed identity buffers.

    Attributes:
        q, k, v: ``(H, d_h, d_h)`` compactors, identity at construction.
    """

    def __init__(self, linear: nn.Module, num_heads: int, qk: bool = True) -> None:
        super().__init__()
        if linear.out_features % (3 * num_heads):
            raise ValueError(f"qkv has {linear.out_features} outputs, not divisible by 3 × {num_heads} heads")
        self.linear = linear
        self.num_heads = num_heads
        self.head_dim = linear.out_features // (3 * num_heads)
        w = linear.weight
        eye = torch.eye(self.head_dim, device=w.device, dtype=w.dtype).expand(num_heads, -1, -1)
        if qk:
            self.q = nn.Parameter(eye.clone())
            self.k = nn.Parameter(eye.clone())
        else:                       # RoPE: q/k stay whole, their compactors are fixed identities (not trained)
            self.register_buffer("q", eye.clone())
            self.register_buffer("k", eye.clone())
        self.v = nn.Parameter(eye.clone())

    def stacked(self) -> torch.Tensor:
        """All compactors as one ``(3, H, d_h, d_h)`` tensor, order q, k, v."""
        return torch.stack([self.q, self.k, self.v])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)                                                # (B, N, 3·H·d)
        shape = y.shape
        y = y.reshape(*shape[:-1], 3, self.num_heads, self.head_dim)      # (B, N, 3, H, d)
        y = torch.einsum("...thd,thed->...the", y, self.stacked())        # y'_e = Σ_d Q[e, d] y_d
        return y.reshape(shape)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', b')`` with ``W' = QW``, ``b' = Qb`` per head (exact: Q is linear, docs/method.md: folding and
        pruning).

        Returns:
            ``W'`` of shape ``(3·H·d_h, C)`` and ``b'`` of shape ``(3·H·d_h,)`` (None without bias).
        """
        Q = self.stacked()                                                # (3, H, d, d)
        W = self.linear.weight.reshape(3, self.num_heads, self.head_dim, -1)
        Wf = (Q @ W).reshape(self.linear.weight.shape)
        b = self.linear.bias
        bf = None if b is None else (Q @ b.reshape(3, self.num_heads, self.head_dim, 1)).reshape(b.shape)
        return Wf, bf


class CompactorLinear(_CompactedLinear):
    """A Linear followed by one ``(D, D)`` compactor on its output (the FFN's ``fc1``).

    Attributes:
        q: ``(D, D)`` compactor, identity at construction.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.q = nn.Parameter(torch.eye(linear.out_features, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) @ self.q.T                                  # (B, N, D)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(QW, Qb)``: shapes ``(D, C)`` and ``(D,)``."""
        b = self.linear.bias
        return self.q @ self.linear.weight, None if b is None else self.q @ b




class CompactorGLU(_CompactedLinear):
    """A gated FFN's packed input Linear (timm's ``GluMlp.fc1``: gate rows and value rows) with one ``(D, D)``
    compactor on the value half. A hidden channel is ``act(gate_j) · value_j``, so a zero compactor row j zeroes it
    whatever the gate: removing channel j removes gate row j, value row j and ``fc2`` column j together.

    Args:
        linear: ``Linear(C, 2·D)``.
        value_first: the value rows come first (timm's ``gate_last=True``); Eva's ``GluMlp`` has them last.

    Attributes:
        q: ``(D, D)`` compactor, identity at construction.
    """

    def __init__(self, linear: nn.Linear, value_first: bool = False) -> None:
        super().__init__()
        self.linear, self.value_first = linear, value_first
        w = linear.weight
        self.q = nn.Parameter(torch.eye(linear.out_features // 2, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.linear(x).chunk(2, dim=-1)                            # (B, N, D) each
        if self.value_first:
            return torch.cat([a @ self.q.T, b], dim=-1)
        return torch.cat([a, b @ self.q.T], dim=-1)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', b')`` of the packed Linear, value rows ``QW_v`` / ``Qb_v``: shapes ``(2·D, C)`` and ``(2·D,)``."""
        W, b = self.linear.weight.chunk(2), None if self.linear.bias is None else self.linear.bias.chunk(2)
        i = 0 if self.value_first else 1
        Ws = list(W)
        Ws[i] = self.q @ Ws[i]
        if b is None:
            return torch.cat(Ws), None
        bs = list(b)
        bs[i] = self.q @ bs[i]
        return torch.cat(Ws), torch.cat(bs)


class BiasedQKV(_CompactedLinear):
    """A bias-free ``qkv`` Linear with separate q and v biases and a zero k bias (timm's ``EvaAttention``, EVA-02) as
    one module: ``forward(x) = x Wᵀ + [q_bias | 0 | v_bias]``, the same numbers timm computes, but called as a
    module so a compactor can wrap it. The k bias stays a zero buffer: with RoPE a k bias would not cancel in the
    softmax. ``weight`` and ``bias`` read like a Linear's."""

    def __init__(self, linear: nn.Linear, q_bias: nn.Parameter, v_bias: nn.Parameter) -> None:
        super().__init__()
        self.linear, self.q_bias, self.v_bias = linear, q_bias, v_bias
        self.register_buffer("k_bias", torch.zeros_like(q_bias), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor:
        return torch.cat([self.q_bias, self.k_bias, self.v_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.linear.weight, self.bias)
