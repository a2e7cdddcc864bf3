"""Background fine-tune jobs: each runs ``python -m cait.finetune`` as its own process (SPEC §2/§3 engine).

A crash, an out-of-memory kill or a cancel never takes the caller (the app) down. One job runs per device at a time;
the others wait, oldest first. Everything lives under one runs directory, so jobs survive an app restart::

    RUNS/jobs/<id>/job.json      # spec, status, pid, times, message (written atomically)
    RUNS/jobs/<id>/stdout.log    # the process's output (its tail explains a failure)
    RUNS/jobs/<id>/run/          # the engine's --output: log.jsonl, train_state-*, teacher/, compact/

Statuses: ``queued`` → ``running`` → ``done`` | ``failed`` | ``cancelled``. A job whose process is gone without a
final log line is ``failed``, with the tail of its output.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import atomic_write
from .finetune import read_log

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIVE = ("queued", "running")


def on_space() -> bool:
    """True when running on a Hugging Face Space (it sets ``SPACE_ID``)."""
    return bool(os.environ.get("SPACE_ID"))


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
    """One fine-tune job. ``args`` are :class:`cait.finetune.FinetuneConfig` fields (``output`` is set by us)."""

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

    def dir(self, root: Path) -> Path:
        """This job's directory under a runs directory."""
        return root / "jobs" / self.id


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


class JobManager:
    """Starts, watches, queues and cancels fine-tune processes under ``root``.

    Args:
        root: the runs directory (default :func:`default_runs_dir`).
        python: the interpreter that runs ``-m cait.finetune``.
        poll_interval: seconds between background refreshes; 0 disables the background thread (call
            :meth:`refresh` yourself, as tests do).
    """

    def __init__(self, root: str | os.PathLike | None = None, python: str = sys.executable,
                 poll_interval: float = 1.0) -> None:
        self.root = Path(root) if root else default_runs_dir()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.python = python
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self.refresh()                                              # adopt or fail jobs left by an earlier app
        if poll_interval > 0:
            threading.Thread(target=self._loop, args=(poll_interval,), daemon=True, name="cait-jobs").start()

    # -- persistence ---------------------------------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        d = job.dir(self.root)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "job.json", lambda f: Path(f).write_text(json.dumps(asdict(job), indent=2)))

    def get(self, job_id: str) -> Job:
        """Raises ``KeyError`` for an unknown id."""
        path = self.root / "jobs" / job_id / "job.json"
        try:
            return Job(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            raise KeyError(f"no job {job_id!r} in {self.root / 'jobs'}") from None

    def list(self) -> list[Job]:
        """All jobs, newest first."""
        jobs = []
        for d in (self.root / "jobs").iterdir():
            try:
                jobs.append(self.get(d.name))
            except KeyError:
                continue
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    # -- life cycle ----------------------------------------------------------------------------------------------
    def submit(self, device: str = "cpu", **args) -> Job:
        """Queue a job; it starts when its device is free. ``args`` are FinetuneConfig fields.

        Raises:
            ValueError: for an unknown option.
        """
        from .finetune import FinetuneConfig
        known = {f for f in FinetuneConfig.__dataclass_fields__} - {"output", "resume", "device", "stop_at"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown fine-tune options: {', '.join(unknown)}")
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4], args=args, device=device)
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
        final = [r for r in read_log(d / "run") if r.get("type") == "final"]
        job.ended, job.returncode, job.pid = time.time(), returncode, None
        if final and (d / "run" / "compact" / "config.json").is_file():
            job.status = "done"
            f = final[-1]
            job.message = (f"done: {100 * f['flops_reduction']:.1f}% fewer FLOPs, top-1 {f['top1_student']:.1f}% "
                           f"(teacher {f['top1_teacher']:.1f}%)")
        else:
            job.status = "failed"
            why = f"exit code {returncode}" if returncode is not None else "its process is gone"
            job.message = f"failed ({why}):\n{tail(d / 'stdout.log')}"
        self._save(job)

    def refresh(self) -> None:
        """One scheduler tick: notice finished or dead processes, then start queued jobs on free devices."""
        with self._lock:
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

    def cancel(self, job_id: str) -> str:
        """Stop a job (its whole process group); returns what was kept.

        Raises:
            KeyError: unknown job.
        """
        with self._lock:
            job = self.get(job_id)
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
            states = sorted(run.glob("train_state-*.json"))
            steps = [r["step"] for r in read_log(run) if r.get("type") == "train"]
            kept = (f"kept: training state of step {int(states[-1].stem.split('-')[1])} in {run} "
                    f"(continue with: python -m cait.finetune --output {run} --resume ...)" if states else
                    "nothing was kept (no training state had been written yet)")
            job.status, job.ended, job.pid = "cancelled", time.time(), None
            job.message = f"cancelled at step {steps[-1] if steps else 0}; {kept}"
            self._save(job)
            return job.message

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
                label = f"job {j.id}: {a.get('model', '?')} −{100 * float(a.get('flops_reduction', 0)):.0f}%"
                out[label] = f"job:{j.id}"
        return out

    def run_dir(self, job_id: str) -> Path:
        """The engine's ``--output`` of a job. Raises ``KeyError`` for an unknown id."""
        return self.get(job_id).dir(self.root) / "run"

    def progress(self, job_id: str) -> dict:
        """Where a job stands: status, step/steps, last loss, |S|, images/s, elapsed and ETA (seconds), records."""
        job = self.get(job_id)
        records = read_log(self.run_dir(job_id))
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
