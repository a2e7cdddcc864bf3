"""Background jobs: each fine-tune runs ``python -m cait.finetune`` (docs/method.md: CDCP, fine-tuning), each
segmentation run ``python -m cait.dense``, as its own process.

:class:`JobManager` queues, starts, watches and cancels them; one job runs per device at a time, the others wait,
oldest first. Everything lives under one runs directory (:mod:`cait.studio.jobs.model`), so jobs survive an app
restart, and a file lock lets two apps on one directory start each job once. A job whose process is gone without a
final log line is ``failed``, with the tail of its output. Under :class:`cait.studio.public.Limits` with
``public=True`` (a Space), :meth:`JobManager.submit` takes no server path, caps steps, batch and image size, counts
each visitor's active jobs, checks disk room before anything is written and stops a job past its share
(:mod:`cait.studio.jobs.disk`), and only the session that started a job can cancel it; finished jobs and uploads are
deleted after the retention time (:mod:`cait.studio.jobs.retention`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ...dense.records import SegmentEvalRecord, SegmentTrainRecord
from ...finetune.records import FinalRecord, Record, StoppedRecord, TrainRecord, of_type
from ...finetune.rundir import state_files
from ..public import Limits, extract_archive
from . import process
from .disk import Charges, DiskUse, acting_for, check_room, disk_use, job_bytes
from .model import JOB_KINDS, Job, JobError, JobStatus, default_runs_dir, new_job_id
from .retention import cleanup
from .store import JobStore, tree_size
from .validate import validate_request, validate_segment_request


@dataclass
class JobProgress:
    """Where a job stands (:meth:`JobManager.progress`); times in seconds, ``eta_s`` None unless running."""

    job: Job
    step: int
    steps: int
    records: list[Record]
    elapsed_s: float
    eta_s: float | None
    loss: float | None
    s_size: int
    images_per_s: float | None


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise JobError(f"Device: {str(device)[:20]!r} is not cpu or cuda")


class JobManager:
    """Starts, watches, queues and cancels fine-tune and segmentation processes under ``root``.

    Args:
        root: the runs directory (default :func:`cait.studio.jobs.model.default_runs_dir`).
        python: the interpreter that runs ``-m cait.finetune``.
        poll_interval: seconds between background refreshes; 0 disables the background thread (call
            :meth:`refresh` yourself, as tests do).
        limits: what a request may ask (:class:`cait.studio.public.Limits`); default: the environment's.
    """

    def __init__(self, root: str | os.PathLike | None = None, python: str = sys.executable,
                 poll_interval: float = 1.0, limits: Limits | None = None) -> None:
        self.store = JobStore(Path(root) if root else default_runs_dir())
        self.root = self.store.root
        self.limits = limits or Limits.for_environment()
        self.python = python
        self._procs: dict[str, subprocess.Popen] = {}
        self._last_cleanup = 0.0
        self._pending: dict[str, int] = {}                          # visitor → bytes being unpacked
        self.charges = Charges()                                    # downloads, calibrated twins, Gradio uploads
        self.refresh()                                              # adopt or fail jobs left by an earlier app
        if poll_interval > 0:
            threading.Thread(target=self._loop, args=(poll_interval,), daemon=True, name="cait-jobs").start()

    # The store's reads, for callers that hold a manager.
    def get(self, job_id: str) -> Job:
        """The job. Raises ``KeyError`` for an unknown or malformed id."""
        return self.store.get(job_id)

    def list(self, limit: int | None = None) -> list[Job]:
        """Jobs, newest first (at most ``limit``)."""
        return self.store.list(limit)

    def records(self, job_id: str) -> list[Record]:
        """The job's log records, read incrementally."""
        return self.store.records(job_id)

    def run_dir(self, job_id: str) -> Path:
        """The engine's ``--output`` of a job. Raises ``KeyError`` for an unknown or malformed id."""
        return self.get(job_id).dir(self.root) / "run"

    def validate(self, args: dict, kind: str = "finetune", owner: str | None = None, upload: str | None = None
                 ) -> dict:
        """The request checked under these limits (:mod:`cait.studio.jobs.validate`), for a job of ``kind``; a
        segmentation may start from ``owner``'s finished fine-tunes (``backbone="job:<id>"``); ``upload`` is the id
        of the archive this request unpacked (in public mode the only data path taken). Raises :class:`JobError`."""
        mine = None if upload is None else self.root / "uploads" / upload
        if kind == "segment":
            return validate_segment_request(args, self.limits, self.root / "uploads", self.job_models(owner), mine)
        if kind != "finetune":
            raise JobError(f"unknown job kind {str(kind)[:40]!r} (finetune or segment)")
        return validate_request(args, self.limits, self.root / "uploads", mine)

    def visible(self, job: Job, viewer: str | None) -> bool:
        """Whether session ``viewer`` may use what ``job`` made: locally always; in public mode, a job trained on an
        uploaded set only by the session that started it (its model would show the visitor's classes)."""
        return not (self.limits.public and job.upload and job.owner != viewer)

    def job_models(self, viewer: str | None = None) -> dict[str, str]:
        """``{"job:<id>": compact model directory}`` of finished fine-tunes ``viewer`` may build on
        (:meth:`visible`)."""
        return {f"job:{j.id}": str(j.product(self.root).parent) for j in self.finished() if self.visible(j, viewer)}

    def submit(self, device: str = "cpu", owner: str | None = None, visitor: str | None = None,
               upload: str | None = None, kind: str = "finetune", **args) -> Job:
        """Queue a job; it starts when its device is free. ``args`` are its kind's config fields.

        Args:
            device: ``"cpu"`` or ``"cuda"``.
            owner, visitor: hashed session and address keys (:func:`cait.studio.public.visitor_key`); in public mode
                only the owner may cancel, and each visitor has a quota of active jobs.
            upload: the id of an unpacked upload under ``RUNS/uploads`` the job trains on.
            kind: ``"finetune"`` (:class:`cait.finetune.config.FinetuneConfig` fields) or ``"segment"``
                (:class:`cait.dense.train.SegmentConfig` fields).

        Raises:
            JobError: an invalid option (named), or a quota reached.
        """
        args = self.validate(args, kind, owner, upload)
        _check_device(device)
        if self.limits.public:                                      # one job cannot hold the CPU for hours
            args["time_limit_s"] = self.limits.max_job_seconds
        with self.store.locked():
            self._check_quota(visitor)
            job = Job(id=new_job_id(), args=args, device=device, owner=owner, visitor=visitor, upload=upload,
                      kind=kind)
            # An upload being submitted is already on disk (in the total): its unpacking reservation is not counted.
            pending = {v: n for v, n in self._pending.items() if v != visitor or upload is None}
            check_room(disk_use(self.store, self.limits, pending, self.charges), self.limits, visitor,
                       job_bytes(job, self.limits),
                       "this job")
            self.store.save(job)
        self.refresh()
        return self.get(job.id)

    def submit_archive(self, archive: str | os.PathLike, device: str = "cpu", owner: str | None = None,
                       visitor: str | None = None, kind: str = "finetune", **args) -> Job:
        """:meth:`submit` on an uploaded ``.zip``: every field and the quota are checked first, then the archive is
        unpacked under ``RUNS/uploads/<id>`` (:func:`cait.studio.public.extract_archive`), then the job is queued. A
        refusal at any point removes what was unpacked.

        Raises:
            JobError: an invalid option (named) or a quota reached; :class:`cait.studio.public.ArchiveError`: an
                archive refused (unsafe, oversized, not the expected folders).
        """
        checked = self.validate({**args, "data": "synthetic"}, kind, owner)
        _check_device(device)
        reserve = self.limits.max_upload_bytes
        key = visitor or ""
        with self.store.locked():
            self._check_quota(visitor)
            need = reserve + job_bytes(Job(id="", args=checked, kind=kind), self.limits)
            check_room(self.disk(), self.limits, visitor, need, "this upload and its job")
            self._pending[key] = self._pending.get(key, 0) + reserve
        upload, dest = self.new_upload()
        try:
            data = extract_archive(archive, dest, self.limits,
                                   unlabelled=kind == "finetune" and checked.get("labels") == "none")
            return self.submit(device, owner, visitor, upload, kind, **{**args, "data": str(data)})
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        finally:
            with self.store.locked():
                self._pending[key] -= reserve
                if not self._pending[key]:
                    del self._pending[key]

    def disk(self) -> DiskUse:
        """What the runs directory holds and reserves now (:func:`cait.studio.jobs.disk.disk_use`)."""
        return disk_use(self.store, self.limits, self._pending, self.charges)

    def check_room(self, need: int, what: str, visitor: str | None = None) -> None:
        """Refuse (:class:`cait.studio.jobs.disk.DiskFull`) writing ``need`` bytes for ``what`` beyond the public
        budgets, the total's and the visitor's (default: the one the request is served for,
        :data:`cait.studio.jobs.disk.acting_for`); locally nothing is refused."""
        with self.store.locked():
            check_room(self.disk(), self.limits, visitor or acting_for.get(), need, what)

    def charge(self, path: str | os.PathLike, visitor: str | None = None) -> None:
        """Count what ``path`` holds (a download, a calibrated twin) against ``visitor`` (default: the one the
        request is served for) while it exists."""
        self.charges.path(visitor or acting_for.get(), path)

    def _check_quota(self, visitor: str | None) -> None:
        """In public mode: room in the queue, and in this visitor's share of it. Raises :class:`JobError`."""
        if not self.limits.public:
            return
        active = [j for j in self.list() if j.status.active]
        if len(active) >= self.limits.max_active_jobs:
            raise JobError(f"the queue is full ({len(active)} jobs); try again when one has finished")
        mine = [j for j in active if visitor is not None and j.visitor == visitor]
        if len(mine) >= self.limits.max_jobs_per_visitor:
            raise JobError(f"you already have {len(mine)} jobs queued or running (at most "
                           f"{self.limits.max_jobs_per_visitor}); cancel one or wait")

    def refresh(self) -> None:
        """One scheduler tick: notice finished or dead processes, then start queued jobs on free devices. Holds
        the runs directory's file lock, so another app on the same directory never starts the same job."""
        with self.store.locked():
            jobs = self.list()
            for job in jobs:
                if job.status != JobStatus.RUNNING:
                    continue
                proc = self._procs.get(job.id)
                if self.limits.public and self._over_disk(job, proc):
                    continue
                if proc is not None:
                    code = proc.poll()
                    if code is not None:
                        self._procs.pop(job.id)
                        self._finish(job, code)
                elif not process.alive(job.pid, job.dir(self.root), job.engine.module):
                    self._finish(job, None)                          # died while no app was watching
            # _finish/_start update these Job objects in place: no need to read job.json again.
            busy = {j.device for j in jobs if j.status == JobStatus.RUNNING}
            for job in sorted((j for j in jobs if j.status == JobStatus.QUEUED), key=lambda j: j.created):
                if job.device not in busy:
                    self._start(job)
                    busy.add(job.device)
        if self.limits.public and time.time() - self._last_cleanup > 600:
            self.cleanup()

    def _over_disk(self, job: Job, proc: subprocess.Popen | None) -> bool:
        """Stop a running public job that has written more than its share (:func:`cait.studio.jobs.disk.job_bytes`),
        its newest training state kept. Returns whether it was stopped."""
        cap, size = job_bytes(job, self.limits), tree_size(job.dir(self.root))
        if size <= cap:
            return False
        process.stop(job.pid, self._procs.pop(job.id, proc))
        job.status, job.ended, job.pid = JobStatus.STOPPED, time.time(), None
        job.message = (f"stopped at step {self._last_step(job.id)}: it wrote {size / 1e6:,.0f} MB, the most a job "
                       f"may write on this public Space is {cap / 1e6:,.0f} MB; its training state is kept")
        self.store.save(job)
        return True

    def _last_step(self, job_id: str) -> int:
        """The step of the job's newest training log record (0 before the first)."""
        steps = [r.step for r in of_type(self.records(job_id), (TrainRecord, SegmentTrainRecord))]
        return steps[-1] if steps else 0

    def _start(self, job: Job) -> None:
        proc = process.start(job, self.root, self.python)
        self._procs[job.id] = proc
        job.status, job.pid, job.started = JobStatus.RUNNING, proc.pid, time.time()
        self.store.save(job)

    def _finish(self, job: Job, returncode: int | None) -> None:
        records = self.records(job.id)
        final = of_type(records, SegmentEvalRecord if job.kind == "segment" else FinalRecord)
        timed_out = [r for r in of_type(records, StoppedRecord) if r.reason == "time_limit"]
        job.ended, job.returncode, job.pid = time.time(), returncode, None
        if final and job.product(self.root).is_file():
            job.status = JobStatus.DONE
            f = final[-1]
            if job.kind == "segment":
                job.message = f"done: held-out mIoU {f.miou:.1f}% after {f.step} steps"
            else:
                job.message = f"done: {100 * f.flops_reduction:.1f}% fewer FLOPs, {f.score_text()}"
        elif timed_out:
            job.status = JobStatus.STOPPED
            job.message = (f"stopped at step {timed_out[-1].step}: its time budget of "
                           f"{self.limits.max_job_seconds / 60:g} min on this public Space ran out; its training "
                           "state is kept")
        else:
            why = f"exit code {returncode}" if returncode is not None else "its process is gone"
            job.status = JobStatus.FAILED
            tail = process.tail(job.dir(self.root) / "stdout.log")
            # On a public Space the visitor reads the reason, never a path or a traceback (stdout.log keeps both).
            job.message = (f"failed ({why}): {process.reason(tail)}" if self.limits.public
                           else f"failed ({why}):\n{tail}")
        self.store.save(job)

    def cancel(self, job_id: str, owner: str | None = None) -> str:
        """Stop a job (its whole process group); returns what was kept.

        Args:
            job_id: the job.
            owner: the caller's session key; in public mode it must be the job's owner.

        Raises:
            KeyError: unknown or malformed job id.
            JobError: in public mode, a job started by another session.
        """
        with self.store.locked():                 # the same lock as start: never a job half-started, half-cancelled
            job = self.get(job_id)
            if self.limits.public and (owner is None or job.owner != owner):
                raise JobError(f"job {job_id} was started by another visitor; only they can cancel it")
            if not job.status.active:
                return f"job {job_id} is already {job.status}"
            if job.status == JobStatus.RUNNING and process.alive(job.pid, job.dir(self.root), job.engine.module):
                process.stop(job.pid, self._procs.pop(job_id, None))
            run = job.dir(self.root) / "run"
            states = state_files(run)
            if not states:
                kept = "nothing was kept (no training state had been written yet)"
            elif self.limits.public:
                kept = f"kept: its training state of step {states[-1][0]}"
            else:
                kept = (f"kept: training state of step {states[-1][0]} in {run} "
                        f"(continue with: python -m {job.engine.module} --output {run} --resume ...)")
            job.status, job.ended, job.pid = JobStatus.CANCELLED, time.time(), None
            job.message = f"cancelled at step {self._last_step(job_id)}; {kept}"
            self.store.save(job)
            return job.message

    def cleanup(self, now: float | None = None) -> list[str]:
        """Retention (:func:`cait.studio.jobs.retention.cleanup`); returns what was deleted."""
        gone = cleanup(self.store, self.limits, now)
        self._last_cleanup = time.time()
        return gone

    def new_upload(self) -> tuple[str, Path]:
        """A fresh ``(id, directory)`` under ``RUNS/uploads`` for an archive to be unpacked into."""
        upload_id = uuid.uuid4().hex[:16]
        return upload_id, self.root / "uploads" / upload_id

    def finished(self, kind: str = "finetune") -> list[Job]:
        """Jobs of ``kind`` that are done (their model exists), newest first."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        return [j for j in self.list() if j.status == JobStatus.DONE and j.kind == kind]

    def progress(self, job_id: str) -> JobProgress:
        """Where a job stands: status, step/steps, last loss, |S|, images/s, elapsed and ETA, its records.

        Raises:
            KeyError: unknown or malformed job id.
        """
        job = self.get(job_id)
        records = self.records(job_id)
        train = of_type(records, SegmentTrainRecord if job.kind == "segment" else TrainRecord)
        steps = int(job.args.get("steps", 300))
        step = train[-1].step if train else 0
        now = job.ended or time.time()
        elapsed = now - job.started if job.started else 0.0
        # Average pace since the start (model building included): a slight over-estimate early on.
        eta = elapsed / step * (steps - step) if job.status == JobStatus.RUNNING and step else None
        last = train[-1] if train else None
        return JobProgress(job, step, steps, records, elapsed, eta, last and last.loss, getattr(last, "s_size", 0),
                           last and last.images_per_s)

    def _loop(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            try:
                self.refresh()
            except Exception as e:  # keep the watcher alive; the next tick retries
                print(f"cait.studio.jobs: refresh failed: {e}", file=sys.stderr)
