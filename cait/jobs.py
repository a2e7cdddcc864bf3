"""Background fine-tune jobs: each runs ``python -m cait.finetune`` as its own process (SPEC §2/§3 engine).

A crash, an out-of-memory kill or a cancel never takes the caller (the app) down. One job runs per device at a time;
the others wait, oldest first. Everything lives under one runs directory, so jobs survive an app restart::

    RUNS/jobs/<id>/job.json      # spec, status, owner, pid, times, message (written atomically)
    RUNS/jobs/<id>/stdout.log    # the process's output (its tail explains a failure)
    RUNS/jobs/<id>/run/          # the engine's --output: log.jsonl, train_state-*, teacher/, compact/ (cait.rundir)
    RUNS/uploads/<id>/           # an uploaded archive, unpacked (public mode)
    RUNS/jobs/.lock              # held while scheduling: two apps on one runs directory start each job once

Statuses: ``queued`` → ``running`` → ``done`` | ``failed`` | ``cancelled``. A job whose process is gone without a
final log line is ``failed``, with the tail of its output. Job ids have one format (:data:`JOB_ID`), checked before
any path is built from them. Under :class:`cait.public.Limits` with ``public=True`` (a Space), :meth:`submit` takes
no server path, caps steps, batch and image size, counts each visitor's active jobs, and only the session that
started a job can cancel it; finished jobs and uploads are deleted after the retention time.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bundled import ASSETS_DIR, ORIGINAL_DIR
from .checkpoint import CONFIG_NAME, atomic_write
from .public import Limits, on_space
from .rundir import LOG_NAME, LogReader, state_files

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIVE = ("queued", "running")
JOB_FILE = "job.json"
JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4,12}$")
"""``YYYYMMDD-HHMMSS-<hex>``: the only job ids accepted anywhere (the hex part is 12 digits for new jobs)."""
UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")
FIELD_NAMES = {"model": "Model", "data": "Data", "flops_reduction": "FLOPs reduction", "steps": "Steps",
               "batch_size": "Batch size", "img_size": "Image size"}
"""The Fine-tune tab's label for each option, so an error names the field the visitor sees."""


JOB_KEY_PREFIX = "job:"


def job_key(job_id: str) -> str:
    """The model-list key of a finished job's pair: ``"job:<id>"`` (the one place it is built)."""
    return JOB_KEY_PREFIX + job_id


def job_id_of(key: str) -> str | None:
    """The job id in a ``"job:<id>"`` key (checked, :func:`check_job_id`), or None for another key."""
    return check_job_id(key[len(JOB_KEY_PREFIX):]) if key.startswith(JOB_KEY_PREFIX) else None


class JobError(ValueError):
    """A job request refused at submit, or an action not allowed; the message names the field or the reason."""


def default_runs_dir() -> Path:
    """Where jobs and checkpoints go: ``$CAIT_RUNS_DIR`` if set; on a Space, ``/data/cait-runs`` when persistent
    storage is mounted at ``/data``, else a temporary directory (a Space's disk is ephemeral, and its repository
    directory is not ours to write); elsewhere ``runs/`` in the repository."""
    if os.environ.get("CAIT_RUNS_DIR"):
        return Path(os.environ["CAIT_RUNS_DIR"]).expanduser()
    if on_space():
        data = Path("/data")
        if data.is_dir() and os.access(data, os.W_OK):
            return data / "cait-runs"
        import tempfile
        return Path(tempfile.gettempdir()) / "cait-runs"
    return REPO_ROOT / "runs"


@dataclass
class Job:
    """One fine-tune job. ``args`` are :class:`cait.finetune.FinetuneConfig` fields (``output`` is set by us).

    ``owner`` and ``visitor`` are hashed keys (:func:`cait.public.visitor_key`) of the session and the network
    address that submitted it; ``upload`` names the unpacked archive it trains on, if any.
    """

    id: str
    args: dict
    status: str = "queued"
    device: str = "cpu"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    returncode: int | None = None
    message: str = ""
    owner: str | None = None
    visitor: str | None = None
    upload: str | None = None

    def dir(self, root: Path) -> Path:
        """This job's directory under a runs directory."""
        return root / "jobs" / self.id

    def data_label(self) -> str:
        """What the job trains on: ``uploaded archive`` for an upload, else its ``data`` (``synthetic`` or a path)."""
        return "uploaded archive" if self.upload else str(self.args.get("data", "synthetic"))


