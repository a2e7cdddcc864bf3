"""The app's engine: builds and caches (original, CAIT twin) pairs and answers each tab's question.

Everything here is plain Python returning PIL images, plotly figures and pandas tables, so it is testable without a
browser; ``app.py`` only lays out widgets and calls it.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn as nn
from PIL import Image

from .attention import attention_in_mask, cls_attention
from .baselines import apply_tome, tome_flops, tome_schedule
from .bench import compare_throughput, resolve_device
from .bundled import BUNDLED_KEY, BUNDLED_LABEL, ORIGINAL_DIR, BundledPair, bundled_pair
from .compress import compress
from .flops import count_params, describe, flops_by_block
from .merge import format_layout, parse_layout, patch_grid, token_grids
from .models import DEIT_MODELS, TEST_MODEL, WeightsInfo, create_model, hub_offline, hub_unreachable_reason
from .photos import MAX_PIXELS, SAMPLE_PHOTOS, load_image, model_view, preprocess, sample_photo
from .public import Limits
from .synthetic import CLASSES, SyntheticShapes, render
from .viz import (block_flops_figure, channels_figure, compactor_figure, consistency_figure, cost_table,
                  display_view, overlay, top_k, training_figure)

if TYPE_CHECKING:
    from .jobs import JobManager


@dataclass
class ModelPair:
    """An original DeiT and its compressed twin, on one device."""

    name: str
    flops_reduction: float
    merge: str
    original: nn.Module
    compressed: nn.Module
    weights: WeightsInfo
    device: torch.device
    _flops: dict = field(default_factory=dict)
    _tome: nn.Module | None = None

    def flops(self) -> dict[str, dict[str, int]]:
        """fvcore FLOPs per part for both models, computed once."""
        if not self._flops:
            self._flops = {"original": flops_by_block(self.original), "compressed": flops_by_block(self.compressed)}
        return self._flops

    def tome(self) -> nn.Module:
        """The ToMe baseline (:mod:`cait.baselines`) of the original at the twin's FLOPs reduction, built once."""
        if self._tome is None:
            f = self.flops()
            reduction = 1 - sum(f["compressed"].values()) / sum(f["original"].values())
            model = copy.deepcopy(self.original)
            self._tome = apply_tome(model, tome_schedule(model, max(0.0, reduction))).eval()
        return self._tome


@dataclass
class AttentionView:
    """What the Attention tab shows for one image."""

    image: Image.Image                      # the crop the models see
    original_mean: Image.Image              # head-mean CLS attention overlay
    compressed_mean: Image.Image
    original_heads: list[tuple[Image.Image, str]]
    compressed_heads: list[tuple[Image.Image, str]]
    original_top5: dict[str, float]
    compressed_top5: dict[str, float]
    grids: tuple[tuple[int, int], tuple[int, int]]
    localisation: tuple[float, float] | None = None   # CLS attention mass inside the object (original, twin)
    object_area: float | None = None                  # the object's share of the image (uniform attention's score)
    true_label: str | None = None                     # known for synthetic samples
    classes_note: str = ""                            # what the model's classes are

    def localisation_text(self) -> str:
        """Markdown for the UI: the model's classes, the true label if known, and the attention localisation."""
        lines = [self.classes_note] if self.classes_note else []
        if self.true_label is not None:
            lines.append(f"**True label:** {self.true_label}.")
        if self.localisation is None:
            lines.append("Attention localisation: needs a sample with a known object mask (the synthetic ones).")
        else:
            o, c = self.localisation
            lines.append(f"**Attention inside the object:** original {100 * o:.1f}%, CAIT twin {100 * c:.1f}% "
                         f"(the object covers {100 * self.object_area:.1f}% of the image: uniform attention scores "
                         "that).")
        return "\n\n".join(lines)


REDUCTION_RANGE = (0.05, 0.8)
"""Total FLOPs reductions the app offers for a DeiT's twin."""

SYNTHETIC_SAMPLES = {f"synthetic shapes, held-out #{i} (object mask known)": i for i in range(4)}
"""Samples of the held-out split of :mod:`cait.synthetic`, rendered at the model's input size."""


