"""Training-free calibration, step 2: a block-by-block least-squares refit of a compact twin (Kwon et al. 2022).

Post-training pruning after Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022),
with a few hundred *unlabelled* images and no gradient step on the weights. Step 1, the Fisher channel scores, is
:func:`cait.compress.importance.fisher_scores`. Step 2, here (:func:`refit_`): block by block, on the compact model's
own inputs (so earlier errors are compensated), refit the Linears that *produce* each residual branch — the ATME
fusion, the attention's ``proj`` and the FFN's ``fc2`` — so the block's tokens match the original's, pooled onto the
merged grid (:func:`cait.models.atme.pool_to_block`): ridge regression, closed form (Kwon et al.'s mask tuning,
generalised from one scale per kept unit to the whole output Linear).

Worked example (DeiT-Tiny, ``h5,v10`` + CDCP at 50%, 256 synthetic images): block 5's VTM fusion ``Linear(384,
192)`` is fitted from 256·98 pairs of the compact model's tokens to the original's block-5 input averaged over the
same pairs; then ``proj (192 → 192)`` and ``fc2 (D_f → 192)`` to the original's post-attention and block outputs,
averaged likewise.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import LayerScale
from timm.models.eva import Eva, EvaBlock

from ..layers.token_merge import pair_tokens
from ..models.atme import block_ropes, get_layout, patch_grid, pool_tokens_to_block, prefix_tokens
from .importance import Progress, tensor_batches

Batches = list[torch.Tensor]
"""Calibration tokens of one model at one point of a block, as a list of ``(B, N, C)`` batches on the CPU."""


@torch.no_grad()
def refit_(compact: nn.Module, original: nn.Module, images: torch.Tensor, batch_size: int = 32, ridge: float = 1e-2,
           cls_weight: float = 1.0, progress: Progress = None, held_out: torch.Tensor | None = None) -> dict:
    """Refit, block by block, each merge fusion, ``proj`` and ``fc2`` of ``compact`` so its tokens match the
    original's (pooled onto the merged grid) on ``images``; in place (module docstring).

    Args:
        compact: the twin: ATME and/or pruned DeiT built from ``original`` (same depth, embed dim and patch grid).
        original: the uncompressed DeiT; not modified.
        images: ``(n, 3, S, S)`` calibration images, normalised.
        batch_size: images per forward pass.
        ridge: λ, relative to the mean of the Gram matrix's diagonal.
        cls_weight: the CLS token's weight, as a share of all patch tokens of its image (1 = as much as all of them).
        progress: called with a short message after each block.
        held_out: ``(m, 3, S, S)`` other images that judge each block's refit: kept only if it lowers the mean
            KL(original ‖ compact) of the outputs on them, else the block's Linears are put back. The fitted token
            MSE is a proxy that can mislead (bundled DeiT-Tiny ``h4,v9``: it falls in every block while the output
            KL rises from 0.91 to 1.08 nats). None: every block's refit is kept.

    Returns:
        ``{"blocks": [{"block", "refit", "kept", "mse_before", "mse_after", "kl"}, ...], "kl_start", "kl_end"}``:
        per block, which Linears were refit, whether the refit was kept, the (token-weighted) mean squared error of
        its output against the original's, pooled, before and after (earlier blocks as decided in both; ``mse_after``
        is that of what was kept), and the held-out KL after the decision (None without ``held_out``);
        ``kl_start`` / ``kl_end``: the held-out KL before any refit and at the end (nats per image; None without).

    Raises:
        ValueError: if the two models do not match in depth or patch grid.
    """
    if len(compact.blocks) != len(original.blocks) or patch_grid(compact) != patch_grid(original):
        raise ValueError("refit needs the compact model and the original it was made from (same depth and grid)")
    compact.eval(), original.eval()
    fit = _Refit(compact, original, batch_size, ridge, cls_weight)
    xo, xc = fit.embed(original, images), fit.embed(compact, images)     # (B, 1 + H·W, C), (B, N_l, C) batches
    judge = None if held_out is None else _Judge(compact, original, held_out, batch_size, fit)
    kl = None if judge is None else judge.kl(0)
    report, kl_start = [], kl
    for l, (bo, bc) in enumerate(zip(bound_blocks(original), bound_blocks(compact))):
        in_o, mid_o, out_o, xo = fit.original_block(bo, xo, l)
        unfit = [bc(x.to(fit.dev)).cpu() for x in xc]                  # the block as it is: the fallback
        before = fit.mse(unfit, out_o)
        saved = {name: (lin.weight.detach().clone(), lin.bias.detach().clone()) for name, lin in _linears(bc).items()}
        refit = []
        if bc.merge is not None:                # (a) the merge fusion: pairs of tokens → the original's input, pooled
            xc = fit.fuse(bc, xc, in_o)
            refit.append("fuse")
        # (b) proj: the attention's output before proj → the original's post-attention tokens minus the compact
        # model's input (so the branch also absorbs the drift of earlier blocks); (c) fc2 likewise for the FFN.
        mid_c = fit.branch(bc.attn.proj, lambda x: bc.attn(bc.norm1(x)), bc.ls1, xc, mid_o)
        xc = fit.branch(bc.mlp.fc2, lambda z: bc.mlp(bc.norm2(z)), bc.ls2, mid_c, out_o)
        refit += ["proj", "fc2"]
        kept = True
        if judge is not None:                   # keep the refit only if the held-out output KL falls
            kept, kl = judge.decide(l, bc, kl, saved)
            xc = xc if kept else unfit
        report.append({"block": l, "refit": refit, "kept": kept, "mse_before": before,
                       "mse_after": fit.mse(xc, out_o), "kl": kl})
        if progress:
            progress(f"refit: block {l + 1}/{len(compact.blocks)}")
    return {"blocks": report, "kl_start": kl_start, "kl_end": kl}


def _linears(block: "_Bound") -> dict[str, nn.Linear]:
    """The Linears :func:`refit_` may change in a block: the merge fusion (if it merges), ``proj`` and ``fc2``."""
    out = {"proj": block.attn.proj, "fc2": block.mlp.fc2}
    if block.merge is not None:
        out["fuse"] = block.merge.fuse
    return out


class _Bound:
    """A block as :func:`refit_` reads it, under a timm ``Block``'s names (``norm1``, ``attn``, ``ls1``, ``norm2``,
    ``mlp``, ``ls2``, ``merge``): an Eva block gets its rotary codes bound (:func:`cait.models.atme.block_ropes`)
    and its ``gamma_1``/``gamma_2`` read as LayerScales. Calling it runs the whole block."""

    def __init__(self, block: nn.Module, rope: torch.Tensor | None) -> None:
        self.block, self.rope, self.merge = block, rope, getattr(block, "merge", None)
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        if isinstance(block, EvaBlock):
            self.ls1, self.ls2 = _layer_scale(block.gamma_1), _layer_scale(block.gamma_2)
            self.attn = _BoundAttention(block.attn, rope)
        else:
            self.ls1, self.ls2, self.attn = block.ls1, block.ls2, block.attn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, rope=self.rope) if isinstance(self.block, EvaBlock) else self.block(x)


class _BoundAttention:
    """An Eva block's attention with its rotary codes bound; ``proj`` is the module's."""

    def __init__(self, attn: nn.Module, rope: torch.Tensor | None) -> None:
        self.module, self.rope, self.proj = attn, rope, attn.proj

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, rope=self.rope)


def _layer_scale(gamma: torch.Tensor | None) -> nn.Module:
    """An Eva ``gamma`` as a LayerScale sharing it (an identity for none)."""
    if gamma is None:
        return nn.Identity()
    ls = LayerScale(gamma.shape[0], device="meta")
    ls.gamma = gamma
    return ls


def bound_blocks(model: nn.Module) -> list[_Bound]:
    """The model's blocks as :class:`_Bound`: an Eva's with the rotary codes each block uses (its own grid's)."""
    rope = model.rope.get_embed() if isinstance(model, Eva) and model.rope is not None else None
    return [_Bound(b, r) for b, r in zip(model.blocks, block_ropes(model, rope))]


class _Judge:
    """Held-out images that judge a refit by the output it gives: the compact model's tokens entering the block
    under decision, and the original's log-probabilities to compare the compact model's with."""

    def __init__(self, compact: nn.Module, original: nn.Module, images: torch.Tensor, batch_size: int,
                 fit: "_Refit") -> None:
        self.compact, self.dev = compact, fit.dev
        self.stream = fit.embed(compact, images)                              # (B, N_0, C) batches
        self.ref = [original(x.to(fit.dev_o)).float().log_softmax(-1).cpu()
                    for x in tensor_batches(images, batch_size)]              # (B, classes) batches
        self.n = len(images)

    def kl(self, start: int) -> float:
        """Mean KL(original ‖ compact) in nats over the held-out images, the compact model run from block
        ``start`` on its current stream."""
        m, total, blocks = self.compact, 0.0, bound_blocks(self.compact)
        for x, ref in zip(self.stream, self.ref):
            x = x.to(self.dev)
            for block in blocks[start:]:
                x = block(x)
            out = m.forward_head(m.norm(x)).float().log_softmax(-1).cpu()
            total += float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="sum"))
        return total / self.n

    def decide(self, l: int, block: nn.Module, kl: float, saved: dict) -> tuple[bool, float]:
        """Keep block ``l``'s refit if the held-out KL falls below ``kl``, else put its Linears back (``saved``:
        name → (weight, bias)); move the stream through the block as decided. Returns (kept, the KL now)."""
        kl_refit = self.kl(l)
        kept = kl_refit < kl
        if not kept:
            for name, lin in _linears(block).items():
                _set_linear(lin, *saved[name])
        self.advance(block)
        return kept, kl_refit if kept else kl

    def advance(self, block: nn.Module) -> None:
        """Move the stream through ``block`` as it was decided."""
        self.stream = [block(x.to(self.dev)).cpu() for x in self.stream]


