"""Retention in public mode: finished jobs and uploads older than ``retention_s`` go, then the oldest while the runs
directory is over ``max_runs_bytes`` (:class:`cait.studio.public.Limits`). Active jobs and their uploads stay."""
from __future__ import annotations

import shutil
import time

from ..public import Limits
from .model import UPLOAD_ID
from .store import JobStore, tree_size


def cleanup(store: JobStore, limits: Limits, now: float | None = None) -> list[str]:
    """Delete what retention says, under the store's lock; returns the job ids and ``upload:<id>`` entries deleted."""
    now, gone = now or time.time(), []
    with store.locked():
        jobs = store.list()
        in_use = {j.upload for j in jobs if j.status.active and j.upload}
        finished = [("job", j.id, j.ended or j.created) for j in jobs if not j.status.active]
        uploads = [("upload", p.name, p.stat().st_mtime) for p in (store.root / "uploads").iterdir()
                   if UPLOAD_ID.match(p.name) and p.name not in in_use]
        victims = sorted(finished + uploads, key=lambda v: v[2])
        downloads = store.root / "downloads"                 # the app's twin .zip files: cheap to remake
        for f in (downloads.iterdir() if downloads.is_dir() else ()):
            if now - f.stat().st_mtime > limits.retention_s:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        total = tree_size(store.root)
        for kind, ident, when in victims:
            if now - when <= limits.retention_s and total <= limits.max_runs_bytes:
                continue
            path = store.root / ("jobs" if kind == "job" else "uploads") / ident
            size = tree_size(path)
            shutil.rmtree(path, ignore_errors=True)
            store.forget(ident)
            total -= size
            gone.append(ident if kind == "job" else f"upload:{ident}")
    return gone