class Studio:
    """Builds model pairs on demand and keeps the most recent ones.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        pretrained: try timm's ImageNet weights (falls back to random initialisation, visibly).
        cache_size: model pairs kept in memory.
        jobs: the fine-tune job manager whose finished jobs join the model list.
        bundled: the trained offline pair (:mod:`cait.bundled`); ``"auto"`` finds it in ``assets/``, None disables.
        calibration_size: unlabelled images the twin of a trained DeiT is calibrated on (:mod:`cait.calibrate`:
            bundled photos with random crops and flips, and synthetic shapes); 0 gives the weight-norm preview.
        limits: request caps (:class:`cait.public.Limits`); default: the job manager's, else the environment's.
    """

    def __init__(self, device: str | None = None, pretrained: bool = True, cache_size: int = 2,
                 jobs: "JobManager | None" = None, bundled: "BundledPair | None | str" = "auto",
                 calibration_size: int = 128, limits: Limits | None = None) -> None:
        self.device = resolve_device(device)
        self.limits = limits or (jobs.limits if jobs is not None else Limits.for_environment())
        self.calibration_size = calibration_size
        self.jobs = jobs
        self.pretrained = pretrained
        self.cache_size = cache_size
        self.bundled = bundled_pair() if bundled == "auto" else bundled
        self._originals: OrderedDict[str, tuple[nn.Module, WeightsInfo]] = OrderedDict()
        self._pairs: OrderedDict[tuple, ModelPair] = OrderedDict()
        self._lock = threading.Lock()

    def model_choices(self) -> dict[str, str]:
        """Display name → model: the bundled pair (``"bundled:…"``), timm DeiTs, then every finished fine-tune job
        (``"job:<id>"``)."""
        choices = {BUNDLED_LABEL: BUNDLED_KEY} if self.bundled is not None else {}
        choices.update({v: k for k, v in DEIT_MODELS.items()})
        if self.jobs is not None:
            choices.update(self.jobs.finished_models())
        return choices

    def hub_reason(self) -> str | None:
        """Why timm's ImageNet weights cannot be had (not asked for, Hub disabled or unreachable), or None."""
        if not self.pretrained:
            return "pretrained weights not requested (--offline)"
        if hub_offline():
            return "the Hub is disabled (HF_HUB_OFFLINE/CAIT_OFFLINE)"
        return hub_unreachable_reason()

    def default_model(self) -> str:
        """Display name to start with: DeiT-Tiny with timm's ImageNet weights when the Hub is reachable, else the
        bundled pair trained here (else DeiT-Tiny, whose random weights the status then flags)."""
        if self.bundled is not None and self.hub_reason() is not None:
            return BUNDLED_LABEL
        return DEIT_MODELS["deit_tiny_patch16_224"]

    def startup_note(self) -> str:
        """Markdown for the app's first screen: the device, and which weights the default model has and why."""
        why = self.hub_reason()
        note = f"Device: `{self.device}`."
        if why and self.bundled is not None:
            note += (f" **Offline:** timm's ImageNet weights are out of reach ({why}), so the default model is the "
                     "bundled DeiT-Tiny and its CAIT twin, trained by this project on synthetic shapes.")
        elif why:
            note += (f" **Offline:** timm's ImageNet weights are out of reach ({why}) and the bundled weights are "
                     "not in this checkout: DeiTs will be randomly initialised.")
        return note

    def default_sample(self) -> str:
        """A synthetic sample (known mask, a class the bundled models know) for the bundled default, else a photo."""
        names = self.sample_names()
        return next(iter(SYNTHETIC_SAMPLES)) if self.default_model() == BUNDLED_LABEL else names[0]

    def _original(self, name: str) -> tuple[nn.Module, WeightsInfo]:
        if name not in self._originals:
            model, info = create_model(name, pretrained=self.pretrained)
            self._originals[name] = (model.to(self.device), info)
            while len(self._originals) > self.cache_size:
                self._originals.popitem(last=False)
        self._originals.move_to_end(name)
        return self._originals[name]

    def pair(self, name: str, flops_reduction: float, merge: str | None = "") -> ModelPair:
        """The (original, compressed) pair for these settings, built once and cached.

        Args:
            name: timm name or display name (``"DeiT-Small"``).
            flops_reduction: total FLOPs reduction in [0, 1).
            merge: optional ATME layout such as ``"h4,v7"``; empty for the planned one.

        Raises:
            ValueError: unknown model, bad layout, or an unreachable FLOPs target (message says which).
        """
        name = self.model_choices().get(name, name)
        if name.startswith("job:"):
            return self._job_pair(name)
        if name == BUNDLED_KEY:
            return self._bundled_pair()
        if name not in DEIT_MODELS and name != TEST_MODEL:
            raise ValueError(f"Model: {str(name)[:80]!r} is not in the list")
        lo, hi = REDUCTION_RANGE
        if not isinstance(flops_reduction, (int, float)) or not lo <= float(flops_reduction) <= hi:
            raise ValueError(f"Total FLOPs reduction: {flops_reduction!r} is outside {lo} to {hi}")
        try:
            layout = format_layout(parse_layout(merge or None)) or None
        except ValueError as e:
            raise ValueError(f"ATME layout: {e}") from None
        key = (name, round(float(flops_reduction), 4), layout)
        with self._lock:
            if key not in self._pairs:
                original, info = self._original(name)
                try:                                   # the layout must fit this model: name the field if not
                    token_grids(patch_grid(original), len(original.blocks), layout)
                except ValueError as e:
                    raise ValueError(f"ATME layout: {e}") from None
                # Trained weights: a calibrated twin (training-free, keeps accuracy). Random ones: the instant preview.
                calibrate = info.trained and self.calibration_size > 0
                compressed = compress(original, float(flops_reduction), layout=layout,
                                      calibration="default" if calibrate else None,
                                      calibration_size=self.calibration_size).to(self.device)
                self._remember(key, ModelPair(name, float(flops_reduction), compressed.cait_meta["merge"], original,
                                              compressed, info, self.device))
            self._pairs.move_to_end(key)
            return self._pairs[key]

    def _remember(self, key: tuple, pair: ModelPair) -> None:
        """Cache a pair, dropping the least recently used beyond ``cache_size``."""
        self._pairs[key] = pair
        while len(self._pairs) > self.cache_size:
            self._pairs.popitem(last=False)

    def _checkpoint_pair(self, key: str, load, describe_weights) -> ModelPair:
        """A cached pair of two checkpoints (teacher, compact twin): ``load()`` returns them, ``describe_weights``
        turns the original into a :class:`WeightsInfo`. Settings come from the checkpoints, not the sliders."""
        from .checkpoint import CheckpointError
        with self._lock:
            if (key,) not in self._pairs:
                try:
                    original, compressed = load()
                except (KeyError, CheckpointError) as e:
                    raise ValueError(f"{key}: its models cannot be loaded ({e})") from None
                meta = compressed.cait_meta
                final = meta.get("finetune", {})
                reduction = (1 - final["flops"] / final["base_flops"] if "flops" in final else
                             meta.get("achieved_reduction", 0.0))
                self._remember((key,), ModelPair(key, reduction, final.get("merge", meta.get("merge", "")), original,
                                                 compressed, describe_weights(original), self.device))
            self._pairs.move_to_end((key,))
            return self._pairs[(key,)]

    def _job_pair(self, name: str) -> ModelPair:
        """Teacher and compact model of a finished fine-tune job."""
        from .checkpoint import load_pretrained
        if self.jobs is None:
            raise ValueError("no job manager: fine-tuned models are not available here")
        job_id = name.split(":", 1)[1]

        def load():
            run = self.jobs.run_dir(job_id)
            return load_pretrained(run / "teacher", self.device), load_pretrained(run / "compact", self.device)

        return self._checkpoint_pair(name, load, lambda original: WeightsInfo(
            "checkpoint", f"fine-tuned by job {job_id} (teacher: {original.cait_meta.get('source', '?')})"))

    def _bundled_pair(self) -> ModelPair:
        """The DeiT-Tiny and CAIT twin trained here on synthetic shapes (``assets/``)."""
        if self.bundled is None:
            raise ValueError("the bundled offline weights are not in this checkout (assets/)")
        b = self.bundled
        why = self.hub_reason()
        prov = b.original_provenance
        detail = (f"bundled weights trained by this project on synthetic shapes "
                  f"({prov.get('top1', '?')}% held-out top-1; `{b.original_dir.parent.name}/`)"
                  + (f"; timm's ImageNet weights are not used: {why}" if why else ""))

        def load():
            original, twin = b.load(self.device)
            # Show the top-1 measured on the fp16 files as shipped (provenance), not the fp32 run's last evaluation.
            final = twin.cait_meta.get("finetune", {})      # empty unless cait.finetune made it
            for key, prov in (("top1_student", b.twin_provenance), ("top1_teacher", b.original_provenance)):
                if final and isinstance(prov.get("top1"), (int, float)):
                    final[key] = float(prov["top1"])
            return original, twin

        return self._checkpoint_pair(BUNDLED_KEY, load, lambda original: WeightsInfo("checkpoint", detail))

    @staticmethod
    def settings_apply(pair: ModelPair) -> bool:
        """False for a fine-tuned twin (bundled or a job): its reduction and layout were fixed by its training."""
        return "finetune" not in (pair.compressed.cait_meta or {})

    def download(self, pair: ModelPair, where: str | os.PathLike) -> Path:
        """A ``.zip`` of the twin's checkpoint (``model.safetensors`` + ``config.json``, :mod:`cait.checkpoint`),
        written under ``where`` once per pair (a key of its settings names it)."""
        import hashlib
        import zipfile

        from .checkpoint import save_pretrained
        meta = pair.compressed.cait_meta or {}
        key = hashlib.sha256(json.dumps([pair.name, pair.flops_reduction, pair.merge, meta.get("finetune", {}).get(
            "step")], default=str).encode()).hexdigest()[:16]
        zpath = Path(where) / f"cait-twin-{key}.zip"
        if not zpath.is_file():
            folder = save_pretrained(pair.compressed, Path(where) / f"cait-twin-{key}")
            tmp = zpath.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(folder.iterdir()):
                    z.write(f, f"cait-twin/{f.name}")
            os.replace(tmp, zpath)
        return zpath

    def status(self, pair: ModelPair) -> str:
        """Markdown: device, where the weights came from, and what the twin is."""
        parts = self._twin_status(pair)
        if pair.name == BUNDLED_KEY:
            parts.append(self._bundled_localisation())
        return "\n\n".join(parts)

    def _twin_status(self, pair: ModelPair) -> list[str]:
        """Markdown paragraphs: device, weights and the twin (fine-tuned run summary, or the untrained preview)."""
        meta = pair.compressed.cait_meta
        if "finetune" in meta:
            f = meta["finetune"]
            return [
                f"**Device:** `{pair.device}` · **Model:** `{pair.name}` ({pair.weights.detail})",
                f"**CAIT twin, fine-tuned with CDCP:** ATME `{f['merge'] or 'none'}`, "
                f"{f['base_flops'] / 1e9:.4f} → {f['flops'] / 1e9:.4f} GFLOPs "
                f"({100 * f['flops_reduction']:.1f}% fewer); held-out top-1 {f['top1_student']:.1f}% "
                + ("(its teacher was not trained). " if f.get("top1_teacher") is None else
                   f"(teacher {f['top1_teacher']:.1f}%). ")
                + "The reduction and layout controls do not apply to it.",
            ]
        f = pair.flops()
        fo, fc = sum(f["original"].values()), sum(f["compressed"].values())
        weights = (f"**Weights:** {pair.weights.detail}." if pair.weights.trained else
                   f"**Weights: not trained** — {pair.weights.detail}. Attention maps and predictions of random "
                   "weights mean nothing; the FLOPs, channel and speed figures are still exact.")
        if "calibration" in meta:
            c = meta["calibration"]
            how = (f"*Calibrated, training-free:* channels chosen by their Fisher information and each block's "
                   f"output Linears refit by least squares on {c['images']} unlabelled images ({c['source']}: bundled "
                   f"photos with random crops and synthetic shapes; {c['seconds']:.0f} s), without the CDCP "
                   "fine-tuning that gives CAIT its full accuracy.")
        else:
            how = ("*Untrained preview:* channels chosen by weight-row norms, without the CDCP fine-tuning that gives "
                   "CAIT its accuracy.")
        return [
            f"**Device:** `{pair.device}` · **Model:** {DEIT_MODELS.get(pair.name, pair.name)} (`{pair.name}`)",
            weights,
            f"**CAIT twin:** ATME layout `{meta['merge'] or 'none'}` ({100 * meta['atme_reduction']:.1f}% of FLOPs) "
            f"+ CDCP channel pruning → {fo / 1e9:.3f} → {fc / 1e9:.3f} GFLOPs "
            f"({100 * (1 - fc / fo):.1f}% fewer). " + how,
        ]

    def _bundled_localisation(self) -> str:
        """Markdown: the bundled models' attention localisation on the held-out split (from their provenance)."""
        o = self.bundled.original_provenance.get("localisation", {})
        c = self.bundled.twin_provenance.get("localisation", {})
        if "attention_in_object" not in o or "attention_in_object" not in c:
            return "**Attention localisation:** not recorded in the bundled provenance."
        return (f"**Attention inside the object** (held-out synthetic images, n = {o.get('images', '?')}): "
                f"original {100 * o['attention_in_object']:.1f}%, CAIT twin {100 * c['attention_in_object']:.1f}%; "
                f"uniform attention would score {100 * o['object_area']:.1f}% (the objects' mean area).")

    @staticmethod
    def sample_names() -> list[str]:
        """Bundled photos, then synthetic samples with known masks."""
        return list(SAMPLE_PHOTOS) + list(SYNTHETIC_SAMPLES)

    def image(self, sample: str | None = None, upload=None) -> Image.Image | None:
        """The image to analyse: an upload (path, array or PIL) if given, else a bundled photo; None for a
        synthetic sample, which :meth:`attention` renders at the model's input size (so its mask aligns).

        Raises:
            ImageError: for an upload that is not a usable image.
            ValueError: if neither is given or the sample name is unknown.
        """
        if upload is not None and not (isinstance(upload, str) and not upload):
            return load_image(upload, self.limits.max_image_pixels if self.limits.public else MAX_PIXELS)
        if sample in SAMPLE_PHOTOS:
            return sample_photo(sample)
        if sample in SYNTHETIC_SAMPLES:
            return None
        raise ValueError("pick a bundled photo or upload an image")

    @torch.no_grad()
    def attention(self, pair: ModelPair, image: Image.Image | None, block: int = -1, sample: str | None = None
                  ) -> AttentionView:
        """CLS attention of both models in one block (default: the last), head-mean and per head, with top-5.

        Raises:
            ValueError: if ``block`` is out of range for the models.
        """
        depth = len(pair.original.blocks)
        if not -depth <= block < depth:
            raise ValueError(f"block {block} is out of range: the model has {depth} blocks (0..{depth - 1})")
        mask, true_label = None, None
        if image is None:                                  # a synthetic sample, rendered at the input size
            if sample not in SYNTHETIC_SAMPLES:
                raise ValueError("pick a bundled photo or upload an image")
            ds = SyntheticShapes(8, pair.original.patch_embed.img_size[0], split="val")
            img, label, mask_np = render(ds.seed, ds.split, SYNTHETIC_SAMPLES[sample], ds.img_size)
            x, mask, view = ds.normalise(img)[None].to(self.device), torch.from_numpy(mask_np)[None], \
                Image.fromarray(img)
            true_label = CLASSES[label]
        else:
            x = preprocess(pair.original, [image]).to(self.device)
            view = model_view(pair.original, image)
        labels = _labels(pair.original)
        res = {}
        for which, model in (("original", pair.original), ("compressed", pair.compressed)):
            a = cls_attention(model, x, block)
            heads = [(overlay(view, a.patch_maps[0, h]), f"head {h}") for h in range(a.patch_maps.shape[1])]
            inside = None if mask is None else float(attention_in_mask(a, mask.to(a.patch_maps.device))[0])
            res[which] = (overlay(view, a.mean()[0], scale=True), heads, top_k(a.logits[0], labels), a.grid, inside)
        o, c = res["original"], res["compressed"]
        return AttentionView(display_view(view), o[0], c[0], o[1], c[1], o[2], c[2], (o[3], c[3]),
                             None if mask is None else (o[4], c[4]),
                             None if mask is None else float(mask.float().mean()), true_label,
                             classes_note(pair.original))

    def channels(self, pair: ModelPair) -> go.Figure:
        """Retained q/k, v and FFN channels per block (paper Fig. 6)."""
        return channels_figure(describe(pair.original), describe(pair.compressed),
                               title=f"{DEIT_MODELS.get(pair.name, pair.name)}: retained channels per block "
                                     f"(ATME {pair.merge or 'none'})")

    def cost(self, pair: ModelPair, measure: bool = False, batch_size: int = 8, iters: int = 3,
             held_out: int = 200, progress=None) -> tuple[pd.DataFrame, go.Figure]:
        """FLOPs, params, measured throughput and (for models trained on synthetic shapes) held-out top-1 of the
        original, its CAIT twin and the ToMe baseline at the twin's FLOPs; and FLOPs per block.

        Args:
            pair: the models.
            measure: time the three models (alternately, same input) on this device.
            batch_size: images per timed batch.
            iters: timed batches per model per round.
            held_out: images of the synthetic held-out split to score top-1 on, when the models know its classes.
            progress: called as ``progress(fraction, message)`` while measuring (:func:`cait.bench.compare_throughput`).

        Raises:
            ValueError: for a batch size outside what these limits allow (the message names the field).
        """
        cap = self.limits.max_cost_batch if self.limits.public else 1024
        if measure and not 1 <= int(batch_size) <= cap:
            raise ValueError(f"Batch size: {batch_size} is outside 1 to {cap}"
                             + (" on this public Space" if self.limits.public else ""))
        f = pair.flops()
        models = {"original": pair.original, "CAIT twin": pair.compressed, "ToMe (baseline)": pair.tome()}
        rows = {"original": {"flops": sum(f["original"].values())},
                "CAIT twin": {"flops": sum(f["compressed"].values())},
                "ToMe (baseline)": {"flops": tome_flops(models["ToMe (baseline)"])}}
        for k, m in models.items():
            rows[k]["params"] = count_params(m)
        if measure:
            speed = compare_throughput(models, batch_size=int(batch_size), device=self.device, warmup=1,
                                       iters=iters, rounds=2, progress=progress)
            for k in rows:
                rows[k]["images_per_s"] = speed[k]["images_per_s"]
        if _labels(pair.original) == list(CLASSES) and held_out > 0:
            from .data import build_datasets
            from .finetune import evaluate
            _, val, _ = build_datasets("synthetic", int(pair.original.patch_embed.img_size[0]), val_size=held_out)
            for k, m in models.items():
                rows[k]["top1"] = evaluate(m, val, self.device)
        table = cost_table(rows)
        table.insert(1, "device", str(self.device))
        return table, block_flops_figure(f["original"], f["compressed"])


