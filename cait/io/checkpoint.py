"""Save and load compact models as ``model.safetensors`` + ``config.json``. Loading never unpickles.

``config.json`` (format ``cait-studio/compact-v1``)::

    {
      "format": "cait-studio/compact-v1",
      "base_model": "deit3_small_patch16_224",    # the timm name it was made from (provenance)
      "architecture": {"family": "VisionTransformer", "patch_size": 16, "embed_dim": 384, "depth": 12,
                       "num_heads": 6, "layer_scale": true, "reg_tokens": 0, ...},   # what the skeleton is built from
      "data": {"mean": [...], "std": [...], "interpolation": "bicubic", "crop_pct": 0.875},   # its preprocessing
      "img_size": 224,
      "num_classes": 1000,
      "merge": "h4,v7",                            # ATME layout, "" for none
      "blocks": [{"qk_dim": 51, "v_dim": 44, "ffn_dim": 1246}, ...],   # per-head q/k and v widths; null = unpruned
      "meta": {...}                                # free-form: preview flag, training provenance, ...
    }

``architecture`` (:class:`cait.models.arch.ViTArch`) records the model's options, so any plain ViT saves and loads:
DeiT, distilled DeiT, DeiT III, DINOv2 with or without registers, CLIP, AugReg, a ViT without a class token, and any
of them made with another depth or width. Files written before it existed have none; they are rebuilt from
``base_model``, which must then be one of :data:`cait.models.deit.PATCH_SIZES`.

A corrupt, truncated or mismatched checkpoint raises :class:`CheckpointError` naming the file and the problem.
Loading checks, before anything is allocated: the config's size and nesting, every number against a bound, the
image size against the patch size, the parameter count; then it builds the skeleton on the ``meta`` device (shapes
only) and checks, from the safetensors header alone, every tensor's name, shape and dtype, and the architecture hash
that ties the weights to the config they were saved with (``model.safetensors`` metadata ``config_sha256``; files
written before it existed have none and are accepted). Only then is memory allocated and the weights read.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..compress.prune import is_pruned, restructure
from ..models.arch import arch_from_dict, arch_of
from ..models.atme import apply_atme, get_layout
from ..models.compactors import has_compactors
from ..models.deit import PATCH_SIZES, architecture, update_cfg
from ..models.meta import ModelMeta, meta_of
from ..models.spec import describe

FORMAT = "cait-studio/compact-v1"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
MAX_CONFIG_BYTES = 1_000_000
"""A ``config.json`` larger than this is refused unread."""
IMG_SIZE_RANGE, NUM_CLASSES_RANGE = (16, 1024), (1, 22_000)
"""Bounds on ``img_size`` (pixels) and ``num_classes`` (ImageNet-22k has 21,843), checked before building."""
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
"""Floating dtypes a weights file may store (upcast to float32 on load)."""
ARCH_KEYS = ("base_model", "img_size", "num_classes", "merge", "blocks")
"""The config entries the architecture hash covers (and ``"architecture"`` where the config has one)."""
DATA_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
"""The preprocessing entries of the model's ``pretrained_cfg`` kept in ``config["data"]``."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def model_config(model: nn.Module) -> dict:
    """The ``config.json`` dict describing a model built by this package (see module docstring)."""
    blocks = None
    if is_pruned(model):
        blocks = [{"qk_dim": b.qk_dim, "v_dim": b.v_dim, "ffn_dim": b.ffn_dim} for b in describe(model).blocks]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "format": FORMAT,
        "base_model": architecture(model),
        "architecture": arch_of(model).to_dict(),
        "data": {k: cfg[k] for k in DATA_KEYS if cfg.get(k) is not None},
        "img_size": int(model.patch_embed.img_size[0]),
        "num_classes": int(model.num_classes),
        "merge": str(get_layout(model)),
        "blocks": blocks,
        "meta": meta_of(model).to_dict(),
    }