def check_job_id(job_id: str) -> str:
    """``job_id`` if it has the one job-id format.

    Raises:
        KeyError: for anything else (``../x``, an absolute path, an empty string, ...).
    """
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise KeyError(f"{str(job_id)[:40]!r} is not a job id")
    return job_id


def _alive(pid: int | None, job_dir: Path) -> bool:
    """True if ``pid`` runs and is this job's engine (pids are reused after restarts)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if "cait.finetune" not in cmd or str(job_dir) not in cmd:
            return False
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"            # a zombie has exited
    except OSError:
        return True                                                 # no /proc: trust kill(0)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a text file ("" if missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class JobManager:
    """Starts, watches, queues and cancels fine-tune processes under ``root``.

    Args:
        root: the runs directory (default :func:`default_runs_dir`).
        python: the interpreter that runs ``-m cait.finetune``.
        poll_interval: seconds between background refreshes; 0 disables the background thread (call
            :meth:`refresh` yourself, as tests do).
        limits: what a request may ask (:class:`cait.public.Limits`); default: :meth:`Limits.for_environment`.
    """

    def __init__(self, root: str | os.PathLike | None = None, python: str = sys.executable,
                 poll_interval: float = 1.0, limits: Limits | None = None) -> None:
        self.root = Path(root) if root else default_runs_dir()
        self.limits = limits or Limits.for_environment()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        self.python = python
        self._procs: dict[str, subprocess.Popen] = {}
        self._cache: dict[str, tuple[int, Job]] = {}                # id → (job.json mtime_ns, Job)
        self._logs: dict[str, LogReader] = {}
        self._lock = threading.RLock()
        self._last_cleanup = 0.0
        self.refresh()                                              # adopt or fail jobs left by an earlier app
        if poll_interval > 0:
            threading.Thread(target=self._loop, args=(poll_interval,), daemon=True, name="cait-jobs").start()

    # -- persistence ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _scheduling(self):
        """This process's lock and the runs directory's file lock (other app processes on the same directory)."""
        with self._lock, (self.root / "jobs" / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _save(self, job: Job) -> None:
        d = job.dir(self.root)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / JOB_FILE, lambda f: Path(f).write_text(json.dumps(asdict(job), indent=2)))

    def get(self, job_id: str) -> Job:
        """The job, re-read only when its ``job.json`` changed. Raises ``KeyError`` for an unknown or malformed id."""
        path = self.root / "jobs" / check_job_id(job_id) / JOB_FILE
        try:
            mtime = path.stat().st_mtime_ns
            cached = self._cache.get(job_id)
            if cached and cached[0] == mtime:
                return Job(**asdict(cached[1]))                    # a copy: callers may modify it
            job = Job(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            raise KeyError(f"no job {job_id!r}") from None
        self._cache[job_id] = (mtime, job)
        return Job(**asdict(job))

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

    def records(self, job_id: str) -> list[dict]:
        """The job's ``log.jsonl`` records, read incrementally (:class:`cait.rundir.LogReader`)."""
        check_job_id(job_id)
        if job_id not in self._logs:
            self._logs[job_id] = LogReader(self.root / "jobs" / job_id / "run" / LOG_NAME)
        return self._logs[job_id].records()

    # -- requests ------------------------------------------------------------------------------------------------
    def validate(self, args: dict) -> dict:
        """Check a job's options at submit, naming the field; return them with ``model`` resolved.

        Raises:
            JobError: an unknown option, or a value outside what these :class:`Limits` allow.
        """
        from .finetune import FinetuneConfig
        from .models import PATCH_SIZES
        known = set(FinetuneConfig.__dataclass_fields__) - {"output", "resume", "device", "stop_at"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise JobError(f"unknown fine-tune options: {', '.join(unknown)}")
        lim, args = self.limits, dict(args)

        def bad(key: str, why: str) -> JobError:
            return JobError(f"{FIELD_NAMES.get(key, key)}: {why}")

        for key, lo, hi in (("steps", 1, lim.steps_cap()), ("batch_size", 2, lim.batch_cap())):
            v = args.get(key, getattr(FinetuneConfig, key))
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise bad(key, f"{v!r} is not a whole number from {lo} to {hi}"
                               + (" on this public Space" if lim.public else ""))
        if args.get("batch_size", FinetuneConfig.batch_size) % 2:
            raise bad("batch_size", f"{args['batch_size']} is odd; Mixup/CutMix pair images, so it must be even")
        r = args.get("flops_reduction", FinetuneConfig.flops_reduction)
        if not isinstance(r, (int, float)) or not 0.0 <= r <= 0.95:
            raise bad("flops_reduction", f"{r!r} is outside 0 to 0.95")
        size = args.get("img_size")
        if size is not None and (not isinstance(size, int) or not 16 <= size <= lim.img_size_cap()):
            raise bad("img_size", f"{size!r} is outside 16 to {lim.img_size_cap()}")
        model = str(args.get("model", FinetuneConfig.model)).strip()
        if model == "bundled":
            model = str(ASSETS_DIR / ORIGINAL_DIR)
        elif lim.public and model not in lim.models:
            raise bad("model", f"choose one of the listed models ({', '.join(lim.models)}); paths are not accepted "
                               "on this public Space")
        elif not lim.public and model not in PATCH_SIZES and not Path(model).is_dir():
            raise bad("model", f"{model!r} is neither a DeiT name ({', '.join(PATCH_SIZES)}) nor a checkpoint "
                               "directory")
        args["model"] = model
        data = str(args.get("data", "synthetic")).strip() or "synthetic"
        if data != "synthetic":
            uploads = (self.root / "uploads").resolve()
            path = Path(data).resolve()
            if lim.public and not path.is_relative_to(uploads):
                raise bad("data", "on this public Space, data is 'synthetic' or an uploaded .zip archive; server "
                                  "paths are not accepted")
            if not (path / "train").is_dir() or not (path / "val").is_dir():
                raise bad("data", f"{data}: expected an ImageFolder root with train/ and val/ (one folder per class) "
                                  "or 'synthetic'")
        args["data"] = data
        return args

    def submit(self, device: str = "cpu", owner: str | None = None, visitor: str | None = None,
               upload: str | None = None, **args) -> Job:
        """Queue a job; it starts when its device is free. ``args`` are FinetuneConfig fields.

        Args:
            device: ``"cpu"`` or ``"cuda"``.
            owner, visitor: hashed session and address keys (:func:`cait.public.visitor_key`); in public mode only
                the owner may cancel, and each visitor has a quota of active jobs.
            upload: the id of an unpacked upload under ``RUNS/uploads`` the job trains on.

        Raises:
            JobError: an invalid option (named), or a quota reached.
        """
        args = self.validate(args)
        if device not in ("cpu", "cuda"):
            raise JobError(f"Device: {device!r} is not cpu or cuda")
        with self._scheduling():
            active = [j for j in self.list() if j.status in ACTIVE]
            if self.limits.public:
                if len(active) >= self.limits.max_active_jobs:
                    raise JobError(f"the queue is full ({len(active)} jobs); try again when one has finished")
                mine = [j for j in active if visitor is not None and j.visitor == visitor]
                if len(mine) >= self.limits.max_jobs_per_visitor:
                    raise JobError(f"you already have {len(mine)} jobs queued or running (at most "
                                   f"{self.limits.max_jobs_per_visitor}); cancel one or wait")
            job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:12], args=args, device=device,
                      owner=owner, visitor=visitor, upload=upload)
            self._save(job)
        self.refresh()
        return self.get(job.id)

    def _command(self, job: Job) -> list[str]:
        cmd = [self.python, "-m", "cait.finetune", "--output", str(job.dir(self.root) / "run"), "--device",
               job.device]
        for k, v in job.args.items():
            flag = "--" + k.replace("_", "-")
            if isinstance(v, bool):
                cmd.append(flag if v else "--no-" + k.replace("_", "-"))
            elif v is not None:
                cmd += [flag, str(v)]
        return cmd

    def _start(self, job: Job) -> None:
        d = job.dir(self.root)
        d.mkdir(parents=True, exist_ok=True)
        out = (d / "stdout.log").open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(self._command(job), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        out.close()
        self._procs[job.id] = proc
        job.status, job.pid, job.started = "running", proc.pid, time.time()
        self._save(job)

    def _finish(self, job: Job, returncode: int | None) -> None:
        d = job.dir(self.root)
        final = [r for r in self.records(job.id) if r.get("type") == "final"]
        job.ended, job.returncode, job.pid = time.time(), returncode, None
        if final and (d / "run" / "compact" / CONFIG_NAME).is_file():
            job.status = "done"
            f = final[-1]
            teacher = "" if f.get("top1_teacher") is None else f" (teacher {f['top1_teacher']:.1f}%)"
            job.message = (f"done: {100 * f['flops_reduction']:.1f}% fewer FLOPs, top-1 {f['top1_student']:.1f}%"
                           + teacher)
        else:
            job.status = "failed"
            why = f"exit code {returncode}" if returncode is not None else "its process is gone"
            job.message = f"failed ({why}):\n{tail(d / 'stdout.log')}"
        self._save(job)

    def refresh(self) -> None:
        """One scheduler tick: notice finished or dead processes, then start queued jobs on free devices. Holds
        the runs directory's file lock, so another app on the same directory never starts the same job."""
        with self._scheduling():
            jobs = self.list()
            for job in jobs:
                if job.status != "running":
                    continue
                proc = self._procs.get(job.id)
                if proc is not None:
                    code = proc.poll()
                    if code is not None:
                        self._procs.pop(job.id)
                        self._finish(job, code)
                elif not _alive(job.pid, job.dir(self.root)):
                    self._finish(job, None)                          # died while no app was watching
            # _finish/_start update these Job objects in place: no need to read job.json again.
            busy = {j.device for j in jobs if j.status == "running"}
            for job in sorted((j for j in jobs if j.status == "queued"), key=lambda j: j.created):
                if job.device not in busy:
                    self._start(job)
                    busy.add(job.device)
        if self.limits.public and time.time() - self._last_cleanup > 600:
            self.cleanup()

    def cancel(self, job_id: str, owner: str | None = None) -> str:
        """Stop a job (its whole process group); returns what was kept.

        Args:
            job_id: the job.
            owner: the caller's session key; in public mode it must be the job's owner.

        Raises:
            KeyError: unknown or malformed job id.
            JobError: in public mode, a job started by another session.
        """
        with self._lock:
            job = self.get(job_id)
            if self.limits.public and (owner is None or job.owner != owner):
                raise JobError(f"job {job_id} was started by another visitor; only they can cancel it")
            if job.status not in ACTIVE:
                return f"job {job_id} is already {job.status}"
            if job.status == "running" and _alive(job.pid, job.dir(self.root)):
                try:
                    os.killpg(job.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                proc = self._procs.pop(job_id, None)
                if proc is not None:
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(job.pid, signal.SIGKILL)
                        proc.wait()
            run = job.dir(self.root) / "run"
            states = state_files(run)
            steps = [r["step"] for r in self.records(job_id) if r.get("type") == "train"]
            if not states:
                kept = "nothing was kept (no training state had been written yet)"
            elif self.limits.public:
                kept = f"kept: its training state of step {states[-1][0]}"
            else:
                kept = (f"kept: training state of step {states[-1][0]} in {run} "
                        f"(continue with: python -m cait.finetune --output {run} --resume ...)")
            job.status, job.ended, job.pid = "cancelled", time.time(), None
            job.message = f"cancelled at step {steps[-1] if steps else 0}; {kept}"
            self._save(job)
            return job.message

    def cleanup(self, now: float | None = None) -> list[str]:
        """Retention (:class:`Limits`): delete finished jobs and uploads older than ``retention_s``, then the oldest
        finished ones while the runs directory exceeds ``max_runs_bytes``. Active jobs and the uploads they use are
        never touched. Returns what was deleted (job ids and ``upload:<id>``)."""
        now, lim, gone = now or time.time(), self.limits, []
        with self._scheduling():
            jobs = self.list()
            in_use = {j.upload for j in jobs if j.status in ACTIVE and j.upload}
            finished = sorted((j for j in jobs if j.status not in ACTIVE), key=lambda j: j.ended or j.created)
            uploads = sorted((p for p in (self.root / "uploads").iterdir() if UPLOAD_ID.match(p.name)
                              and p.name not in in_use), key=lambda p: p.stat().st_mtime)
            victims = [("job", j.id, j.ended or j.created) for j in finished] + \
                      [("upload", p.name, p.stat().st_mtime) for p in uploads]
            victims.sort(key=lambda v: v[2])
            downloads = self.root / "downloads"                  # the app's twin .zip files: cheap to remake
            for f in (downloads.iterdir() if downloads.is_dir() else ()):
                if now - f.stat().st_mtime > lim.retention_s:
                    shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
            total = _size(self.root)
            for kind, ident, when in victims:
                if now - when <= lim.retention_s and total <= lim.max_runs_bytes:
                    continue
                path = self.root / ("jobs" if kind == "job" else "uploads") / ident
                size = _size(path)
                shutil.rmtree(path, ignore_errors=True)
                self._cache.pop(ident, None)
                self._logs.pop(ident, None)
                total -= size
                gone.append(ident if kind == "job" else f"upload:{ident}")
        self._last_cleanup = time.time()
        return gone

    def new_upload(self) -> tuple[str, Path]:
        """A fresh ``(id, directory)`` under ``RUNS/uploads`` for an archive to be unpacked into."""
        upload_id = uuid.uuid4().hex[:16]
        return upload_id, self.root / "uploads" / upload_id

    def _loop(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            try:
                self.refresh()
            except Exception as e:  # keep the watcher alive; the next tick retries
                print(f"cait.jobs: refresh failed: {e}", file=sys.stderr)

    # -- views ---------------------------------------------------------------------------------------------------
    def finished_models(self) -> dict[str, str]:
        """Display label → ``"job:<id>"`` for every job with a compact model."""
        out = {}
        for j in self.list():
            if j.status == "done":
                a = j.args
                name = "bundled DeiT-Tiny" if str(a.get("model", "")).endswith(ORIGINAL_DIR) else a.get("model", "?")
                label = f"job {j.id}: {name} −{100 * float(a.get('flops_reduction', 0)):.0f}%"
                out[label] = job_key(j.id)
        return out

    def run_dir(self, job_id: str) -> Path:
        """The engine's ``--output`` of a job. Raises ``KeyError`` for an unknown or malformed id."""
        return self.get(job_id).dir(self.root) / "run"

    def progress(self, job_id: str) -> dict:
        """Where a job stands: status, step/steps, last loss, |S|, images/s, elapsed and ETA (seconds), records."""
        job = self.get(job_id)
        records = self.records(job_id)
        train = [r for r in records if r.get("type") == "train"]
        steps = int(job.args.get("steps", 300))
        step = train[-1]["step"] if train else 0
        now = job.ended or time.time()
        elapsed = now - job.started if job.started else 0.0
        # Average pace since the start (model building included): a slight over-estimate early on.
        eta = elapsed / step * (steps - step) if job.status == "running" and step else None
        return {"job": job, "step": step, "steps": steps, "records": records, "elapsed_s": elapsed, "eta_s": eta,
                "loss": train[-1]["loss"] if train else None, "s_size": train[-1]["s_size"] if train else 0,
                "images_per_s": train[-1]["images_per_s"] if train else None}
