"""FLOPs and parameters in the paper's convention (docs/method.md: FLOPs).

One FLOP is one multiply-add. Counted: every Linear (the ATME fusion Linears included), the patch-embedding
convolution, the classifier, and the two attention matmuls (q·kᵀ and attn·v). Not counted (choice, matching the
formula of docs/method.md: FLOPs): LayerNorm, GELU, softmax, additions.

Two independent counts that must agree:

* :func:`analytic_flops` — the closed form per block with N tokens (CLS included), embed dim C, q/k width D_qk and
  v width D_v (summed over heads) and FFN width D_f::

      N·C·(2·D_qk + D_v) + N²·(D_qk + D_v) + N·D_v·C + 2·N·C·D_f   (+ N_out·2C·C when the block merges)

  plus the patch embedding ``patches·(3·p²)·C`` and the head ``C·classes``. DeiT-S: 4.599 G.
* :func:`count_flops` — fvcore's jit trace, with a handle for ``aten::scaled_dot_product_attention`` (fvcore has
  none: without it DeiT-S counts 4.24 G) and LayerNorm switched off.

Compactors are not part of the analytic count: it describes the deployed model, into which they fold. The closed
form lives with the model's shape, :class:`cait.models.spec.ModelSpec`.
"""
from __future__ import annotations

import copy
import warnings
from math import prod

import torch
import torch.nn as nn

with warnings.catch_warnings():          # fvcore's import touches the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from ..layers.pruned_attention import exact_widths
from ..models.spec import ModelSpec, describe


def analytic_flops(model: nn.Module | ModelSpec) -> int:
    """Total FLOPs (multiply-adds, one image) by the closed form of docs/method.md: FLOPs."""
    spec = model if isinstance(model, ModelSpec) else describe(model)
    return spec.flops()


def _sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q·kᵀ plus attn·v, as multiply-adds."""
    q, k, v = (get_shape(x) for x in inputs[:3])                    # (B, H, L, E), (B, H, S, E), (B, H, S, Ev)
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _not_counted(inputs, outputs) -> int:
    return 0


def flop_analysis(model: nn.Module, img_size: int | None = None) -> FlopCountAnalysis:
    """An fvcore ``FlopCountAnalysis`` of one image in the paper's convention (see module docstring).

    Args:
        model: any DeiT built by this package.
        img_size: input side in pixels; another size than the model's counts a resized copy (timm's
            ``set_input_size``: position embedding resampled, ATME grids moved).

    Raises:
        ValueError: if the model cannot take that size (not a multiple of the patch, or a layout that no longer fits).
    """
    size = img_size or model.patch_embed.img_size[0]
    if size != model.patch_embed.img_size[0]:                   # count a resized copy; the model is untouched
        if size % model.patch_embed.patch_size[0]:
            raise ValueError(f"img_size {size} is not a multiple of the patch size {model.patch_embed.patch_size[0]}")
        model = copy.deepcopy(model)
        model.set_input_size(img_size=size)
    p = next(model.parameters())
    x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    fca = FlopCountAnalysis(model, (x,))
    fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
    # Zero, not None: fvcore's set_op_handle(name, None) leaves an existing default handle in place.
    fca.set_op_handle("aten::layer_norm", _not_counted)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with exact_widths(model):                # the kernel's zero padding is not the model's multiply-adds
        fca.total()                          # run the trace now, in eval mode (fvcore caches it)
    model.train(was_training)
    return fca


def count_flops(model: nn.Module, img_size: int | None = None) -> int:
    """Total FLOPs (multiply-adds) of one image, counted by fvcore with attention matmuls included (docs/method.md:
    FLOPs).

    Args:
        model: any DeiT built by this package (original, ATME, compactor or compact).
        img_size: input side in pixels; default: the model's own (224 for DeiT). Another size counts a resized copy.

    Raises:
        ValueError: for a size that is not a multiple of the patch size, or at which the ATME layout does not fit.
    """
    return int(flop_analysis(model, img_size).total())


def flops_by_block(model: nn.Module, img_size: int | None = None) -> dict[str, int]:
    """fvcore FLOPs per top-level part: ``patch_embed``, ``blocks.0`` … ``blocks.{L-1}``, ``head`` (an
    attention-pooling head's FLOPs included)."""
    by_module = flop_analysis(model, img_size).by_module()
    names = ["patch_embed"] + [f"blocks.{i}" for i in range(len(model.blocks))]
    out = {n: int(by_module.get(n, 0)) for n in names}
    out["head"] = int(by_module.get("head", 0)) + int(by_module.get("attn_pool", 0))
    return out


def count_params(model: nn.Module) -> int:
    """Number of parameters (compactors included if the model still has them)."""
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (their dtypes): what its checkpoint holds."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
