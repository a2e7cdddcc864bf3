"""Model creation: timm DeiTs with a visible offline fallback, and a tiny DeiT for tests.

`create_model` is the one door through which the library, the app and the command lines get a DeiT. It asks timm
for ImageNet weights (Hugging Face Hub) and, when the Hub cannot be reached, returns a randomly initialised model
together with a `WeightsInfo` that says so — never a crash and never a silent fallback.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
)
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .atme import block_ropes

DEIT_MODELS: dict[str, str] = {
    "deit_tiny_patch16_224": "DeiT-Tiny",
    "deit_small_patch16_224": "DeiT-Small",
    "deit_base_patch16_224": "DeiT-Base",
}
"""The paper's models (docs/method.md: models), timm name → display name."""

TEST_MODEL = "deit_test_patch4_32"
"""A tiny DeiT (32 px, patch 4 → 8×8 grid, C=48, 3 heads of 16, depth 6, 10 classes) that exists for tests."""

PATCH_SIZES: dict[str, int] = {**{name: 16 for name in DEIT_MODELS}, TEST_MODEL: 4}
"""The architectures this package builds, with their patch size in pixels; checkpoints naming any other are refused."""


# timm's registry reads this module-level table for the models registered below.
default_cfgs = generate_default_cfgs({
    f"{TEST_MODEL}.untrained": dict(
        url="", num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bicubic",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj", classifier="head"),
})


@register_model
def deit_test_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny DeiT-shaped ViT for tests and demos where size doesn't matter. Has no pretrained weights.

    Raises:
        ValueError: if ``pretrained=True``.
    """
    if pretrained:
        raise ValueError(f"{TEST_MODEL} has no pretrained weights")
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10, qkv_bias=True)
    return build_model_with_cfg(VisionTransformer, TEST_MODEL, pretrained=False,
                                pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs))


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from.

    Attributes:
        source: ``"timm-imagenet"`` (timm's pretrained weights from the Hub), ``"random"`` or ``"checkpoint"``.
        detail: one human-readable sentence, e.g. why the Hub could not be used.
    """

    source: str
    detail: str

    @property
    def trained(self) -> bool:
        """False for random initialisation."""
        return self.source != "random"


def hub_offline() -> bool:
    """True when the user asked for no Hub access (``HF_HUB_OFFLINE=1`` or ``CAIT_OFFLINE=1``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "CAIT_OFFLINE"))


def architecture(model: nn.Module) -> str:
    """The timm architecture name a model was built from (e.g. ``"deit_small_patch16_224"``).

    Raises:
        ValueError: if the model carries no timm ``pretrained_cfg`` naming its architecture.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ValueError("model has no pretrained_cfg['architecture']; build it with timm.create_model")
    return name


def update_cfg(model: nn.Module, **changes) -> nn.Module:
    """Update a model's timm ``pretrained_cfg`` (and its ``default_cfg`` alias) in place, e.g. after a new head or
    input size, so timm's data config and anyone reading the cfg see the model as it is, not as the base was."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {}, **changes)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


@functools.lru_cache(maxsize=1)
def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None if the Hugging Face Hub answers a TCP connection within ``timeout`` seconds, else why not.

    Checked once per process, so an offline machine falls back in seconds rather than after the Hub client's
    retries (about 50 s here).
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host} unreachable: {e.strerror or e}"


def cached_weights(name: str) -> str | None:
    """Path of timm's pretrained weights for ``name`` in the local Hugging Face cache, if already downloaded."""
    try:
        hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
        for filename in ("model.safetensors", "pytorch_model.bin") if hub_id else ():
            path = try_to_load_from_cache(hub_id, filename)
            if isinstance(path, str) and filename.endswith(".safetensors"):
                return path
    except Exception:  # no cfg, no cache: nothing cached
        return None
    return None


def missing_weights_reason(name: str, hub_reason: str | None) -> str | None:
    """Why ``create_model(name, pretrained=True)`` would give random weights (None: trained weights are within reach,
    from the Hub or the local cache). ``hub_reason``: :func:`hub_unreachable_reason`'s answer, or None.

    >>> missing_weights_reason(TEST_MODEL, None)
    'deit_test_patch4_32 has no published weights'
    """
    hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None) if name in DEIT_MODELS else None
    if not hub_id:
        return f"{name} has no published weights"
    if hub_reason is None or cached_weights(name):
        return None
    return f"{name}'s weights are not in the local cache and the Hub is out of reach ({hub_reason})"


