"""CDCP fine-tuning with hard distillation: ``python -m cait.finetune`` or :func:`finetune` (SPEC §2, §3).

One process or many (``torchrun --nproc_per_node=N -m cait.finetune ...``: DDP, NCCL on GPU, Gloo on CPU).

The run: build the student (ATME layout from the budget split, identity compactors) from an uncompressed teacher;
train with AdamW (compactors in their own group: β₁ 0.99, no weight decay), cosine LR, Mixup/CutMix with
soft-target cross-entropy, and hard distillation from the teacher; after every backward rewrite the compactor
gradients by Eq. 2, taking the masked rows' group-lasso step in proximal form after the optimizer step
(:mod:`cait.lasso`); rebuild S every ``mask_interval`` steps after the warm-up from the compactor row norms with both
consistencies while the FLOPs target ramps, then holds. At the end zero S's rows, prune and fold, and write a
compact checkpoint that :func:`cait.load_pretrained` (and the app) loads.

Files in ``--output``: ``log.jsonl`` (one JSON object per logging step / evaluation / end), ``train_state-*.json``
+ ``.safetensors`` (atomic, last two kept; ``--resume`` continues from the newest), ``compact/`` (the result).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .lasso import (FlopsSchedule, apply_gradient_rule, max_masked_row_norm, reset_optimizer_rows_,
                   shrink_masked_rows_, zero_masked_rows_)
from .checkpoint import CheckpointError, load_pretrained, read_config, save_pretrained
from .compactor import add_compactors, iter_compactors
from .data import StepBatchSampler, build_datasets
from .flops import ModelSpec, describe
from .merge import apply_atme, format_layout, get_layout
from .meta import FinetuneSummary, ModelMeta
from .models import architecture, create_model, update_cfg
from .plan import BudgetSplit, split_budget
from .prune import fold_compactors, is_pruned, prune
from .rundir import LOG_NAME, RunDirError, read_state, restore_state, save_state, state_files
from .select import ChannelMask, compactor_scores, select_channels
from .token_labels import TokenLabelled, drop_token_head, token_label_loss, token_targets


class FinetuneError(RuntimeError):
    """A run that cannot start or continue; earlier checkpoints are left intact."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FinetuneConfig:
    """Every option of a run; the command line has one flag per field (``--flops-reduction`` for flops_reduction)."""

    model: str = _f("deit_tiny_patch16_224", "timm DeiT name, or a checkpoint directory of an uncompressed model")
    pretrained: bool = _f(False, "start from timm's ImageNet weights when the Hub is reachable")
    data: str = _f("synthetic", "'synthetic' or an ImageFolder root with train/ and val/")
    flops_reduction: float = _f(0.5, "total FLOPs reduction R (ATME planned first, CDCP the rest)")
    merge: str | None = _f(None, "explicit ATME layout, e.g. h4,v7 (default: planned from R)")
    atme_share: float = _f(0.8, "share of R planned for ATME when --merge is not given")
    steps: int = _f(300, "optimizer steps")
    batch_size: int = _f(64, "global batch size (split across processes)")
    img_size: int | None = _f(None, "input side in pixels (default: the model's; a checkpoint trained at another size "
                                         "has its position embedding resampled)")
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)")
    output: str = _f("runs/finetune", "run directory")
    resume: bool = _f(False, "continue the run in --output from its newest training state")
    lr: float = _f(1e-4, "peak learning rate (paper: 1e-4 at batch 256)")
    min_lr: float = _f(1e-6, "final learning rate of the cosine decay")
    lr_warmup: float = _f(0.05, "fraction of steps of linear LR warm-up")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on compactors, biases, norms, tokens)")
    compactor_beta1: float = _f(0.99, "AdamW beta1 of the compactor group (0.9 elsewhere)")
    compactor_lr: float | None = _f(None, "peak LR of the compactors, on the model's cosine schedule (default: lr)")
    mask_shrink: float | None = _f(None, "norm taken off each masked compactor row per step by the proximal "
                                         "group-lasso step (default: 2 / hold steps, so a unit row reaches 0 halfway "
                                         "through the hold; 0: Eq. 2's lasso gradient inside AdamW instead)")
    label_smoothing: float = _f(0.1, "label smoothing")
    mixup: float = _f(0.8, "Mixup alpha (0 disables)")
    cutmix: float = _f(1.0, "CutMix alpha (0 disables)")
    distill_alpha: float | None = _f(None, "weight of hard distillation (default: 0.1 for Tiny, 0.25 otherwise)")
    token_labels: float = _f(0.0, "weight of token labelling: each patch token also predicts its patch's label "
                                  "(object class by covered share, else background) through a training-only head "
                                  "(LV-ViT; cait.token_labels); needs --data synthetic and no Mixup/CutMix")
    lasso: float = _f(1e-5, "group-lasso strength lambda of Eq. 2")
    mask_interval: int = _f(10, "rebuild the masked set S every this many steps")
    cdcp_warmup: float = _f(0.1, "fraction of steps before S is first built")
    cdcp_ramp: float = _f(0.4, "fraction of steps over which the FLOPs target ramps to its final value")
    min_channels: int = _f(1, "channels kept at least per head and per FFN")
    round_to: int = _f(1, "kept widths in multiples of this (8 suits tensor cores and CPU vector units)")
    eval_interval: int = _f(100, "evaluate every this many steps (and at the end)")
    val_size: int = _f(512, "validation images of the synthetic set")
    synthetic_size: int = _f(20000, "training images of the synthetic set (one epoch)")
    log_interval: int = _f(10, "log every this many steps")
    ckpt_interval: int = _f(100, "write a training state every this many steps")
    workers: int = _f(0, "data-loader worker processes per rank")
    seed: int = _f(0, "seed of data order, augmentation and selection ties")
    amp: bool = _f(True, "bfloat16 autocast on CUDA")
    stop_at: int | None = _f(None, "stop after this step as if killed (for tests and time-boxed runs)")

    # Fields that define a run: a resume must match them.
    IDENTITY = ("model", "pretrained", "data", "flops_reduction", "merge", "atme_share", "steps", "batch_size",
                "img_size", "lr", "min_lr", "lr_warmup", "weight_decay", "compactor_beta1", "compactor_lr",
                "mask_shrink", "label_smoothing", "mixup", "cutmix", "distill_alpha", "token_labels", "lasso",
                "mask_interval", "cdcp_warmup", "cdcp_ramp", "min_channels", "round_to", "val_size", "synthetic_size",
                "seed")

    def to_dict(self) -> dict:
        """All fields, JSON-ready."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------------------
# Process group
# ------------------------------------------------------------------------------------------------------------------
def _setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda and not torch.cuda.is_available():
        raise FinetuneError("CUDA was asked for, but torch sees no GPU here; use --device cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------------------------
# Models, optimizer, loss
# ------------------------------------------------------------------------------------------------------------------
def _teacher(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, bool, str]:
    """The uncompressed model; returns (model, whether it can teach these classes, where it came from)."""
    if Path(cfg.model).is_dir():
        try:
            model = load_pretrained(cfg.model)
        except CheckpointError as e:
            raise FinetuneError(str(e)) from None
        if get_layout(model) or is_pruned(model):
            raise FinetuneError(f"{cfg.model}: fine-tuning starts from an uncompressed model; this checkpoint is "
                                "already merged or pruned")
        if model.num_classes != num_classes:
            raise FinetuneError(f"{cfg.model}: the checkpoint has {model.num_classes} classes, the data "
                                f"{cfg.data!r} has {num_classes}")
        trained_at = int(model.patch_embed.img_size[0])
        if cfg.img_size and cfg.img_size != trained_at:
            # Progressive resizing (FixRes-style): timm resamples the position embedding to the new grid.
            if cfg.img_size % model.patch_embed.patch_size[0]:
                raise FinetuneError(f"--img-size {cfg.img_size} is not a multiple of the patch size "
                                    f"{model.patch_embed.patch_size[0]}")
            model.set_input_size(img_size=(cfg.img_size, cfg.img_size))
            update_cfg(model, input_size=(3, cfg.img_size, cfg.img_size))
            return model, True, f"checkpoint {cfg.model} (trained at {trained_at} px, resized to {cfg.img_size} px)"
        return model, True, f"checkpoint {cfg.model}"
    kwargs = {"img_size": cfg.img_size} if cfg.img_size else {}
    try:
        model, info = create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    teaches = info.trained and model.num_classes == num_classes
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)
        update_cfg(model, num_classes=num_classes)
    return model, teaches, info.detail


def _param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    compactor_ids = {id(p) for _, p in iter_compactors(model)}
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    compactors, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in compactor_ids:
            compactors.append(p)
        elif p.ndim <= 1 or name in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": compactors, "weight_decay": 0.0, "betas": (cfg.compactor_beta1, 0.999),    # SPEC §2
         "lr": cfg.lr if cfg.compactor_lr is None else cfg.compactor_lr},
    ]


def shrink_per_step(cfg: FinetuneConfig, schedule: FlopsSchedule) -> float:
    """Norm removed from each masked compactor row per step (choice, see :mod:`cait.lasso`): ``--mask-shrink``, or
    2 / hold steps, so that a unit-norm row entering S when the hold starts is exactly 0 halfway through the hold and
    the model trains without it for the rest of the run."""
    if cfg.mask_shrink is not None:
        return cfg.mask_shrink
    return 2.0 / max(1, cfg.steps - schedule.hold_step)


def _seed_step(seed: int, step: int) -> None:
    """Seed every RNG from (seed, step): augmentation is then the same whether or not the run was resumed."""
    s = (seed * 1_000_003 + step) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device: torch.device, batch_size: int = 64, rank: int = 0, world: int = 1
             ) -> float:
    """Top-1 (%) on a dataset, sharded across ranks and summed."""
    model.eval()
    correct = total = 0
    idx = list(range(rank, len(dataset), world))
    for i in range(0, len(idx), batch_size):
        xs, ys = zip(*(dataset[j] for j in idx[i:i + batch_size]))
        out = model(torch.stack(xs).to(device))
        correct += int((out.argmax(-1).cpu() == torch.tensor(ys)).sum())
        total += len(ys)
    if world > 1:
        t = torch.tensor([correct, total], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        correct, total = int(t[0]), int(t[1])
    return 100.0 * correct / max(total, 1)


def _resume(out: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: FinetuneConfig) -> dict:
    """Restore the newest training state of ``out`` after checking it was written by the same configuration."""
    try:
        meta, tensors = read_state(out)
    except RunDirError as e:
        raise FinetuneError(f"--resume given, but {e}") from None
    before = meta.get("config", {})
    defaults = FinetuneConfig().to_dict()                  # a field newer than the state: its default then
    diff = [k for k in FinetuneConfig.IDENTITY if before.get(k, defaults[k]) != getattr(cfg, k)]
    if diff:
        raise FinetuneError(f"{out}: cannot resume a different configuration; changed: "
                            + ", ".join(f"{k} ({before.get(k)!r} → {getattr(cfg, k)!r})" for k in diff))
    restore_state(model, opt, meta, tensors)
    return meta


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig) -> dict:
    """Run CDCP fine-tuning; returns the final summary (also the last line of ``log.jsonl``).

    Raises:
        FinetuneError: bad data (:class:`cait.data.DataError` is re-raised as is), a class mismatch with a
            checkpoint, an unreachable FLOPs target, a resume of a different configuration, or a NaN loss. Earlier
            training states are left intact.
    """
    rank, world, device = _setup_distributed(cfg.device)
    try:
        return _run(cfg, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What a CDCP run holds between steps: made by :func:`_build`, advanced by :func:`_step`, ended by
    :func:`_export`. ``student`` is the merged DeiT (with compactors when ``cdcp``); ``model`` is what the loop calls
    (the student, inside :class:`TokenLabelled` and/or DDP)."""

    cfg: FinetuneConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    train_set: Any
    val_set: Any
    classes: list[str]
    teacher: nn.Module
    teaches: bool                                          # False: a random teacher, no distillation, no top-1
    source: str
    split: BudgetSplit
    spec: ModelSpec                                        # the merged student's widths before pruning
    cdcp: bool                                             # False: no channel budget, no compactors
    student: nn.Module
    model: nn.Module
    schedule: FlopsSchedule
    shrink: float
    alpha: float
    opt: torch.optim.Optimizer
    sched: Any
    mixup: Any
    criterion: nn.Module
    loader: Any
    log: IO | None
    start: int = 0
    mask: ChannelMask | None = None
    entered: int = 0
    history: dict = field(default_factory=dict)
    top1_teacher: float | None = None

    def emit(self, rec: dict) -> None:
        """Append one record to ``log.jsonl`` (rank 0 only)."""
        if self.log:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()

    def save(self, step: int) -> None:
        """Write a resumable training state (rank 0 only)."""
        if self.rank == 0:
            save_state(self.out, step, self.student, self.opt, self.mask,
                       {"config": self.cfg.to_dict(), "history": self.history})

    def top1(self, model: nn.Module) -> float:
        """Held-out top-1 (%) of ``model``, shared over the ranks."""
        return evaluate(model, self.val_set, self.device, rank=self.rank, world=self.world)

    def evaluate_teacher_once(self) -> None:
        """The frozen teacher's top-1, measured once; a random teacher's never."""
        if self.top1_teacher is None and self.teaches:
            self.top1_teacher = self.top1(self.teacher)


