"""Planning: where to merge tokens (ATME layout) and how to split a FLOPs budget between ATME and CDCP.

Layout planning (paper §III-B, docs/method.md: ATME): for a target token-level FLOPs reduction r, put k merges at evenly
spaced blocks (alternating HTM, VTM, …), then shift one merge by one block at a time, keeping the move that gets closest
to r, until no move helps. Worked example, DeiT-S, k = 2: the even layout ``h4,v8`` gives 41.1%; moving the VTM to
block 7 (the 8th) gives 43.1% (43.3% in the paper).

Budget split (paper §IV-C1, docs/method.md: budget split): for a total reduction R, plan ATME first for
``atme_share · R`` (choice: ``atme_share = 0.8``, which for DeiT-S at R = 0.55 gives the paper's ``h4,v7``), then
give CDCP whatever makes the total exactly R.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from ..models.atme import get_layout
from ..models.family import check_supported
from ..models.layout import Layout, LayoutLike, token_grids
from ..models.spec import ModelSpec, describe
from .prune import is_pruned

MAX_MERGES = 4


def _spec(model: nn.Module | ModelSpec) -> ModelSpec:
    """The :class:`ModelSpec` of a model (read once), or the spec itself."""
    return model if isinstance(model, ModelSpec) else describe(model)


def layout_spec(model: nn.Module | ModelSpec, layout: LayoutLike) -> ModelSpec:
    """The :class:`ModelSpec` the model would have with ``layout`` applied (the model itself is untouched).

    Args:
        model: an unmerged DeiT, or its :func:`cait.models.spec.describe` (pass the spec when planning many layouts).
        layout: the ATME layout.

    Raises:
        ValueError: if the model already has merges or the layout does not fit it.
    """
    spec = _spec(model)
    if spec.merged:
        raise ValueError("model already has an ATME layout")
    layout = Layout.parse(layout)
    grids = token_grids(spec.grid, len(spec.blocks), layout)
    return replace(spec, blocks=tuple(replace(b, tokens=spec.prefix + h * w,
                                              merge_tokens=h * w if i in layout else 0)
                                      for i, (b, (h, w)) in enumerate(zip(spec.blocks, grids))))


def atme_reduction(model: nn.Module | ModelSpec, layout: LayoutLike) -> float:
    """FLOPs reduction (0..1) of ``layout`` on an unmerged model (or its spec), merge Linears included
    (docs/method.md: FLOPs)."""
    spec = _spec(model)
    return 1.0 - layout_spec(spec, layout).flops() / spec.flops()


def _even_positions(depth: int, k: int) -> list[int]:
    return [round(i * depth / (k + 1)) for i in range(1, k + 1)]


def _alternate(positions: list[int]) -> Layout:
    return Layout({p: "hv"[i % 2] for i, p in enumerate(positions)})


def _search(spec: ModelSpec, target: float, k: int) -> tuple[Layout, float] | None:
    """Even spacing, then one-block shifts while they bring the reduction closer to ``target``."""
    depth = len(spec.blocks)

    def reduction(pos: list[int]) -> float | None:
        try:
            return atme_reduction(spec, _alternate(pos))
        except ValueError:                                            # grid side already 1
            return None

    pos = _even_positions(depth, k)
    if len(set(pos)) < k or reduction(pos) is None:
        return None
    best = abs(reduction(pos) - target)
    while True:
        moves = []
        for i in range(k):
            for step in (-1, 1):
                cand = pos.copy()
                cand[i] += step
                if 0 <= cand[i] < depth and all(a < b for a, b in zip(cand, cand[1:])):
                    r = reduction(cand)
                    if r is not None:
                        moves.append((abs(r - target), cand))
        if not moves or min(moves)[0] >= best:
            return _alternate(pos), reduction(pos)
        best, pos = min(moves)


def plan_atme(model: nn.Module | ModelSpec, flops_reduction: float, num_merges: int | None = None, tol: float = 0.01
              ) -> Layout:
    """The ATME layout closest to a target token-level FLOPs reduction (paper §III-B).

    Args:
        model: an unmerged DeiT, or its :func:`cait.models.spec.describe`.
        flops_reduction: target reduction of total FLOPs, in [0, 1).
        num_merges: number of merges k; default: the fewest (1..4) that land within ``tol`` of the target, else the
            k that lands closest.
        tol: acceptable distance to the target when choosing k.

    Returns:
        A layout such as ``{4: "h", 7: "v"}``; ``{}`` for a zero target.

    Raises:
        ValueError: for a target outside [0, 1) or a ``num_merges`` the grid cannot take.
    """
    if not 0.0 <= flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be in [0, 1), got {flops_reduction}")
    if flops_reduction == 0.0 or num_merges == 0:
        return Layout()
    spec = _spec(model)
    ks = [num_merges] if num_merges is not None else list(range(1, MAX_MERGES + 1))
    results = [(abs(r - flops_reduction), k, lay) for k in ks if (res := _search(spec, flops_reduction, k))
               for lay, r in [res]]
    if not results:
        raise ValueError(f"the {spec.grid} grid cannot take {num_merges} merges in {len(spec.blocks)} blocks")
    within = [r for r in results if r[0] <= tol]
    return (min(within, key=lambda r: r[1]) if within else min(results, key=lambda r: r[0]))[2]


@dataclass(frozen=True)
class BudgetSplit:
    """How a total FLOPs reduction is shared between ATME and CDCP (FLOPs are multiply-adds for one image).

    Attributes:
        layout: the ATME layout.
        total_reduction: R, requested.
        atme_reduction: what the layout alone removes.
        base_flops: the uncompressed model's FLOPs.
        target_flops: ``floor((1 − R) · base_flops)``, what CDCP must reach after ATME.
    """

    layout: Layout
    total_reduction: float
    atme_reduction: float
    base_flops: int
    target_flops: int

    @property
    def cdcp_reduction(self) -> float:
        """The share of the original FLOPs CDCP removes: ``R − atme_reduction``."""
        return self.total_reduction - self.atme_reduction


def split_budget(model: nn.Module, flops_reduction: float, layout: LayoutLike = None, atme_share: float = 0.8
                 ) -> BudgetSplit:
    """Split a total FLOPs reduction R: ATME first, CDCP the rest (docs/method.md: budget split).

    Args:
        model: an uncompressed plain ViT (no merges, not pruned; :mod:`cait.models.family`).
        flops_reduction: R in [0, 1).
        layout: an explicit ATME layout; default: :func:`plan_atme` for ``atme_share · R``.
        atme_share: the share of R planned for ATME when no layout is given (choice, see module docstring).

    Raises:
        ValueError: if R is outside [0, 1), ``atme_share`` outside [0, 1], the model is not a plain ViT (the
            message names what is missing) or is already compressed, or the layout alone removes more than R.
    """
    if not 0.0 <= flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be in [0, 1), got {flops_reduction}")
    if not 0.0 <= atme_share <= 1.0:
        raise ValueError(f"atme_share must be in [0, 1], got {atme_share}")
    check_supported(model)                                # a plain ViT, judged by its modules, not its name
    if get_layout(model) or is_pruned(model):
        raise ValueError("split_budget needs the uncompressed model (it has merges or pruned blocks)")
    spec = describe(model)                                # read once; the planning below works on the spec
    if layout is None:
        layout = plan_atme(spec, atme_share * flops_reduction)
        if atme_reduction(spec, layout) > flops_reduction:
            layout = Layout()
    layout = Layout.parse(layout)
    base = spec.flops()
    r_atme = atme_reduction(spec, layout)
    if r_atme > flops_reduction + 1e-9:
        raise ValueError(f"merge layout {layout} alone removes {100 * r_atme:.1f}% of FLOPs, more than "
                         f"the requested {100 * flops_reduction:.1f}%; ask for a larger reduction or fewer merges")
    return BudgetSplit(layout, flops_reduction, r_atme, base, int((1.0 - flops_reduction) * base))