def classes_note(model: nn.Module) -> str:
    """One line saying what a model's classes are (so a shape model's top-5 on a photo surprises nobody)."""
    labels = _labels(model)
    if labels == list(CLASSES):
        return (f"**Classes:** the {len(CLASSES)} synthetic shapes ({', '.join(CLASSES)}); on a photo its "
                "predictions mean nothing.")
    if getattr(model, "num_classes", 0) == 1000:
        return "**Classes:** ImageNet-1k (1000)."
    if labels:
        return f"**Classes:** {len(labels)} ({', '.join(labels[:12])}{', …' if len(labels) > 12 else ''})."
    return f"**Classes:** {getattr(model, 'num_classes', '?')}, unnamed."


def _labels(model: nn.Module) -> list[str] | None:
    """Class names: the model's own (fine-tuned on synthetic shapes, say), else ImageNet's for 1000 classes."""
    classes = (getattr(model, "cait_meta", None) or {}).get("classes")
    if classes and len(classes) == getattr(model, "num_classes", -1):
        return list(classes)
    return _imagenet_labels() if getattr(model, "num_classes", 0) == 1000 else None


@functools.lru_cache(maxsize=1)
def _imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


# ----------------------------------------------------------------------------------------------------------------
# Fine-tune jobs and the compactor view
# ----------------------------------------------------------------------------------------------------------------
def _fmt_s(seconds: float | None) -> str:
    """``"01:02:03"``, with whole days in front past 24 h (``"3 d 01:02:03"``); ``"–"`` for None."""
    if seconds is None:
        return "–"
    days, rest = divmod(int(max(0, seconds)), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days} d {clock}" if days else clock