@dataclass
class _Refit:
    """The pieces of :func:`refit_` that each block repeats: token streams, targets, one ridge fit per Linear."""

    compact: nn.Module
    original: nn.Module
    batch_size: int
    ridge: float
    cls_weight: float

    def __post_init__(self) -> None:
        self.dev = next(self.compact.parameters()).device
        self.dev_o = next(self.original.parameters()).device
        self.layout = get_layout(self.compact)
        self.grid = patch_grid(self.original)
        self.prefix = prefix_tokens(self.original)                     # P: CLS, distillation token, registers

    def embed(self, m: nn.Module, images: torch.Tensor) -> Batches:
        """Tokens entering block 0, per batch, on the CPU."""
        dev = next(m.parameters()).device

        def tokens(x: torch.Tensor) -> torch.Tensor:
            t = m._pos_embed(m.patch_embed(x.to(dev)))
            return m.norm_pre(t[0] if isinstance(m, Eva) else t)          # Eva: (tokens, rotary codes)

        return [tokens(x).cpu() for x in tensor_batches(images, self.batch_size)]

    def pooled(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The original's tokens ``(B, P + H·W, C)`` pooled onto the grid block ``block`` of the twin sees."""
        return pool_tokens_to_block(x, self.grid, self.layout, block, self.prefix)

    def original_block(self, bo: nn.Module, xo: Batches, l: int) -> tuple[Batches, Batches, Batches, Batches]:
        """The original block's input, post-attention and output tokens, pooled onto block ``l``'s grid, and its
        unpooled output (the next block's input)."""
        in_o, mid_o, out_o, nxt = [], [], [], []
        for x in xo:
            x = x.to(self.dev_o)
            mid = x + bo.ls1(bo.attn(bo.norm1(x)))
            out = mid + bo.ls2(bo.mlp(bo.norm2(mid)))
            in_o.append(self.pooled(x, l).cpu()), mid_o.append(self.pooled(mid, l).cpu())
            out_o.append(self.pooled(out, l).cpu()), nxt.append(out.cpu())
        return in_o, mid_o, out_o, nxt

    def mse(self, ys: Batches, ts: Batches) -> float:
        """Token-weighted mean squared error of ``ys`` against ``ts``."""
        num = den = 0.0
        for y, t in zip(ys, ts):
            w = _token_weights(len(y), y.shape[1], self.cls_weight, "cpu", self.prefix)
            num += float((((y - t) ** 2).mean(-1) * w).sum())
            den += float(w.sum())
        return num / den

    def fuse(self, bc: "_Bound", xc: Batches, in_o: Batches) -> Batches:
        """Refit the merge's fusion Linear from pairs of the twin's tokens to the original's (pooled) input; return
        the merged tokens."""
        fit, (gh, gw), P = _Ridge(), bc.merge.in_grid, self.prefix
        for x, t in zip(xc, in_o):
            B, _, C = x.shape
            pairs = pair_tokens(x[:, P:].reshape(B, gh, gw, C), bc.merge.direction).reshape(B, -1, 2 * C)
            fit.add(pairs.to(self.dev), t[:, P:].to(self.dev))
        _set_linear(bc.merge.fuse, *fit.solve(self.ridge))
        return [bc.merge(x.to(self.dev)).cpu() for x in xc]

    def branch(self, linear: nn.Linear, run: Callable[[torch.Tensor], torch.Tensor], ls: nn.Module, xs: Batches,
               targets: Batches) -> Batches:
        """Refit the Linear that ends a residual branch (``proj`` or ``fc2``): its inputs while ``run`` computes the
        branch on ``xs`` → ``(target − x) / γ``; return the stream after the refit branch, ``x + γ·linear(a)``."""
        acts: list[torch.Tensor] = []
        hook = linear.register_forward_pre_hook(lambda m, a: acts.append(a[0].cpu()))
        try:
            for x in xs:
                run(x.to(self.dev))
        finally:
            hook.remove()
        fit, g = _Ridge(), _scale(ls)
        for x, a, t in zip(xs, acts, targets):
            target = (t - x) if g is None else (t - x) / g.cpu()
            fit.add(a.to(self.dev), target.to(self.dev),
                    _token_weights(len(x), x.shape[1], self.cls_weight, self.dev, self.prefix))
        _set_linear(linear, *fit.solve(self.ridge))
        return [(x.to(self.dev) + ls(linear(a.to(self.dev)))).cpu() for x, a in zip(xs, acts)]


class _Ridge:
    """Accumulates ``[X, 1]ᵀ[X, 1]`` and ``[X, 1]ᵀY`` in float64 over batches; :meth:`solve` gives ``(W, b)`` of
    ``argmin Σ w·‖XWᵀ + b − Y‖² + λ·mean(diag)·‖W‖²``."""

    def __init__(self) -> None:
        self.G = self.B = None

    def add(self, X: torch.Tensor, Y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        X = torch.cat([X.reshape(-1, X.shape[-1]), X.new_ones(X[..., :1].numel(), 1)], dim=1).double()
        Y = Y.reshape(-1, Y.shape[-1]).double()
        Xw = X if weight is None else X * weight.reshape(-1, 1).double()
        G, B = Xw.T @ X, Xw.T @ Y
        self.G, self.B = (G, B) if self.G is None else (self.G + G, self.B + B)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        G = self.G.clone()
        d = G.shape[0] - 1
        G[:d, :d] += ridge * G.diagonal()[:d].mean().clamp_min(1e-12) * torch.eye(d, dtype=G.dtype, device=G.device)
        sol = torch.linalg.solve(G, self.B)                              # (d + 1, out)
        return sol[:d].T.contiguous(), sol[d].contiguous()


def _set_linear(lin: nn.Linear, W: torch.Tensor, b: torch.Tensor) -> None:
    lin.weight.data.copy_(W.to(lin.weight.dtype))
    if lin.bias is None:
        raise ValueError("the refit needs a Linear with a bias")
    lin.bias.data.copy_(b.to(lin.bias.dtype))


def _scale(ls: nn.Module) -> torch.Tensor | None:
    """The layer-scale vector γ of a branch (None for an identity)."""
    if isinstance(ls, LayerScale):
        return ls.gamma.detach()
    if isinstance(ls, nn.Identity):
        return None
    raise TypeError(f"cannot refit through a {type(ls).__name__} layer scale")


def _token_weights(B: int, N: int, cls_weight: float, device, prefix: int = 1) -> torch.Tensor:
    """Row weights ``(B, N)``: the first prefix token (timm's CLS) counts ``cls_weight · (N − P)`` patch tokens (the
    head reads it); other prefix tokens count one each; without prefix tokens every row counts one."""
    w = torch.ones(B, N, device=device)
    if prefix:
        w[:, 0] = cls_weight * (N - prefix)
    return w
