"""Measured planning: choose the ATME/CDCP split of a FLOPs budget by what the twin keeps and how fast it runs.

The paper's planner (:mod:`cait.compress.plan`, ``--plan paper``; paper §III-B for the layout, §IV-C1 for the budget
split) gives ATME a fixed share of the budget and places the merges by FLOPs alone. Measured on the bundled DeiT-Tiny at 50% fewer FLOPs without training, that rule loses
(docs/results.md, *The measured planner*): the planned ``h4,v9`` keeps 51% top-1 where CDCP alone keeps 89%, and the first
merge's block decides most of it. :func:`search_layouts` measures instead, on the model and the device at hand:

1. **Candidates**: every layout of 0 to ``max_merges`` merges (any blocks, HTM or VTM) whose ATME share fits in the
   budget, CDCP taking the rest, grown by a beam search: each level extends the ``beam`` best layouts of every
   bucket of ATME share (buckets ``bucket`` wide) by one merge, so the fast end of the frontier (large ATME share)
   is explored as well as the accurate end.
2. **Proxy** (cheap, every candidate): the twin built with Fisher channel scores computed *once*, on the unmerged
   model, and shared by all candidates (a merge changes no block's widths, only the FLOPs a unit costs, which
   :func:`cait.compress.importance.per_flop` takes from each candidate's own shape), no refit; scored by its
   KL(original ‖ twin) on ``proxy_images`` held-out images.
3. **Speed** (the best of each bucket): images/s at ``batch_size`` on ``device``, timed in alternation with the
   original and ToMe at the same FLOPs (:func:`cait.measure.speed.compare_throughput`), median of ``rounds``.
4. **Calibration** (``finalists`` only): of the timed candidates at least ``min_speedup`` times as fast as the
   original, the ones with the lowest proxy KL get the full :func:`cait.compress.compress`, scored by agreement and
   KL on images that neither fitted nor judged its refit. The proxy ranks well *within* a bucket, where the CDCP
   shares are alike, but not across: without the refit CDCP alone looks worse than it is (bundled DeiT-Tiny, 50%:
   proxy KL 0.35 for CDCP alone, 0.48 for ``h4,h11``; calibrated, 96% against 48% agreement).
5. **Choice** (objective ``"training-free"``): the finalist with the highest agreement (then the lowest KL). By
   default ``min_speedup`` is ``tome_share`` (0.9) × ToMe's measured speed-up at the same FLOPs, the baseline a user
   would otherwise take without training. If no candidate is that fast, the fastest is calibrated and chosen, and
   :attr:`LayoutSearch.rule` says so.

Widths are rounded to ``round_to`` (8 by default: on a 2-core AVX2 CPU, CDCP alone at 50% ran 2.02× with exact
widths and 2.26× rounded to 8, ToMe 2.38×). A speed-up target with the FLOPs reduction left free is not searched:
give the reduction, and the speed-up as ``min_speedup``.

>>> import timm, cait
>>> model = timm.create_model(cait.TEST_MODEL).eval()         # the tiny test DeiT: 32 px, 8x8 grid, 6 blocks
>>> found = search_layouts(model, 0.5, calibration=torch.randn(56, 3, 32, 32), max_merges=1, rounds=1,
...                        batch_size=4, proxy_images=8, score_images=8, calibration_size=40)
>>> found.choice.layout in {c.layout for c in found.candidates}, found.twin.cait_meta.planner["planner"]
(True, 'measured')
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..baselines.tome import apply_tome, tome_schedule
from ..compress.importance import fisher_scores, per_flop, tensor_batches
from ..compress.oneshot import compress, log_probs
from ..compress.plan import atme_reduction, split_budget
from ..compress.prune import prune
from ..compress.select import select_channels
from ..data.calibration import calibration_images
from ..models.atme import apply_atme
from ..models.layout import Layout
from ..models.spec import describe
from .accuracy import Agreement
from .flops import analytic_flops
from .speed import compare_throughput, resolve_device, speedup_spread

Progress = Callable[[str], None] | None


@dataclass
class Candidate:
    """One split of the budget: an ATME layout, CDCP taking the rest of the FLOPs.

    Attributes:
        layout: the layout, as text (``""``: CDCP only).
        atme_reduction: the share of the original's FLOPs the merges remove (0..1).
        flops: the twin's FLOPs (multiply-adds, one image).
        proxy_kl: KL(original ‖ proxy twin) in nats per image on the proxy images (shared Fisher scores, no refit).
        speedup, speedup_min, speedup_max: the twin's images/s over the original's, median and range over rounds
            (None when not timed).
        agreement, kl: after full calibration, on the scoring images: % of images whose top-1 class is the
            original's, and KL in nats (None when not calibrated).
    """

    layout: str
    atme_reduction: float
    flops: int
    proxy_kl: float
    speedup: float | None = None
    speedup_min: float | None = None
    speedup_max: float | None = None
    agreement: float | None = None
    kl: float | None = None


@dataclass
class LayoutSearch:
    """What :func:`search_layouts` measured and chose.

    Attributes:
        flops_reduction: R, the total reduction every candidate reaches.
        candidates: every candidate the proxy scored, most promising first (lowest proxy KL); the best of each
            bucket carries its speed-up, the finalists their agreement and KL.
        choice: the chosen candidate (calibrated and timed).
        rule: the sentence that says why it was chosen.
        tome_speedup: ToMe's speed-up at the same FLOPs, same run.
        min_speedup: the speed floor the choice had to meet.
        seconds: wall-clock seconds per phase (``fisher``, ``proxy``, ``speed``, ``calibration``, ``total``).
        device, batch_size, score_images: where and how speed and agreement were measured.
        twin: the chosen calibrated twin (not part of :meth:`to_dict`).
    """

    flops_reduction: float
    candidates: list[Candidate]
    choice: Candidate
    rule: str
    tome_speedup: float
    min_speedup: float
    seconds: dict
    device: str
    batch_size: int
    score_images: int
    twin: nn.Module | None = field(default=None, repr=False)

    def frontier(self) -> list[Candidate]:
        """The calibrated candidates no other calibrated candidate beats in both speed-up and agreement, fastest
        first."""
        done = [c for c in self.candidates if c.agreement is not None and c.speedup is not None]
        front = [c for c in done if not any(o.speedup >= c.speedup and o.agreement >= c.agreement and
                                            (o.speedup, o.agreement) != (c.speedup, c.agreement) for o in done)]
        return sorted(front, key=lambda c: -c.speedup)

    def to_dict(self) -> dict:
        """A JSON-ready record (candidates, choice, rule, costs)."""
        return {"planner": "measured", "objective": "training-free", "flops_reduction": self.flops_reduction,
                "choice": asdict(self.choice), "rule": self.rule, "tome_speedup": self.tome_speedup,
                "min_speedup": self.min_speedup, "seconds": self.seconds, "device": self.device,
                "batch_size": self.batch_size, "score_images": self.score_images,
                "frontier": [c.layout for c in self.frontier()],
                "candidates": [asdict(c) for c in self.candidates]}


def candidate_layouts(model: nn.Module, flops_reduction: float, extend: Layout | None = None) -> list[Layout]:
    """Every layout that adds one merge (any free block, HTM or VTM) to ``extend`` (default: no merge) and still
    fits the model's grid and the budget (its ATME share at most ``flops_reduction``).

    >>> import timm, cait
    >>> m = timm.create_model(cait.TEST_MODEL)                  # 6 blocks, 8x8 patch grid
    >>> [str(l) for l in candidate_layouts(m, 0.15)]            # an earlier merge would remove more than 15%
    ['h5', 'v5']
    """
    spec, base = describe(model), dict(extend or {})
    out = []
    for block in range(len(spec.blocks)):
        if block in base:
            continue
        for d in "hv":
            layout = Layout({**base, block: d})
            try:
                if atme_reduction(spec, layout) <= flops_reduction:
                    out.append(layout)
            except ValueError:                                  # a grid side already 1
                continue
    return out


def search_layouts(model: nn.Module, flops_reduction: float, calibration="default", calibration_size: int = 256,
                   max_merges: int = 2, beam: int = 1, bucket: float = 0.1, finalists: int = 3, round_to: int = 8,
                   min_channels: int = 1, proxy_images: int = 32, score_images: int = 128,
                   min_speedup: float | None = None, tome_share: float = 0.9, device: str | None = "cpu",
                   batch_size: int = 32, rounds: int = 3, seed: int = 0, include: tuple = (),
                   progress: Progress = None) -> LayoutSearch:
    """Search the ATME/CDCP splits of ``flops_reduction`` and return the frontier and a calibrated choice (module
    docstring for the five steps).

    Args:
        model: an uncompressed DeiT; not modified.
        flops_reduction: R in [0, 1); every candidate reaches it (ATME's share, CDCP the rest).
        calibration, calibration_size: unlabelled images to fit on (as :func:`cait.compress.compress`);
            ``proxy_images`` and ``score_images`` more come from the same source (a tensor must hold all three).
        max_merges: 0 to 4 merges per layout.
        beam: layouts kept per bucket of ATME share at each level of the search.
        bucket: width of a bucket of ATME share (0.1 = ten points of the original's FLOPs).
        finalists: how many candidates are fully calibrated: those at least ``min_speedup`` fast with the lowest
            proxy KL.
        round_to, min_channels: as for :func:`cait.compress.compress`.
        proxy_images: held-out images the proxy KL is measured on.
        score_images: held-out images the calibrated finalists' agreement and KL are measured on.
        min_speedup: the speed-up the choice must reach; default ``tome_share`` × ToMe's at the same FLOPs.
        device: where speed is timed (``"cpu"``, ``"cuda"``; None: CUDA when available).
        batch_size, rounds: of the speed measurement (images per batch, alternation rounds).
        seed: of the calibration draw; progress: called with short status strings.
        include: layouts (e.g. the paper's plan) also scored, timed and calibrated, in the same run; they compete
            for the choice like the others.

    Returns:
        A :class:`LayoutSearch`; ``.twin`` is the chosen calibrated twin, its ``cait_meta.planner`` the record of
        this search (planner, objective, agreement, KL, candidates, seconds).

    Raises:
        ValueError: for R outside [0, 1), ``max_merges`` outside 0..4, a model that is not an uncompressed DeiT.
        cait.data.datasets.DataError: for calibration data that cannot be used.
    """
    if not 0 <= max_merges <= 4:
        raise ValueError(f"max_merges must be in 0..4, got {max_merges}")
    split_budget(model, flops_reduction)                        # validates R and the model
    t_start = time.perf_counter()
    s = _Search(model.eval(), flops_reduction, round_to, min_channels, batch_size, progress or (lambda m: None))
    s.draw(calibration, calibration_size, proxy_images, score_images, seed)
    s.grow(max_merges, beam, bucket)
    extra = s.include(include)
    timed = _per_bucket(list(s.scored.values()), bucket, 1)
    timed += [c for c in extra if c not in timed]
    tome_speedup = s.time(timed, device, rounds)
    floor = tome_share * tome_speedup if min_speedup is None else min_speedup
    fast = sorted((c for c in timed if c.speedup >= floor), key=lambda c: c.proxy_kl)[:finalists]
    twins = s.calibrate(list({c.layout: c for c in (fast or [max(timed, key=lambda c: c.speedup)]) + extra}.values()))
    choice, rule = _choose(timed, floor, len(s.score))
    if min_speedup is None:
        rule += f" ({tome_share:.0%} of ToMe's {tome_speedup:.2f}x at the same FLOPs, same run)"
    s.seconds["total"] = round(time.perf_counter() - t_start, 1)
    found = LayoutSearch(flops_reduction, sorted(s.scored.values(), key=lambda c: c.proxy_kl), choice, rule,
                         round(tome_speedup, 3), round(floor, 3), s.seconds, str(resolve_device(device)),
                         batch_size, len(s.score), twins[choice.layout])
    _record(found)
    return found


def _choose(timed: list[Candidate], floor: float, n_score: int) -> tuple[Candidate, str]:
    """The calibrated candidate with the highest agreement (then the lowest KL) at least ``floor`` times as fast as
    the original, or the fastest when none is; and the sentence that says why."""
    fast = [c for c in timed if c.agreement is not None and c.speedup >= floor]      # finalists and fast extras
    if not fast:
        return max(timed, key=lambda c: c.speedup), f"no candidate reached {floor:.2f}x; the fastest was taken"
    choice = max(fast, key=lambda c: (c.agreement, -c.kl))
    return choice, (f"the highest agreement ({choice.agreement:.1f}% on {n_score} held-out images) of the "
                    f"{len(fast)} calibrated candidates at least {floor:.2f}x as fast as the original")


def _record(found: LayoutSearch) -> None:
    """Write the search's record into the chosen twin's ``cait_meta`` (planner, objective, what it measured)."""
    c, meta = found.choice, found.twin.cait_meta
    meta.planner = {"planner": "measured", "objective": "training-free", "layout": c.layout,
                    "agreement": c.agreement, "kl": c.kl, "score_images": found.score_images,
                    "speedup": c.speedup, "tome_speedup": found.tome_speedup, "candidates": len(found.candidates),
                    "seconds": found.seconds["total"], "rule": found.rule}
    if not c.layout:
        meta.note = "CDCP only: merges cost accuracy before training here (measured planner); " + meta.note


@dataclass
class _Search:
    """The state :func:`search_layouts` walks through: images, shared Fisher scores, scored candidates, costs."""

    model: nn.Module
    reduction: float
    round_to: int
    min_channels: int
    batch_size: int
    say: Callable[[str], None]
    scored: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def draw(self, calibration, n_fit: int, n_proxy: int, n_score: int, seed: int) -> None:
        """One draw of unlabelled images, split into fit / proxy / scoring; the Fisher scores on the fit part."""
        images = calibration_images(calibration, n_fit + n_proxy + n_score, self.model, seed)
        self.fit, self.proxy, self.score = images[:n_fit], images[n_fit:n_fit + n_proxy], images[n_fit + n_proxy:]
        self.ref_proxy = log_probs(self.model, self.proxy, self.batch_size)
        self.ref_score = log_probs(self.model, self.score, self.batch_size)
        labels = log_probs(self.model, self.fit, self.batch_size).argmax(-1)      # the original's own predictions
        t0 = time.perf_counter()
        self.say("Fisher scores on the original (shared by every candidate)")
        self.fisher = fisher_scores(self.model, self.fit, labels, self.batch_size)
        self.target = split_budget(self.model, self.reduction, "").target_flops
        self.seconds["fisher"] = round(time.perf_counter() - t0, 1)

    def proxy_twin(self, layout: Layout) -> nn.Module:
        """The layout's twin with the shared Fisher scores, per FLOP of its own shape, and no refit."""
        twin = apply_atme(copy.deepcopy(self.model), layout)
        spec = describe(twin)
        return prune(twin, select_channels(per_flop(self.fisher, spec), spec, self.target, self.min_channels,
                                           self.round_to))

    def evaluate(self, layout: Layout) -> None:
        """Score one layout by its proxy twin's KL on the proxy images (once per layout)."""
        if str(layout) not in self.scored:
            twin = self.proxy_twin(layout)
            kl = _agreement(twin, self.ref_proxy, self.proxy, self.batch_size).kl
            self.scored[str(layout)] = Candidate(str(layout), round(atme_reduction(self.model, layout), 4),
                                                 analytic_flops(twin), round(kl, 5))

    def grow(self, max_merges: int, beam: int, bucket: float) -> None:
        """The beam search: from no merge, add one merge per level to the best ``beam`` layouts of each bucket."""
        t0 = time.perf_counter()
        level = [Layout()]
        self.evaluate(level[0])
        for k in range(1, max_merges + 1):
            grown = {str(l): l for base in level for l in candidate_layouts(self.model, self.reduction, base)}
            for i, layout in enumerate(grown.values()):
                self.evaluate(layout)
                self.say(f"proxy: {k} merge(s), layout {i + 1}/{len(grown)}")
            level = [Layout.parse(c.layout) for c in _per_bucket([self.scored[k] for k in grown], bucket, beam)]
            if not level:
                break
        self.seconds["proxy"] = round(time.perf_counter() - t0, 1)

    def include(self, layouts) -> list[Candidate]:
        """Score the layouts asked for by name (``include=``) and return their candidates."""
        for lay in layouts:
            self.evaluate(Layout.parse(lay))
        return [self.scored[str(Layout.parse(lay))] for lay in layouts]

    def time(self, timed: list[Candidate], device, rounds: int) -> float:
        """Time ``timed`` (their proxy twins: speed depends on shape only), the original and ToMe in alternation;
        fill each candidate's speed-up; return ToMe's."""
        t0 = time.perf_counter()
        self.say(f"speed: {len(timed)} candidates, the original and ToMe, {rounds} rounds")
        tome = apply_tome(copy.deepcopy(self.model), tome_schedule(self.model, self.reduction))
        models = {"original": self.model, "tome": tome,
                  **{c.layout: self.proxy_twin(Layout.parse(c.layout)) for c in timed}}
        speed = _speedups(models, self.batch_size, device, rounds)
        for c in timed:
            c.speedup, c.speedup_min, c.speedup_max = speed[c.layout]
        self.seconds["speed"] = round(time.perf_counter() - t0, 1)
        return speed["tome"][0]

    def calibrate(self, finalists: list[Candidate]) -> dict[str, nn.Module]:
        """The full calibration of each finalist, scored on images that neither fitted nor judged it."""
        t0, twins = time.perf_counter(), {}
        for c in finalists:
            self.say(f"calibrating {c.layout or 'CDCP only'}")
            twin = compress(self.model, self.reduction, layout=c.layout, round_to=self.round_to,
                            min_channels=self.min_channels, calibration=self.fit, calibration_size=len(self.fit),
                            batch_size=self.batch_size)
            a = _agreement(twin, self.ref_score, self.score, self.batch_size)
            c.agreement, c.kl, twins[c.layout] = round(a.agreement, 2), round(a.kl, 5), twin
        self.seconds["calibration"] = round(time.perf_counter() - t0, 1)
        return twins


def _per_bucket(cands: list[Candidate], width: float, k: int) -> list[Candidate]:
    """The ``k`` lowest-proxy-KL candidates of each bucket of ATME share ``width`` wide."""
    buckets: dict[int, list[Candidate]] = {}
    for c in cands:
        buckets.setdefault(int(c.atme_reduction / width + 1e-9), []).append(c)
    return [c for b in sorted(buckets) for c in sorted(buckets[b], key=lambda c: c.proxy_kl)[:k]]


def _speedups(models: dict, batch_size: int, device, rounds: int) -> dict[str, tuple[float, float, float]]:
    """name → (median, min, max) speed-up over the original, round by round in one alternating run."""
    speed = compare_throughput(models, batch_size=batch_size, device=device, warmup=1, iters=2, rounds=rounds)
    out = {}
    for name in models:
        s = speedup_spread(speed, name)
        out[name] = (round(s.median, 3), round(s.low, 3), round(s.high, 3))
    return out


def _agreement(twin: nn.Module, ref: torch.Tensor, images: torch.Tensor, batch_size: int) -> Agreement:
    """Agreement (%) and mean KL(original ‖ twin) in nats against the original's log-probabilities ``ref``."""
    out = log_probs(twin.eval(), images, batch_size)
    kl = float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="sum")) / len(images)
    return Agreement(100.0 * float((out.argmax(-1) == ref.argmax(-1)).float().mean()), kl, len(images))