def _sees_details(jobs: "JobManager", job, viewer: str | None) -> bool:
    """Locally everyone; on a public Space only the session that started the job (paths, log tails)."""
    return not jobs.limits.public or (viewer is not None and job.owner == viewer)


def jobs_table(jobs: "JobManager", viewer: str | None = None, limit: int = 50) -> pd.DataFrame:
    """One row per job, newest first (at most ``limit``): id, status, model, data, FLOPs target, step, device,
    message. In public mode another visitor's job shows no data path and no message."""
    rows = []
    for j in jobs.list(limit=limit):
        p = jobs.progress(j.id)
        mine = _sees_details(jobs, j, viewer)
        model = j.args.get("model", "")
        rows.append({"job": j.id, "status": j.status,
                     "model": "bundled DeiT-Tiny" if str(model).endswith(ORIGINAL_DIR) else model,
                     "data": j.data_label() if mine or j.data_label() == "synthetic" else "(not shown)",
                     "FLOPs reduction": j.args.get("flops_reduction"), "step": f"{p['step']}/{p['steps']}",
                     "device": j.device, "message": j.message.splitlines()[0] if j.message and mine else ""})
    return pd.DataFrame(rows, columns=["job", "status", "model", "data", "FLOPs reduction", "step", "device",
                                       "message"])


