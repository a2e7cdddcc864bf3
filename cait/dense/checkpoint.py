"""A trained segmenter on disk, and what it costs. Loading never unpickles.

::

    SEGMENTER/segmenter.json        format cait-studio/segmenter-v1: classes, blocks read, decoder widths, the
                                    backbone's baseline and its settings, input size, held-out score, run config
    SEGMENTER/backbone/             the backbone checkpoint (cait.io.checkpoint): a baseline's uncompressed model;
                                    absent when segmenter.json names a bundled one ("bundled": "original"|"cait")
    SEGMENTER/decoder.safetensors   pyramid, decoder and head; metadata config_sha256 ties it to segmenter.json

:func:`load_segmenter` checks the JSON's size and every field against a bound before building anything, then the
decoder's tensor names and shapes from the safetensors header, then the hash. :func:`segmenter_flops` counts
multiply-adds of one image (docs/method.md: FLOPs): the backbone with :func:`cait.count_flops` (fvcore equals each
baseline's closed form), the pyramid, decoder and head with fvcore's convolution counts (norms, activations,
pooling and resizing not counted).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from fvcore.nn import FlopCountAnalysis
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..baselines.token_pruning import apply_token_pruning
from ..baselines.tome import apply_tome
from ..io.bundled import bundled_pair
from ..io.checkpoint import CheckpointError, atomic_write, load_checkpoint, read_json_file, save_pretrained
from ..measure.flops import count_flops
from ..models.deit import resize_input
from .backbones import BASELINES
from .features import backbone_kind
from .records import SegmentEvalRecord
from .segmenter import DecoderConfig, Segmenter

FORMAT = "cait-studio/segmenter-v1"
CONFIG_NAME, DECODER_NAME, BACKBONE_DIR = "segmenter.json", "decoder.safetensors", "backbone"
MAX_CONFIG_BYTES = 200_000
_ARCH_KEYS = ("num_classes", "blocks", "decoder")


def _hash(config: dict) -> str:
    return hashlib.sha256(json.dumps({k: config.get(k) for k in _ARCH_KEYS}, sort_keys=True).encode()).hexdigest()


def _baseline_settings(backbone: nn.Module) -> dict:
    kind = backbone_kind(backbone)
    if kind == "tome":
        return {"baseline": "tome", "schedule": list(backbone.tome.schedule)}
    if kind == "token_pruning":
        return {"baseline": "token_pruning", "keep_rate": backbone.pruning.keep_rate,
                "locations": list(backbone.pruning.locations)}
    return {"baseline": "none"}                              # atme and cdcp baselines are checkpoints of their own


def save_segmenter(seg: Segmenter, path: str | os.PathLike, classes: list[str], what: str = "",
                   config: dict | None = None, score: SegmentEvalRecord | None = None,
                   bundled_backbone: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a segmenter (module docstring); returns the directory.

    Args:
        bundled_backbone: ``"original"`` or ``"cait"``: the backbone is that bundled checkpoint (``assets/``) and is
            not copied (a baseline's settings are still saved); default: the backbone is written beside the decoder.
        dtype: store the decoder in this dtype (``torch.float16`` halves it); default: as is.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if bundled_backbone not in (None, "original", "cait"):
        raise ValueError(f"bundled_backbone is 'original' or 'cait', got {bundled_backbone!r}")
    if bundled_backbone is None:
        save_pretrained(seg.backbone, path / BACKBONE_DIR)
    d = seg.decoder_config
    cfg = {"format": FORMAT, "num_classes": seg.num_classes, "classes": list(classes), "blocks": list(seg.blocks),
           "decoder": {"pyramid_channels": d.pyramid_channels, "segmentation_channels": d.segmentation_channels},
           "backbone": {**_baseline_settings(seg.backbone), "what": what,
                        **({"bundled": bundled_backbone} if bundled_backbone else {})},
           "img_size": int(seg.backbone.patch_embed.img_size[0]), "frozen": seg.frozen,
           "score": None if score is None else {"miou": score.miou, "per_class_iou": score.per_class_iou,
                                                "pixel_accuracy": score.pixel_accuracy},
           "config": config or {}}
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in seg.decoder_modules().state_dict().items()}
    atomic_write(path / DECODER_NAME, lambda f: save_file(tensors, f, metadata={"format": FORMAT,
                                                                                 "config_sha256": _hash(cfg)}))
    atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(cfg, indent=2) + "\n"))
    return path


def read_segmenter_config(path: str | os.PathLike) -> dict:
    """``segmenter.json`` read and checked, nothing built.

    Raises:
        CheckpointError: naming the file and the field: missing, too large, not JSON, wrong format, or a field out of
            its bounds.
    """
    cfile = Path(path) / CONFIG_NAME
    cfg = read_json_file(cfile, missing="missing (not a segmenter directory)", max_bytes=MAX_CONFIG_BYTES)

    def bad(field: str) -> CheckpointError:
        return CheckpointError(f"{cfile}: {field!r} is missing or out of bounds")

    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfile}: format is not {FORMAT!r}")
    k = cfg.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 256:
        raise bad("num_classes")
    if not (isinstance(cfg.get("classes"), list) and len(cfg["classes"]) == k
            and all(isinstance(c, str) and len(c) <= 100 for c in cfg["classes"])):
        raise bad("classes")
    if not (isinstance(cfg.get("blocks"), list) and len(cfg["blocks"]) == 4
            and all(isinstance(b, int) and 0 <= b < 64 for b in cfg["blocks"])):
        raise bad("blocks")
    dec = cfg.get("decoder")
    if not (isinstance(dec, dict) and all(isinstance(dec.get(n), int) and 8 <= dec[n] <= 1024
                                          for n in ("pyramid_channels", "segmentation_channels"))
            and dec["segmentation_channels"] % 32 == 0):
        raise bad("decoder")
    bb = cfg.get("backbone")
    if not (isinstance(bb, dict) and bb.get("baseline") in BASELINES
            and bb.get("bundled") in (None, "original", "cait")):
        raise bad("backbone")
    size = cfg.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= 1024:
        raise bad("img_size")
    return cfg


def load_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu") -> Segmenter:
    """Load a segmenter written by :func:`save_segmenter` (eval mode).

    Raises:
        CheckpointError: for a bad ``segmenter.json`` (:func:`read_segmenter_config`), a backbone checkpoint that
            cannot be loaded, or decoder weights that are corrupt, of another configuration (hash) or of other names
            or shapes.
    """
    path = Path(path)
    cfg = read_segmenter_config(path)
    bb = cfg["backbone"]
    backbone = _bundled_backbone(bb["bundled"]) if bb.get("bundled") else load_checkpoint(path / BACKBONE_DIR)
    try:
        resize_input(backbone, cfg["img_size"])                    # a bundled backbone ships at 224 px
    except ValueError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: 'img_size' does not fit the backbone ({e})") from None
    try:
        if bb["baseline"] == "tome":
            apply_tome(backbone, bb["schedule"])
        elif bb["baseline"] == "token_pruning":
            apply_token_pruning(backbone, float(bb["keep_rate"]), list(bb["locations"]))
        seg = Segmenter(backbone, cfg["num_classes"], cfg["blocks"], DecoderConfig(**cfg["decoder"]),
                        frozen=bool(cfg.get("frozen", True)))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: does not describe a segmenter of this backbone ({e})") from None
    wfile = path / DECODER_NAME
    expected = seg.decoder_modules().state_dict()
    try:
        with safe_open(wfile, framework="pt") as f:
            metadata = f.metadata() or {}
            header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        tensors = load_file(wfile)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile}: missing, corrupt or truncated ({type(e).__name__})") from None
    if metadata.get("config_sha256") != _hash(cfg):
        raise CheckpointError(f"{wfile}: was saved with another {CONFIG_NAME} (num_classes, blocks or decoder edited?)")
    if header != {k: tuple(v.shape) for k, v in expected.items()}:
        raise CheckpointError(f"{wfile}: tensor names or shapes do not match {CONFIG_NAME}")
    seg.decoder_modules().load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    seg.classes = cfg["classes"]
    return seg.to(device).eval()


def _bundled_backbone(which: str) -> nn.Module:
    pair = bundled_pair()
    if pair is None:
        raise CheckpointError("this segmenter reads a bundled backbone, and the bundled pair is not in this checkout")
    return load_checkpoint(pair.original_dir if which == "original" else pair.twin_dir)


class _Decode(nn.Module):
    def __init__(self, seg: Segmenter, size: int) -> None:
        super().__init__()
        self.seg, self.size = seg, size

    def forward(self, a, b, c, d):
        return self.seg.decode([a, b, c, d], (self.size, self.size))


def segmenter_flops(seg: Segmenter, img_size: int | None = None) -> tuple[int, int]:
    """``(backbone FLOPs, segmenter FLOPs)`` of one image at ``img_size`` (default: the backbone's), multiply-adds;
    the second includes the first (module docstring)."""
    size = img_size or int(seg.backbone.patch_embed.img_size[0])
    backbone = count_flops(seg.backbone, size)
    p = seg.backbone.patch_embed.patch_size[0]
    maps = tuple(torch.zeros(1, seg.backbone.embed_dim, size // p, size // p) for _ in range(4))
    fca = FlopCountAnalysis(_Decode(seg, size).eval(), maps)
    for op in ("aten::group_norm", "aten::upsample_bilinear2d", "aten::upsample_nearest2d", "aten::batch_norm"):
        fca.set_op_handle(op, lambda inputs, outputs: 0)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return backbone, backbone + int(fca.total())
