"""(original, CAIT twin) pairs: built once per setting and kept in a small cache (:class:`PairCache`).

A DeiT's twin is made by :func:`cait.compress.compress`, calibrated without training when the DeiT has trained
weights (else the instant weight-norm preview); the bundled pair and a finished job's pair are loaded from their
checkpoints, whose settings their training fixed. A calibrated twin (DeiT-S: about two minutes on a 2-core CPU) is
also kept on disk under ``RUNS/twins/<key>`` (:func:`twin_key`: model, weights, reduction, layout, calibration
images), so each is computed once per server, across evictions from memory and restarts.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..baselines.tome import apply_tome, tome_flops_by_block, tome_schedule
from ..compress.oneshot import compress
from ..data.calibration import calibration_images
from ..io.bundled import BundledPair
from ..io.checkpoint import CheckpointError, load_checkpoint, save_pretrained
from ..measure.accuracy import agreement
from ..measure.flops import flops_by_block, tensor_bytes
from ..measure.frontier import search_layouts
from ..measure.precision import in_precision
from ..models.atme import get_layout, patch_grid
from ..io.source import create_model
from ..models.deit import WeightsInfo
from ..models.layout import Layout, token_grids
from ..models.meta import meta_of
from .catalogue import BUNDLED, ModelRef
from .jobs.manager import JobManager

REDUCTION_RANGE = (0.05, 0.8)
"""Total FLOPs reductions the app offers for a DeiT's twin."""


@dataclass
class ModelPair:
    """An original DeiT and its compressed twin, on one device. ``merge`` is the twin's ATME layout."""

    ref: ModelRef
    flops_reduction: float
    merge: Layout
    original: nn.Module
    compressed: nn.Module
    weights: WeightsInfo
    device: torch.device
    _flops: dict = field(default_factory=dict)
    _tome: nn.Module | None = None
    _precisions: dict = field(default_factory=dict)

    def flops(self) -> dict[str, dict[str, int]]:
        """fvcore FLOPs per part of the original, the twin and (``"tome"``) the ToMe baseline, computed once."""
        if not self._flops:
            self._flops = {"original": flops_by_block(self.original), "compressed": flops_by_block(self.compressed)}
            self._flops["tome"] = tome_flops_by_block(self.tome())      # closed form = fvcore's, no trace
        return self._flops

    def tome(self) -> nn.Module:
        """The ToMe baseline (:mod:`cait.baselines.tome`) of the original at the twin's FLOPs reduction, built once."""
        if self._tome is None:
            f = self.flops()
            reduction = 1 - sum(f["compressed"].values()) / sum(f["original"].values())
            model = copy.deepcopy(self.original)
            self._tome = apply_tome(model, tome_schedule(model, max(0.0, reduction))).eval()
        return self._tome

    def in_precision(self, which: str, precision: str) -> nn.Module:
        """``"original"``, ``"CAIT twin"`` or ``"ToMe (baseline)"`` running in ``precision``
        (:func:`cait.measure.precision.in_precision`), made once per precision.

        Raises:
            cait.measure.precision.PrecisionError: an unknown precision, or one this device cannot run.
        """
        model = {"original": self.original, "CAIT twin": self.compressed, "ToMe (baseline)": self.tome()}[which]
        if precision == "fp32":
            return model
        key = (which, precision)
        if key not in self._precisions:
            self._precisions[key] = in_precision(model, precision, self.device)
        return self._precisions[key]

    @property
    def settings_apply(self) -> bool:
        """False for a fine-tuned twin (bundled or a job): its reduction and layout were fixed by its training."""
        return not meta_of(self.compressed).fixed_by_training


MEASURED = "auto"
"""The layout field's word for the measured planner (:func:`cait.measure.frontier.search_layouts`)."""


def layout_field(text: str | None) -> Layout | str | None:
    """The ATME layout field: empty → None (the paper's plan), ``"none"`` → no merges (CDCP only), ``"auto"`` →
    :data:`MEASURED` (the measured planner), else the parsed layout.

    Raises:
        ValueError: ``"ATME layout: ..."`` listing every problem of the text.
    """
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == "none":
        return Layout()
    if text.lower() == MEASURED:
        return MEASURED
    try:
        return Layout.parse(text)
    except ValueError as e:
        raise ValueError(f"ATME layout: {e}") from None


AGREEMENT_IMAGES = 64
"""Unlabelled images (the calibration source, another draw) on which a calibrated twin's agreement is measured."""


def measure_agreement_(twin: nn.Module, original: nn.Module, device: torch.device,
                       n: int = AGREEMENT_IMAGES) -> None:
    """Record in ``twin.cait_meta.calibration`` how often the calibrated twin predicts the original's top-1 class on
    ``n`` unlabelled images it was not calibrated on (the default source, seed 1; calibration draws seed 0)."""
    images = calibration_images("default", n, original, seed=1)
    a = agreement(twin, original, [(x, 0) for x in images], device)
    c = twin.cait_meta.calibration
    c.agreement, c.kl, c.agreement_images = round(a.agreement, 2), round(a.kl, 4), a.images


