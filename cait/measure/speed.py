"""Throughput and latency: images/s of models timed in alternation on one input (paper §IV, docs/method.md: FLOPs).

Convention: one device, a fixed batch, images per second; speed-ups are ratios against the uncompressed model
measured the same way in the same run. Models are timed in alternation (original, compressed, original, …) so
drift in clock speed or load hits both alike; the reported figure is the median. The command line comparing a DeiT
with its twin is ``python -m cait.bench`` (:mod:`cait.cli.bench`).
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn


def resolve_device(device: str | None = None) -> torch.device:
    """``"cuda"``/``"cpu"``/None (CUDA when available) → a ``torch.device``.

    Raises:
        ValueError: if CUDA is asked for but not available.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for, but torch sees no GPU here; use --device cpu")
    return dev


def _time_batches(model: nn.Module, x: torch.Tensor, iters: int, amp_dtype: torch.dtype | None) -> list[float]:
    """Seconds per batch for ``iters`` batches (CUDA events on GPU, wall clock on CPU)."""
    cuda = x.device.type == "cuda"
    out = []
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                model(x)
                out.append(time.perf_counter() - t0)
    return out


def compare_throughput(models: dict[str, nn.Module], batch_size: int = 32, device: str | torch.device | None = None,
                       warmup: int = 2, iters: int = 5, rounds: int = 3, img_size: int | None = None,
                       amp_dtype: torch.dtype | None = None, progress=None, budget_s: float | None = None
                       ) -> dict[str, dict]:
    """Measure several models in alternation on the same input.

    Args:
        models: name → model (moved to ``device``, put in eval mode).
        batch_size: images per batch.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        warmup: untimed batches per model before timing.
        iters: timed batches per model per round.
        rounds: alternation rounds.
        img_size: input side in pixels; default: the first model's.
        amp_dtype: e.g. ``torch.bfloat16`` for autocast; None for the model's own dtype.
        progress: called as ``progress(fraction_done, message)`` after every warm-up and timed run (a UI bar).
        budget_s: no round is started that would end (at the previous round's pace) more than this many seconds
            after the first warm-up; at least one round is always timed. None: all ``rounds``.

    Returns:
        name → ``{"images_per_s", "latency_s" (median seconds per batch), "batch_size", "device", "timed_batches",
        "round_images_per_s"}``, the last one images/s of each round (its median batch), from which
        :func:`speedup_spread` gives a speed-up with its spread.
    """
    dev = resolve_device(device if device is None else str(device))
    size = img_size or next(iter(models.values())).patch_embed.img_size[0]
    x = torch.randn(batch_size, 3, size, size, device=dev)
    total, done = len(models) * (1 + rounds), 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done / total, what)

    t0 = time.perf_counter()
    for name, m in models.items():
        m.to(dev).eval()
        _time_batches(m, x, warmup, amp_dtype)
        tick(f"warm-up: {name}")
    times: dict[str, list[list[float]]] = {k: [] for k in models}            # name → per round, seconds per batch
    last = 0.0                                                                # how long the previous round took
    for r in range(rounds):
        if r and budget_s is not None and time.perf_counter() - t0 + last > budget_s:
            break                                     # a round that would end past the budget is not started
        r0 = time.perf_counter()
        for name, m in models.items():
            times[name].append(_time_batches(m, x, iters, amp_dtype))
            tick(f"round {r + 1}/{rounds}: {name}")
        last = time.perf_counter() - r0
    result = {}
    for name, per_round in times.items():
        med = statistics.median(t for ts in per_round for t in ts)
        result[name] = {"images_per_s": batch_size / med, "latency_s": med, "batch_size": batch_size,
                        "device": str(dev), "timed_batches": sum(map(len, per_round)),
                        "round_images_per_s": [batch_size / statistics.median(ts) for ts in per_round]}
    return result


