"""A background job as data: :class:`Job`, its :class:`JobStatus`, its :class:`JobKind` (a fine-tune or a
segmentation run), its id format and where jobs live.

::

    RUNS/jobs/<id>/job.json      # this record (written atomically)
    RUNS/jobs/<id>/stdout.log    # the process's output (its tail explains a failure)
    RUNS/jobs/<id>/run/          # the engine's --output: log.jsonl, train_state-*, and compact/ or segmenter/
    RUNS/uploads/<id>/           # an uploaded archive, unpacked (public mode)

Statuses: ``queued`` → ``running`` → ``done`` | ``failed`` | ``cancelled`` | ``stopped`` (its time budget ran
out). Job ids have one format (:data:`JOB_ID`), checked before any path is built from them.
"""
from __future__ import annotations

import enum
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ...io.bundled import REPO_ROOT
from ..public import on_space

JOB_FILE = "job.json"
JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4,12}$")
"""``YYYYMMDD-HHMMSS-<hex>``: the only job ids accepted anywhere (the hex part is 12 digits for new jobs)."""
UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")
FIELD_NAMES = {"model": "Model", "data": "Data", "flops_reduction": "FLOPs reduction", "steps": "Steps",
               "batch_size": "Batch size", "img_size": "Image size", "backbone": "Backbone", "baseline": "Baseline",
               "backbone_lr": "Backbone LR (end to end)", "lr": "Learning rate", "merge": "Layout",
               "train_size": "Training images", "val_size": "Held-out images", "labels": "Targets",
               "temperature": "Temperature", "token_distill": "Token distillation",
               "token_distill_blocks": "Token distillation blocks", "calibrate": "Calibration images",
               "calibrate_start": "Calibrated start",
               "calibration_data": "Calibration data", "cpu_bf16": "bf16 on the CPU", "report_to": "Report to"}
"""The Fine-tune tab's label for each option, so an error names the field the visitor sees."""


@dataclass(frozen=True)
class JobKind:
    """What a kind of job runs and what a finished one has made."""

    module: str                    # run as ``python -m <module>``
    product: str                   # the file under ``run/`` whose presence means the job made its model
    noun: str                      # how the tab names it


JOB_KINDS = {"finetune": JobKind("cait.finetune", "compact/config.json", "fine-tune"),
             "segment": JobKind("cait.dense", "segmenter/segmenter.json", "segmentation")}
"""``finetune``: a CAIT twin (:mod:`cait.finetune`); ``segment``: a segmenter (:mod:`cait.dense`)."""


class JobStatus(str, enum.Enum):
    """Where a job stands; stored in ``job.json`` as its value (``"queued"``, …)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"                 # its public time budget ran out; the training state is kept

    @property
    def active(self) -> bool:
        """Queued or running: it holds a place in the queue and its files are in use."""
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)

    def __str__(self) -> str:
        return self.value


class JobError(ValueError):
    """A job request refused at submit, or an action not allowed; the message names the field or the reason."""


@dataclass
class Job:
    """One background job. ``args`` are the fields of its kind's config (:class:`cait.finetune.config.FinetuneConfig`
    or :class:`cait.dense.train.SegmentConfig`; ``output`` is ours).

    ``owner`` and ``visitor`` are hashed keys (:func:`cait.studio.public.visitor_key`) of the session and the network
    address that submitted it; ``upload`` names the unpacked archive it trains on, if any. Times are seconds since
    the epoch.
    """

    id: str
    args: dict
    status: JobStatus = JobStatus.QUEUED
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
    kind: str = "finetune"

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)              # from job.json: the value string
        if self.kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}")

    @property
    def engine(self) -> JobKind:
        """What this job runs and makes."""
        return JOB_KINDS[self.kind]

    def product(self, root: Path) -> Path:
        """The file a finished job has made (``compact/config.json`` or ``segmenter/segmenter.json``)."""
        return self.dir(root) / "run" / self.engine.product

    def dir(self, root: Path) -> Path:
        """This job's directory under a runs directory."""
        return root / "jobs" / self.id

    def data_label(self) -> str:
        """What the job trains on: ``uploaded archive`` for an upload, else its ``data`` (``synthetic`` or a path)."""
        return "uploaded archive" if self.upload else str(self.args.get("data", "synthetic"))

    def model_label(self) -> str:
        """The model it starts from: a fine-tune's ``model``, a segmentation's ``backbone`` (and its baseline)."""
        if self.kind == "segment":
            backbone, base = str(self.args.get("backbone", "")), self.args.get("baseline", "none")
            parts = Path(backbone).parts
            if len(parts) >= 4 and parts[-4] == "jobs" and parts[-2:] == ("run", "compact"):  # jobs/<id>/run/compact
                backbone = "job:" + parts[-3]
            return backbone + ("" if base in (None, "none") else f" → {base}")
        return str(self.args.get("model", ""))


def new_job_id() -> str:
    """A fresh id in the one format: the time, then 12 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:12]


def check_job_id(job_id: str) -> str:
    """``job_id`` if it has the one job-id format.

    Raises:
        KeyError: for anything else (``../x``, an absolute path, an empty string, ...).
    """
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise KeyError(f"{str(job_id)[:40]!r} is not a job id")
    return job_id


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
        return Path(tempfile.gettempdir()) / "cait-runs"
    return REPO_ROOT / "runs"