def twin_key(name: str, weights: WeightsInfo, flops_reduction: float, layout: Layout | None,
               calibration_size: int) -> str:
    """The name of a calibrated twin on disk: a hash of everything that decides it."""
    text = json.dumps([name, weights.source, weights.detail, round(float(flops_reduction), 4),
                       None if layout is None else str(layout), calibration_size])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class PairCache:
    """Builds model pairs on demand and keeps the most recent ``cache_size`` (and as many originals).

    Args:
        device: where the models live.
        pretrained: try timm's ImageNet weights (falls back to random initialisation, visibly).
        calibration_size: unlabelled images a trained DeiT's twin is calibrated on; 0 gives the preview.
        cache_size: pairs kept in memory.
        bundled: the bundled pair (None: not in this checkout).
        jobs: the job manager whose finished jobs can be paired (None: none).
        hub_reason: why timm's ImageNet weights cannot be had, or None (said of the bundled pair's weights).
        twins: where calibrated twins are kept on disk (None: memory only).
        room: called with a twin's bytes before it is written to ``twins``; it raises to skip writing (the public
            disk budget), the twin is still used.
        charge: called with a twin's folder once written (the public disk budget charges the visitor it was made
            for).
        measured: whether the layout field may ask for the measured planner (minutes of compute: off in public
            mode).
    """

    def __init__(self, device: torch.device, pretrained: bool, calibration_size: int, cache_size: int,
                 bundled: BundledPair | None, jobs: JobManager | None,
                 hub_reason: Callable[[], str | None] = lambda: None, twins: Path | None = None,
                 room: Callable[[int], None] | None = None, measured: bool = True,
                 charge: Callable[[Path], None] | None = None) -> None:
        self.device, self.pretrained, self.calibration_size, self.cache_size = (device, pretrained, calibration_size,
                                                                                cache_size)
        self.measured = measured
        self.bundled, self.jobs, self.hub_reason = bundled, jobs, hub_reason
        self.twins, self.room, self.charge = twins, room, charge
        self._originals: OrderedDict[str, tuple[nn.Module, WeightsInfo]] = OrderedDict()
        self._pairs: OrderedDict[tuple, ModelPair] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef, flops_reduction: float, layout: Layout | None = None) -> ModelPair:
        """The pair for these settings, built once and cached (a job's or the bundled pair ignores the settings).

        Args:
            ref: the model.
            flops_reduction: total FLOPs reduction, within :data:`REDUCTION_RANGE`.
            layout: the twin's ATME layout; None for the paper's plan, :data:`MEASURED` for the measured planner
                (:func:`layout_field` reads the UI's text).

        Raises:
            ValueError: a reduction out of range, a layout that does not fit the model, an unreachable FLOPs
                target, or checkpoints that cannot be loaded (the message names the field or the model).
        """
        if ref.kind == "job":
            return self._job_pair(ref)
        if ref.kind == "bundled":
            return self._bundled_pair()
        lo, hi = REDUCTION_RANGE
        if not isinstance(flops_reduction, (int, float)) or not lo <= float(flops_reduction) <= hi:
            raise ValueError(f"Total FLOPs reduction: {flops_reduction!r} is outside {lo} to {hi}")
        key = (ref, round(float(flops_reduction), 4), layout)
        with self._lock:
            if key not in self._pairs:
                original, info = self._original(ref.name)
                if layout == MEASURED:
                    self._check_measured(info)
                elif layout is not None:               # the layout must fit this model: name the field if not
                    try:
                        token_grids(patch_grid(original), len(original.blocks), layout)
                    except ValueError as e:
                        raise ValueError(f"ATME layout: {e}") from None
                # Trained weights: a calibrated twin (training-free, keeps accuracy). Random ones: the instant preview.
                calibrate = info.trained and self.calibration_size > 0
                twin = self._calibrated(ref.name, info, float(flops_reduction), layout) if calibrate else None
                if twin is None:
                    twin = self._build(original, float(flops_reduction), layout, calibrate)
                    if calibrate:
                        measure_agreement_(twin, original, self.device)
                        self._keep(twin, twin_key(ref.name, info, flops_reduction, layout, self.calibration_size))
                self._remember(key, ModelPair(ref, float(flops_reduction), get_layout(twin),
                                              original, twin, info, self.device))
            self._pairs.move_to_end(key)
            return self._pairs[key]

    def _build(self, original: nn.Module, flops_reduction: float, layout: Layout | str | None, calibrate: bool
               ) -> nn.Module:
        """A new twin: the measured planner's choice (one merge at most, two speed rounds: minutes on a CPU for
        DeiT-Tiny), the calibrated twin of a trained model, or the preview of a random one."""
        if layout == MEASURED:
            return search_layouts(original, flops_reduction, calibration="default",
                                  calibration_size=self.calibration_size, max_merges=1, rounds=2,
                                  device=str(self.device)).twin.to(self.device)
        return compress(original, flops_reduction, layout=layout, calibration="default" if calibrate else None,
                        calibration_size=self.calibration_size).to(self.device)

    def _check_measured(self, info: WeightsInfo) -> None:
        """Refuse the measured planner where it cannot run or means nothing, naming the field."""
        if not self.measured:
            raise ValueError("ATME layout: auto (the measured planner) takes minutes of compute and is off on this "
                             "public app; run python -m cait.compress --plan measured where you can")
        if not info.trained or self.calibration_size <= 0:
            raise ValueError("ATME layout: auto (the measured planner) scores a twin by how often it agrees with the "
                             "original, which means nothing for random weights; load trained weights first")

    def _calibrated(self, name: str, info: WeightsInfo, flops_reduction: float, layout: Layout | str | None
                    ) -> nn.Module | None:
        """The calibrated twin kept on disk for these settings, or None (not kept, or unreadable: made again)."""
        if self.twins is None:
            return None
        folder = self.twins / twin_key(name, info, flops_reduction, layout, self.calibration_size)
        if not (folder / "config.json").is_file():
            return None
        try:
            twin = load_checkpoint(folder, self.device)
        except (CheckpointError, OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        os.utime(folder)                                   # retention counts from the last use
        return twin

    def _keep(self, twin: nn.Module, key: str) -> None:
        """Write a calibrated twin to ``twins/<key>`` (atomically: a temporary folder renamed), if there is room."""
        if self.twins is None:
            return
        if self.room is not None:
            try:
                self.room(tensor_bytes(twin))
            except Exception:
                return                                     # no room on disk: used from memory only
        self.twins.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.twins, prefix=".tmp-"))
        try:
            save_pretrained(twin, tmp)
            os.replace(tmp, self.twins / key)
        except OSError:                                    # another request kept the same twin first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if self.charge is not None:
            self.charge(self.twins / key)

    def _original(self, name: str) -> tuple[nn.Module, WeightsInfo]:
        if name not in self._originals:
            model, info = create_model(name, pretrained=self.pretrained)
            self._originals[name] = (model.to(self.device), info)
            while len(self._originals) > self.cache_size:
                self._originals.popitem(last=False)
        self._originals.move_to_end(name)
        return self._originals[name]

    def _remember(self, key: tuple, pair: ModelPair) -> None:
        """Cache a pair, dropping the least recently used beyond ``cache_size``."""
        self._pairs[key] = pair
        while len(self._pairs) > self.cache_size:
            self._pairs.popitem(last=False)

    def _checkpoint_pair(self, ref: ModelRef, load: Callable[[], tuple[nn.Module, nn.Module]],
                         describe_weights: Callable[[nn.Module], WeightsInfo]) -> ModelPair:
        """A cached pair of two checkpoints (teacher, compact twin): ``load()`` returns them, ``describe_weights``
        turns the original into a :class:`WeightsInfo`. Settings come from the checkpoints, not the sliders."""
        with self._lock:
            if (ref,) not in self._pairs:
                try:
                    original, compressed = load()
                except (KeyError, CheckpointError) as e:
                    raise ValueError(f"{ref.key}: its models cannot be loaded ({e})") from None
                meta = meta_of(compressed)
                final = meta.finetune
                reduction = (1 - final.flops / final.base_flops if final else meta.achieved_reduction or 0.0)
                self._remember((ref,), ModelPair(ref, reduction, get_layout(compressed),
                                                 original, compressed, describe_weights(original), self.device))
            self._pairs.move_to_end((ref,))
            return self._pairs[(ref,)]

    def _job_pair(self, ref: ModelRef) -> ModelPair:
        """Teacher and compact model of a finished fine-tune job."""
        if self.jobs is None:
            raise ValueError("no job manager: fine-tuned models are not available here")

        def load():
            run = self.jobs.run_dir(ref.name)
            return load_checkpoint(run / "teacher", self.device), load_checkpoint(run / "compact", self.device)

        return self._checkpoint_pair(ref, load, lambda original: WeightsInfo(
            "checkpoint", f"fine-tuned by job {ref.name} (teacher: {meta_of(original).source or '?'})"))

    def _bundled_pair(self) -> ModelPair:
        """The DeiT-Tiny and CAIT twin trained here on synthetic shapes (``assets/``)."""
        if self.bundled is None:
            raise ValueError("the bundled offline weights are not in this checkout (assets/)")
        b = self.bundled
        prov, why = b.original_provenance, self.hub_reason()
        detail = (f"bundled weights trained by this project on synthetic shapes "
                  f"({prov.get('top1', '?')}% held-out top-1; `{b.original_dir.parent.name}/`)"
                  + (f"; timm's ImageNet weights are not used: {why}" if why else ""))

        def load():
            original, twin = b.load(self.device)
            # Show the top-1 measured on the fp16 files as shipped (provenance), not the fp32 run's last evaluation.
            final = meta_of(twin).finetune                  # None unless cait.finetune made it
            for key, p in (("top1_student", b.twin_provenance), ("top1_teacher", b.original_provenance)):
                if final is not None and isinstance(p.get("top1"), (int, float)):
                    setattr(final, key, float(p["top1"]))
            return original, twin

        return self._checkpoint_pair(BUNDLED, load, lambda original: WeightsInfo("checkpoint", detail))

