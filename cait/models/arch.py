"""A ViT's architecture as a JSON record: what a checkpoint needs to rebuild the model without its name.

A timm name says which architecture a model was built from, not which options it was built with: a DINOv2 with
registers, a DeiT III with LayerScale, a CLIP ViT with a pre-norm, or any of them created with another ``depth`` or
``embed_dim``. :class:`ViTArch` reads those options from the model's own modules (:meth:`ViTArch.of`), checks every
value against a bound when read back from JSON (:meth:`ViTArch.from_dict`), and builds the skeleton with timm's own
class (:meth:`ViTArch.build`). The prefix tokens are ``class_token + reg_tokens`` (+1 for a distilled DeiT's
distillation token), as timm's ``num_prefix_tokens`` counts them. An ``Eva`` (EVA-02, DINOv3) has its own record,
:class:`EvaArch` (its FFN kind and rotary settings); :func:`arch_of` and :func:`arch_from_dict` pick the right one.

>>> import timm
>>> arch = ViTArch.of(timm.create_model("vit_small_patch14_reg4_dinov2", depth=2, img_size=70))
>>> arch.patch_size, arch.embed_dim, arch.depth, arch.reg_tokens, arch.layer_scale, arch.prefix_tokens
(14, 384, 2, 4, True, 5)
>>> ViTArch.from_dict(arch.to_dict()) == arch
True
>>> ViTArch.from_dict(dict(arch.to_dict(), depth=1000))
Traceback (most recent call last):
    ...
ValueError: architecture 'depth' must be an integer in [1, 64], got 1000
>>> eva = arch_of(timm.create_model("vit_small_patch16_dinov3", depth=2, dynamic_img_size=False))
>>> eva.family, eva.rope, eva.reg_tokens, eva.abs_pos_embed, arch_from_dict(eva.to_dict()) == eva
('Eva', 'dinov3', 4, False, True)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import GluMlp, LayerScale, SwiGLU
from timm.layers.activations import GELU, GELUTanh, QuickGELU
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import VisionTransformer

FAMILIES = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}
"""The timm classes a record can name (the ATME and compact models are these classes, patched)."""
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
"""MLP activations by timm's names (``timm.layers.get_act_layer``)."""
GLOBAL_POOLS = ("token", "avg", "", "map")
MAX_PARAMS = 3_000_000_000
"""A record describing more parameters than this is refused before anything is allocated (ViT-g has 1.0 B)."""


