"""The app's status Markdown: the first screen's note, what a model pair is, and what a model's classes are.

Plain functions of a :class:`cait.studio.pairs.ModelPair` (and the bundled pair's provenance), so the wording of
every status line lives in one file and is testable without a browser.
"""
from __future__ import annotations

import functools

import torch.nn as nn
from timm.data import ImageNetInfo

from ..data.synthetic import CLASSES
from ..io.bundled import BundledPair
from .catalogue import MODEL_NAMES
from ..models.meta import meta_of

ABOVE_TEACHER = ("It scores above its teacher: the fine-tune was also more training than the teacher had at this "
                 "resolution, so the teacher is under-trained for this data; compression does not add accuracy. ")
"""Said of a fine-tuned twin more than one point above its teacher (an earlier bundled twin was, under a teacher
trained too little at 224 px: docs/bundled.md)."""


def startup_note(device, hub_reason: str | None, bundled: BundledPair | None) -> str:
    """Markdown for the app's first screen: the device, and which weights the default model has and why."""
    note = f"Device: `{device}`."
    if hub_reason and bundled is not None:
        note += (f" **Offline:** timm's ImageNet weights are out of reach ({hub_reason}), so the default model is the "
                 "bundled DeiT-Tiny and its CAIT twin, trained by this project on synthetic shapes.")
    elif hub_reason:
        note += (f" **Offline:** timm's ImageNet weights are out of reach ({hub_reason}) and the bundled weights are "
                 "not in this checkout: DeiTs will be randomly initialised.")
    return note


def pair_status(pair, bundled: BundledPair | None = None) -> str:
    """Markdown: device, where the weights came from, and what the twin is (fine-tuned run summary, calibrated, or
    the untrained preview); for the bundled pair also its held-out attention localisation."""
    parts = _twin_status(pair)
    if pair.ref.kind == "bundled" and bundled is not None:
        parts.append(_bundled_localisation(bundled))
    return "\n\n".join(parts)


def _twin_status(pair) -> list[str]:
    """Markdown paragraphs: device, weights and the twin (fine-tuned run summary, calibrated, or the preview)."""
    meta = meta_of(pair.compressed)
    if meta.finetune is not None:
        f = meta.finetune
        return [
            f"**Device:** `{pair.device}` · **Model:** `{pair.ref.key}` ({pair.weights.detail})",
            f"**CAIT twin, fine-tuned with CDCP:** ATME `{f.merge or 'none'}`, "
            f"{f.base_flops / 1e9:.4f} → {f.flops / 1e9:.4f} GFLOPs "
            f"({100 * f.flops_reduction:.1f}% fewer); held-out {f.score_text(_val_size(meta))}"
            + (" (its teacher was not trained). " if f.top1_teacher is None else ". ")
            + (ABOVE_TEACHER if None not in (f.top1_teacher, f.top1_student) and f.top1_student > f.top1_teacher + 1
               else "")
            + "The reduction and layout controls do not apply to it.",
        ]
    f = pair.flops()
    fo, fc = sum(f["original"].values()), sum(f["compressed"].values())
    weights = (f"**Weights:** {pair.weights.detail}." if pair.weights.trained else
               f"**Weights: not trained** — {pair.weights.detail}. Attention maps and predictions of random "
               "weights mean nothing; the FLOPs, channel and speed figures are still exact.")
    if meta.calibration:
        c = meta.calibration
        how = (f"*Calibrated, training-free:* channels chosen by their Fisher information and each block's "
               f"output Linears refit by least squares on {c.images} unlabelled images ({c.source}: bundled "
               f"photos with random crops and synthetic shapes; {c.seconds:.0f} s), without the CDCP "
               "fine-tuning that gives CAIT its full accuracy.")
        if c.agreement is not None:
            how += (f" **Measured here:** on {c.agreement_images} other unlabelled images of that source the twin "
                    f"predicts the original's class for {c.agreement:.1f}% of them (KL {c.kl:.3f} nats).")
        if meta.merge:
            how += (" Merges without training cost accuracy: on the bundled DeiT-Tiny (90.9%) at 50% FLOPs the "
                    "planned layout kept 50% of the original's predictions (48.7% top-1) and layout `none` (CDCP "
                    "only) 94% (89.1%) (docs/results.md).")
        how += (" **To recover accuracy without labels**, run a fine-tune job with *Targets: the original's "
                "predictions* (Fine-tune tab): the twin learns from the original's outputs and tokens on images the "
                "app always has.")
    else:
        how = ("*Untrained preview:* channels chosen by weight-row norms, without the CDCP fine-tuning that gives "
               "CAIT its accuracy.")
    structure = (f"**CAIT twin:** ATME layout `{meta.merge}` ({100 * (meta.atme_reduction or 0):.1f}% of FLOPs) + "
                 "CDCP channel pruning" if meta.merge else "**CAIT twin, CDCP only (no merges):** channel pruning")
    return [
        f"**Device:** `{pair.device}` · **Model:** {MODEL_NAMES.get(pair.ref.name, pair.ref.key)} (`{pair.ref.name}`)",
        weights,
        f"{structure} → {fo / 1e9:.3f} → {fc / 1e9:.3f} GFLOPs ({100 * (1 - fc / fo):.1f}% fewer). "
        + planner_text(meta.planner) + how,
    ]