def job_view(jobs: "JobManager", job_id: str, viewer: str | None = None) -> tuple[str, go.Figure]:
    """Markdown status (step, loss, |S|, images/s, elapsed, ETA, message with log tail) and the live curves.

    Raises:
        KeyError: unknown or malformed job id.
    """
    p = jobs.progress(job_id)
    job = p["job"]
    lines = [f"**Job `{job.id}`** — **{job.status}** on `{job.device}` · step {p['step']}/{p['steps']}"
             + (f" · loss {p['loss']:.3f}" if p["loss"] is not None else "")
             + f" · |S| {p['s_size']}"
             + (f" · {p['images_per_s']:.0f} images/s" if p["images_per_s"] else "")
             + f" · elapsed {_fmt_s(p['elapsed_s'])} · ETA {_fmt_s(p['eta_s'])}"]
    if job.status == "queued":
        lines.append("Waiting for its device to be free (one job per device).")
    if job.message and _sees_details(jobs, job, viewer):
        lines.append("```\n" + job.message + "\n```")
    return "\n\n".join(lines), training_figure(p["records"])


@functools.lru_cache(maxsize=16)
def _step_seconds(model: str, batch_size: int, flops_reduction: float, device: str) -> float:
    """Seconds of one training step as the engine runs it (student with ATME and compactors, teacher forward for
    distillation, synthetic batch rendered), measured once per setting: one warm-up step, then one timed."""
    import time as _time

    import torch.nn.functional as F

    from .checkpoint import load_pretrained
    from .compactor import add_compactors
    from .merge import apply_atme
    from .plan import split_budget
    teacher = (load_pretrained(model) if Path(model).is_dir() else create_model(model, pretrained=False)[0]).eval()
    split = split_budget(teacher, flops_reduction)
    student = apply_atme(copy.deepcopy(teacher), split.layout)
    if split.target_flops < describe(student).flops():
        add_compactors(student)
    teacher, student = teacher.to(device), student.to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    ds = SyntheticShapes(batch_size, int(teacher.patch_embed.img_size[0]))
    seconds = 0.0
    for i in range(2):
        t0 = _time.perf_counter()
        x = torch.stack([ds[j][0] for j in range(batch_size)]).to(device)
        with torch.no_grad():
            hard = teacher(x).argmax(-1)
        loss = F.cross_entropy(student(x), hard)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds = _time.perf_counter() - t0
    return seconds