def _check_fields(cls, d: object, bounds: dict, flags: tuple, choices: dict) -> None:
    """Raise ``ValueError`` unless a stored record is an object, naming the first key that is missing, unknown, of
    the wrong type or out of bounds: integers in ``bounds``, booleans in ``flags``, strings among ``choices``,
    ``norm_eps`` in (0, 0.01]."""
    if not isinstance(d, dict):
        raise ValueError(f"architecture must be an object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    missing, unknown = [n for n in names if n not in d], sorted(set(d) - set(names))
    if missing or unknown:
        raise ValueError(f"architecture keys missing {missing} or unknown {unknown[:5]}")
    for key, (lo, hi) in bounds.items():
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"architecture {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    for key in flags:
        if not isinstance(d[key], bool):
            raise ValueError(f"architecture {key!r} must be true or false, got {d[key]!r}")
    for key, allowed in choices.items():
        if d[key] not in allowed:
            raise ValueError(f"architecture {key!r} must be one of {list(allowed)}, got {d[key]!r}")
    eps = d["norm_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps <= 1e-2:
        raise ValueError(f"architecture 'norm_eps' must be a number in (0, 0.01], got {eps!r}")


def _activation(act: nn.Module) -> str:
    """timm's name of an MLP activation module. Raises ValueError for any other activation."""
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, GELUTanh) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    if isinstance(act, (GELU, nn.GELU)):
        return "gelu"
    raise ValueError(f"MLP activation {type(act).__name__} cannot be recorded (supported: {', '.join(ACTIVATIONS)})")


_BOUNDS = {"patch_size": (1, 64), "in_chans": (1, 16), "embed_dim": (8, 8192), "depth": (1, 64),
           "num_heads": (1, 128), "mlp_hidden": (1, 65536), "reg_tokens": (0, 64)}
_FLAGS = ("qkv_bias", "proj_bias", "layer_scale", "class_token", "no_embed_class", "pre_norm", "final_norm",
          "fc_norm", "pool_include_prefix", "learned_pos_embed")


class _Record:
    """What both records share: their JSON form and the checks before a build."""

    def to_dict(self) -> dict:
        """The JSON object stored in a checkpoint's ``config.json`` (``"architecture"``)."""
        return dataclasses.asdict(self)

    def _check_build(self, img_size: int) -> None:
        """Raise ``ValueError`` for a record over :data:`MAX_PARAMS` parameters or an image size the patch does
        not divide."""
        if self.approx_params() > MAX_PARAMS:
            raise ValueError(f"architecture has ~{self.approx_params():,} parameters, more than {MAX_PARAMS:,}")
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {self.patch_size}")


@dataclass(frozen=True)
class ViTArch(_Record):
    """The options of a timm ``VisionTransformer`` (or distilled DeiT) that decide its tensors and its function.

    Attributes:
        family: a key of :data:`FAMILIES`.
        patch_size: pixels per side of a patch (14, 16, 32, ...); ``in_chans`` input channels.
        embed_dim: C; ``depth``: blocks; ``num_heads``: H (C divisible by H).
        mlp_hidden: the skeleton's FFN width before a compact model's per-block widths apply (for a compact model,
            the widest block's: :func:`cait.compress.prune.restructure` then gives every block its own).
        qkv_bias, proj_bias: whether the attention's Linears have biases.
        layer_scale: LayerScale (``ls1``/``ls2``, DeiT III, DINOv2) in every block.
        class_token, reg_tokens: a CLS token; register tokens (DINOv2 ``reg4``: 4).
        no_embed_class: prefix tokens get no position embedding; ``learned_pos_embed``: a learned position
            embedding at all (False: none).
        pre_norm: a LayerNorm before the blocks (CLIP); ``final_norm``: one after them, on the tokens or, with
            ``fc_norm``, on the pooled feature (timm's meaning of the two flags).
        global_pool: ``"token"`` (CLS), ``"avg"``, ``"map"`` (SigLIP's attention-pooling head) or ``""``;
            ``pool_include_prefix``: average the prefix tokens too.
        act: the MLP activation (:data:`ACTIVATIONS`); ``norm_eps``: every LayerNorm's epsilon (1e-6 DeiT, 1e-5 CLIP).
    """

    family: str
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    qkv_bias: bool
    proj_bias: bool
    layer_scale: bool
    class_token: bool
    reg_tokens: int
    no_embed_class: bool
    learned_pos_embed: bool
    pre_norm: bool
    final_norm: bool
    fc_norm: bool
    global_pool: str
    pool_include_prefix: bool
    act: str
    norm_eps: float

    @property
    def prefix_tokens(self) -> int:
        """P: CLS + registers (+ the distillation token), as timm's ``num_prefix_tokens``."""
        return int(self.class_token) + self.reg_tokens + int(self.family == "VisionTransformerDistilled")

    @classmethod
    def of(cls, model: nn.Module) -> "ViTArch":
        """Read the record from a model's modules (original, ATME or compact).

        Raises:
            ValueError: for a model that is not one of :data:`FAMILIES` or has a part the record cannot describe
                (a patch-embedding norm, another activation, mixed LayerNorm epsilons).
        """
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer; its architecture cannot be "
                             f"recorded")
        block = model.blocks[0]
        if not isinstance(model.patch_embed.norm, nn.Identity):
            raise ValueError("a patch-embedding norm cannot be recorded yet")
        pool = getattr(model, "attn_pool", None)                 # MAP: timm builds it from mlp_ratio too
        pool_hidden = 0 if pool is None or pool.mlp is None else int(pool.mlp.fc1.out_features)
        eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
        if len(eps) > 1:
            raise ValueError(f"LayerNorms with different epsilons ({sorted(eps)}) cannot be recorded")
        attn = block.attn
        return cls(
            family="VisionTransformerDistilled" if isinstance(model, VisionTransformerDistilled) else
            "VisionTransformer",
            patch_size=int(model.patch_embed.patch_size[0]), in_chans=int(model.patch_embed.proj.in_channels),
            embed_dim=int(model.embed_dim), depth=len(model.blocks), num_heads=int(attn.num_heads),
            mlp_hidden=max(pool_hidden, *(int(b.mlp.fc1.out_features) for b in model.blocks)),
            qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
            layer_scale=isinstance(block.ls1, LayerScale), class_token=model.cls_token is not None,
            reg_tokens=int(model.num_reg_tokens), no_embed_class=bool(model.no_embed_class),
            learned_pos_embed=model.pos_embed is not None, pre_norm=not isinstance(model.norm_pre, nn.Identity),
            final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
            fc_norm=not isinstance(model.fc_norm, nn.Identity),
            global_pool=str(model.global_pool), pool_include_prefix=bool(model.pool_include_prefix),
            act=_activation(block.mlp.act), norm_eps=float(eps.pop()) if eps else 1e-6)

    @classmethod
    def from_dict(cls, d: object) -> "ViTArch":
        """Read and check a stored record: every key present and typed, every number in its bound.

        Raises:
            ValueError: naming the first key that is missing, of the wrong type or out of bounds.
        """
        _check_fields(cls, d, _BOUNDS, _FLAGS,
                      {"family": tuple(FAMILIES), "act": ACTIVATIONS, "global_pool": GLOBAL_POOLS})
        eps = d["norm_eps"]
        if d["embed_dim"] % d["num_heads"]:
            raise ValueError(f"architecture embed_dim {d['embed_dim']} is not divisible by num_heads {d['num_heads']}")
        if d["family"] == "VisionTransformerDistilled" and not d["class_token"]:
            raise ValueError("a distilled DeiT has a class token")
        return cls(**dict(d, norm_eps=float(eps)))

    def approx_params(self) -> int:
        """Parameters of the blocks alone, by formula (an upper bound's main term), for refusing huge records."""
        C, F = self.embed_dim, self.mlp_hidden
        return self.depth * (4 * C * C + 2 * C * F)

    def build(self, img_size: int, num_classes: int, device: str | torch.device | None = None) -> nn.Module:
        """A randomly initialised model of this architecture (timm's own class) at ``img_size`` pixels.

        Args:
            device: where to allocate (``"meta"``: shapes only, nothing allocated).

        Raises:
            ValueError: for a record over :data:`MAX_PARAMS` parameters or an image size the patch does not divide.
        """
        self._check_build(img_size)
        kwargs = dict(
            img_size=img_size, patch_size=self.patch_size, in_chans=self.in_chans, num_classes=num_classes,
            global_pool=self.global_pool, embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=(self.mlp_hidden + 0.5) / self.embed_dim, qkv_bias=self.qkv_bias, proj_bias=self.proj_bias,
            init_values=1.0 if self.layer_scale else None, class_token=self.class_token,
            pos_embed="learn" if self.learned_pos_embed else "none", no_embed_class=self.no_embed_class,
            reg_tokens=self.reg_tokens, pre_norm=self.pre_norm, final_norm=self.final_norm, fc_norm=self.fc_norm,
            pool_include_prefix=self.pool_include_prefix, act_layer=self.act,
            norm_layer=partial(nn.LayerNorm, eps=self.norm_eps))
        with torch.device(device or "cpu"):
            return FAMILIES[self.family](**kwargs)