def _run(cfg: FinetuneConfig, rank: int, world: int, device: torch.device) -> dict:
    run = _build(cfg, rank, world, device)
    bar = None
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=run.start, desc="cait.finetune", dynamic_ncols=True)
    t_last, seen = time.perf_counter(), 0
    for step, batch in enumerate(run.loader, start=run.start):
        loss_value = _step(run, step, batch)
        seen += batch[0].shape[0] * world
        done = step + 1
        if rank == 0 and (done % cfg.log_interval == 0 or done == cfg.steps):
            now = time.perf_counter()
            run.emit({"type": "train", "step": done, "epoch": done * cfg.batch_size / len(run.train_set),
                      "loss": loss_value, "lr": run.opt.param_groups[0]["lr"],
                      "flops_target": run.schedule.target(step), "s_size": 0 if run.mask is None else run.mask.size(),
                      "s_entered": run.entered,
                      "max_masked_norm": max_masked_row_norm(run.student, run.mask) if run.cdcp else 0.0,
                      "images_per_s": seen / (now - t_last)})
            t_last, seen = now, 0
        if done % cfg.eval_interval == 0 and done < cfg.steps:
            top1 = run.top1(run.student)
            run.evaluate_teacher_once()
            run.history[str(done)] = top1
            run.emit({"type": "eval", "step": done, "top1_student": top1, "top1_teacher": run.top1_teacher})
        if done % cfg.ckpt_interval == 0 and done < cfg.steps:
            run.save(done)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", S=0 if run.mask is None else run.mask.size())
        if cfg.stop_at is not None and done >= cfg.stop_at:
            run.save(done)
            run.emit({"type": "stopped", "step": done})
            if bar:
                bar.close()
            return {"type": "stopped", "step": done, "mask": None if run.mask is None else run.mask.to_dict()}
    if bar:
        bar.close()
    return _export(run)


