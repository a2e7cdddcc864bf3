"""The jobs of a runs directory on disk: ``job.json`` files read only when they change, logs read incrementally, and
the file lock that lets two app processes share one runs directory (:mod:`cait.studio.jobs.model` has the layout).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ...finetune.records import Record
from ...finetune.rundir import LOG_NAME, LogReader
from ...io.checkpoint import atomic_write
from .model import JOB_FILE, JOB_ID, Job, JobStatus, check_job_id


class JobStore:
    """Job records under ``root/jobs``, cached by modification time, and their run logs.

    Args:
        root: the runs directory; ``jobs/`` and ``uploads/`` are created in it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, tuple[tuple[int, int, int], Job]] = {}     # id → ((mtime_ns, inode, size), Job)
        self._logs: dict[str, LogReader] = {}
        self.thread_lock = threading.RLock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """This process's lock and the runs directory's file lock (other app processes on the same directory)."""
        with self.thread_lock, (self.root / "jobs" / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def save(self, job: Job) -> None:
        """Write ``job.json`` atomically."""
        d = job.dir(self.root)
        d.mkdir(parents=True, exist_ok=True)
        record = dataclasses.asdict(job) | {"status": JobStatus(job.status).value}
        atomic_write(d / JOB_FILE, lambda f: Path(f).write_text(json.dumps(record, indent=2)))

    def get(self, job_id: str) -> Job:
        """The job (a copy: callers may modify it), re-read only when its ``job.json`` changed.

        Raises:
            KeyError: an unknown or malformed id.
        """
        path = self.root / "jobs" / check_job_id(job_id) / JOB_FILE
        try:
            st = path.stat()
            # Every save is an atomic replace, so a new inode marks a change even within one timestamp tick.
            mtime = (st.st_mtime_ns, st.st_ino, st.st_size)
            cached = self._cache.get(job_id)
            if cached and cached[0] == mtime:
                return dataclasses.replace(cached[1], args=dict(cached[1].args))
            job = Job(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            raise KeyError(f"no job {job_id!r}") from None
        self._cache[job_id] = (mtime, job)
        return dataclasses.replace(job, args=dict(job.args))

    def list(self, limit: int | None = None) -> list[Job]:
        """Jobs, newest first (at most ``limit``)."""
        jobs = []
        for entry in os.scandir(self.root / "jobs"):
            if JOB_ID.match(entry.name):
                try:
                    jobs.append(self.get(entry.name))
                except KeyError:
                    continue
        jobs.sort(key=lambda j: j.created, reverse=True)
        return jobs[:limit] if limit else jobs

    def records(self, job_id: str) -> list[Record]:
        """The job's ``log.jsonl`` records, read incrementally (:class:`cait.finetune.rundir.LogReader`)."""
        check_job_id(job_id)
        if job_id not in self._logs:
            self._logs[job_id] = LogReader(self.root / "jobs" / job_id / "run" / LOG_NAME)
        return self._logs[job_id].records()

    def forget(self, job_id: str) -> None:
        """Drop the cached record and log of a deleted job."""
        self._cache.pop(job_id, None)
        self._logs.pop(job_id, None)


def tree_size(path: Path) -> int:
    """Bytes of every file under ``path`` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
