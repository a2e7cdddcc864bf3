"""Save and load compact models as ``model.safetensors`` + ``config.json``. Loading never unpickles.

``config.json`` (format ``cait-studio/compact-v1``)::

    {
      "format": "cait-studio/compact-v1",
      "base_model": "deit_small_patch16_224",     # timm architecture the skeleton is built from
      "img_size": 224,
      "num_classes": 1000,
      "merge": "h4,v7",                            # ATME layout, "" for none
      "blocks": [{"qk_dim": 51, "v_dim": 44, "ffn_dim": 1246}, ...],   # per-head q/k and v widths; null = unpruned
      "meta": {...}                                # free-form: preview flag, training provenance, ...
    }

A corrupt, truncated or mismatched checkpoint raises :class:`CheckpointError` naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .compactor import has_compactors
from .flops import describe
from .merge import apply_atme, format_layout, get_layout
from .models import architecture
from .prune import is_pruned, restructure

FORMAT = "cait-studio/compact-v1"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def model_config(model: nn.Module) -> dict:
    """The ``config.json`` dict describing a model built by this package (see module docstring)."""
    blocks = None
    if is_pruned(model):
        blocks = [{"qk_dim": b.qk_dim, "v_dim": b.v_dim, "ffn_dim": b.ffn_dim} for b in describe(model).blocks]
    return {
        "format": FORMAT,
        "base_model": architecture(model),
        "img_size": int(model.patch_embed.img_size[0]),
        "num_classes": int(model.num_classes),
        "merge": format_layout(get_layout(model)),
        "blocks": blocks,
        "meta": dict(getattr(model, "cait_meta", {}) or {}),
    }


def atomic_write(path: Path, write) -> None:
    """Write ``path`` via ``write(tmp_path)`` into a temporary file beside it, then rename: readers never see a
    half-written file."""
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
        model: an original, ATME or compact DeiT (compactors must be folded first with :func:`cait.prune`).
        path: a directory, created if needed.
        dtype: store floating tensors in this dtype (e.g. ``torch.float16`` halves the size); default: as is.
        meta: extra entries merged into ``config["meta"]``.

    Returns:
        The directory.

    Raises:
        ValueError: if the model still has compactors.
    """
    if has_compactors(model):
        raise ValueError("fold the compactors first (cait.prune); a compactor model is a training state")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model_config(model)
    config["meta"].update(meta or {})
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": FORMAT}))
    atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def read_config(path: str | os.PathLike) -> dict:
    """Read and validate ``config.json`` of a checkpoint directory.

    Raises:
        CheckpointError: missing directory or file, invalid JSON, wrong format, missing or ill-typed keys.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfile = path / CONFIG_NAME
    if not cfile.is_file():
        raise CheckpointError(f"{cfile}: missing")
    try:
        config = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfile}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfile}: format is {found!r}, expected {FORMAT!r}")
    for key, kind in (("base_model", str), ("img_size", int), ("num_classes", int), ("merge", str)):
        if not isinstance(config.get(key), kind):
            raise CheckpointError(f"{cfile}: key {key!r} missing or not a {kind.__name__}")
    blocks = config.get("blocks")
    if blocks is not None and not (isinstance(blocks, list) and all(
            isinstance(b, dict) and all(isinstance(b.get(k), int) for k in ("qk_dim", "v_dim", "ffn_dim"))
            for b in blocks)):
        raise CheckpointError(f"{cfile}: 'blocks' must be null or a list of {{qk_dim, v_dim, ffn_dim}} integers")
    if not timm.is_model(config["base_model"]):
        raise CheckpointError(f"{cfile}: unknown base_model {config['base_model']!r}")
    return config


def build_skeleton(config: dict) -> nn.Module:
    """A randomly initialised model with the architecture a config describes (ATME layout and pruned widths)."""
    model = timm.create_model(config["base_model"], pretrained=False, num_classes=config["num_classes"],
                              img_size=config["img_size"])
    apply_atme(model, config["merge"])
    if config.get("blocks") is not None:
        restructure(model, [(b["qk_dim"], b["v_dim"], b["ffn_dim"]) for b in config["blocks"]])
    return model


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained`; weights are read with safetensors (no pickle).

    Args:
        path: the checkpoint directory.
        device: where to put the model.

    Returns:
        The model in eval mode, float32 (fp16 checkpoints are upcast), with ``model.cait_meta`` from the config.

    Raises:
        CheckpointError: naming the file and the problem, for a missing/corrupt/truncated file, a config that does
            not describe a buildable model, or tensors whose names or shapes do not match the config.
    """
    path = Path(path)
    config = read_config(path)
    cfile, wfile = path / CONFIG_NAME, path / WEIGHTS_NAME
    try:
        model = build_skeleton(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfile}: does not describe a buildable model ({e})") from None
    if not wfile.is_file():
        raise CheckpointError(f"{wfile}: missing")
    try:
        tensors = load_file(wfile)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile}: corrupt or truncated safetensors file ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{wfile}: does not match {CONFIG_NAME}: missing tensors {missing[:3]}, "
                              f"unexpected tensors {unexpected[:3]}")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise CheckpointError(f"{wfile}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                                  f"{CONFIG_NAME} implies {tuple(v.shape)}")
        if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise CheckpointError(f"{wfile}: tensor {k!r} contains NaN or infinity")
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()}, strict=True)
    model.cait_meta = dict(config.get("meta") or {})
    return model.to(device).eval()
