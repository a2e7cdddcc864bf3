"""Training-free calibration of a CAIT twin: Fisher channel scores and a block-by-block least-squares refit.

Post-training pruning after Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022),
with a few hundred *unlabelled* images and no gradient step on the weights:

1. **Fisher scores** (:func:`fisher_scores`). Give every prunable unit a mask ``m = 1``: a q/k pair (l, h, j), a v
   channel (l, h, j), an FFN channel (l, j). With the original model's own predictions as labels, the loss increase
   from removing a unit is, to second order, ``½ Σ_images (∂L_i/∂m)²`` (the empirical Fisher; Kwon et al. §4.1).
   For a channel with activations ``a`` and gradients ``g`` on the N tokens of image i, ``∂L_i/∂m = Σ_n a·g``.
   Removing the pair (q_j, k_j) removes one term of the head's ``q·kᵀ``, the same as masking q_j, so the pair's
   score is the q channel's. Scores go to the consistent selection of :mod:`cait.select` per FLOP removed.
2. **Least-squares refit** (:func:`refit_`). Block by block, on the compact model's own inputs (so earlier errors
   are compensated), refit the Linears that *produce* each residual branch — the ATME fusion, the attention's
   ``proj`` and the FFN's ``fc2`` — so the block's tokens match the original's, pooled onto the merged grid
   (:func:`cait.merge.pool_to_block`): ridge regression, closed form (Kwon et al.'s mask tuning, generalised from
   one scale per kept unit to the whole output Linear).

Worked example (DeiT-Tiny, ``h5,v10`` + CDCP at 50%, 256 synthetic images): block 5's VTM fusion ``Linear(384,
192)`` is fitted from 256·98 pairs of the compact model's tokens to the original's block-5 input averaged over the
same pairs; then ``proj (192 → 192)`` and ``fc2 (D_f → 192)`` to the original's post-attention and block outputs,
averaged likewise.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, LayerScale

from .merge import MergeBlock, get_layout, pair_tokens, patch_grid, pool_to_block
from .select import ChannelScores

Progress = Callable[[str], None] | None


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


# ----------------------------------------------------------------------------------------------------------------
# 1. Fisher scores
# ----------------------------------------------------------------------------------------------------------------
def fisher_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 32,
                  progress: Progress = None) -> ChannelScores:
    """Empirical Fisher of each prunable unit's mask (see module docstring), summed over the images.

    Args:
        model: an unpruned DeiT (ATME allowed) with timm ``Attention`` and ``Mlp``, no compactors.
        images: ``(n, 3, S, S)`` calibration images, normalised for the model.
        labels: ``(n,)`` the labels to score against (the original model's predictions).
        batch_size: images per backward pass.
        progress: called with a short message after each batch.

    Returns:
        :class:`ChannelScores` with ``q = k`` = the q/k pair's Fisher ``(H, d_h)``, ``v`` ``(H, d_h)``, ``ffn``
        ``(D_f,)`` per block (units: squared nats).

    Raises:
        TypeError: if a block's attention is not timm's ``Attention`` (a pruned model, or compactors).
    """
    device = next(model.parameters()).device
    blocks = list(model.blocks)
    for i, b in enumerate(blocks):
        if type(b.attn) is not Attention or type(b.attn.qkv) is not nn.Linear:
            raise TypeError(f"block {i}: Fisher scores need timm's Attention with a plain qkv Linear")
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
    sums = [[None, None, None] for _ in blocks]
    was_training = model.training
    model.eval()
    try:
        for k, (x, y) in enumerate(zip(_batches(images, batch_size), _batches(labels, batch_size))):
            with torch.enable_grad():
                x = x.to(device).requires_grad_(False)
                loss = F.cross_entropy(model(x), y.to(device), reduction="sum")   # a sum: per-image gradients
                model.zero_grad(set_to_none=True)
                loss.backward()
            with torch.no_grad():
                for i, b in enumerate(blocks):
                    H = b.attn.num_heads
                    qkv, g = acts[(i, "qkv")], acts[(i, "qkv", "grad")]             # (B, N, 3·H·d)
                    per = (qkv * g).sum(dim=1)                                       # (B, 3·H·d): ∂L_i/∂m
                    per = per.reshape(len(x), 3, H, -1).pow(2).sum(dim=0).float().cpu()   # (3, H, d)
                    h, hg = acts[(i, "ffn")], acts[(i, "ffn", "grad")]               # (B, N, D_f)
                    f = (h * hg).sum(dim=1).pow(2).sum(dim=0).float().cpu()
                    for j, t in enumerate((per[0], per[2], f)):
                        sums[i][j] = t if sums[i][j] is None else sums[i][j] + t
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


def per_flop(scores: ChannelScores, spec) -> ChannelScores:
    """Scores divided by the FLOPs each unit's removal saves (:class:`cait.flops.BlockSpec` unit costs), so the
    selection walk removes the cheapest loss per FLOP first."""
    qk = [s / b.qk_unit_flops() for s, b in zip(scores.qk(), spec.blocks)]
    v = [s / b.v_unit_flops() for s, b in zip(scores.v, spec.blocks)]
    ffn = [s / b.ffn_unit_flops() for s, b in zip(scores.ffn, spec.blocks)]
    return ChannelScores(q=qk, k=[t.clone() for t in qk], v=v, ffn=ffn)


# ----------------------------------------------------------------------------------------------------------------
# 2. Least-squares refit
# ----------------------------------------------------------------------------------------------------------------
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


def _token_weights(B: int, N: int, cls_weight: float, device) -> torch.Tensor:
    """Row weights ``(B, N)``: the CLS token counts ``cls_weight · (N − 1)`` patch tokens (the head reads it)."""
    w = torch.ones(B, N, device=device)
    w[:, 0] = cls_weight * (N - 1)
    return w


@torch.no_grad()
def refit_(compact: nn.Module, original: nn.Module, images: torch.Tensor, batch_size: int = 32, ridge: float = 1e-2,
           cls_weight: float = 1.0, progress: Progress = None) -> dict:
    """Refit, block by block, each merge fusion, ``proj`` and ``fc2`` of ``compact`` so its tokens match the
    original's (pooled onto the merged grid) on ``images``; in place (module docstring, step 2).

    Args:
        compact: the twin: ATME and/or pruned DeiT built from ``original`` (same depth, embed dim and patch grid).
        original: the uncompressed DeiT; not modified.
        images: ``(n, 3, S, S)`` calibration images, normalised.
        batch_size: images per forward pass.
        ridge: λ, relative to the mean of the Gram matrix's diagonal.
        cls_weight: the CLS token's weight, as a share of all patch tokens of its image (1 = as much as all of them).
        progress: called with a short message after each block.

    Returns:
        ``{"blocks": [{"block", "refit", "mse_before", "mse_after"}, ...]}``: per block, which Linears were refit
        and the (token-weighted) mean squared error of its output against the original's, pooled, before and after
        (earlier blocks already refit in both).

    Raises:
        ValueError: if the two models do not match in depth or patch grid.
    """
    if len(compact.blocks) != len(original.blocks) or patch_grid(compact) != patch_grid(original):
        raise ValueError("refit needs the compact model and the original it was made from (same depth and grid)")
    dev_c, dev_o = next(compact.parameters()).device, next(original.parameters()).device
    compact.eval(), original.eval()
    layout = get_layout(compact)
    H0, W0 = patch_grid(original)

    def pooled(x: torch.Tensor, block: int) -> torch.Tensor:            # original tokens → block's merged grid
        B, _, C = x.shape
        p = pool_to_block(x[:, 1:].reshape(B, H0, W0, C), layout, block)
        return torch.cat([x[:, :1], p.reshape(B, -1, C)], dim=1)

    def embed(m: nn.Module, dev) -> torch.Tensor:                       # tokens entering block 0, on the CPU
        return torch.cat([m.norm_pre(m._pos_embed(m.patch_embed(x.to(dev)))).cpu()
                          for x in _batches(images, batch_size)])

    def mse(ys: list[torch.Tensor], ts: list[torch.Tensor]) -> float:
        num = den = 0.0
        for y, t in zip(ys, ts):
            w = _token_weights(len(y), y.shape[1], cls_weight, "cpu")
            num += float((((y - t) ** 2).mean(-1) * w).sum())
            den += float(w.sum())
        return num / den

    xo, xc = embed(original, dev_o), embed(compact, dev_c)                # (n, 1 + H·W, C), (n, N_l, C)
    report = []
    for l, (bo, bc) in enumerate(zip(original.blocks, compact.blocks)):
        # The original block: its input, post-attention and output tokens, pooled onto this block's grid.
        in_o, mid_o, out_o, nxt = [], [], [], []
        for x in _batches(xo, batch_size):
            x = x.to(dev_o)
            mid = x + bo.ls1(bo.attn(bo.norm1(x)))
            out = mid + bo.ls2(bo.mlp(bo.norm2(mid)))
            in_o.append(pooled(x, l).cpu()), mid_o.append(pooled(mid, l).cpu()), out_o.append(pooled(out, l).cpu())
            nxt.append(out.cpu())
        xo = torch.cat(nxt)
        before = mse([bc(x.to(dev_c)).cpu() for x in _batches(xc, batch_size)], out_o)
        refit = []

        # (a) The merge fusion: pairs of the compact model's tokens → the original's input, pooled over the pair.
        if isinstance(bc, MergeBlock):
            fit = _Ridge()
            gh, gw = bc.merge.in_grid
            for x, t in zip(_batches(xc, batch_size), in_o):
                B, _, C = x.shape
                pairs = pair_tokens(x[:, 1:].reshape(B, gh, gw, C), bc.merge.direction).reshape(B, -1, 2 * C)
                fit.add(pairs.to(dev_c), t[:, 1:].to(dev_c))
            _set_linear(bc.merge.fuse, *fit.solve(ridge))
            refit.append("fuse")
            xc = torch.cat([bc.merge(x.to(dev_c)).cpu() for x in _batches(xc, batch_size)])

        # (b) proj: the compact attention's output before proj → the original's post-attention tokens minus the
        # compact model's input (so the branch also absorbs the drift of earlier blocks).
        acts: list[torch.Tensor] = []
        hook = bc.attn.proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].cpu()))
        try:
            for x in _batches(xc, batch_size):
                bc.attn(bc.norm1(x.to(dev_c)))
        finally:
            hook.remove()
        fit, g1 = _Ridge(), _scale(bc.ls1)
        for x, a, t in zip(_batches(xc, batch_size), acts, mid_o):
            target = (t - x) if g1 is None else (t - x) / g1.cpu()
            fit.add(a.to(dev_c), target.to(dev_c), _token_weights(len(x), x.shape[1], cls_weight, dev_c))
        _set_linear(bc.attn.proj, *fit.solve(ridge))
        refit.append("proj")
        mid_c = [(x.to(dev_c) + bc.ls1(bc.attn.proj(a.to(dev_c)))).cpu()
                 for x, a in zip(_batches(xc, batch_size), acts)]

        # (c) fc2: the compact FFN's hidden activations → the original's block output minus the stream so far.
        acts = []
        hook = bc.mlp.fc2.register_forward_pre_hook(lambda m, a: acts.append(a[0].cpu()))
        try:
            for z in mid_c:
                bc.mlp(bc.norm2(z.to(dev_c)))
        finally:
            hook.remove()
        fit, g2 = _Ridge(), _scale(bc.ls2)
        for z, h, t in zip(mid_c, acts, out_o):
            target = (t - z) if g2 is None else (t - z) / g2.cpu()
            fit.add(h.to(dev_c), target.to(dev_c), _token_weights(len(z), z.shape[1], cls_weight, dev_c))
        _set_linear(bc.mlp.fc2, *fit.solve(ridge))
        refit.append("fc2")
        outs = [(z.to(dev_c) + bc.ls2(bc.mlp.fc2(h.to(dev_c)))).cpu() for z, h in zip(mid_c, acts)]
        xc = torch.cat(outs)
        report.append({"block": l, "refit": refit, "mse_before": before, "mse_after": mse(outs, out_o)})
        if progress:
            progress(f"refit: block {l + 1}/{len(compact.blocks)}")
    return {"blocks": report}
