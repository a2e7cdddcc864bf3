"""Disk budgets in public mode: what the runs directory holds, per visitor and in total, and the room a request
needs before it writes anything (:class:`cait.studio.public.Limits`: ``max_runs_bytes``, ``max_visitor_bytes``,
``max_job_bytes``).

Everything the app writes lives under the runs directory and is counted: jobs (with their unpacked uploads) under
the visitor who started them, uploads being unpacked, the twins offered for download, cached calibrated twins and
Gradio's own upload cache (moved under the runs directory in public mode). A job *reserves* what it may still write
(:func:`job_bytes`, its training states, teacher and compact model), so a queue of jobs cannot overrun the budget
later. A request that does not fit is refused (:class:`DiskFull`, saying which budget and when room comes back);
nothing another visitor made is deleted to make room for it.
"""
from __future__ import annotations

import contextvars
import functools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..public import Limits
from .model import Job, JobError
from .store import JobStore, tree_size

STATES_KEPT = 2
"""Training states a run keeps (:func:`cait.finetune.rundir.save_state`), each weights + two AdamW moments."""


class DiskFull(JobError):
    """A request that would take the runs directory, or one visitor's share of it, over its budget."""


acting_for: contextvars.ContextVar[str | None] = contextvars.ContextVar("acting_for", default=None)
"""The visitor (address key) a request is being served for, set around each heavy handler
(:func:`cait.studio.ui.common.heavy`): what the request writes outside a job is charged to them."""


class Charges:
    """Bytes written on a visitor's behalf outside their jobs: a twin zipped for download and a calibrated twin (by
    path: counted while the path exists, whatever its size becomes), Gradio's cached uploads (by size, until the
    cache retires them). Thread-safe; kept in memory (after a restart such files still count in the total)."""

    def __init__(self) -> None:
        self._paths: dict[Path, str] = {}
        self._bytes: list[tuple[str, int, float]] = []             # (visitor, bytes, expires at)
        self._lock = threading.Lock()

    def path(self, visitor: str | None, path: str | Path) -> None:
        """Charge what ``path`` holds to ``visitor`` (the first visitor who caused it keeps the charge)."""
        if visitor:
            with self._lock:
                self._paths.setdefault(Path(path), visitor)

    def bytes(self, visitor: str | None, n: int, ttl_s: float, now: float | None = None) -> None:
        """Charge ``n`` bytes to ``visitor`` for ``ttl_s`` seconds."""
        if visitor:
            with self._lock:
                self._bytes.append((visitor, int(n), (now or time.time()) + ttl_s))

    def by_visitor(self, now: float | None = None) -> dict[str, int]:
        """Visitor → bytes charged now (paths that are gone and sizes past their time are dropped)."""
        now, out = now or time.time(), {}
        with self._lock:
            self._paths = {p: v for p, v in self._paths.items() if p.exists()}
            self._bytes = [c for c in self._bytes if c[2] > now]
            paths, sizes = list(self._paths.items()), list(self._bytes)
        for p, v in paths:
            out[v] = out.get(v, 0) + (tree_size(p) if p.is_dir() else p.stat().st_size if p.is_file() else 0)
        for v, n, _ in sizes:
            out[v] = out.get(v, 0) + n
        return out


