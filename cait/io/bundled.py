"""Trained weights that ship with the repository: a DeiT-Tiny and its CAIT twin, trained here on synthetic shapes.

When the Hugging Face Hub cannot be reached, timm's ImageNet weights cannot be had and a random DeiT's attention maps
mean nothing. These two checkpoints, produced by this project's own pipeline (``assets/train_offline_weights.py``),
are then the app's default, so the offline experience is a real one::

    assets/deit_tiny_synthetic/        config.json  model.safetensors (fp16)  provenance.json
    assets/cait_deit_tiny_synthetic/   config.json  model.safetensors (fp16)  provenance.json

``provenance.json`` says how each was made: command, seed, data set, steps, device, top-1, FLOPs, date, and the
attention-localisation score on the held-out split.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository checkout this package runs from (for an installed wheel: its site-packages)."""
PACKAGED_ASSETS = Path(__file__).resolve().parents[1] / "_assets"
"""Where an installed wheel keeps the bundled checkpoints (``pyproject.toml`` maps ``assets/`` to ``cait._assets``)."""
ASSETS_DIR = Path(os.environ.get("CAIT_ASSETS_DIR") or
                  (REPO_ROOT / "assets" if (REPO_ROOT / "assets").is_dir() else PACKAGED_ASSETS))
"""Where the bundled checkpoints live: ``$CAIT_ASSETS_DIR`` if set, else the checkout's ``assets/``, else the
installed package's copy."""

ROOT_SCRIPT = REPO_ROOT / "assets" / "train_offline_weights.py"
"""The script that reproduces the bundled pair from scratch."""

ORIGINAL_DIR, TWIN_DIR = "deit_tiny_synthetic", "cait_deit_tiny_synthetic"
PROVENANCE_NAME = "provenance.json"


@dataclass(frozen=True)
class BundledPair:
    """The bundled original and twin checkpoint directories and their provenance dicts."""

    original_dir: Path
    twin_dir: Path
    original_provenance: dict
    twin_provenance: dict

    def load(self, device="cpu") -> tuple[nn.Module, nn.Module]:
        """``(original, twin)`` in eval mode on ``device`` (fp16 on disk, float32 in memory).

        Raises:
            cait.io.checkpoint.CheckpointError: for a missing, corrupt or mismatched checkpoint.
        """
        return load_checkpoint(self.original_dir, device), load_checkpoint(self.twin_dir, device)


def bundled_pair(root: str | os.PathLike | None = None) -> BundledPair | None:
    """The bundled pair under ``root`` (default :data:`ASSETS_DIR`), or None when it is not there (a checkout
    without the assets). Only looks for the files; :meth:`BundledPair.load` validates them."""
    root = Path(root) if root is not None else ASSETS_DIR
    dirs = root / ORIGINAL_DIR, root / TWIN_DIR
    if not all((d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file() for d in dirs):
        return None
    return BundledPair(*dirs, *(read_provenance(d) for d in dirs))


def read_provenance(path: str | os.PathLike) -> dict:
    """``path/provenance.json`` as a dict; empty if the file is missing or unreadable."""
    try:
        data = json.loads((Path(path) / PROVENANCE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