def planner_text(planner: dict | None) -> str:
    """One or two sentences: which planner chose the layout, and for the measured one what it measured."""
    planner = planner or {}
    if planner.get("planner") == "measured":
        chosen = f"`{planner.get('layout')}`" if planner.get("layout") else "CDCP only"
        text = (f"*Layout measured, not ruled:* of {planner.get('candidates', '?')} layouts the planner chose "
                f"{chosen}, {planner.get('rule', '')} ({planner.get('seconds', 0):.0f} s). ")
        if not planner.get("layout"):
            text += "CDCP only: merges cost accuracy before training on this model. "
        return text
    if planner.get("planner") == "paper":
        return (f"*Layout by the paper's rule:* ATME planned for {100 * planner.get('atme_share', 0.8):.0f}% of the "
                "reduction (write `auto` in the layout field to measure the split instead). ")
    return ""


def _bundled_localisation(bundled: BundledPair) -> str:
    """Markdown: the bundled models' attention localisation on the held-out split (from their provenance)."""
    o = bundled.original_provenance.get("localisation", {})
    c = bundled.twin_provenance.get("localisation", {})
    if "attention_in_object" not in o or "attention_in_object" not in c:
        return "**Attention localisation:** not recorded in the bundled provenance."
    return (f"**Attention inside the object** (held-out synthetic images, n = {o.get('images', '?')}): "
            f"original {100 * o['attention_in_object']:.1f}%, CAIT twin {100 * c['attention_in_object']:.1f}%; "
            f"uniform attention would score {100 * o['object_area']:.1f}% (the objects' mean area).")


def classes_note(model: nn.Module) -> str:
    """One line saying what a model's classes are (so a shape model's top-5 on a photo surprises nobody)."""
    labels = model_labels(model)
    if labels == list(CLASSES):
        return (f"**Classes:** the {len(CLASSES)} synthetic shapes ({', '.join(CLASSES)}); on a photo its "
                "predictions mean nothing.")
    if getattr(model, "num_classes", 0) == 1000:
        return "**Classes:** ImageNet-1k (1000)."
    if labels:
        return f"**Classes:** {len(labels)} ({', '.join(labels[:12])}{', …' if len(labels) > 12 else ''})."
    if getattr(model, "num_classes", None) == 0:
        return ("**Classes:** none: a feature backbone without a classifier (its output is a feature vector, so "
                "there is no top-5; compare the attention maps and the cost).")
    return f"**Classes:** {getattr(model, 'num_classes', '?')}, unnamed."


def model_labels(model: nn.Module) -> list[str] | None:
    """Class names: the model's own (fine-tuned on synthetic shapes, say), else ImageNet's for 1000 classes."""
    classes = meta_of(model).classes
    if classes and len(classes) == getattr(model, "num_classes", -1):
        return list(classes)
    return _imagenet_labels() if getattr(model, "num_classes", 0) == 1000 else None


@functools.lru_cache(maxsize=1)
def _imagenet_labels() -> list[str]:
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _val_size(meta) -> int | None:
    """The held-out images of the run that made a model (its config's ``val_size``), for records without their n."""
    return (meta.config or {}).get("val_size")