@functools.lru_cache(maxsize=32)
def _arch_sizes(base_model: str) -> tuple[int, int]:
    """(parameters, compactor parameters) of a DeiT architecture, counted on the meta device (no memory, no
    download). Compactors: one square matrix per q, k, v and FFN hidden layer of every block (an upper bound)."""
    from ...models.deit import create_model
    with torch.device("meta"):
        model, _ = create_model(base_model, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    compactors = sum(3 * b.attn.qkv.in_features ** 2 + b.mlp.fc1.out_features ** 2 for b in model.blocks)
    return params, compactors


def base_model(model: str) -> str:
    """The timm architecture of a fine-tune's ``model`` field: a name, or a checkpoint folder's ``base_model``."""
    config = Path(model) / "config.json"
    if config.is_file():
        try:
            return str(json.loads(config.read_text())["base_model"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return model


def job_bytes(job: Job, limits: Limits) -> int:
    """Bytes a job may write: for a fine-tune, :data:`STATES_KEPT` training states (student with compactors, its two
    AdamW moments), the teacher and the compact model, in fp32; a segmentation run, half of ``max_job_bytes``.
    Capped at ``limits.max_job_bytes`` (a job is stopped beyond it)."""
    if job.kind != "finetune":
        return limits.max_job_bytes // 2
    try:
        params, compactors = _arch_sizes(base_model(str(job.args.get("model", ""))))
    except Exception:                                     # an architecture we cannot size: assume the most
        return limits.max_job_bytes
    estimate = 4 * (STATES_KEPT * 3 * (params + compactors) + 2 * params)
    return min(limits.max_job_bytes, int(1.1 * estimate))


@dataclass
class DiskUse:
    """What the runs directory holds (bytes): ``total`` on disk, ``reserved`` for active jobs' future writes, and per
    visitor key (their jobs, uploads included, and what they are unpacking)."""

    total: int
    reserved: int
    by_visitor: dict[str, int] = field(default_factory=dict)
    reserved_by_visitor: dict[str, int] = field(default_factory=dict)


def disk_use(store: JobStore, limits: Limits, pending: dict[str, int] | None = None,
             charges: Charges | None = None) -> DiskUse:
    """Measure the runs directory now; ``pending`` adds uploads being unpacked (visitor → bytes reserved) and
    ``charges`` what visitors caused to be written outside their jobs (downloads, calibrated twins, uploads)."""
    use = DiskUse(total=tree_size(store.root), reserved=0)
    for visitor, size in (charges.by_visitor() if charges is not None else {}).items():
        use.by_visitor[visitor] = use.by_visitor.get(visitor, 0) + size
    for job in store.list():
        written = tree_size(job.dir(store.root))
        size = written + (tree_size(store.root / "uploads" / job.upload) if job.upload else 0)
        if job.visitor:
            use.by_visitor[job.visitor] = use.by_visitor.get(job.visitor, 0) + size
        if job.status.active:
            left = max(0, job_bytes(job, limits) - written)
            use.reserved += left
            if job.visitor:
                use.reserved_by_visitor[job.visitor] = use.reserved_by_visitor.get(job.visitor, 0) + left
    for visitor, size in (pending or {}).items():
        use.reserved += size
        use.reserved_by_visitor[visitor] = use.reserved_by_visitor.get(visitor, 0) + size
    return use


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def check_room(use: DiskUse, limits: Limits, visitor: str | None, need: int, what: str) -> None:
    """Refuse ``what`` (e.g. "this job") if ``need`` more bytes do not fit the total or the visitor's budget.

    Raises:
        DiskFull: naming the budget, what is used and when room comes back; never a path.
    """
    if not limits.public:
        return
    hours = limits.retention_s / 3600
    if use.total + use.reserved + need > limits.max_runs_bytes:
        raise DiskFull(f"{what} needs {_mb(need)} and this public Space's disk budget of {_mb(limits.max_runs_bytes)} "
                       f"is taken ({_mb(use.total)} written, {_mb(use.reserved)} held for running jobs); finished "
                       f"work is kept {hours:g} h, so try again later")
    mine = use.by_visitor.get(visitor, 0) + use.reserved_by_visitor.get(visitor, 0) if visitor else 0
    if visitor and mine + need > limits.max_visitor_bytes:
        raise DiskFull(f"{what} needs {_mb(need)} and your jobs, uploads and downloads already hold {_mb(mine)} of your "
                       f"{_mb(limits.max_visitor_bytes)} on this public Space; they are deleted {hours:g} h after "
                       "they finish")