def architecture_hash(config: dict) -> str:
    """SHA-256 of the architecture-defining config entries (:data:`ARCH_KEYS`), canonical JSON: what ties a weights
    file to the config it was saved with."""
    keys = ARCH_KEYS + (("architecture",) if "architecture" in config else ())
    return hashlib.sha256(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write ``path`` via ``write(tmp_path)`` into a temporary file beside it, then rename: readers never see a
    half-written file. Temporary files of ``path`` left by a process killed mid-write (over an hour old) are
    removed first."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    meta: dict | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (each atomically: temp file, then rename).

    Args:
        model: an original, ATME or compact plain ViT or Eva (:class:`cait.models.arch.ViTArch`,
            :class:`~cait.models.arch.EvaArch`; compactors must be folded first with :func:`cait.prune`).
        path: a directory, created if needed.
        dtype: store floating tensors in this dtype (e.g. ``torch.float16`` halves the size); default: as is.
        meta: extra entries merged into ``config["meta"]``.

    Returns:
        The directory.

    Raises:
        ValueError: if the model still has compactors.
        CheckpointError: for a model whose architecture the config cannot record, or whose recorded skeleton
            (built on the ``meta`` device) would not have the model's tensors; nothing is written then.
    """
    if has_compactors(model):
        raise ValueError("fold the compactors first (cait.prune or cait.fold_compactors); a compactor model is a "
                         "training state")
    try:
        arch_of(model)                                   # first: a model neither record describes is refused here
        config = model_config(model)
    except ValueError as e:
        raise CheckpointError(f"cannot save this model: {e}") from None
    config["meta"].update(meta or {})
    _check_rebuilds(config, model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config_sha256": architecture_hash(config)}
    atomic_write(path / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=metadata))
    atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def _check_rebuilds(config: dict, model: nn.Module) -> None:
    """Raise :class:`CheckpointError` unless the skeleton ``config`` describes (built on the ``meta`` device, nothing
    allocated) has exactly the model's tensor names and shapes."""
    try:
        expected = build_skeleton(config, device="meta").state_dict()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot save this model: its config does not rebuild it ({e})") from None
    actual = model.state_dict()
    diff = sorted(set(expected) ^ set(actual)) or [k for k, v in actual.items() if v.shape != expected[k].shape]
    if diff:
        raise CheckpointError(f"cannot save this model: the checkpoint format would rebuild it with other tensors "
                              f"({', '.join(diff[:3])}); nothing was written")


def _check_data(data: object, cfile: Path) -> None:
    """``config["data"]``: preprocessing entries of bounded type and size."""
    if not isinstance(data, dict) or set(data) - set(DATA_KEYS):
        raise CheckpointError(f"{cfile}: 'data' must be an object with keys among {list(DATA_KEYS)}")
    for key in ("mean", "std"):
        v = data.get(key, [0.5])
        if not (isinstance(v, list) and 1 <= len(v) <= 16 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 255 for x in v)):
            raise CheckpointError(f"{cfile}: data {key!r} must be a list of up to 16 numbers in [0, 255]")
    if any(not isinstance(data.get(k, ""), str) or len(data.get(k, "")) > 32 for k in ("interpolation", "crop_mode")):
        raise CheckpointError(f"{cfile}: data 'interpolation' and 'crop_mode' must be short strings")
    crop = data.get("crop_pct", 1.0)
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 2:
        raise CheckpointError(f"{cfile}: data 'crop_pct' must be a number in (0, 2], got {crop!r}")


def _patch_size(config: dict, cfile: Path) -> int:
    """The patch size the config implies, after checking its architecture record (or, for a file without one, its
    base name against :data:`cait.models.deit.PATCH_SIZES`)."""
    base, arch = config.get("base_model"), config.get("architecture")
    if arch is None:
        if base not in PATCH_SIZES:
            raise CheckpointError(f"{cfile}: records no architecture and its base_model {base!r} is not one this "
                                  f"package builds by name ({sorted(PATCH_SIZES)})")
        return PATCH_SIZES[base]
    if not isinstance(base, str) or not 0 < len(base) <= 200:
        raise CheckpointError(f"{cfile}: 'base_model' must be a model name (a string of 1 to 200 characters)")
    try:
        arch = arch_from_dict(arch)
    except ValueError as e:
        raise CheckpointError(f"{cfile}: {e}") from None
    _check_data(config.get("data", {}), cfile)
    return arch.patch_size


