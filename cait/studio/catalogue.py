"""Which models the app offers: one typed identity, :class:`ModelRef`, and the list the Model dropdown shows.

A model is a timm DeiT by name, one of a curated few other timm ViTs (:data:`CURATED`), the bundled offline pair,
or a finished fine-tune job. Its :attr:`ModelRef.key` is the one spelling that travels (the dropdown's value, the
API's argument, the pair cache's key)::

    >>> ModelRef.parse("deit:deit_small_patch16_224"), ModelRef.parse("bundled")
    (ModelRef(kind='deit', name='deit_small_patch16_224'), ModelRef(kind='bundled', name=''))
    >>> ModelRef.parse("timm:vit_small_patch14_reg4_dinov2").key
    'timm:vit_small_patch14_reg4_dinov2'
    >>> ModelRef.parse("job:20261201-101500-ab12cd34ef56").name
    '20261201-101500-ab12cd34ef56'

The dropdown shows labels and carries keys (Gradio's ``(label, value)`` choices), so no label is ever looked up
backwards.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..io.bundled import ORIGINAL_DIR, BundledPair
from ..io.source import ModelSource
from ..models.deit import DEIT_MODELS, TEST_MODEL, hub_offline, hub_unreachable_reason
from .jobs.manager import JobManager
from .jobs.model import Job, check_job_id

BUNDLED_LABEL = "DeiT-Tiny, trained on synthetic shapes (bundled, works offline)"
KINDS = ("deit", "timm", "source", "bundled", "job")
CURATED: dict[str, str] = {
    "deit3_small_patch16_224": "DeiT III-S (LayerScale, ImageNet-1k head)",
    "vit_small_patch14_reg4_dinov2": "DINOv2-S with 4 registers (518 px, a feature backbone)",
    "vit_small_patch16_224.augreg_in21k_ft_in1k": "ViT-S AugReg (ImageNet-21k → 1k)",
    "vit_base_patch16_clip_224.openai_ft_in1k": "CLIP ViT-B/16 (OpenAI, fine-tuned on ImageNet-1k; pre-norm)",
    "vit_base_patch16_siglip_gap_224": "SigLIP-B/16 (no class token, average pooling; a feature backbone)",
    "vit_small_patch16_dinov3.lvd1689m": "DINOv3-S (RoPE, 4 registers, 256 px; a feature backbone)",
    "eva02_tiny_patch14_336.mim_in22k_ft_in1k": "EVA-02-T (RoPE, SwiGLU; ImageNet-1k head, 336 px)",
}
"""Other plain ViTs the Model list offers beside the paper's DeiTs, timm name → label (every one compresses:
``tests/test_app.py`` builds each), timm's ``VisionTransformer`` and ``Eva`` (EVA-02, DINOv3) classes."""
MODEL_NAMES = {**DEIT_MODELS, **CURATED}
"""Every timm name the list offers, with its label."""
_LISTED_KIND = {**{name: "deit" for name in (*DEIT_MODELS, TEST_MODEL)}, **{name: "timm" for name in CURATED}}
"""A listed timm name → its :class:`ModelRef` kind."""