_EVA_BOUNDS = dict(_BOUNDS)
_EVA_FLAGS = ("qkv_bias", "qkv_fused", "layer_scale", "class_token", "no_embed_class", "abs_pos_embed", "pre_norm",
              "final_norm", "fc_norm", "rope_rotate_half")
FFN_KINDS = ("mlp", "glu", "swiglu")
"""An Eva block's FFN: timm's ``Mlp`` (GELU), ``GluMlp`` (packed SwiGLU, EVA-02) or ``SwiGLU`` (separate gate and
value Linears)."""
ROPE_KINDS = ("cat", "dinov3")
"""Eva's axial RoPE modules by timm's ``rope_type``: ``RotaryEmbeddingCat`` (EVA-02), ``RotaryEmbeddingDinoV3``."""


@dataclass(frozen=True)
class EvaArch(_Record):
    """The options of a timm ``Eva`` (EVA-02, DINOv3) that decide its tensors and its function; the counterpart of
    :class:`ViTArch` (``family == "Eva"``).

    The sizes, tokens, norms, pooling and ``norm_eps`` mean what they mean in :class:`ViTArch`.

    Attributes:
        ffn: the FFN (:data:`FFN_KINDS`); ``qkv_bias``: q and v biases; ``qkv_fused``: one ``qkv`` Linear (else
            ``q_proj``/``k_proj``/``v_proj``); ``layer_scale``: ``gamma_1``/``gamma_2``.
        abs_pos_embed: a learned absolute position embedding (EVA-02 has one and RoPE; DINOv3 RoPE only).
        rope: :data:`ROPE_KINDS`; ``rope_temperature``, ``rope_rotate_half``, ``rope_grid_offset``,
            ``rope_grid_indexing`` and ``rope_ref_grid`` (EVA-02's reference grid, ``[]`` for none): its settings.
    """

    family: str
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    ffn: str
    qkv_bias: bool
    qkv_fused: bool
    layer_scale: bool
    class_token: bool
    reg_tokens: int
    no_embed_class: bool
    abs_pos_embed: bool
    pre_norm: bool
    final_norm: bool
    fc_norm: bool
    global_pool: str
    rope: str
    rope_temperature: float
    rope_rotate_half: bool
    rope_grid_offset: float
    rope_grid_indexing: str
    rope_ref_grid: list
    norm_eps: float

    @property
    def prefix_tokens(self) -> int:
        """P: CLS + registers, as timm's ``num_prefix_tokens``."""
        return int(self.class_token) + self.reg_tokens

    @classmethod
    def of(cls, model: nn.Module) -> "EvaArch":
        """Read the record from an Eva's modules (original, ATME or compact).

        Raises:
            ValueError: for a model the record cannot describe (no RoPE or another RoPE module, an attention-pooling
                head, norms inside the blocks, mixed LayerNorm epsilons, a post-norm block).
        """
        rope, block = model.rope, model.blocks[0]
        if type(rope) not in (RotaryEmbeddingCat, RotaryEmbeddingDinoV3) or model.attn_pool is not None \
                or not isinstance(block, EvaBlock):
            raise ValueError("only an Eva with axial RoPE (EVA-02, DINOv3), pre-norm blocks and no attention-pooling "
                             "head can be recorded")
        eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
        if len(eps) > 1:
            raise ValueError(f"LayerNorms with different epsilons ({sorted(eps)}) cannot be recorded")
        mlps = [b.mlp for b in model.blocks]
        ffn = "glu" if isinstance(mlps[0], GluMlp) else "swiglu" if isinstance(mlps[0], SwiGLU) else "mlp"
        hidden = max((m.fc1_g.out_features if ffn == "swiglu" else m.fc1.out_features // (2 if ffn == "glu" else 1))
                     for m in mlps)
        attn, dinov3 = _eva_attention(block), isinstance(rope, RotaryEmbeddingDinoV3)
        ref = getattr(rope, "ref_feat_shape", None)
        return cls(
            family="Eva", patch_size=int(model.patch_embed.patch_size[0]),
            in_chans=int(model.patch_embed.proj.in_channels), embed_dim=int(model.embed_dim), depth=len(model.blocks),
            num_heads=int(block.attn.num_heads), mlp_hidden=int(hidden), ffn=ffn, qkv_bias=attn["bias"],
            qkv_fused=attn["fused"], layer_scale=block.gamma_1 is not None, class_token=model.cls_token is not None,
            reg_tokens=0 if model.reg_token is None else int(model.reg_token.shape[1]),
            no_embed_class=bool(model.no_embed_class), abs_pos_embed=model.pos_embed is not None,
            pre_norm=not isinstance(model.norm_pre, nn.Identity), final_norm=not isinstance(model.norm, nn.Identity),
            fc_norm=not isinstance(model.fc_norm, nn.Identity), global_pool=str(model.global_pool),
            rope="dinov3" if dinov3 else "cat", rope_temperature=float(rope.temperature),
            rope_rotate_half=bool(rope.rotate_half), rope_grid_offset=float(rope.grid_offset),
            rope_grid_indexing=str(rope.grid_indexing), rope_ref_grid=[int(v) for v in ref] if ref else [],
            norm_eps=float(eps.pop()) if eps else 1e-6)

    @classmethod
    def from_dict(cls, d: object) -> "EvaArch":
        """Read and check a stored record, as :meth:`ViTArch.from_dict`.

        Raises:
            ValueError: naming the first key that is missing, of the wrong type or out of bounds.
        """
        _check_fields(cls, d, _EVA_BOUNDS, _EVA_FLAGS,
                      {"family": ("Eva",), "ffn": FFN_KINDS, "rope": ROPE_KINDS, "rope_grid_indexing": ("ij", "xy"),
                       "global_pool": GLOBAL_POOLS + ("avgmax", "max")})
        for key, (lo, hi) in {"rope_temperature": (1.0, 1e6), "rope_grid_offset": (-64.0, 64.0)}.items():
            v = d[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"architecture {key!r} must be a number in [{lo}, {hi}], got {v!r}")
        ref = d["rope_ref_grid"]
        if not (isinstance(ref, list) and len(ref) in (0, 2)
                and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024 for v in ref)):
            raise ValueError(f"architecture 'rope_ref_grid' must be [] or two integers in [1, 1024], got {ref!r}")
        if d["embed_dim"] % d["num_heads"] or (d["embed_dim"] // d["num_heads"]) % 4:
            raise ValueError(f"architecture embed_dim {d['embed_dim']} must split into num_heads {d['num_heads']} "
                             f"heads of a multiple of 4 channels (axial RoPE)")
        return cls(**dict(d, norm_eps=float(d["norm_eps"]), rope_temperature=float(d["rope_temperature"]),
                          rope_grid_offset=float(d["rope_grid_offset"])))

    def approx_params(self) -> int:
        """Parameters of the blocks alone, by formula, for refusing huge records."""
        C, F = self.embed_dim, self.mlp_hidden
        return self.depth * (4 * C * C + (3 if self.ffn != "mlp" else 2) * C * F)

    def build(self, img_size: int, num_classes: int, device: str | torch.device | None = None) -> nn.Module:
        """A randomly initialised ``Eva`` of this architecture at ``img_size`` pixels, fixed size.

        Raises:
            ValueError: for a record over :data:`MAX_PARAMS` parameters or an image size the patch does not divide.
        """
        self._check_build(img_size)
        kwargs = dict(
            img_size=img_size, patch_size=self.patch_size, in_chans=self.in_chans, num_classes=num_classes,
            global_pool=self.global_pool, embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            qkv_bias=self.qkv_bias, qkv_fused=self.qkv_fused, mlp_ratio=(self.mlp_hidden + 0.5) / self.embed_dim,
            swiglu_mlp=self.ffn != "mlp", swiglu_align_to=1 if self.ffn == "swiglu" else 0,
            init_values=1.0 if self.layer_scale else None, class_token=self.class_token,
            num_reg_tokens=self.reg_tokens, no_embed_class=self.no_embed_class, use_abs_pos_emb=self.abs_pos_embed,
            use_rot_pos_emb=True, rope_type=self.rope, rope_grid_offset=self.rope_grid_offset,
            rope_grid_indexing=self.rope_grid_indexing, rope_temperature=self.rope_temperature,
            rope_rotate_half=self.rope_rotate_half, use_pre_transformer_norm=self.pre_norm,
            use_post_transformer_norm=self.final_norm, use_fc_norm=self.fc_norm,
            ref_feat_shape=tuple(self.rope_ref_grid) or None, norm_layer=partial(nn.LayerNorm, eps=self.norm_eps))
        with torch.device(device or "cpu"):
            return Eva(**kwargs)


def _eva_attention(block: nn.Module) -> dict:
    """``{"fused": …, "bias": …}`` of an Eva block's attention, original (EvaAttention) or compact
    (PrunedAttention: read from the block's recorded original layout, ``block.attn.qkv`` fused, bias if any)."""
    attn = block.attn
    if hasattr(attn, "q_proj"):
        fused = attn.qkv is not None
        bias = (attn.q_bias is not None) if fused else attn.q_proj.bias is not None
        if fused and attn.q_bias is None and attn.qkv.bias is not None:            # biases fused into qkv (ToMe)
            bias = True
        return {"fused": fused, "bias": bias}
    return {"fused": True, "bias": attn.qkv.bias is not None}


def arch_of(model: nn.Module) -> "ViTArch | EvaArch":
    """The architecture record of a timm ``VisionTransformer`` (:class:`ViTArch`) or ``Eva`` (:class:`EvaArch`).

    Raises:
        ValueError: for a model neither record can describe.
    """
    return EvaArch.of(model) if isinstance(model, Eva) else ViTArch.of(model)


def arch_from_dict(d: object) -> "ViTArch | EvaArch":
    """Read a stored record of either kind, by its ``family``.

    Raises:
        ValueError: for a record that does not check (:meth:`ViTArch.from_dict`, :meth:`EvaArch.from_dict`).
    """
    return EvaArch.from_dict(d) if isinstance(d, dict) and d.get("family") == "Eva" else ViTArch.from_dict(d)
