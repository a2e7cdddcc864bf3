"""CDCP: choosing the masked set S with head-level and attention-level consistency (paper Alg. 1–3, docs/method.md:
CDCP).

Data structures, worked example for a 2-block model with 3 heads of d_h = 4 and FFN width 8::

    scores = ChannelScores(
        q=[(3, 4) tensor, (3, 4) tensor],    # ‖Q^q_{l,h}[j, :]‖₂ per block l, head h, channel j
        k=[...], v=[...],                    # same shapes
        ffn=[(8,) tensor, (8,) tensor])      # ‖Q^ffn_l[j, :]‖₂
    mask = select_channels(scores, describe(model), target_flops)
    mask.qk[0]  -> (3, 4) bool, True = channel pair (q_j, k_j) of that head is in S (to be removed)
    mask.v[0]   -> (3, 4) bool
    mask.ffn[0] -> (8,) bool
    mask.widths() -> [(qk kept per head, v kept per head, ffn kept), ...]   e.g. [(3, 2, 5), (4, 4, 6)]

Units and their scores: a q/k *pair* (l, h, j) scored by the mean of s^q_j and s^k_j (attention-level
consistency: q_j and k_j go together); a v channel (l, h, j); an FFN channel (l, j). The walk takes units in
ascending score order; a q/k or v unit in head h also pulls, from every other head of its block, that head's
lowest-scored unit of the same kind not yet in S (head-level consistency), so every head of a block keeps the same
widths. It stops when the model with S removed meets the FLOPs target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.spec import ModelSpec
from .importance import ChannelScores


@dataclass
class ChannelMask:
    """The masked set S. True marks a channel in S (masked during training, removed by pruning).

    Attributes:
        qk: per block, ``(H, d_h)`` bool: the q/k channel pair j of head h.
        v: per block, ``(H, d_h)`` bool.
        ffn: per block, ``(D_f,)`` bool.
    """

    qk: list[torch.Tensor]
    v: list[torch.Tensor]
    ffn: list[torch.Tensor]

    @classmethod
    def empty_like(cls, scores: ChannelScores) -> "ChannelMask":
        """A mask with nothing in S, shaped like ``scores``."""
        z = lambda ts: [torch.zeros(t.shape, dtype=torch.bool) for t in ts]  # noqa: E731
        return cls(z(scores.q), z(scores.v), z(scores.ffn))

    @classmethod
    def keep_all(cls, spec: ModelSpec) -> "ChannelMask":
        """A mask with nothing in S for a model of this shape."""
        z = lambda *shape: torch.zeros(shape, dtype=torch.bool)  # noqa: E731
        return cls([z(b.heads, b.qk_dim) for b in spec.blocks], [z(b.heads, b.v_dim) for b in spec.blocks],
                   [z(b.ffn_dim) for b in spec.blocks])

    def widths(self) -> list[tuple[int, int, int]]:
        """Per block ``(qk kept per head, v kept per head, ffn kept)``.

        Raises:
            ValueError: if the heads of a block keep different widths (the mask breaks head-level consistency).
        """
        self.check_consistency()
        return [(int((~qk[0]).sum()), int((~v[0]).sum()), int((~f).sum())) for qk, v, f in
                zip(self.qk, self.v, self.ffn)]

    def check_consistency(self) -> None:
        """Raise ``ValueError`` unless every head of every block keeps the same q/k width and the same v width."""
        for l, (qk, v) in enumerate(zip(self.qk, self.v)):
            for kind, m in (("q/k", qk), ("v", v)):
                kept = (~m).sum(dim=1)
                if not bool((kept == kept[0]).all()):
                    raise ValueError(f"block {l}: heads keep different {kind} widths {kept.tolist()}")

    def size(self) -> int:
        """|S| counted in units: q/k pairs + v channels + FFN channels."""
        return int(sum(int(t.sum()) for t in self.qk + self.v + self.ffn))

    def to_dict(self) -> dict[str, list[list]]:
        """JSON-friendly form (lists of 0/1)."""
        return {k: [t.to(torch.uint8).tolist() for t in getattr(self, k)] for k in ("qk", "v", "ffn")}

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelMask":
        """Inverse of :meth:`to_dict`."""
        return cls(*([torch.tensor(t, dtype=torch.bool) for t in d[k]] for k in ("qk", "v", "ffn")))


def select_channels(scores: ChannelScores, spec: ModelSpec, target_flops: int, min_channels: int = 1,
                    round_to: int = 1) -> ChannelMask:
    """Build S from scratch: the consistent selection of paper Alg. 1–3 (docs/method.md: the masked set S).

    Args:
        scores: channel importances (:mod:`cait.compress.importance`: compactor norms during training, weight norms
            or Fisher scores one-shot).
        spec: the model's shape before pruning (:func:`cait.models.spec.describe`), ATME included.
        target_flops: stop once the model with S removed has at most this many FLOPs (multiply-adds, one image).
        min_channels: channels kept at least per head (q/k and v) and per FFN (choice, docs/method.md: the masked
            set S; default 1).
        round_to: make every kept width a multiple of this (see :func:`round_widths`); 1 = no rounding.

    Returns:
        The mask; every head of a block keeps the same q/k width and the same v width.

    Raises:
        ValueError: if ``target_flops`` cannot be reached even with every block at ``min_channels``, if ``scores``
            do not match ``spec`` or are not finite, or for ``min_channels`` / ``round_to`` below 1.
    """
    _check_selection_inputs(scores, spec, min_channels, round_to)
    mask = ChannelMask.empty_like(scores)
    flops = spec.flops()
    if flops <= target_flops:
        return mask
    walk = _ConsistentWalk(scores, spec, mask, min_channels)
    for unit in walk.ascending():
        if flops <= target_flops:
            break
        flops -= walk.take(*unit)
    if flops > target_flops:
        floor = spec.with_widths([(b.qk_dim if b.rope else min_channels, min_channels, min_channels)
                                  for b in spec.blocks]).flops()
        raise ValueError(f"FLOPs target {target_flops / 1e9:.3f} G is out of reach: with {min_channels} channel(s) "
                         f"per head and per FFN the model still needs {floor / 1e9:.3f} G")
    return round_widths(mask, scores, spec, target_flops, round_to) if round_to > 1 else mask


def _check_selection_inputs(scores: ChannelScores, spec: ModelSpec, min_channels: int, round_to: int) -> None:
    """Raise ``ValueError`` unless the options are valid and the scores are finite and shaped like ``spec``."""
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    for kind in ("q", "k", "v", "ffn"):
        for l, t in enumerate(getattr(scores, kind)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"channel scores of {kind} in block {l} contain NaN or infinity")
    if len(scores.q) != len(spec.blocks):
        raise ValueError(f"scores cover {len(scores.q)} blocks, the model has {len(spec.blocks)}")
    for l, b in enumerate(spec.blocks):
        if scores.q[l].shape != (b.heads, b.qk_dim) or scores.v[l].shape != (b.heads, b.v_dim) \
                or scores.ffn[l].shape != (b.ffn_dim,):
            raise ValueError(f"block {l}: score shapes do not match the model "
                             f"(heads {b.heads}, q/k {b.qk_dim}, v {b.v_dim}, ffn {b.ffn_dim})")


class _ConsistentWalk:
    """The state of Alg. 1–3's walk over ``mask``: per (kind, block, head) the channels in ascending score order with
    a cursor past those already in S, and the widths still kept."""

    def __init__(self, scores: ChannelScores, spec: ModelSpec, mask: ChannelMask, min_channels: int) -> None:
        self.scores, self.spec, self.mask, self.min_channels = scores, spec, mask, min_channels
        self.per_kind = {"qk": (scores.qk(), mask.qk), "v": (scores.v, mask.v)}
        depth = len(spec.blocks)
        self.order = {(kind, l): torch.argsort(s[l], dim=1, stable=True).tolist()
                      for kind, (s, _) in self.per_kind.items() for l in range(depth)}
        self.cursor = {key: [0] * len(self.order[key]) for key in self.order}
        self.kept = {(kind, l): (spec.blocks[l].qk_dim if kind == "qk" else spec.blocks[l].v_dim)
                     for kind in self.per_kind for l in range(depth)}
        self.kept_ffn = [b.ffn_dim for b in spec.blocks]

    def ascending(self) -> list[tuple[str, int, int, int]]:
        """All units ``(kind, block, head, channel)`` in ascending score order; ties keep enumeration order (block,
        kind, head, channel)."""
        values, units = [], []
        for l, b in enumerate(self.spec.blocks):
            for kind, (s, _) in self.per_kind.items():
                values.append(s[l].flatten())
                units += [(kind, l, h, j) for h in range(b.heads) for j in range(s[l].shape[1])]
            values.append(self.scores.ffn[l])
            units += [("ffn", l, 0, j) for j in range(b.ffn_dim)]
        return [units[u] for u in torch.argsort(torch.cat(values), stable=True).tolist()]

    def lowest_free(self, kind: str, l: int, h: int) -> int:
        """Head h's lowest-scored unit of this kind not yet in S."""
        taken, idx = self.per_kind[kind][1][l][h], self.order[(kind, l)][h]
        c = self.cursor[(kind, l)]
        while taken[idx[c[h]]]:
            c[h] += 1
        return idx[c[h]]

    def take(self, kind: str, l: int, h: int, j: int) -> int:
        """Put a unit into S (a q/k or v unit with the lowest free unit of every other head of its block: head-level
        consistency); return the FLOPs this saves (0 if it is already in S or its group is at the minimum)."""
        b = self.spec.blocks[l]
        if kind == "ffn":
            if self.mask.ffn[l][j] or self.kept_ffn[l] <= self.min_channels:
                return 0
            self.mask.ffn[l][j] = True
            self.kept_ffn[l] -= 1
            return b.ffn_unit_flops()
        taken = self.per_kind[kind][1][l]
        if taken[h, j] or self.kept[(kind, l)] <= self.min_channels or (kind == "qk" and b.rope):
            return 0                                             # RoPE: q/k stay whole (BlockSpec.rope)
        taken[h, j] = True                                       # the unit itself ...
        for h2 in range(b.heads):                                # ... and the lowest free unit of every other head
            if h2 != h:
                taken[h2, self.lowest_free(kind, l, h2)] = True
        self.kept[(kind, l)] -= 1
        return b.heads * (b.qk_unit_flops() if kind == "qk" else b.v_unit_flops())