def fixed_grid_kwargs(model: nn.Module) -> dict:
    """The ``timm.create_model`` arguments that build ``model``'s architecture at a fixed grid: ``{"dynamic_img_size":
    False}`` for a model built with a dynamic image size (DINOv3's default; the same weights, and ATME needs the grid
    at every block), else ``{}``. ``model`` may be on the ``meta`` device."""
    return {"dynamic_img_size": False} if getattr(model, "dynamic_img_size", False) else {}


def create_model(name: str, pretrained: bool = True, **kwargs) -> tuple[nn.Module, WeightsInfo]:
    """Create a timm DeiT, with ImageNet weights when the Hub is reachable.

    Args:
        name: a timm model name, e.g. ``"deit_small_patch16_224"`` or :data:`TEST_MODEL`.
        pretrained: try timm's pretrained weights (Hugging Face Hub). When that fails (offline, no weights for this
            name), the model is randomly initialised and the returned `WeightsInfo` says why.
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``img_size``). A model whose timm default
            is a dynamic image size (DINOv3) is built at its default size with ``dynamic_img_size=False`` (the same
            weights; ATME needs a fixed grid) unless ``dynamic_img_size`` is given.

    Returns:
        ``(model, info)``; the model is in eval mode on the CPU.

    Raises:
        ValueError: if ``name`` is not a timm model name.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; try one of {sorted(DEIT_MODELS)}")
    if "dynamic_img_size" not in kwargs:
        kwargs.update(fixed_grid_kwargs(timm.create_model(name, pretrained=False, device="meta")))
    info = WeightsInfo("random", "random initialisation (pretrained weights not requested)")
    model = None
    if pretrained:
        reason = "the Hub is disabled (HF_HUB_OFFLINE/CAIT_OFFLINE)" if hub_offline() else hub_unreachable_reason()
        cached = cached_weights(name) if reason else None
        if reason and not cached:
            info = WeightsInfo("random", f"random initialisation: {reason}")
        else:
            try:
                overlay = {"pretrained_cfg_overlay": dict(file=cached)} if cached else {}
                model = timm.create_model(name, pretrained=True, **overlay, **kwargs)
                where = "from the local cache" if cached else "from the Hub"
                info = WeightsInfo("timm-imagenet", f"timm ImageNet weights for {name} ({where})")
            except Exception as e:  # missing weights, hub errors: all mean "fall back, and say so"
                why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                info = WeightsInfo("random", f"random initialisation: pretrained weights unavailable ({why})")
    if model is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval(), info


def block_outputs(model: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Each listed block's output tokens ``(B, N_i, C)`` (CLS first) for images ``x (B, 3, S, S)``, running the model's
    own patch embedding and blocks (for models whose token count is not a grid, where timm's
    ``forward_intermediates`` cannot reshape).

    Raises:
        ValueError: for a block index outside the model.
    """
    depth = len(model.blocks)
    wanted = sorted({i % depth for i in indices}) if all(-depth <= i < depth for i in indices) else None
    if wanted is None:
        raise ValueError(f"block indices {indices} are outside 0..{depth - 1}")
    if isinstance(model, Eva):                                # Eva: each block also takes its rotary codes
        x, rope = model._pos_embed(model.patch_embed(x))
        x, ropes = model.norm_pre(x), block_ropes(model, rope)
    else:
        x, ropes = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))), None
    out = []
    for i, block in enumerate(model.blocks[: wanted[-1] + 1]):
        x = block(x) if ropes is None else block(x, rope=ropes[i])
        if i in wanted:
            out.append(x)
    return out


def resize_input(model: nn.Module, img_size: int) -> nn.Module:
    """Make a model take ``img_size``-pixel inputs, in place: timm's ``set_input_size`` (position embedding
    resampled; an ATME model also moves its merges) and its ``pretrained_cfg`` updated to match, so data configs
    read from it (calibration, transforms) use the new size.

    Raises:
        ValueError: for a size that is not a multiple of the patch, or at which an ATME layout no longer fits.
    """
    patch = model.patch_embed.patch_size[0]
    if img_size % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
    if img_size != model.patch_embed.img_size[0]:
        model.set_input_size(img_size=img_size)
    return update_cfg(model, input_size=(3, img_size, img_size))