@dataclass(frozen=True)
class Spread:
    """A measured figure with its spread: the median over ``n`` rounds and the lowest and highest round.

    >>> str(Spread(1.72, 1.67, 1.91, 3))
    '1.72 (1.67–1.91)'
    >>> str(Spread(2.0, 2.0, 2.0, 1))
    '2.00 (1 round)'
    """
    median: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return self.format()

    def format(self, digits: int = 2) -> str:
        """``"median (low–high)"`` with ``digits`` decimals, or ``"median (1 round)"`` when nothing spreads."""
        if self.n < 2:
            return f"{self.median:.{digits}f} (1 round)"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.n}

    @classmethod
    def parse(cls, text: str) -> "Spread":
        """Read back what :meth:`format` wrote (e.g. a cell of the app's tables); ``n`` is 1 or, when a range is
        shown, 2 (at least).

        Raises:
            ValueError: for text that is not ``"median (low–high)"`` or ``"median (1 round)"``.

        >>> Spread.parse("1.72 (1.67–1.91)")
        Spread(median=1.72, low=1.67, high=1.91, n=2)
        """
        m = re.fullmatch(r"\s*([-\d.]+) \((?:([-\d.]+)–([-\d.]+)|1 round)\)\s*", str(text))
        if m is None:
            raise ValueError(f"not a measured figure with its spread: {text!r}")
        med = float(m.group(1))
        if m.group(2) is None:
            return cls(med, med, med, 1)
        return cls(med, float(m.group(2)), float(m.group(3)), 2)


def spread(values: list[float]) -> Spread:
    """Median, min and max of per-round values (e.g. images/s of each round).

    Raises:
        ValueError: for no values.
    """
    if not values:
        raise ValueError("spread: no rounds were timed")
    return Spread(statistics.median(values), min(values), max(values), len(values))


def speedup_spread(speed: dict[str, dict], name: str, ref: str = "original", inverse: bool = False) -> Spread:
    """Speed-up of ``name`` over ``ref`` from one :func:`compare_throughput` result: the ratio of their images/s in
    each round (both timed in the same alternation), then its median and range over the rounds.

    Args:
        speed: a :func:`compare_throughput` result holding both names.
        name, ref: the model and the reference.
        inverse: ``ref/name`` instead (e.g. a latency ratio from per-round latencies).

    Raises:
        KeyError: if either name was not timed.

    >>> speed = {"original": {"round_images_per_s": [10.0, 11.0, 9.0]},
    ...          "twin": {"round_images_per_s": [20.0, 20.0, 19.8]}}
    >>> str(speedup_spread(speed, "twin"))
    '2.00 (1.82–2.20)'
    """
    ratios = [b / a for a, b in zip(speed[ref]["round_images_per_s"], speed[name]["round_images_per_s"])]
    return spread([1 / r for r in ratios] if inverse else ratios)


def measure_throughput(model: nn.Module, batch_size: int = 32, device: str | torch.device | None = None,
                       warmup: int = 2, iters: int = 10, img_size: int | None = None,
                       amp_dtype: torch.dtype | None = None) -> dict:
    """Images/s of one model: ``{"images_per_s", "latency_s", "batch_size", "device"}`` (see compare_throughput)."""
    return compare_throughput({"model": model}, batch_size, device, warmup, iters, 1, img_size, amp_dtype)["model"]


@dataclass(frozen=True)
class TimingCost:
    """What :func:`throughput_and_latency` costs at the least (its warm-ups and one round) for some models, predicted
    from one timed batch per model: ``per_image`` seconds of every model together, per image of a batch, and
    ``fixed`` seconds that do not grow with the batch (the batch-1 part).

    >>> cost = TimingCost(per_image=0.1, fixed=2.0, iters=1)
    >>> round(cost.seconds(32), 1), cost.largest_batch(10.0)
    (8.4, 40)
    """
    per_image: float
    fixed: float
    iters: int = 1
    partial: bool = False          # probing stopped early (past a budget): the prediction is a lower bound

    def seconds(self, batch_size: int) -> float:
        """Predicted seconds at ``batch_size`` (``1 + iters`` batches per model, then the batch-1 part)."""
        return (1 + self.iters) * batch_size * self.per_image + self.fixed

    def largest_batch(self, budget_s: float) -> int:
        """The largest batch size whose prediction fits ``budget_s`` (0 when none does)."""
        room = budget_s - self.fixed
        return max(0, int(room / ((1 + self.iters) * self.per_image) + 1e-9)) if room > 0 else 0


