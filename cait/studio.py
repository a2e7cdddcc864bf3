"""The app's engine: builds and caches (original, CAIT twin) pairs and answers the Attention, Channels and Cost tabs.

Everything here is plain Python returning PIL images, plotly figures and pandas tables, so it is testable without a
browser; ``app.py`` only lays out widgets and calls it. The status Markdown lives in :mod:`cait.status`, the
Fine-tune and Compactors tabs' answers in :mod:`cait.jobviews`.
"""
from __future__ import annotations

import copy
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn as nn
from PIL import Image

from .attention_maps import attention_in_mask, cls_attention
from .baselines import apply_tome, tome_flops, tome_schedule
from .bench import compare_throughput, resolve_device
from .bundled import BUNDLED_KEY, BUNDLED_LABEL, BundledPair, bundled_pair
from .compress import compress
from .flops import count_params, describe, flops_by_block
from .jobs import job_id_of
from .meta import meta_of
from .merge import format_layout, parse_layout, patch_grid, token_grids
from .models import DEIT_MODELS, TEST_MODEL, WeightsInfo, create_model, hub_offline, hub_unreachable_reason
from .photos import SAMPLE_PHOTOS, load_image, model_view, preprocess, sample_photo
from .public import Limits
from .status import classes_note, model_labels, pair_status, startup_note
from .synthetic import CLASSES, SyntheticShapes, held_out_sample
from .viz import block_flops_figure, channels_figure, cost_table, display_view, overlay, top_k

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