def _check_output(cfg: FinetuneConfig) -> Path:
    """``--output`` exists and is writable, and holds no earlier run unless resuming (rank 0)."""
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise FinetuneError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    if not cfg.resume and state_files(out):
        raise FinetuneError(f"{out}: holds an earlier run; pass --resume to continue it or choose a new --output")
    return out


def _build(cfg: FinetuneConfig, rank: int, world: int, device: torch.device) -> _Run:
    """Check the configuration, then make data, teacher, student (ATME + compactors), optimizer and loader, and
    restore the newest state when resuming. Rank 0 saves the teacher and logs the start of a new run."""
    if cfg.batch_size % world or (cfg.batch_size // world) % 2:
        raise FinetuneError(f"--batch-size {cfg.batch_size} must split into an even batch per process "
                            f"({world} processes; Mixup/CutMix pair images)")
    out = _check_output(cfg) if rank == 0 else Path(cfg.output)
    if cfg.token_labels < 0:
        raise FinetuneError(f"--token-labels must be >= 0, got {cfg.token_labels}")
    if cfg.token_labels > 0 and (cfg.data != "synthetic" or cfg.mixup > 0 or cfg.cutmix > 0):
        raise FinetuneError("--token-labels needs object masks (--data synthetic) and no Mixup/CutMix "
                            "(--mixup 0 --cutmix 0)")

    # Data first: the teacher's head must match its classes.
    train_set, val_set, classes = build_datasets(cfg.data, cfg.img_size or _default_img_size(cfg), cfg.seed,
                                                 cfg.synthetic_size, cfg.val_size)
    if cfg.token_labels > 0:
        train_set.masks = True                            # batches carry the object masks
    torch.manual_seed(cfg.seed)                           # the same student initialisation on every rank
    teacher, teaches, source = _teacher(cfg, len(classes))
    try:
        split = split_budget(teacher, cfg.flops_reduction, cfg.merge, cfg.atme_share)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    student = apply_atme(copy.deepcopy(teacher), split.layout)
    # No channel budget (R = 0, e.g. training a teacher, or a layout that alone meets R): no CDCP at all. Identity
    # compactors would only cost time (2x per step on CPU for DeiT-Tiny, benchmarks/finetune_step.py).
    spec = describe(student)                              # the same with compactors: they fold away
    cdcp = split.target_flops < spec.flops()
    student = (add_compactors(student) if cdcp else student).to(device)
    trainee = TokenLabelled(student, len(classes)) if cfg.token_labels > 0 else student
    teacher = teacher.to(device).eval().requires_grad_(False)
    schedule = FlopsSchedule(cfg.steps, spec.flops(), split.target_flops, cfg.cdcp_warmup, cfg.cdcp_ramp,
                             cfg.mask_interval)
    shrink = shrink_per_step(cfg, schedule)
    if shrink < 0:
        raise FinetuneError(f"--mask-shrink must be >= 0, got {shrink}")
    try:                                                  # fail now, not after hours, if the target is out of reach
        if cdcp:
            select_channels(compactor_scores(student), spec, split.target_flops, cfg.min_channels, cfg.round_to)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    # SPEC §3: α = 0.1 for DeiT-Tiny, 0.25 for Small/Base, read from the teacher's architecture (not its path).
    default_alpha = 0.1 if architecture(teacher) == "deit_tiny_patch16_224" else 0.25
    alpha = (cfg.distill_alpha if cfg.distill_alpha is not None else default_alpha) if teaches else 0.0

    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    opt = create_optimizer_v2(_param_groups(student, cfg), opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = CosineLRScheduler(opt, t_initial=cfg.steps, lr_min=cfg.min_lr,
                              warmup_t=int(cfg.lr_warmup * cfg.steps), warmup_lr_init=cfg.min_lr, t_in_epochs=False)
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                   num_classes=len(classes)) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.label_smoothing)

    start, mask, history = 0, None, {}
    if cfg.resume:                                         # every rank: each holds its own optimizer state
        meta = _resume(out, student, opt, cfg)
        start = meta["step"]
        mask = None if meta["mask"] is None else ChannelMask.from_dict(meta["mask"])
        history = meta.get("history", {})
    if world > 1:
        for t in student.state_dict().values():
            dist.broadcast(t, src=0)
        model = nn.parallel.DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    else:
        model = trainee
    sampler = StepBatchSampler(len(train_set), cfg.batch_size // world, cfg.steps, start, rank, world, cfg.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    run = _Run(cfg, rank, world, device, out, train_set, val_set, classes, teacher, teaches, source, split, spec,
               cdcp, student, model, schedule, shrink, alpha, opt, sched, mixup, criterion, loader,
               log=(out / LOG_NAME).open("a") if rank == 0 else None, start=start, mask=mask, history=history)
    if rank == 0 and not cfg.resume:
        teacher.cait_meta = ModelMeta(kind="teacher", base_model=architecture(teacher), source=source, classes=classes)
        save_pretrained(teacher, out / "teacher")         # the app shows it next to the result
        run.emit({"type": "start", "config": cfg.to_dict(), "teacher": source, "distill_alpha": alpha,
                  "merge": format_layout(split.layout), "base_flops": split.base_flops,
                  "atme_flops": spec.flops(), "target_flops": split.target_flops, "classes": len(classes),
                  "world_size": world, "device": str(device)})
    return run


