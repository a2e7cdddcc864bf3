"""CDCP's training rule: the masked group-lasso gradient (paper Eq. 2) and the FLOPs-target schedule (docs/method.md:
CDCP).

The gradient the optimizer sees for compactor row j is::

    G(Q_j) = m_j · ∂L/∂Q_j + λ · Q_j / max(‖Q_j‖₂, ε)

with ``m_j = 0`` for rows in the masked set S (they receive only the group-lasso pull towards zero) and 1 otherwise.
The FLOPs target is off during a warm-up, ramps linearly from the ATME model's FLOPs to the final target, then holds
so the masked rows reach ~0 before pruning; all three are fractions of the run, so short runs keep the same shape.

Short runs (choice): a masked row's update is then a pure group-lasso step, and the fine-tuning engine takes it in
proximal form after the optimizer step (:func:`shrink_masked_rows_`: the row's norm falls by a fixed amount, stopping
at exactly 0) instead of through AdamW. Inside AdamW the row moves ~LR per entry per step whatever λ is, so reaching 0
in a few hundred steps needs a compactor LR near 1e-2; at that LR every *unmasked* entry of the dense ``4C × 4C`` and
``d_h × d_h`` compactors also moves ~1e-2 per step, and that noise took a trained DeiT-Tiny to chance within 50 steps
(docs/bundled.md). With the proximal step the compactors keep the model's LR.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..compress.select import ChannelMask
from ..layers.compactor import CompactorQKV
from ..models.compactors import ffn_compactor


def compactor_rows(model: nn.Module, mask: ChannelMask | None) -> Iterator[tuple[nn.Parameter, torch.Tensor | None]]:
    """Each compactor with the boolean "row is in S" tensor of its rows: ``(H, d)`` for q/k/v, ``(D,)`` for FFN.

    q and k share the mask of their q/k pair (attention-level consistency); a rotary model's fixed q/k compactors are
    left out. With ``mask=None`` the row masks are None.
    """
    blocks = model.module.blocks if hasattr(model, "module") else model.blocks
    for l, block in enumerate(blocks):
        qkv, fc1 = block.attn.qkv, ffn_compactor(block.mlp)
        if not isinstance(qkv, CompactorQKV) or fc1 is None:
            raise ValueError(f"block {l} has no compactors")
        if isinstance(qkv.q, nn.Parameter):                   # RoPE: q/k compactors are fixed identities
            yield qkv.q, None if mask is None else mask.qk[l]
            yield qkv.k, None if mask is None else mask.qk[l]
        yield qkv.v, None if mask is None else mask.v[l]
        yield fc1.q, None if mask is None else mask.ffn[l]


@torch.no_grad()
def apply_gradient_rule(model: nn.Module, mask: ChannelMask | None, lasso: float = 1e-5, eps: float = 1e-8,
                        proximal: bool = False) -> None:
    """Rewrite every compactor's ``.grad`` in place by paper Eq. 2 (call after backward, before the optimizer step).

    Args:
        model: a compactor model (or a DDP wrapper of one); gradients already all-reduced.
        mask: the current S; None before the first selection (every row keeps its task gradient).
        lasso: λ (the paper: 1e-5).
        eps: ε in ``max(‖Q_j‖₂, ε)``.
        proximal: give rows in S a zero gradient; their group-lasso step is then taken after the optimizer step by
            :func:`shrink_masked_rows_` (with their Adam moments reset by :func:`reset_optimizer_rows_`, AdamW
            leaves them exactly where they are). Unmasked rows get Eq. 2 either way.
    """
    for Q, in_s in compactor_rows(model, mask):
        norms = Q.norm(dim=-1, keepdim=True).clamp_min(eps)                   # (..., rows, 1)
        task = torch.zeros_like(Q) if Q.grad is None else Q.grad
        pull = lasso * Q / norms                                              # the group-lasso term
        if in_s is None:
            Q.grad = task + pull
            continue
        keep = (~in_s.to(Q.device)).unsqueeze(-1).to(Q.dtype)                 # (..., rows, 1): m_j
        Q.grad = keep * (task + pull) if proximal else keep * task + pull


@torch.no_grad()
def shrink_masked_rows_(model: nn.Module, mask: ChannelMask | None, amount: float) -> None:
    """Proximal group-lasso step on the rows in S, in place: ``Q_j ← Q_j · max(0, 1 − amount / ‖Q_j‖₂)``.

    Each masked row keeps its direction and loses ``amount`` of norm, stopping at exactly 0 (the proximal operator of
    ``amount · ‖Q_j‖₂``); rows outside S are untouched. Call after the optimizer step.

    Args:
        model: a compactor model (or a DDP wrapper of one).
        mask: the current S (None: nothing to do).
        amount: norm removed per call, ≥ 0.

    Raises:
        ValueError: if ``amount`` is negative.
    """
    if amount < 0:
        raise ValueError(f"shrink amount must be >= 0, got {amount}")
    if mask is None:
        return
    for Q, in_s in compactor_rows(model, mask):
        in_s = in_s.to(Q.device)
        if not bool(in_s.any()):
            continue
        norms = Q.norm(dim=-1, keepdim=True)                                  # (..., rows, 1)
        factor = (1 - amount / norms.clamp_min(1e-12)).clamp_min(0)
        Q.copy_(torch.where(in_s.unsqueeze(-1), Q * factor, Q))


@torch.no_grad()
def max_masked_row_norm(model: nn.Module, mask: ChannelMask | None) -> float:
    """Largest ‖Q_j‖₂ over rows in S (0.0 when S is empty): how far the masked rows are from zero."""
    best = 0.0
    for Q, in_s in compactor_rows(model, mask):
        if in_s is not None and bool(in_s.any()):
            best = max(best, float(Q.norm(dim=-1)[in_s.to(Q.device)].max()))
    return best


@torch.no_grad()
def zero_masked_rows_(model: nn.Module, mask: ChannelMask) -> float:
    """Set every row in S to zero, in place; returns the largest norm removed (should be ~0 after training)."""
    removed = max_masked_row_norm(model, mask)
    for Q, in_s in compactor_rows(model, mask):
        Q[in_s.to(Q.device)] = 0
    return removed


@torch.no_grad()
def reset_optimizer_rows_(model: nn.Module, optimizer: torch.optim.Optimizer, old: ChannelMask | None,
                          new: ChannelMask) -> int:
    """Zero the Adam moments of compactor rows that enter S (choice, docs/method.md: the gradient rule).

    A row that enters S carries momentum (β₁ = 0.99) and a second moment (β₂ = 0.999) built from task gradients;
    they would carry it on in the task direction and scale the λ-sized lasso gradient down to nothing for thousands
    of steps. Restarting that row's moments lets the lasso term drive it to zero within a short run's hold phase.

    Returns:
        The number of rows reset.
    """
    olds = itertools.repeat(None) if old is None else (m for _, m in compactor_rows(model, old))
    count = 0
    for (Q, in_new), in_old in zip(compactor_rows(model, new), olds):
        entering = in_new if in_old is None else in_new & ~in_old
        if not bool(entering.any()):
            continue
        state = optimizer.state.get(Q, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][entering.to(Q.device)] = 0
        count += int(entering.sum())
    return count


@dataclass(frozen=True)
class FlopsSchedule:
    """The CDCP FLOPs target over a run of ``steps`` optimizer steps (docs/method.md: the FLOPs ramp).

    Attributes:
        steps: total steps.
        start_flops: FLOPs of the ATME model (the target at the start of the ramp).
        final_flops: the final target.
        warmup: fraction of the run before S is first built.
        ramp: fraction of the run over which the target moves linearly to ``final_flops``; then it holds.
        interval: S is rebuilt every ``interval`` steps from the end of the warm-up until the hold starts; it is
            rebuilt once more at the final target when the hold starts, then frozen (choice: every masked row gets
            the whole hold to reach ~0; the paper's 270 hold epochs make late entrants harmless, a short run's don't).
    """

    steps: int
    start_flops: int
    final_flops: int
    warmup: float = 0.1
    ramp: float = 0.5
    interval: int = 10

    def __post_init__(self) -> None:
        if not (0 <= self.warmup and 0 <= self.ramp and self.warmup + self.ramp <= 1):
            raise ValueError(f"need warmup, ramp >= 0 and warmup + ramp <= 1, got {self.warmup}, {self.ramp}")
        if self.interval < 1:
            raise ValueError(f"mask interval must be >= 1, got {self.interval}")

    @property
    def first_step(self) -> int:
        """First step at which S is built (the end of the warm-up)."""
        return int(round(self.warmup * self.steps))

    def target(self, step: int) -> int | None:
        """The FLOPs target at ``step`` (None during the warm-up)."""
        if step < self.first_step:
            return None
        ramp_steps = max(1, int(round(self.ramp * self.steps)))
        frac = min(1.0, (step - self.first_step + 1) / ramp_steps)
        return int(self.start_flops - frac * (self.start_flops - self.final_flops))

    @property
    def hold_step(self) -> int:
        """First step of the hold phase (the target is final from here on)."""
        return self.first_step + max(1, int(round(self.ramp * self.steps))) - 1

    def rebuild_at(self, step: int) -> bool:
        """True when S is rebuilt at ``step``."""
        if step < self.first_step or step > self.hold_step:
            return False
        return step == self.hold_step or (step - self.first_step) % self.interval == 0
