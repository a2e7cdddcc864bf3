"""*Download the twin*: a ``.zip`` of the twin's checkpoint (``model.safetensors`` + ``config.json``)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..io.checkpoint import save_pretrained
from ..measure.flops import tensor_bytes
from ..models.meta import meta_of
from .pairs import ModelPair


def twin_bytes(pair: ModelPair) -> int:
    """Bytes the twin's ``.zip`` takes at most: its parameters and buffers as stored, plus 1 MB of config."""
    return tensor_bytes(pair.compressed) + 1_000_000


def download_twin(pair: ModelPair, where: str | os.PathLike, room: Callable[[int], None] | None = None) -> Path:
    """The twin's checkpoint zipped under ``where``, written once per pair (a hash of its settings names it);
    it loads with :func:`cait.load_pretrained` once unpacked. Only the ``.zip`` stays: the folder it is made from
    is written to a temporary directory beside it and removed.

    Args:
        pair: the models.
        where: the folder for the zip files.
        room: called with the bytes a new zip needs before anything is written (the public disk budget); it raises
            to refuse.
    """
    final = meta_of(pair.compressed).finetune
    key = hashlib.sha256(json.dumps([pair.ref.key, pair.flops_reduction, str(pair.merge), final and final.step],
                                    default=str).encode()).hexdigest()[:16]
    where = Path(where)
    zpath = where / f"cait-twin-{key}.zip"
    if zpath.is_file():
        return zpath
    if room is not None:
        room(twin_bytes(pair))
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where, prefix=".twin-") as tmp:
        folder = save_pretrained(pair.compressed, Path(tmp) / "cait-twin")
        part = Path(tmp) / "twin.zip"
        with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(folder.iterdir()):
                z.write(f, f"cait-twin/{f.name}")
        shutil.rmtree(folder)
        os.replace(part, zpath)
    return zpath