def least_timing(models: dict[str, nn.Module], batch_size: int, device: str | torch.device | None = None,
                 iters: int = 1, img_size: int | None = None, probe: int = 4, budget_s: float | None = None
                 ) -> TimingCost:
    """Predict what :func:`throughput_and_latency` needs at the least for these models at ``batch_size``, from one
    timed batch of ``min(batch_size, probe)`` images per model (after an untimed image), scaled linearly to the
    batch (per-image time falls as the batch grows, so it errs long) and, for the batch-1 part, taken whole (one
    image costs at most that batch). Lets a caller with a time budget refuse a combination up front.

    Args:
        models, device, img_size: as :func:`compare_throughput`.
        batch_size, iters: as :func:`throughput_and_latency`.
        probe: images in the timed batch.
        budget_s: stop probing once the prediction of the models probed so far passes it (then ``partial``, and
            the prediction is a lower bound): a slow precision is refused without probing every model.
    """
    dev = resolve_device(device if device is None else str(device))
    size = img_size or next(iter(models.values())).patch_embed.img_size[0]
    b0 = max(1, min(batch_size, probe))
    x1, xb = torch.randn(1, 3, size, size, device=dev), torch.randn(b0, 3, size, size, device=dev)
    per_image = fixed = 0.0
    for m in models.values():
        m.to(dev).eval()
        _time_batches(m, x1, 1, None)                                  # untimed: first-call costs
        t = _time_batches(m, xb, 1, None)[0]
        per_image += t / b0
        fixed += t * (2 + 2 * iters)                                   # batch 1: 2 warm-ups + 2·iters timed
        so_far = TimingCost(per_image, fixed, iters, partial=m is not list(models.values())[-1])
        if budget_s is not None and so_far.seconds(batch_size) > budget_s:
            return so_far
    return TimingCost(per_image, fixed, iters)


def throughput_and_latency(models: dict[str, nn.Module], batch_size: int, device: str | torch.device | None = None,
                           iters: int = 3, rounds: int = 2, img_size: int | None = None, progress=None,
                           budget_s: float | None = None) -> dict[str, dict]:
    """Images/s at ``batch_size`` and latency at batch 1 of each model, each measured in alternation on one input
    (:func:`compare_throughput`; batch 1 gets twice the timed passes, one image being quick and noisy).

    Args:
        models, device, img_size: as :func:`compare_throughput`.
        batch_size: images per batch of the throughput measurement.
        iters, rounds: timed batches per model per round, and rounds.
        progress: called as ``progress(fraction_done, message)`` over both measurements.
        budget_s: seconds for both measurements (two thirds for the batch, one third for batch 1), past which no
            new round starts (:func:`compare_throughput`); None: all rounds.

    Returns:
        name → ``{"images_per_s", "latency_ms" (batch 1, median), "batch_size", "device", "timed_batches",
        "rounds", "images_per_s_spread", "latency_ms_spread", "speedup", "latency_speedup"}``: the last four are
        :class:`Spread` over the rounds, the speed-ups against the first model (ratios taken round by round).
    """
    def part(start: float):                                # the two measurements share the progress bar
        return None if progress is None else (lambda f, what: progress(start + f / 2, what))

    share = (None, None) if budget_s is None else (2 * budget_s / 3, budget_s / 3)
    batch = compare_throughput(models, batch_size, device, warmup=1, iters=iters, rounds=rounds, img_size=img_size,
                               progress=part(0.0), budget_s=share[0])
    single = compare_throughput(models, 1, device, warmup=2, iters=2 * iters, rounds=rounds, img_size=img_size,
                                progress=part(0.5), budget_s=share[1])
    ref = next(iter(models))
    return {k: {"images_per_s": batch[k]["images_per_s"], "latency_ms": 1e3 * single[k]["latency_s"],
                "batch_size": batch_size, "device": batch[k]["device"], "timed_batches": batch[k]["timed_batches"],
                "rounds": len(batch[k]["round_images_per_s"]),
                "images_per_s_spread": spread(batch[k]["round_images_per_s"]),
                "latency_ms_spread": spread([1e3 / v for v in single[k]["round_images_per_s"]]),
                "speedup": speedup_spread(batch, k, ref), "latency_speedup": speedup_spread(single, k, ref)}
            for k in models}