def _step(run: _Run, step: int, batch: list[torch.Tensor]) -> float:
    """One optimisation step (rebuilding S when the schedule says so); returns the loss.

    Raises:
        FinetuneError: when the loss is not finite (nothing of this step is saved).
    """
    cfg, student, device = run.cfg, run.student, run.device
    x, y = batch[0], batch[1]
    run.model.train()
    if run.cdcp and run.schedule.rebuild_at(step):
        m = (select_channels(compactor_scores(student), run.spec, run.schedule.target(step), cfg.min_channels,
                             cfg.round_to) if run.rank == 0 else None)
        m = _broadcast(m, run.rank, run.world)
        run.entered = reset_optimizer_rows_(student, run.opt, run.mask, m)
        run.mask = m
    _seed_step(cfg.seed, step * run.world + run.rank)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if run.mixup:
        x, y = run.mixup(x, y)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        logits = run.model(x)
        if cfg.token_labels > 0:                           # (logits, token logits) from TokenLabelled
            logits, tokens = logits
        loss = run.criterion(logits, y)
        if run.alpha > 0:
            with torch.no_grad():
                hard = run.teacher(x).argmax(-1)
            loss = (1 - run.alpha) * loss + run.alpha * F.cross_entropy(logits, hard)
        if cfg.token_labels > 0:
            targets = token_targets(batch[2].to(device), y, len(run.classes), student)
            loss = loss + cfg.token_labels * token_label_loss(tokens, targets)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise FinetuneError(f"loss became {loss_value} at step {step}; stopped without saving this state "
                            f"(earlier training states in {run.out} are intact). Try a lower --lr.")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.cdcp:
        apply_gradient_rule(student, run.mask, cfg.lasso, proximal=run.shrink > 0)  # after the DDP all-reduce
    run.opt.step()
    if run.cdcp and run.shrink > 0:
        shrink_masked_rows_(student, run.mask, run.shrink)  # the masked rows' lasso step, identical on every rank
    run.sched.step_update(step + 1)
    return loss_value


