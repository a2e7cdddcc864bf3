"""The lines of a run's ``log.jsonl``, typed: one record class per kind, shared by the writer and every reader.

The engine (:mod:`cait.finetune.engine`) writes them with :func:`to_json`; the run directory
(:mod:`cait.finetune.rundir`), the app's job manager and live curves, and ``assets/train_offline_weights.py`` read
them back with :func:`from_json`, and select them by class (:func:`of_type`), never by a ``"type"`` string. A line
of a kind this version does not know is skipped. Worked example:

    >>> line = ('{"type": "train", "step": 10, "epoch": 0.03, "loss": 2.07, "lr": 1e-4, "flops_target": null, '
    ...         '"s_size": 0, "s_entered": 0, "max_masked_norm": 0.0, "images_per_s": 12.5}')
    >>> from_json(json.loads(line))
    TrainRecord(step=10, epoch=0.03, loss=2.07, lr=0.0001, flops_target=None, s_size=0, ...)
    >>> from_json({"type": "a kind from a later version", "step": 3}) is None
    True

FLOPs are multiply-adds for one image; top-1 is in % on the run's held-out split (None: not measured, e.g. an
untrained teacher); ``images_per_s`` counts all processes.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar, Union

from ..models.meta import FinetuneSummary, from_fields


@dataclass
class StartRecord:
    """The first line of a new run: its configuration and budget."""

    TYPE: ClassVar[str] = "start"
    config: dict
    teacher: str                   # where the teacher's weights came from
    distill_alpha: float
    merge: str                     # the ATME layout, "" for none
    base_flops: int
    atme_flops: int                # after the merges, before CDCP
    target_flops: int              # CDCP's final target
    classes: int
    world_size: int
    device: str

    def pruned_before_training(self) -> bool:
        """True when the run started from a calibrated twin (``--calibrate N``, ``--calibrate-start twin``): its
        channels were chosen and removed before the first step, so it trains no compactors and S stays empty."""
        return int(self.config.get("calibrate") or 0) > 0 and self.config.get("calibrate_start", "twin") == "twin"


@dataclass
class TrainRecord:
    """Every ``log_interval`` steps: the loss and where CDCP stands."""

    TYPE: ClassVar[str] = "train"
    step: int
    epoch: float
    loss: float
    lr: float
    flops_target: int | None       # None during CDCP's warm-up
    s_size: int                    # |S| in units
    s_entered: int                 # compactor rows that entered S at the last rebuild
    max_masked_norm: float
    images_per_s: float


@dataclass
class EvalRecord:
    """Every ``eval_interval`` steps: held-out top-1 of the student (with S still masked) and of the teacher
    (None: the held-out images have no labels); label-free runs add the student's agreement with the teacher (%)
    and the KL divergence (nats), :class:`cait.measure.accuracy.Agreement`."""

    TYPE: ClassVar[str] = "eval"
    step: int
    top1_student: float | None
    top1_teacher: float | None
    agreement: float | None = None
    kl: float | None = None


@dataclass
class StoppedRecord:
    """A run stopped on purpose before its end: its training state of ``step`` is kept. ``reason``: ``"stop_at"``
    (``--stop-at``) or ``"time_limit"`` (``--time-limit-s`` ran out)."""

    TYPE: ClassVar[str] = "stopped"
    step: int
    mask: dict | None = field(default=None, compare=False)   # S then (ChannelMask.to_dict); not in the log line
    reason: str = "stop_at"


@dataclass
class FinalRecord(FinetuneSummary):
    """The last line: the compact model's FLOPs and top-1 (the :class:`cait.models.meta.FinetuneSummary` a fine-tuned
    model carries), and S as removed (``mask``, kept out of the log line: it is in ``compact/``)."""

    TYPE: ClassVar[str] = "final"
    mask: dict | None = field(default=None, compare=False)

    def summary(self) -> FinetuneSummary:
        """This record without the mask, as a fine-tuned model's meta stores it."""
        names = {f.name for f in dataclasses.fields(FinetuneSummary)}
        return FinetuneSummary(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


Record = Union[StartRecord, TrainRecord, EvalRecord, StoppedRecord, FinalRecord]
RECORD_TYPES: dict[str, type] = {c.TYPE: c for c in (StartRecord, TrainRecord, EvalRecord, StoppedRecord, FinalRecord)}


def register(cls: type) -> type:
    """Class decorator: make a record class (a dataclass with a ``TYPE``) readable by :func:`from_json`, for log
    kinds of other engines (the segmentation engine's, :mod:`cait.dense.records`).

    Raises:
        ValueError: if another class already has that ``TYPE``.
    """
    if RECORD_TYPES.get(cls.TYPE, cls) is not cls:
        raise ValueError(f"log record type {cls.TYPE!r} is taken by {RECORD_TYPES[cls.TYPE].__name__}")
    RECORD_TYPES[cls.TYPE] = cls
    return cls
_NOT_LOGGED = ("mask",)
R = TypeVar("R")


def to_dict(record: Record) -> dict:
    """The log line's JSON object: ``{"type": ..., **fields}`` without the fields kept out of the log."""
    return {"type": record.TYPE, **{k: v for k, v in dataclasses.asdict(record).items() if k not in _NOT_LOGGED}}


def to_json(record: Record) -> str:
    """One log line (no newline)."""
    return json.dumps(to_dict(record))


def from_json(obj: dict) -> Record | None:
    """The record a parsed log line holds; None for a kind this version does not know.

    Raises:
        ValueError: a known kind whose line lacks a required field.
    """
    cls = RECORD_TYPES.get(obj.get("type")) if isinstance(obj, dict) else None
    if cls is None:
        return None
    try:
        return from_fields(cls, obj)
    except TypeError as e:
        raise ValueError(f"log record of type {cls.TYPE!r} is incomplete ({e})") from None


def of_type(records: Iterable[Record], cls: type[R]) -> list[R]:
    """The records of one class, in log order: ``of_type(records, TrainRecord)``."""
    return [r for r in records if isinstance(r, cls)]
