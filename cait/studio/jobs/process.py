"""A job's process: its engine's command line (``python -m cait.finetune`` or ``python -m cait.dense``), starting it
in its own session, telling whether it still runs, and stopping its whole process group. A crash, an out-of-memory
kill or a cancel never takes the app down.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from ...io.bundled import REPO_ROOT
from .model import Job


def command(job: Job, root: Path, python: str) -> list[str]:
    """The engine's command line for ``job``: ``--output`` inside the job's directory, one flag per option."""
    cmd = [python, "-m", job.engine.module, "--output", str(job.dir(root) / "run"), "--device", job.device]
    for k, v in job.args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            cmd.append(flag if v else "--no-" + k.replace("_", "-"))
        elif v is not None:
            cmd += [flag, str(v)]
    return cmd


def start(job: Job, root: Path, python: str) -> subprocess.Popen:
    """Start the job's engine in a new session (its own process group), output to ``stdout.log``."""
    d = job.dir(root)
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with (d / "stdout.log").open("ab") as out:
        return subprocess.Popen(command(job, root, python), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def alive(pid: int | None, job_dir: Path, module: str = "cait.finetune") -> bool:
    """True if ``pid`` runs and is this job's engine, ``python -m <module>`` (pids are reused after restarts)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if module not in cmd or str(job_dir) not in cmd:
            return False
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"            # a zombie has exited
    except OSError:
        return True                                                 # no /proc: trust kill(0)


def stop(pid: int, proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM the job's process group; SIGKILL it if ``proc`` (started by this app) has not exited in time."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)
            proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a text file ("" if missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s/:'\"()]+){2,}/?")


def reason(tail: str) -> str:
    """One line for a visitor from a failed job's output: its ``error:`` line or last exception, with every
    absolute path replaced by ``<path>`` ("" when there is none)."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    pick = next((ln for ln in reversed(lines) if ln.startswith("error:")), None) or \
        next((ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)), None) or \
        (lines[-1] if lines else "")
    return hide_paths(pick)[:300]


def hide_paths(text: str) -> str:
    """``text`` with every absolute path replaced by ``<path>`` (what a public visitor may read)."""
    return _PATH.sub("<path>", text)
