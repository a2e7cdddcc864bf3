"""Retention in public mode: finished jobs and unused uploads go ``retention_s`` after they end, twins made for
download and Gradio's cached files ``cache_retention_s`` after they were written, calibrated twins
``retention_s`` after their last use (:class:`cait.studio.public.Limits`).
Active jobs and their uploads stay; nothing is deleted early to make room (:mod:`cait.studio.jobs.disk` refuses the
newcomer instead)."""
from __future__ import annotations

import shutil
import time

from ..public import Limits
from .model import UPLOAD_ID
from .store import JobStore


def cleanup(store: JobStore, limits: Limits, now: float | None = None) -> list[str]:
    """Delete what retention says, under the store's lock; returns the job ids and ``upload:<id>`` entries deleted."""
    now, gone = now or time.time(), []
    with store.locked():
        jobs = store.list()
        in_use = {j.upload for j in jobs if j.status.active and j.upload}
        finished = [("job", j.id, j.ended or j.created) for j in jobs if not j.status.active]
        uploads = [("upload", p.name, p.stat().st_mtime) for p in (store.root / "uploads").iterdir()
                   if UPLOAD_ID.match(p.name) and p.name not in in_use]
        # Caches of what can be remade: every file of the download and upload caches aged from its own write (a
        # folder's time moves only when an entry is added or removed, so a zip in a busy folder was never retired);
        # a calibrated twin (a folder read as one) from its last use.
        for cache in CACHES:
            _expire_files(store.root / cache, now, limits.cache_retention_s)
        for f in ((store.root / "twins").iterdir() if (store.root / "twins").is_dir() else ()):
            if now - f.stat().st_mtime > limits.retention_s:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        for kind, ident, when in finished + uploads:
            if now - when <= limits.retention_s:
                continue
            shutil.rmtree(store.root / ("jobs" if kind == "job" else "uploads") / ident, ignore_errors=True)
            store.forget(ident)
            gone.append(ident if kind == "job" else f"upload:{ident}")
    return gone


def _expire_files(root, now: float, age: float) -> None:
    """Delete the files under ``root`` last written more than ``age`` seconds ago, then the folders left empty (and
    not touched for as long, so a folder just made for a file being written stays)."""
    if not root.is_dir():
        return
    for f in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):    # deepest first
        try:
            if f.is_file() or f.is_symlink():
                if now - f.lstat().st_mtime > age:
                    f.unlink(missing_ok=True)
            elif f.is_dir() and now - f.stat().st_mtime > age and not any(f.iterdir()):
                f.rmdir()
        except OSError:                                  # written or removed meanwhile: the next sweep sees it
            continue


CACHES = ("downloads", "gradio")
"""Folders of the runs directory that only cache what can be remade: twins zipped for download, and Gradio's upload
cache (``GRADIO_TEMP_DIR`` points there in public mode)."""
