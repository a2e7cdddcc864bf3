"""*Download the twin*: a ``.zip`` of the twin's checkpoint (``model.safetensors`` + ``config.json``)."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

from ..io.checkpoint import save_pretrained
from ..models.meta import meta_of
from .pairs import ModelPair


def download_twin(pair: ModelPair, where: str | os.PathLike) -> Path:
    """The twin's checkpoint zipped under ``where``, written once per pair (a hash of its settings names it);
    it loads with :func:`cait.load_pretrained` once unpacked."""
    final = meta_of(pair.compressed).finetune
    key = hashlib.sha256(json.dumps([pair.ref.key, pair.flops_reduction, str(pair.merge), final and final.step],
                                    default=str).encode()).hexdigest()[:16]
    zpath = Path(where) / f"cait-twin-{key}.zip"
    if not zpath.is_file():
        folder = save_pretrained(pair.compressed, Path(where) / f"cait-twin-{key}")
        tmp = zpath.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.iterdir()):
                z.write(f, f"cait-twin/{f.name}")
        os.replace(tmp, zpath)
    return zpath