def _kinds(mask: ChannelMask, scores: ChannelScores) -> dict[str, tuple[list, list]]:
    """kind → (masks, scores), each a per-block list of ``(H, d)`` (FFN as ``(1, D)``)."""
    return {"qk": (mask.qk, scores.qk()), "v": (mask.v, scores.v),
            "ffn": ([m.view(1, -1) for m in mask.ffn], [s.view(1, -1) for s in scores.ffn])}


def _set_kept(m: torch.Tensor, s: torch.Tensor, kept: int) -> None:
    """Make each row (head) of ``m (H, d)`` keep exactly ``kept`` channels, in place: shrinking drops the
    lowest-scored kept channels, growing restores the highest-scored removed ones."""
    for h in range(m.shape[0]):
        now = int((~m[h]).sum())
        if kept < now:
            kept_idx = (~m[h]).nonzero().flatten()
            drop = kept_idx[torch.argsort(s[h][kept_idx], stable=True)[: now - kept]]
            m[h, drop] = True
        elif kept > now:
            gone = m[h].nonzero().flatten()
            back = gone[torch.argsort(s[h][gone], descending=True, stable=True)[: kept - now]]
            m[h, back] = False


def round_widths(mask: ChannelMask, scores: ChannelScores, spec: ModelSpec, target_flops: int, multiple: int
                 ) -> ChannelMask:
    """Make every kept width (q/k and v per head, FFN) a multiple of ``multiple``, keeping the FLOPs target.

    Matrix shapes that are multiples of 8 suit vector units and tensor cores (measured on CPU: DeiT-S at 55%, kept
    widths rounded to 8 run 94% of the FLOPs-ideal speed-up instead of 86%). Each width first goes to the *nearest*
    multiple (a width that rounds up gets back its best-scored removed channels; one that rounds down loses its
    worst-scored kept ones, per head, so head-level consistency holds); then, while the model exceeds the target,
    the group whose next ``multiple`` channels score lowest is rounded down one more step. A full width is never
    rounded, and no width goes below ``multiple`` unless the original is smaller.

    Returns:
        A new mask (the input is not modified).

    Raises:
        ValueError: if no rounding meets the target.
    """
    mask = ChannelMask([m.clone() for m in mask.qk], [m.clone() for m in mask.v], [m.clone() for m in mask.ffn])
    kinds = _kinds(mask, scores)
    kept: dict[tuple[str, int], int] = {}
    for kind, (masks, _) in kinds.items():
        for l, m in enumerate(masks):
            full, k = m.shape[1], int((~m[0]).sum())
            r = full if k == full else min(full, max(multiple, int(round(k / multiple)) * multiple))
            kept[(kind, l)] = min(r, full)
            _set_kept(m, kinds[kind][1][l], kept[(kind, l)])

    def flops() -> int:
        return spec.with_widths([(kept[("qk", l)], kept[("v", l)], kept[("ffn", l)])
                                 for l in range(len(spec.blocks))]).flops()

    while flops() > target_flops:
        best = None
        for (kind, l), k in kept.items():
            if kind == "qk" and spec.blocks[l].rope:
                continue
            step = k - multiple if k % multiple == 0 else (k // multiple) * multiple
            if step < min(multiple, kinds[kind][0][l].shape[1]) or step < 1:
                continue
            m, s = kinds[kind][0][l], kinds[kind][1][l]
            cost = float(torch.sort(s[~m].view(m.shape[0], -1), dim=1).values[:, : k - step].mean())
            if best is None or cost < best[0]:
                best = (cost, kind, l, step)
        if best is None:
            raise ValueError(f"no widths in multiples of {multiple} meet {target_flops / 1e9:.3f} G")
        _, kind, l, step = best
        kept[(kind, l)] = step
        _set_kept(kinds[kind][0][l], kinds[kind][1][l], step)
    return mask


@dataclass
class GlobalSelection:
    """Plain global compactor selection, without head- or attention-level consistency (the paper's contrast).

    Attributes:
        q, k, v: per block ``(H, d_h)`` bool, True = selected (near-zero after training).
        ffn: per block ``(D_f,)`` bool.
        widths: per block ``(qk, v, ffn)`` that a batched attention could actually drop to: a q/k channel goes only
            when both q_j and k_j are selected, and every head keeps as many as the head that keeps most.
    """

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    ffn: list[torch.Tensor]
    widths: list[tuple[int, int, int]]


def global_selection(scores: ChannelScores, spec: ModelSpec, target_flops: int) -> GlobalSelection:
    """Select the lowest-scored q, k, v and FFN channels one by one, with no consistency, until the *nominal* FLOPs
    (each channel counted as if it could be removed on its own: half a q/k pair for q or k) meet the target.

    The result shows what vanilla compactor pruning would push to zero; :attr:`GlobalSelection.widths` shows how
    little of it a batched attention can actually remove (paper §III-C, Fig. 7, Tab. XI).
    """
    values, units = [], []
    for l, b in enumerate(spec.blocks):
        for kind, s in (("q", scores.q[l]), ("k", scores.k[l]), ("v", scores.v[l])):
            values.append(s.flatten())
            units += [(kind, l, h, j) for h in range(s.shape[0]) for j in range(s.shape[1])]
        values.append(scores.ffn[l])
        units += [("ffn", l, 0, j) for j in range(scores.ffn[l].numel())]
    sel = {kind: [torch.zeros(getattr(scores, kind)[l].shape, dtype=torch.bool) for l in range(len(spec.blocks))]
           for kind in ("q", "k", "v", "ffn")}
    flops = spec.flops()
    for u in torch.argsort(torch.cat(values), stable=True).tolist():
        if flops <= target_flops:
            break
        kind, l, h, j = units[u]
        b = spec.blocks[l]
        if kind == "ffn":
            sel["ffn"][l][j] = True
            flops -= b.ffn_unit_flops()
        else:
            sel[kind][l][h, j] = True
            flops -= b.qk_unit_flops() // 2 if kind in ("q", "k") else b.v_unit_flops()
    widths = []
    for l, b in enumerate(spec.blocks):
        qk_drop = int((sel["q"][l] & sel["k"][l]).sum(dim=1).min())
        v_drop = int(sel["v"][l].sum(dim=1).min())
        widths.append((b.qk_dim - qk_drop, b.v_dim - v_drop, b.ffn_dim - int(sel["ffn"][l].sum())))
    return GlobalSelection(sel["q"], sel["k"], sel["v"], sel["ffn"], widths)