def finetune_estimate(model: str, steps: int, batch_size: int, flops_reduction: float, device: str,
                      val_size: int = 512, evals: int = 5) -> str:
    """Markdown: how long a fine-tune would take on this device, from a training step measured here (cached).

    Raises:
        ValueError: for settings the engine would refuse (the message names the field).
    """
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError("Steps and Batch size must be whole numbers (at least 1 and 2)")
    per_step = _step_seconds(model, batch_size, round(float(flops_reduction), 2), device)
    eval_s = per_step / batch_size / 3 * val_size * evals          # a forward is about a third of a training step
    total = steps * per_step + eval_s
    return (f"**Estimated time on this `{device}`:** about {_fmt_s(total)} ({per_step:.2f} s per step of {batch_size} "
            f"images, measured just now; plus {evals} evaluations of {val_size} images). Other jobs or visitors on "
            "this machine slow it down.")


def compactor_view(jobs: "JobManager", job_id: str) -> tuple[str, go.Figure, go.Figure]:
    """Compactor heatmaps of a job's newest state, and CDCP against plain global selection at the same FLOPs.

    Raises:
        ValueError: if the job has written no training state yet.
    """
    from .rundir import RunDirError, compactor_snapshot
    from .select import global_selection
    try:
        snap = compactor_snapshot(jobs.run_dir(job_id))
    except (RunDirError, KeyError) as e:
        raise ValueError(str(e)) from None
    g = global_selection(snap.scores, snap.spec, snap.target_flops)
    g_flops = snap.spec.with_widths(g.widths).flops()
    cdcp_widths = snap.mask.widths() if snap.mask is not None else None
    near_zero = sum(int((t < 1e-2).sum()) for t in snap.scores.q + snap.scores.k + snap.scores.v + snap.scores.ffn)
    text = [f"**Job `{job_id}`, training state of step {snap.step}.** FLOPs target {snap.target_flops / 1e9:.4f} G. "
            f"Near-zero compactor rows (‖Q_j‖ < 0.01): {near_zero}."]
    if cdcp_widths is not None:
        m = snap.mask
        rows = 2 * sum(int(t.sum()) for t in m.qk) + sum(int(t.sum()) for t in m.v + m.ffn)
        text.append(f"**CDCP** (S: {m.size()} units = {rows} compactor rows, since a q/k unit is a pair of rows, "
                    f"one in q and one in k): every head of a block keeps the same widths, so all of S can go: "
                    f"{snap.spec.with_widths(cdcp_widths).flops() / 1e9:.4f} G.")
    text.append(f"**Plain global selection** at the same nominal FLOPs selects channels head by head and q apart "
                f"from k; a batched attention can only drop q/k channels selected in both, down to the head that "
                f"keeps most: it deploys at {g_flops / 1e9:.4f} G "
                f"({100 * (g_flops / snap.target_flops - 1):+.1f}% against the target).")
    if cdcp_widths is not None and cdcp_widths == g.widths:
        text.append("*Here the two deploy the same widths:* the compactor norms are still so uniform (or S so small) "
                    "that the channels global selection picks happen to line up across heads and between q and k; "
                    "the difference appears as the masked rows shrink (compare a later training state).")
    elif cdcp_widths is None:
        text.append("*No CDCP selection yet* (the warm-up comes first): the chart shows global selection alone.")
    return ("\n\n".join(text), compactor_figure(snap.scores, snap.mask, f"Compactors at step {snap.step}"),
            consistency_figure(snap.spec, cdcp_widths, g.widths, "Kept per block: CDCP vs global selection"))