@dataclass
class Sample:
    """An image to analyse. A synthetic sample is rendered at the model's input size and knows its object mask and
    label; a photo or an upload does not (the model's own resize and crop apply to it)."""

    image: Image.Image
    mask: torch.Tensor | None = None        # (S, S) bool
    label: str | None = None


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
        """Markdown for the app's first screen (:func:`cait.status.startup_note`)."""
        return startup_note(self.device, self.hub_reason(), self.bundled)

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
            merge: optional ATME layout such as ``"h4,v7"``; empty for the planned one, ``"none"`` for no merges
                (CDCP only).

        Raises:
            ValueError: unknown model, bad layout, or an unreachable FLOPs target (message says which).
        """
        name = self.model_choices().get(name, name)
        try:
            is_job = job_id_of(name) is not None
        except KeyError as e:
            raise ValueError(f"Model: {e.args[0]}") from None
        if is_job:
            return self._job_pair(name)
        if name == BUNDLED_KEY:
            return self._bundled_pair()
        if name not in DEIT_MODELS and name != TEST_MODEL:
            raise ValueError(f"Model: {str(name)[:80]!r} is not in the list")
        lo, hi = REDUCTION_RANGE
        if not isinstance(flops_reduction, (int, float)) or not lo <= float(flops_reduction) <= hi:
            raise ValueError(f"Total FLOPs reduction: {flops_reduction!r} is outside {lo} to {hi}")
        try:                                           # "" → the planned layout; "none" → CDCP only, no merges
            text = (merge or "").strip()
            layout = "" if text.lower() == "none" else (format_layout(parse_layout(text or None)) or None)
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
                self._remember(key, ModelPair(name, float(flops_reduction), meta_of(compressed).merge, original,
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
                meta = meta_of(compressed)
                final = meta.finetune
                reduction = (1 - final.flops / final.base_flops if final else meta.achieved_reduction or 0.0)
                self._remember((key,), ModelPair(key, reduction, final.merge if final else meta.merge, original,
                                                 compressed, describe_weights(original), self.device))
            self._pairs.move_to_end((key,))
            return self._pairs[(key,)]

    def _job_pair(self, name: str) -> ModelPair:
        """Teacher and compact model of a finished fine-tune job."""
        from .checkpoint import load_pretrained
        if self.jobs is None:
            raise ValueError("no job manager: fine-tuned models are not available here")
        job_id = job_id_of(name)

        def load():
            run = self.jobs.run_dir(job_id)
            return load_pretrained(run / "teacher", self.device), load_pretrained(run / "compact", self.device)

        return self._checkpoint_pair(name, load, lambda original: WeightsInfo(
            "checkpoint", f"fine-tuned by job {job_id} (teacher: {meta_of(original).source or '?'})"))

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
            final = meta_of(twin).finetune                  # None unless cait.finetune made it
            for key, prov in (("top1_student", b.twin_provenance), ("top1_teacher", b.original_provenance)):
                if final is not None and isinstance(prov.get("top1"), (int, float)):
                    setattr(final, key, float(prov["top1"]))
            return original, twin

        return self._checkpoint_pair(BUNDLED_KEY, load, lambda original: WeightsInfo("checkpoint", detail))

    @staticmethod
    def settings_apply(pair: ModelPair) -> bool:
        """False for a fine-tuned twin (bundled or a job): its reduction and layout were fixed by its training."""
        return not meta_of(pair.compressed).fixed_by_training

    def download(self, pair: ModelPair, where: str | os.PathLike) -> Path:
        """A ``.zip`` of the twin's checkpoint (``model.safetensors`` + ``config.json``, :mod:`cait.checkpoint`),
        written under ``where`` once per pair (a key of its settings names it)."""
        import hashlib
        import zipfile

        from .checkpoint import save_pretrained
        final = meta_of(pair.compressed).finetune
        key = hashlib.sha256(json.dumps([pair.name, pair.flops_reduction, pair.merge, final and final.step],
                                        default=str).encode()).hexdigest()[:16]
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
        """Markdown: device, where the weights came from, and what the twin is (:func:`cait.status.pair_status`)."""
        return pair_status(pair, self.bundled)

    @staticmethod
    def sample_names() -> list[str]:
        """Bundled photos, then synthetic samples with known masks."""
        return list(SAMPLE_PHOTOS) + list(SYNTHETIC_SAMPLES)

    def sample(self, pair: ModelPair, name: str | None = None, upload=None) -> Sample:
        """The image to analyse with ``pair``: an upload (path, array or PIL) if given, else a bundled photo, else a
        held-out synthetic sample rendered at the model's input size (so its mask aligns).

        Raises:
            ImageError: for an upload that is not a usable image.
            ValueError: if neither is given or the sample name is unknown.
        """
        if upload is not None and not (isinstance(upload, str) and not upload):
            return Sample(load_image(upload, self.limits.image_pixels_cap()))
        if name in SAMPLE_PHOTOS:
            return Sample(sample_photo(name))
        if name in SYNTHETIC_SAMPLES:
            return Sample(*held_out_sample(SYNTHETIC_SAMPLES[name], int(pair.original.patch_embed.img_size[0])))
        raise ValueError("pick a bundled photo or upload an image")

    @torch.no_grad()
    def attention(self, pair: ModelPair, sample: Sample, block: int = -1) -> AttentionView:
        """CLS attention of both models in one block (default: the last), head-mean and per head, with top-5.

        Raises:
            ValueError: if ``block`` is out of range for the models.
        """
        depth = len(pair.original.blocks)
        if not -depth <= block < depth:
            raise ValueError(f"block {block} is out of range: the model has {depth} blocks (0..{depth - 1})")
        if sample.mask is not None:                        # rendered at the input size: its pixels as they are
            x, view = SyntheticShapes.normalise_image(sample.image)[None], sample.image
        else:
            x, view = preprocess(pair.original, [sample.image]), model_view(pair.original, sample.image)
        x, mask = x.to(self.device), None if sample.mask is None else sample.mask[None]
        labels = model_labels(pair.original)
        res = {}
        for which, model in (("original", pair.original), ("compressed", pair.compressed)):
            a = cls_attention(model, x, block)
            heads = [(overlay(view, a.patch_maps[0, h]), f"head {h}") for h in range(a.patch_maps.shape[1])]
            inside = None if mask is None else float(attention_in_mask(a, mask.to(a.patch_maps.device))[0])
            res[which] = (overlay(view, a.mean()[0], scale=True), heads, top_k(a.logits[0], labels), a.grid, inside)
        o, c = res["original"], res["compressed"]
        return AttentionView(display_view(view), o[0], c[0], o[1], c[1], o[2], c[2], (o[3], c[3]),
                             None if mask is None else (o[4], c[4]),
                             None if mask is None else float(mask.float().mean()), sample.label,
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
        cap = self.limits.cost_batch_cap()
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
        if model_labels(pair.original) == list(CLASSES) and held_out > 0:
            from .data import build_datasets
            from .finetune import evaluate
            _, val, _ = build_datasets("synthetic", int(pair.original.patch_embed.img_size[0]), val_size=held_out)
            for k, m in models.items():
                rows[k]["top1"] = evaluate(m, val, self.device)
        table = cost_table(rows)
        table.insert(1, "device", str(self.device))
        return table, block_flops_figure(f["original"], f["compressed"])
