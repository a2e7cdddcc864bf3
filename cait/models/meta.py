"""What a model says about itself: ``model.cait_meta``, one typed record, saved as ``config.json``'s ``"meta"``.

Written by the functions that make models (:func:`cait.compress`, the fine-tuning engine, :func:`cait.apply_tome`) and
read by everything that shows them (the app's status, the model card, the command lines). Worked example, the
bundled twin::

    ModelMeta(kind="finetuned", base_model="deit_tiny_patch16_224", merge="h5,v10", classes=["circle", ...],
              finetune=FinetuneSummary(step=600, merge="h5,v10", base_flops=1253683200, flops=626..., top1_student=...),
              config={...the run's FinetuneConfig...})

Kinds: ``"preview"`` (weight-norm one-shot), ``"calibrated"`` (training-free, :mod:`cait.compress.refit`),
``"finetuned"`` (:mod:`cait.finetune`), ``"teacher"`` (the uncompressed model a run started from), ``"model"``
(anything else).
On disk the record is a JSON object; keys this version does not know are kept in :attr:`ModelMeta.extra` and written
back, and files from before this record existed (no ``kind``) are read by what they hold.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KINDS = ("preview", "calibrated", "finetuned", "teacher", "model")


def from_fields(cls, d: dict):
    """``cls(**d)`` (a dataclass) with the keys ``cls`` does not know dropped: records written by a newer version.

    Raises:
        TypeError: if ``d`` lacks a field without a default.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FinetuneSummary:
    """The final record of a fine-tune run (``log.jsonl``'s ``"final"`` line, without the mask). FLOPs are
    multiply-adds for one image; top-1 in % on the run's held-out split (``top1_teacher`` None: not trained;
    ``top1_student`` None: the held-out images have no labels); label-free runs add the held-out ``agreement`` with
    the teacher (% of images with its top-1 class) and ``kl`` (mean KL(teacher ‖ student), nats); ``held_out`` is
    the number of held-out images all of them are on (None in records from before it was kept)."""

    step: int
    merge: str
    base_flops: int
    flops: int
    flops_reduction: float
    top1_student: float | None
    top1_masked: float | None = None
    top1_teacher: float | None = None
    max_removed_row_norm: float | None = None
    s_size: int | None = None
    agreement: float | None = None
    kl: float | None = None
    held_out: int | None = None

    def score_text(self, held_out: int | None = None) -> str:
        """The held-out scores in words, with their n (``held_out`` when the record predates it, e.g. the run's
        ``val_size``): ``"top-1 65.3% (teacher 90.9%), agreement with the teacher 68.0%, KL 0.610 nats (n = 1000)"``.
        """
        parts = []
        if self.top1_student is not None:
            parts.append(f"top-1 {self.top1_student:.1f}%"
                         + ("" if self.top1_teacher is None else f" (teacher {self.top1_teacher:.1f}%)"))
        if self.agreement is not None:
            parts.append(f"agreement with the teacher {self.agreement:.1f}%"
                         + ("" if self.kl is None else f", KL {self.kl:.3f} nats"))
        n = self.held_out if self.held_out is not None else held_out
        n = "" if n is None else f" (n = {n})"
        return ", ".join(parts) + n if parts else "no held-out score"


@dataclass
class CalibrationSummary:
    """How a calibrated twin was made (:func:`cait.compress.compress` with ``calibration=``): ``images`` unlabelled
    images from ``source`` (a name such as ``"default"``, or the type of a tensor or loader), ``seconds`` of CPU or
    GPU time in all, and each block's token-weighted output MSE against the original after the refit (older files
    may lack some; they read as empty). Where the app measured it: ``agreement`` (%) of ``agreement_images`` other
    unlabelled images from the same source on which the twin's top-1 class is the original's, and ``kl`` the mean
    KL(original ‖ twin) in nats (:func:`cait.measure.accuracy.agreement`). ``channels``: which channel scores won
    on the held-out calibration images (``"fisher"`` or ``"weight"``); ``refit_blocks``: the blocks whose refit was
    kept; ``held_out_kl``: the held-out KL (nats) before and after the refit."""

    images: int = 0
    source: str = ""
    seconds: float = 0.0
    block_mse: list[float] = field(default_factory=list)
    channels: str = ""
    refit_blocks: list[int] = field(default_factory=list)
    held_out_kl: list[float] = field(default_factory=list)
    agreement: float | None = None
    kl: float | None = None
    agreement_images: int = 0