@dataclass(frozen=True)
class ModelRef:
    """A model the app can pair with its twin: ``kind`` ``"deit"`` (``name`` a timm DeiT), ``"timm"`` (``name`` one of
    :data:`CURATED`), ``"source"`` (``name`` any :class:`cait.ModelSource` spelling typed into the Model field: a timm
    name, ``hf-hub:owner/name`` or a checkpoint directory; local mode only), ``"bundled"`` or ``"job"`` (``name`` a
    job id)."""

    kind: str
    name: str = ""

    @property
    def key(self) -> str:
        """``"deit:<timm name>"``, ``"timm:<timm name>"``, the typed spelling itself, ``"bundled"`` or
        ``"job:<id>"``."""
        if self.kind == "source":
            return self.name
        return "bundled" if self.kind == "bundled" else f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, key: str, typed: bool = True) -> "ModelRef":
        """The model a key names.

        Args:
            typed: whether free text (a timm name, ``hf-hub:`` id or folder) may name a model; a public Space passes
                False, so it never looks a typed path up (its answer would say whether a server folder exists).

        Raises:
            ValueError: ``"Model: ..."`` for anything but a listed model, a well-formed job key or (``typed``) a
                :class:`cait.ModelSource` spelling.
        """
        text = str(key)
        kind, _, name = text.partition(":")
        if text == "bundled":
            return cls("bundled")
        if kind in ("deit", "timm") and _LISTED_KIND.get(name) == kind:
            return cls(kind, name)
        if kind == "job":
            try:
                return cls("job", check_job_id(name))
            except KeyError as e:
                raise ValueError(f"Model: {e.args[0]}") from None
        if text in _LISTED_KIND:                                         # a listed name, typed without its kind
            return cls(_LISTED_KIND[text], text)
        if typed:
            try:
                return cls("source", str(ModelSource.parse(text)))
            except ValueError:
                pass
        raise ValueError(f"Model: {text[:80]!r} is not in the list, nor a timm name, an hf-hub:owner/name id or a "
                         "checkpoint directory")

    @classmethod
    def deit(cls, name: str) -> "ModelRef":
        """A timm DeiT by name (checked as :meth:`parse` checks it)."""
        return cls.parse(f"deit:{name}")

    @classmethod
    def job(cls, job_id: str) -> "ModelRef":
        """A fine-tune job's pair (checked as :meth:`parse` checks it)."""
        return cls.parse(f"job:{job_id}")


BUNDLED = ModelRef("bundled")


def job_label(job: Job) -> str:
    """The dropdown's label of a finished job: its id, its teacher and its FLOPs reduction."""
    a = job.args
    name = "bundled DeiT-Tiny" if str(a.get("model", "")).endswith(ORIGINAL_DIR) else a.get("model", "?")
    return f"job {job.id}: {name} −{100 * float(a.get('flops_reduction', 0)):.0f}%"


class Catalogue:
    """The models on offer and which one to start with.

    Args:
        bundled: the bundled pair, or None when this checkout lacks it.
        jobs: the job manager whose finished jobs join the list (None: none do).
        pretrained: whether timm's ImageNet weights were asked for.
    """

    def __init__(self, bundled: BundledPair | None, jobs: JobManager | None, pretrained: bool) -> None:
        self.bundled, self.jobs, self.pretrained = bundled, jobs, pretrained

    def choices(self, viewer: str | None = None) -> list[tuple[str, str]]:
        """``(label, key)`` for the dropdown: the bundled pair, timm DeiTs, then the finished fine-tune jobs session
        ``viewer`` may use (:meth:`cait.studio.jobs.manager.JobManager.visible`)."""
        out = [(BUNDLED_LABEL, BUNDLED.key)] if self.bundled is not None else []
        out += [(label, ModelRef("deit", name).key) for name, label in DEIT_MODELS.items()]
        out += [(label, ModelRef("timm", name).key) for name, label in CURATED.items()]
        if self.jobs is not None:
            out += [(job_label(j), ModelRef("job", j.id).key) for j in self.jobs.finished()
                    if self.jobs.visible(j, viewer)]
        return out

    def hub_reason(self) -> str | None:
        """Why timm's ImageNet weights cannot be had (not asked for, Hub disabled or unreachable), or None."""
        if not self.pretrained:
            return "pretrained weights not requested (--offline)"
        if hub_offline():
            return "the Hub is disabled (HF_HUB_OFFLINE/CAIT_OFFLINE)"
        return hub_unreachable_reason()

    def default(self) -> ModelRef:
        """DeiT-Tiny with timm's ImageNet weights when the Hub is reachable, else the bundled pair trained here (else
        DeiT-Tiny, whose random weights the status then flags)."""
        if self.bundled is not None and self.hub_reason() is not None:
            return BUNDLED
        return ModelRef("deit", "deit_tiny_patch16_224")

    def label(self, ref: ModelRef) -> str:
        """What the dropdown shows for ``ref`` (its key when it is not on offer)."""
        return next((label for label, key in self.choices() if key == ref.key), ref.key)
