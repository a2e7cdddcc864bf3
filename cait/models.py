"""Model creation: timm DeiTs with a visible offline fallback, and a tiny DeiT for tests.

`create_model` is the one door through which the library, the app and the command lines get a DeiT. It asks timm
for ImageNet weights (Hugging Face Hub) and, when the Hub cannot be reached, returns a randomly initialised model
together with a `WeightsInfo` that says so — never a crash and never a silent fallback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import timm
import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

DEIT_MODELS: dict[str, str] = {
    "deit_tiny_patch16_224": "DeiT-Tiny",
    "deit_small_patch16_224": "DeiT-Small",
    "deit_base_patch16_224": "DeiT-Base",
}
"""The paper's models (SPEC §0), timm name → display name."""

TEST_MODEL = "deit_test_patch4_32"
"""A tiny DeiT (32 px, patch 4 → 8×8 grid, C=48, 3 heads of 16, depth 6, 10 classes) that exists for tests."""


@register_model
def deit_test_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny DeiT-shaped ViT for tests and demos where size doesn't matter. Has no pretrained weights.

    Raises:
        ValueError: if ``pretrained=True``.
    """
    if pretrained:
        raise ValueError(f"{TEST_MODEL} has no pretrained weights")
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10, qkv_bias=True)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = dict(architecture=TEST_MODEL, input_size=(3, args["img_size"], args["img_size"]),
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0,
                                interpolation="bicubic", num_classes=args["num_classes"])
    return model


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


def create_model(name: str, pretrained: bool = True, **kwargs) -> tuple[nn.Module, WeightsInfo]:
    """Create a timm DeiT, with ImageNet weights when the Hub is reachable.

    Args:
        name: a timm model name, e.g. ``"deit_small_patch16_224"`` or :data:`TEST_MODEL`.
        pretrained: try timm's pretrained weights (Hugging Face Hub). When that fails (offline, no weights for this
            name), the model is randomly initialised and the returned `WeightsInfo` says why.
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``img_size``).

    Returns:
        ``(model, info)``; the model is in eval mode on the CPU.

    Raises:
        ValueError: if ``name`` is not a timm model name.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; try one of {sorted(DEIT_MODELS)}")
    info = WeightsInfo("random", "random initialisation (pretrained weights not requested)")
    model = None
    if pretrained:
        if hub_offline():
            info = WeightsInfo("random", "random initialisation: the Hub is disabled (HF_HUB_OFFLINE/CAIT_OFFLINE)")
        else:
            try:
                model = timm.create_model(name, pretrained=True, **kwargs)
                info = WeightsInfo("timm-imagenet", f"timm ImageNet weights for {name}")
            except Exception as e:  # offline, missing weights, hub errors: all mean "fall back, and say so"
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                info = WeightsInfo("random", f"random initialisation: pretrained weights unavailable ({reason})")
    if model is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval(), info