@dataclass
class ModelMeta:
    """``model.cait_meta``: how a model was made (see the module docstring).

    Attributes:
        kind: one of :data:`KINDS`.
        base_model: the timm architecture it was made from.
        flops_reduction: the total reduction asked for; ``achieved_reduction`` what the model has.
        merge: its ATME layout (``""`` for none); ``atme_reduction`` the FLOPs share the layout removes.
        round_to: kept widths are multiples of this.
        note: one human-readable sentence.
        classes: class names, when known (e.g. the synthetic shapes).
        source: where a teacher's weights came from.
        calibration: how a calibrated twin was calibrated.
        finetune: the run's summary, for a fine-tuned twin.
        config: the run's :class:`cait.finetune.config.FinetuneConfig` as a dict.
        tome: ToMe's per-block schedule, for the baseline.
        planner: how the layout was chosen: ``{"planner": "paper", "atme_share": 0.8}``, ``{"planner": "explicit"}``
            or the measured planner's record (:func:`cait.measure.frontier.search_layouts`: objective, agreement,
            KL, candidates, seconds, rule).
        extra: keys this version does not know (kept and written back).
    """

    kind: str = "model"
    base_model: str | None = None
    flops_reduction: float | None = None
    achieved_reduction: float | None = None
    merge: str = ""
    atme_reduction: float | None = None
    round_to: int | None = None
    note: str = ""
    classes: list[str] | None = None
    source: str | None = None
    calibration: CalibrationSummary | None = None
    finetune: FinetuneSummary | None = None
    config: dict | None = None
    tome: list[int] | None = None
    planner: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"meta kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def preview(self) -> bool:
        """True for the weight-norm preview (its accuracy means nothing)."""
        return self.kind == "preview"

    @property
    def fixed_by_training(self) -> bool:
        """True for a fine-tuned twin: its reduction and layout were set by its run."""
        return self.kind == "finetuned"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in ``config.json`` (``preview`` kept for readers of older files)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in ("finetune", "calibration"):
            value = getattr(self, key)
            d[key] = None if value is None else dataclasses.asdict(value)
        d = {k: v for k, v in d.items() if v is not None}
        return {**self.extra, **d, "preview": self.preview}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelMeta":
        """Read a stored record; an older one without ``kind`` is classified by what it holds."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kind = d.pop("kind", None)
        preview = d.pop("preview", False)
        role = d.pop("role", None)
        if kind not in KINDS:
            kind = ("finetuned" if d.get("finetune") else "calibrated" if d.get("calibration") else
                    "preview" if preview else "teacher" if role == "teacher" else "model")
        known = {k: v for k, v in d.items() if k in names}
        for key, record in (("finetune", FinetuneSummary), ("calibration", CalibrationSummary)):
            if isinstance(known.get(key), dict):
                known[key] = from_fields(record, known[key])
            elif key in known and known[key] is not None:
                raise ValueError(f"meta {key!r} must be an object, got {type(known[key]).__name__}")
        return cls(kind=kind, **known, extra={k: v for k, v in d.items() if k not in names})


def meta_of(model) -> ModelMeta:
    """``model.cait_meta`` as a :class:`ModelMeta` (an empty ``"model"`` record if it has none)."""
    meta = getattr(model, "cait_meta", None)
    if isinstance(meta, ModelMeta):
        return meta
    return ModelMeta.from_dict(meta if isinstance(meta, dict) else None)
