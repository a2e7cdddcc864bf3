"""Training a segmenter: :func:`segment` (``python -m cait.dense``), frozen backbone (a probe) or end to end.

The same shape as the fine-tune engine (:mod:`cait.finetune.engine`): one config dataclass, batches a pure function
of (seed, step) (:class:`cait.data.datasets.StepBatchSampler`), a resumable training state every
``ckpt_interval`` steps (:mod:`cait.finetune.rundir`, safetensors + JSON), typed log records
(:mod:`cait.dense.records`), ``torchrun`` for several processes, a progress bar on a terminal. The loss is
cross-entropy over pixels; AdamW with a cosine LR (the paper's ADE20K recipe uses AdamW, lr 6e-5, weight decay 0.01
end to end; a probe's decoder trains at a larger LR). At the end the segmenter is scored on the held-out split and
written to ``OUTPUT/segmenter`` (:func:`cait.dense.checkpoint.load_segmenter`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from ..data.datasets import StepBatchSampler
from ..data.segmentation import build_segmentation_sets
from ..finetune.config import FinetuneError, option, without_paths
from ..finetune.distributed import out_of_time, seed_step, setup_distributed
from ..finetune.records import StoppedRecord
from ..finetune.report import RunLog, check_report_to
from ..finetune.rundir import LOG_NAME, prepare_output, resume_state, save_state
from ..measure.segmentation import evaluate_segmentation
from ..models.deit import resize_input
from .backbones import load_backbone, make_backbone
from .checkpoint import save_segmenter, segmenter_flops
from .records import SegmentEvalRecord, SegmentStartRecord, SegmentTrainRecord
from .segmenter import DecoderConfig, Segmenter


@dataclass
class SegmentConfig:
    """Every option of a segmentation run; the command line has one flag per field."""

    backbone: str = option("bundled:original", "bundled:original, bundled:cait, a timm name, hf-hub:owner/name or a "
                           "checkpoint directory")
    baseline: str = option("none", "none, or a training-free baseline made from the (uncompressed) backbone: tome, "
                           "token_pruning, atme, cdcp")
    flops_reduction: float = option(0.5, "FLOPs reduction of the tome, token_pruning and cdcp baselines")
    merge: str | None = option(None, "the atme baseline's layout, e.g. h5,v10")
    calibration_size: int = option(256, "synthetic images the atme and cdcp baselines are calibrated on")
    data: str = option("synthetic", "'synthetic', a folder of train|val/images + masks, or hf:NAME[:CONFIG][@SPLIT] "
                      "(an image and a mask column; cait.data.segmentation)")
    img_size: int | None = option(None, "input side in pixels (default: the backbone's)")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(16, "global batch size")
    lr: float = option(1e-3, "peak LR of the pyramid, decoder and head")
    backbone_lr: float | None = option(None, "peak LR of the backbone: set it to train end to end (default: frozen, "
                                       "a probe)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    lr_warmup: float = option(0.05, "fraction of steps of linear LR warm-up")
    pyramid_channels: int = option(64, "FPN pyramid channels")
    segmentation_channels: int = option(32, "FPN segmentation channels (a multiple of 32: GroupNorm)")
    train_size: int = option(2000, "synthetic training images (one epoch)")
    val_size: int = option(500, "held-out images (synthetic, or the first rows of a Hub dataset's held-out split)")
    eval_interval: int = option(100, "evaluate every this many steps (and at the end)")
    log_interval: int = option(10, "log every this many steps")
    ckpt_interval: int = option(100, "write a training state every this many steps")
    seed: int = option(0, "seed of data order, flips and the decoder's initialisation")
    device: str | None = option(None, "cpu or cuda (default: cuda when available)")
    output: str = option("runs/segment", "run directory")
    resume: bool = option(False, "continue the run in --output from its newest training state")
    report_to: str = option("none", "also log every record to 'trackio' (local store, no Hub needed) or "
                            "'tensorboard' (<output>/tensorboard); 'none': log.jsonl only")
    stop_at: int | None = option(None, "stop after this step as if killed (for tests and time-boxed runs)")
    time_limit_s: float | None = option(None, "stop cleanly after this many seconds of training in this process: the "
                                        "training state is written and a 'stopped' record says why")

    IDENTITY = ("backbone", "baseline", "flops_reduction", "merge", "calibration_size", "data", "img_size", "steps",
                "batch_size", "lr", "backbone_lr", "weight_decay", "lr_warmup", "pyramid_channels",
                "segmentation_channels", "train_size", "val_size", "seed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def provenance(self) -> dict:
        """The fields as the segmenter this run made carries them: no server path
        (:func:`cait.finetune.config.without_paths`)."""
        return without_paths(self.to_dict())


@dataclass
class SegmentResult:
    """What :func:`segment` returns: the held-out score at ``step`` (None for a run stopped by ``stop_at``)."""

    step: int
    score: SegmentEvalRecord | None
    output: Path


def segment(cfg: SegmentConfig) -> SegmentResult:
    """Train a segmenter as ``cfg`` says (module docstring).

    Raises:
        FinetuneError: an option no run can start with, or a resume of a different configuration, or a NaN loss
            (earlier training states are left intact); :class:`cait.data.datasets.DataError` for bad data.
    """
    rank, world, device = setup_distributed(cfg.device)
    try:
        return _run(cfg, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _segmenter(cfg: SegmentConfig, model: nn.Module, num_classes: int, device: torch.device
               ) -> tuple[Segmenter, str]:
    """The backbone (its baseline made, if any) inside a fresh segmenter, and what the backbone is."""
    try:
        backbone, what = make_backbone(model, cfg.baseline, cfg.flops_reduction, cfg.merge, cfg.calibration_size)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    torch.manual_seed(cfg.seed)                                     # the same decoder for every backbone
    seg = Segmenter(backbone, num_classes, decoder=DecoderConfig(cfg.pyramid_channels, cfg.segmentation_channels),
                    frozen=cfg.backbone_lr is None)
    return seg.to(device), what


def _load(cfg: SegmentConfig) -> tuple[nn.Module, int]:
    """The backbone checkpoint, resized to ``img_size`` (position embedding resampled, merges moved), and its size."""
    try:
        model = load_backbone(cfg.backbone)
        size = cfg.img_size or int(model.patch_embed.img_size[0])
        resize_input(model, size)
    except ValueError as e:
        raise FinetuneError(f"--backbone {cfg.backbone}: {e}") from None
    return model, size


def _optimizer(cfg: SegmentConfig, seg: Segmenter) -> torch.optim.Optimizer:
    groups = [{"params": list(seg.decoder_modules().parameters()), "lr": cfg.lr}]
    if cfg.backbone_lr is not None:
        groups.append({"params": [p for p in seg.backbone.parameters() if p.requires_grad], "lr": cfg.backbone_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _check(cfg: SegmentConfig, world: int) -> Path:
    check_report_to(cfg.report_to)
    if cfg.steps < 1 or cfg.batch_size < world or cfg.batch_size % world:
        raise FinetuneError(f"--steps must be >= 1 and --batch-size a multiple of the {world} processes")
    if cfg.segmentation_channels % 32:
        raise FinetuneError(f"--segmentation-channels must be a multiple of 32 (GroupNorm), got "
                            f"{cfg.segmentation_channels}")
    return prepare_output(cfg.output, cfg.resume)


@dataclass
class _Run:
    """A segmentation run between steps: made by :func:`_build`, advanced by :func:`_run`."""

    cfg: SegmentConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    seg: Segmenter
    model: nn.Module                        # the segmenter, inside DDP with several processes
    opt: torch.optim.Optimizer
    sched: CosineLRScheduler
    loader: torch.utils.data.DataLoader
    val_set: object
    classes: list[str]
    start: int
    what: str                               # what the backbone is (for the checkpoint)
    log: object | None

    def emit(self, record) -> None:
        if self.log:
            self.log.write(record)

    def evaluate(self, step: int) -> SegmentEvalRecord:
        s = evaluate_segmentation(self.seg, self.val_set, len(self.classes), self.device)
        record = SegmentEvalRecord(step=step, miou=s.miou, per_class_iou=s.per_class_iou,
                                   pixel_accuracy=s.pixel_accuracy)
        self.emit(record)
        return record

    def save(self, step: int) -> None:
        if self.rank == 0:
            save_state(self.out, step, self.seg, self.opt, None, {"config": self.cfg.to_dict()})


def _build(cfg: SegmentConfig, rank: int, world: int, device: torch.device) -> _Run:
    """Check, load the backbone, make data, segmenter, optimizer and loader, resume; rank 0 logs a new run's start."""
    out = _check(cfg, world)
    model, size = _load(cfg)
    train_set, val_set, classes = build_segmentation_sets(cfg.data, size, cfg.seed, cfg.train_size, cfg.val_size)
    seg, what = _segmenter(cfg, model, len(classes), device)
    opt = _optimizer(cfg, seg)
    start = int(resume_state(out, seg, opt, cfg)["step"]) if cfg.resume else 0
    sched = CosineLRScheduler(opt, t_initial=cfg.steps, lr_min=cfg.lr * 1e-2, warmup_t=int(cfg.lr_warmup * cfg.steps),
                              warmup_lr_init=cfg.lr * 1e-2, t_in_epochs=False)
    sched.step_update(start)
    wrapped = seg if world == 1 else nn.parallel.DistributedDataParallel(
        seg, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=seg.frozen)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=StepBatchSampler(
        len(train_set), cfg.batch_size // world, cfg.steps, start, rank, world, cfg.seed))
    run = _Run(cfg, rank, world, device, out, seg, wrapped, opt, sched, loader, val_set, classes, start, what,
               RunLog(out / LOG_NAME, cfg.report_to) if rank == 0 else None)
    if rank == 0 and not cfg.resume:
        backbone_flops, total_flops = segmenter_flops(seg, size)
        run.emit(SegmentStartRecord(config=cfg.to_dict(), backbone=what, classes=classes, img_size=size,
                                    backbone_flops=backbone_flops, segmenter_flops=total_flops,
                                    trainable_params=sum(p.numel() for p in seg.parameters() if p.requires_grad),
                                    world_size=world, device=str(device)))
    return run


def _run(cfg: SegmentConfig, rank: int, world: int, device: torch.device) -> SegmentResult:
    run = _build(cfg, rank, world, device)
    bar = tqdm(total=cfg.steps, initial=run.start, desc="cait.dense", dynamic_ncols=True) \
        if rank == 0 and sys.stderr.isatty() else None
    t_last, seen = time.perf_counter(), 0
    t0 = t_last
    for step, (x, y) in enumerate(run.loader, start=run.start):
        run.model.train()
        seed_step(cfg.seed, step * world + rank)
        loss = F.cross_entropy(run.model(x.to(device)), y.to(device))
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FinetuneError(f"loss became {loss_value} at step {step}; earlier training states in {run.out} "
                                "are intact")
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.sched.step_update(step + 1)
        done, seen = step + 1, seen + x.shape[0] * world
        if rank == 0 and (done % cfg.log_interval == 0 or done == cfg.steps):
            now = time.perf_counter()
            run.emit(SegmentTrainRecord(step=done, loss=loss_value, lr=run.opt.param_groups[0]["lr"],
                                        images_per_s=seen / (now - t_last)))
            t_last, seen = now, 0
        if done % cfg.eval_interval == 0 and done < cfg.steps and rank == 0:
            run.evaluate(done)
        if done % cfg.ckpt_interval == 0 and done < cfg.steps:
            run.save(done)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        late = done < cfg.steps and out_of_time(t0, cfg.time_limit_s, world, device)
        if late or (cfg.stop_at is not None and done >= cfg.stop_at):
            run.save(done)
            run.emit(StoppedRecord(step=done, reason="time_limit" if late else "stop_at"))     # rank 0 logs
            if run.log:
                run.log.close()
            if bar:
                bar.close()
            return SegmentResult(done, None, run.out)
    if bar:
        bar.close()
    run.save(cfg.steps)
    final = run.evaluate(cfg.steps) if rank == 0 else None
    if rank == 0:
        save_segmenter(run.seg, run.out / "segmenter", classes=run.classes, what=run.what, config=cfg.provenance(),
                       score=final)
        run.log.close()
    return SegmentResult(cfg.steps, final, run.out)