def _export(run: _Run) -> dict:
    """Zero S's rows, prune and fold, evaluate, and (rank 0) save ``compact/`` and the final log line."""
    cfg, student, split = run.cfg, run.student, run.split
    run.save(cfg.steps)                                    # the compactors as trained (the compactor view reads it)
    drop_token_head(student)                               # training-only: the result is a plain CAIT DeiT
    if run.cdcp:
        mask = run.mask
        needs_final = mask is None or run.schedule.target(cfg.steps - 1) != split.target_flops
        final_mask = (select_channels(compactor_scores(student), run.spec, split.target_flops, cfg.min_channels,
                                      cfg.round_to) if run.rank == 0 and needs_final else None)
        if final_mask is not None or run.world > 1:
            mask = _broadcast(final_mask if final_mask is not None else mask, run.rank, run.world)
        removed = zero_masked_rows_(student, mask)
    else:
        mask, removed = ChannelMask.keep_all(run.spec), 0.0
    top1_masked = run.top1(student)
    run.evaluate_teacher_once()
    # Nothing to remove: fold only (or nothing to fold), so the result stays an uncompressed (or ATME) DeiT.
    compact = (fold_compactors(student) if mask.size() == 0 else prune(student, mask)).eval()
    top1_compact = run.top1(compact)
    flops = describe(compact).flops()
    summary = {"type": "final", "step": cfg.steps, "merge": format_layout(split.layout),
               "base_flops": split.base_flops, "flops": flops, "flops_reduction": 1 - flops / split.base_flops,
               "top1_teacher": run.top1_teacher, "top1_masked": top1_masked, "top1_student": top1_compact,
               "max_removed_row_norm": removed, "s_size": mask.size(), "mask": mask.to_dict()}
    if run.rank == 0:
        compact.cait_meta = ModelMeta(
            kind="finetuned", base_model=architecture(compact), flops_reduction=cfg.flops_reduction,
            achieved_reduction=summary["flops_reduction"], merge=summary["merge"],
            atme_reduction=split.atme_reduction, round_to=cfg.round_to, classes=run.classes,
            finetune=FinetuneSummary.from_dict(summary), config=cfg.to_dict(),
            note=(f"fine-tuned with CDCP for {cfg.steps} steps (python -m cait.finetune)" if run.cdcp or split.layout
                  else f"trained for {cfg.steps} steps, uncompressed (python -m cait.finetune)"))
        save_pretrained(compact, run.out / "compact")
        run.emit({k: v for k, v in summary.items() if k != "mask"})
        run.log.close()
    if run.world > 1:
        (run.out / f"final_mask_rank{run.rank}.json").write_text(json.dumps(mask.to_dict()))
    return summary


def _default_img_size(cfg: FinetuneConfig) -> int:
    if Path(cfg.model).is_dir():
        try:
            return read_config(cfg.model)["img_size"]
        except CheckpointError as e:
            raise FinetuneError(str(e)) from None
    import timm
    if not timm.is_model(cfg.model):
        raise FinetuneError(f"unknown model {cfg.model!r} (neither a timm name nor a checkpoint directory)")
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.model)
    return int(pretrained_cfg.input_size[-1]) if pretrained_cfg else 224


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cait.finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print the final summary as JSON (rank 0); exit 2 with a message on bad input."""
    args = _parser().parse_args(argv)
    cfg = FinetuneConfig(**vars(args))
    try:
        summary = finetune(cfg)
    except (FinetuneError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "mask"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