def _int(config: dict, key: str, lo: int, hi: int, cfile: Path) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CheckpointError(f"{cfile}: {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def read_json_file(cfile: Path, missing: str = "missing", max_bytes: int = MAX_CONFIG_BYTES) -> object:
    """A small JSON file parsed: the one reader of every config a checkpoint, a segmenter or a Hub folder carries.

    Args:
        cfile: the file.
        missing: what the error says after the file's name when it does not exist.
        max_bytes: a larger file is refused unread (default :data:`MAX_CONFIG_BYTES`).

    Returns:
        The parsed value (any JSON type: the caller checks its shape).

    Raises:
        CheckpointError: naming the file: missing, larger than ``max_bytes``, not valid UTF-8 JSON, or nested too
            deeply.
    """
    if not cfile.is_file():
        raise CheckpointError(f"{cfile}: {missing}")
    if cfile.stat().st_size > max_bytes:
        raise CheckpointError(f"{cfile}: {cfile.stat().st_size} bytes, more than a config can be ({max_bytes} at most)")
    try:
        return json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfile}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{cfile}: JSON nested too deeply") from None


def read_config(path: str | os.PathLike) -> dict:
    """Read and validate ``config.json`` of a checkpoint directory, without building anything.

    Raises:
        CheckpointError: missing directory or file, a file over :data:`MAX_CONFIG_BYTES`, invalid or too deeply
            nested JSON, wrong format, an ``architecture`` record out of bounds (or, in a file without one, a base
            name not in :data:`cait.models.deit.PATCH_SIZES`), ``img_size`` or ``num_classes`` out of bounds (or not
            a multiple of the patch size), ill-typed ``merge``, ``blocks``, ``data`` or ``meta``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfile = path / CONFIG_NAME
    config = read_json_file(cfile)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfile}: format is {found!r}, expected {FORMAT!r}")
    patch = _patch_size(config, cfile)
    size = _int(config, "img_size", *IMG_SIZE_RANGE, cfile)
    if size % patch:
        raise CheckpointError(f"{cfile}: img_size {size} is not a multiple of the patch size {patch}")
    _int(config, "num_classes", *NUM_CLASSES_RANGE, cfile)
    if not isinstance(config.get("merge"), str) or len(config["merge"]) > 200:
        raise CheckpointError(f"{cfile}: 'merge' must be a layout string such as 'h4,v7' (or '')")
    blocks = config.get("blocks")
    if blocks is not None and not (isinstance(blocks, list) and len(blocks) <= 64 and all(
            isinstance(b, dict) and all(isinstance(b.get(k), int) and not isinstance(b.get(k), bool)
                                        for k in ("qk_dim", "v_dim", "ffn_dim")) for b in blocks)):
        raise CheckpointError(f"{cfile}: 'blocks' must be null or a list of {{qk_dim, v_dim, ffn_dim}} integers")
    depth = (config.get("architecture") or {}).get("depth", len(blocks or []))
    if blocks is not None and len(blocks) != depth:
        raise CheckpointError(f"{cfile}: {len(blocks)} block widths for an architecture of depth {depth}")
    if not isinstance(config.get("meta", {}), dict):
        raise CheckpointError(f"{cfile}: 'meta' must be an object")
    return config


def build_skeleton(config: dict, hub_id: str | None = None, device: str | torch.device | None = None) -> nn.Module:
    """A randomly initialised model with the architecture a config describes (ATME layout and pruned widths).

    Its ``pretrained_cfg`` describes this model, not the base: its classes, input size and preprocessing,
    ``tag="cait"``, and the Hub repository it was loaded from (``hf_hub_id``) or none (the base's ImageNet weights are
    not these). ``device="meta"`` builds the shapes only.

    Raises:
        ValueError, TypeError: for a config that does not describe a buildable model.
    """
    S, classes = config["img_size"], config["num_classes"]
    if config.get("architecture") is not None:
        model = arch_from_dict(config["architecture"]).build(S, classes, device=device)
        update_cfg(model, architecture=config["base_model"], **config.get("data", {}))
    else:                                               # files from before the architecture record
        with torch.device(device or "cpu"):
            model = timm.create_model(config["base_model"], pretrained=False, num_classes=classes, img_size=S)
    update_cfg(model, num_classes=classes, input_size=(3, S, S), tag="cait", hf_hub_id=hub_id, url="")
    apply_atme(model, config["merge"])
    if config.get("blocks") is not None:
        restructure(model, [(b["qk_dim"], b["v_dim"], b["ffn_dim"]) for b in config["blocks"]])
    return model


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", hub_id: str | None = None
                    ) -> nn.Module:
    """Load a checkpoint directory written by :func:`save_pretrained`; weights are read with safetensors (no pickle).
    :func:`cait.load_pretrained` (:mod:`cait.io.hub`) also takes ``hf-hub:`` ids and calls this.

    Args:
        path: the checkpoint directory.
        device: where to put the model.
        hub_id: the Hub repository the directory was downloaded from (recorded in the model's ``pretrained_cfg``).

    Returns:
        The model in eval mode, float32 (fp16 checkpoints are upcast), with ``model.cait_meta`` (a
        :class:`cait.models.meta.ModelMeta`) from the config.

    Raises:
        CheckpointError: naming the file and the problem, for a missing/corrupt/truncated file, a config that is out
            of bounds or does not describe a buildable model (:func:`read_config`), weights saved with another
            config (architecture hash), tensors whose names, shapes or dtypes do not match the config, or a meta
            record of the wrong shape.
    """
    path = Path(path)
    config = read_config(path)
    cfile, wfile = path / CONFIG_NAME, path / WEIGHTS_NAME
    try:
        skeleton = build_skeleton(config, hub_id, device="meta")       # shapes only: nothing allocated yet
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfile}: does not describe a buildable model ({e})") from None
    if not wfile.is_file():
        raise CheckpointError(f"{wfile}: missing")
    expected = skeleton.state_dict()
    _check_header(wfile, config, expected)
    persistent = {n for n, _ in skeleton.named_buffers()} <= set(expected)
    model = skeleton.to_empty(device="cpu") if persistent else build_skeleton(config, hub_id)
    try:
        tensors = load_file(wfile)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile}: corrupt or truncated safetensors file ({e})") from None
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{wfile}: tensor {k!r} contains NaN or infinity")
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()}, strict=True)
    try:
        model.cait_meta = ModelMeta.from_dict(config.get("meta"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfile}: 'meta' is not a model record ({e})") from None
    return model.to(device).eval()


def _check_header(wfile: Path, config: dict, expected: dict[str, torch.Tensor]) -> None:
    """From the safetensors header alone (nothing is loaded): the architecture hash, then every tensor's name, shape
    and floating dtype against the skeleton's ``expected`` state dict. Raises :class:`CheckpointError`."""
    try:                                          # the header only: names, shapes, dtypes, metadata
        with safe_open(wfile, framework="pt") as f:
            metadata = f.metadata() or {}
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile}: corrupt or truncated safetensors file ({e})") from None
    if metadata.get("config_sha256") not in (None, architecture_hash(config)):
        raise CheckpointError(f"{wfile}: was saved with another {CONFIG_NAME} (architecture hash differs: has "
                              f"base_model, img_size, num_classes, merge or blocks been edited?)")
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{wfile}: does not match {CONFIG_NAME}: missing tensors {missing[:3]}, "
                              f"unexpected tensors {unexpected[:3]}")
    for k, v in expected.items():
        shape, dtype = header[k]
        if shape != tuple(v.shape):
            raise CheckpointError(f"{wfile}: tensor {k!r} has shape {shape}, {CONFIG_NAME} implies {tuple(v.shape)}")
        if v.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{wfile}: tensor {k!r} is {dtype}, expected a floating dtype "
                                  f"({', '.join(FLOAT_DTYPES)})")
