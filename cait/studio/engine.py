"""The object the UI holds: the device, the request limits, the models on offer, the pair cache and the jobs.

Each tab's answer is a plain function in its own module (:mod:`~cait.studio.attention`, :mod:`~cait.studio.channels`,
:mod:`~cait.studio.cost`, :mod:`~cait.studio.jobs.views`) over a :class:`~cait.studio.pairs.ModelPair`; the Gradio
widgets live in :mod:`cait.studio.ui`.
"""
from __future__ import annotations

from ..io.bundled import BundledPair, bundled_pair
from ..measure.speed import resolve_device
from .catalogue import BUNDLED, Catalogue, ModelRef
from .jobs.manager import JobManager
from .pairs import ModelPair, PairCache, layout_field
from .public import Limits
from .samples import SYNTHETIC_SAMPLES, sample_names
from .segmentation import BundledSegmenters
from .slot import ComputeSlot
from .status import pair_status, startup_note


class Studio:
    """Builds model pairs on demand for the app.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        pretrained: try timm's ImageNet weights (falls back to random initialisation, visibly).
        cache_size: model pairs kept in memory.
        jobs: the fine-tune job manager whose finished jobs join the model list.
        bundled: the trained offline pair (:mod:`cait.io.bundled`); ``"auto"`` finds it in ``assets/``, None disables.
        calibration_size: unlabelled images the twin of a trained DeiT is calibrated on (bundled photos with random
            crops and flips, and synthetic shapes); 0 gives the weight-norm preview.
        limits: request caps (:class:`cait.studio.public.Limits`); default: the job manager's, else the environment's.
        segmenters: the Segmentation tab's segmenters; ``"auto"``: the bundled ones (``assets/segmenters``).

    Attributes:
        slot: the :class:`cait.studio.slot.ComputeSlot` the UI's heavy requests take turns in (in public mode,
            one place per visitor).
    """

    def __init__(self, device: str | None = None, pretrained: bool = True, cache_size: int = 2,
                 jobs: JobManager | None = None, bundled: BundledPair | None | str = "auto",
                 calibration_size: int = 128, limits: Limits | None = None,
                 segmenters: BundledSegmenters | str = "auto") -> None:
        self.device = resolve_device(device)
        self.limits = limits or (jobs.limits if jobs is not None else Limits.for_environment())
        self.jobs = jobs
        self.bundled = bundled_pair() if bundled == "auto" else bundled
        self.catalogue = Catalogue(self.bundled, jobs, pretrained)
        self.pairs = PairCache(self.device, pretrained, calibration_size, cache_size, self.bundled, jobs,
                               self.catalogue.hub_reason, twins=jobs.root / "twins" if jobs is not None else None,
                               room=(lambda n: jobs.check_room(n, "a calibrated twin")) if jobs is not None else None,
                               charge=jobs.charge if jobs is not None else None,
                               measured=not self.limits.public)
        self.segmenters = BundledSegmenters(device=self.device) if segmenters == "auto" else segmenters
        self.slot = ComputeSlot(per_visitor=self.limits.public)     # the app's heavy requests, one at a time

    def pair(self, key: str, flops_reduction: float, merge: str | None = "", viewer: str | None = None) -> ModelPair:
        """The pair for a model key (:attr:`cait.studio.catalogue.ModelRef.key`) and the UI's settings.

        Args:
            key: ``"deit:<timm name>"``, ``"timm:<timm name>"``, ``"bundled"``, ``"job:<id>"``, or (local mode)
                any :class:`cait.ModelSource` spelling: a timm name, ``hf-hub:owner/name``, a checkpoint directory.
            flops_reduction: total FLOPs reduction.
            merge: the ATME layout field: empty for the paper's plan, ``"none"`` for CDCP only, ``"auto"`` for the
                measured planner (local mode), or e.g. ``h4,v7``.
            viewer: the caller's session key; in public mode a job trained on another visitor's upload is refused.

        Raises:
            ValueError: unknown model, bad layout, or an unreachable FLOPs target (the message names the field).
        """
        try:
            ref = ModelRef.parse(key, typed=not self.limits.public)
        except ValueError:
            if not self.limits.public:
                raise
            raise ValueError(f"Model: {str(key)[:80]!r} is not one of the listed models (typed names, Hub ids and "
                             "folders are for local mode)") from None
        if ref.kind == "job" and self.jobs is not None:
            try:
                job = self.jobs.get(ref.name)
            except KeyError:
                job = None
            if job is not None and not self.jobs.visible(job, viewer):
                raise ValueError(f"Model: {ref.key} is not one of the listed models")
        return self.pairs.get(ref, flops_reduction, layout_field(merge))

    def startup_line(self) -> str:
        """One line for the server's terminal: the device, the pair the page opens on and why, the mode, where jobs
        go."""
        ref, why = self.catalogue.default(), self.catalogue.hub_reason()
        weights = ("bundled weights trained by this project" if ref.kind == "bundled" else
                   f"random weights: {why}" if why else "timm's ImageNet weights from the Hub")
        mode = "public mode (capped, no server paths)" if self.limits.public else "local mode"
        runs = f"; jobs under {self.jobs.root}" if self.jobs is not None else ""
        return f"CAIT Studio on {self.device}: opens on {self.catalogue.label(ref)} ({weights}); {mode}{runs}"

    def startup_note(self) -> str:
        """Markdown for the app's first screen (:func:`cait.studio.status.startup_note`)."""
        return startup_note(self.device, self.catalogue.hub_reason(), self.bundled)

    def status(self, pair: ModelPair) -> str:
        """Markdown: device, where the weights came from, what the twin is (:func:`cait.studio.status.pair_status`)."""
        return pair_status(pair, self.bundled)

    def default_sample(self) -> str:
        """A synthetic sample (known mask, a class the bundled models know) for the bundled default, else a photo."""
        return next(iter(SYNTHETIC_SAMPLES)) if self.catalogue.default() == BUNDLED else sample_names()[0]
