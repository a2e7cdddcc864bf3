"""Everything a CDCP run is made of, built before its first step: data, teacher and student, optimisation
(docs/method.md: CDCP, fine-tuning).

:func:`build_run` checks the configuration, then makes each part with one function (:func:`_data`,
:func:`_networks`, :func:`_optimisation`), restores the newest training state when resuming, and returns a
:class:`Run`, which the loop in :mod:`cait.finetune.engine` advances. Rank 0 saves the teacher and logs the start
of a new run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from ..compress.importance import compactor_scores
from ..compress.plan import BudgetSplit, split_budget
from ..compress.prune import is_pruned
from ..compress.oneshot import calibrate_merges, compress
from ..compress.select import ChannelMask, select_channels
from ..data.datasets import DataError, StepBatchSampler, Unlabelled, build_datasets
from ..io.checkpoint import CheckpointError, load_checkpoint, save_pretrained
from ..io.source import ModelSource
from ..measure.accuracy import Agreement, agreement, evaluate
from ..models.atme import apply_atme, get_layout
from ..models.compactors import add_compactors, iter_compactors
from ..models.deit import architecture, create_model, resize_input, update_cfg
from ..models.meta import ModelMeta, meta_of
from ..models.spec import ModelSpec, describe
from .config import CALIBRATE_STARTS, TOKEN_DISTILL_BLOCKS, FinetuneConfig, FinetuneError
from .lasso import FlopsSchedule
from .records import Record, StartRecord
from .report import RunLog, check_report_to
from .rundir import LOG_NAME, prepare_output, resume_state, save_state
from .token_distill import WithTokens
from .token_labels import TokenLabelled


@dataclass
class RunData:
    """The run's images: ``train_set`` (step-indexed batches), ``val_set`` (held out), class names."""

    train_set: Any
    val_set: Any
    classes: list[str]
    labelled: bool = True          # False: the held-out images have no labels (top-1 is not measured)


@dataclass
class Networks:
    """The teacher and the student. ``student`` is the merged DeiT (with compactors when ``cdcp``)."""

    teacher: nn.Module
    teaches: bool                  # False: a random teacher, no distillation, no top-1
    source: str                    # where the teacher came from
    split: BudgetSplit
    spec: ModelSpec                # the merged student's widths before pruning
    cdcp: bool                     # False: no channel budget, no compactors
    student: nn.Module
    trainee: nn.Module             # the student, inside TokenLabelled (token labels) or WithTokens (token distillation)
    alpha: float                   # weight of hard distillation


@dataclass
class Optimisation:
    """AdamW with its cosine LR, the loss, Mixup/CutMix, and CDCP's FLOPs schedule and proximal shrink per step."""

    opt: torch.optim.Optimizer
    sched: Any
    mixup: Any
    criterion: nn.Module
    schedule: FlopsSchedule
    shrink: float


@dataclass
class Run:
    """What a CDCP run holds between steps. ``model`` is what the loop calls: the student, inside
    :class:`TokenLabelled` and/or DDP."""

    cfg: FinetuneConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    data: RunData
    nets: Networks
    optim: Optimisation
    model: nn.Module
    loader: Any
    log: RunLog | None             # rank 0's log.jsonl (and tracker mirror)
    start: int = 0
    mask: ChannelMask | None = None
    entered: int = 0
    history: dict = field(default_factory=dict)
    top1_teacher: float | None = None

    def emit(self, record: Record) -> None:
        """Append one record to ``log.jsonl`` (rank 0 only)."""
        if self.log:
            self.log.write(record)

    def save(self, step: int) -> None:
        """Write a resumable training state (rank 0 only)."""
        if self.rank == 0:
            save_state(self.out, step, self.nets.student, self.optim.opt, self.mask,
                       {"config": self.cfg.to_dict(), "history": self.history})

    def top1(self, model: nn.Module) -> float | None:
        """Held-out top-1 (%) of ``model``, shared over the ranks; None when the held-out images have no labels."""
        if not self.data.labelled:
            return None
        return evaluate(model, self.data.val_set, self.device, rank=self.rank, world=self.world)

    def agreement(self, model: nn.Module) -> Agreement | None:
        """Label-free runs: ``model``'s held-out agreement with the teacher and KL (None with labels)."""
        if self.cfg.labels != "none":
            return None
        return agreement(model, self.nets.teacher, self.data.val_set, self.device, rank=self.rank, world=self.world)

    def evaluate_teacher_once(self) -> None:
        """The frozen teacher's top-1, measured once; a random teacher's never."""
        if self.top1_teacher is None and self.nets.teaches and self.data.labelled:
            self.top1_teacher = self.top1(self.nets.teacher)


def build_run(cfg: FinetuneConfig, rank: int, world: int, device: torch.device) -> Run:
    """Check the configuration, make data, networks, optimisation and loader, and restore the newest state when
    resuming; rank 0 saves the teacher and logs the start of a new run.

    Raises:
        FinetuneError: a configuration the run cannot start with (the message names the option).
        cait.data.datasets.DataError: data that cannot be used.
    """
    _check(cfg, world)
    out = prepare_output(cfg.output, cfg.resume) if rank == 0 else Path(cfg.output)
    stored = _stored(str(cfg.model))                      # a checkpoint, Hub or bundled teacher: loaded once
    data = _data(cfg, stored)
    nets = _networks(cfg, data, device, out, rank, stored)
    optim = _optimisation(cfg, nets, len(data.classes))
    start, mask, history = 0, None, {}
    if cfg.resume:                                         # every rank: each holds its own optimizer state
        state = resume_state(out, nets.student, optim.opt, cfg)
        start = state["step"]
        mask = None if state["mask"] is None else ChannelMask.from_dict(state["mask"])
        history = state.get("history", {})
    trainee = nets.trainee
    if world > 1:
        for t in nets.student.state_dict().values():
            dist.broadcast(t, src=0)
        trainee = nn.parallel.DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    sampler = StepBatchSampler(len(data.train_set), cfg.batch_size // world, cfg.steps, start, rank, world, cfg.seed)
    loader = torch.utils.data.DataLoader(data.train_set, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    run = Run(cfg, rank, world, device, out, data, nets, optim, trainee, loader,
              log=RunLog(out / LOG_NAME, cfg.report_to) if rank == 0 else None, start=start, mask=mask, history=history)
    if rank == 0 and not cfg.resume:
        teacher = nets.teacher
        teacher.cait_meta = ModelMeta(kind="teacher", base_model=architecture(teacher), source=nets.source,
                                      classes=data.classes)
        save_pretrained(teacher, out / "teacher")         # the app shows it next to the result
        run.emit(StartRecord(config=cfg.to_dict(), teacher=nets.source, distill_alpha=nets.alpha,
                             merge=str(nets.split.layout), base_flops=nets.split.base_flops,
                             atme_flops=nets.spec.flops(), target_flops=nets.split.target_flops,
                             classes=len(data.classes), world_size=world, device=str(device)))
    return run


def _check(cfg: FinetuneConfig, world: int) -> None:
    """Options that no run can start with."""
    if cfg.batch_size % world or (cfg.batch_size // world) % 2:
        raise FinetuneError(f"--batch-size {cfg.batch_size} must split into an even batch per process "
                            f"({world} processes; Mixup/CutMix pair images)")
    if cfg.token_labels < 0:
        raise FinetuneError(f"--token-labels must be >= 0, got {cfg.token_labels}")
    if cfg.labels not in ("data", "none"):
        raise FinetuneError(f"--labels must be 'data' or 'none', got {str(cfg.labels)[:20]!r}")
    if cfg.labels == "none" and cfg.token_labels > 0:
        raise FinetuneError("--token-labels reads the data's labels; it cannot run with --labels none")
    check_report_to(cfg.report_to)
    if cfg.token_distill < 0 or (cfg.token_distill > 0 and cfg.labels != "none"):
        raise FinetuneError(f"--token-distill (got {cfg.token_distill}) must be >= 0, and > 0 only with --labels none")
    if cfg.calibrate_start not in CALIBRATE_STARTS:
        raise FinetuneError(f"--calibrate-start must be 'twin' or 'merges', got {str(cfg.calibrate_start)[:20]!r}")
    if cfg.token_distill_blocks not in TOKEN_DISTILL_BLOCKS:
        raise FinetuneError(f"--token-distill-blocks must be 'last' or 'all', "
                            f"got {str(cfg.token_distill_blocks)[:20]!r}")
    if not cfg.temperature > 0:
        raise FinetuneError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.token_labels > 0 and (cfg.data != "synthetic" or cfg.mixup > 0 or cfg.cutmix > 0):
        raise FinetuneError("--token-labels needs object masks (--data synthetic) and no Mixup/CutMix "
                            "(--mixup 0 --cutmix 0)")


def _data(cfg: FinetuneConfig, stored: nn.Module | None) -> RunData:
    """Training and held-out images (first: the teacher's head must match their classes); ``stored``: the teacher
    when it is a stored model (:func:`_stored`)."""
    train_set, val_set, classes = build_datasets(cfg.data, cfg.img_size or _default_img_size(cfg, stored), cfg.seed,
                                                 cfg.synthetic_size, cfg.val_size)
    labelled = True
    if not classes:                                       # photos, an unlabelled Hub dataset: the teacher's classes
        if cfg.labels != "none":
            raise FinetuneError(f"{cfg.data}: these images have no labels; learn from the teacher with --labels none")
        classes, labelled = _teacher_classes(stored), False
    if cfg.token_labels > 0:
        train_set.masks = True                            # batches carry the object masks
    if cfg.labels == "none":
        train_set = Unlabelled(train_set)                 # label-free: the labels never leave the dataset
    return RunData(train_set, val_set, classes, labelled)


def _networks(cfg: FinetuneConfig, data: RunData, device: torch.device, out: Path, rank: int,
              stored: nn.Module | None) -> Networks:
    """The teacher, the budget split, and the student: ATME layout, plus compactors when CDCP has a budget."""
    torch.manual_seed(cfg.seed)                           # the same student initialisation on every rank
    teacher, teaches, source = _teacher(cfg, len(data.classes), stored)
    try:
        split = split_budget(teacher, cfg.flops_reduction, cfg.merge, cfg.atme_share)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    if cfg.calibrate > 0:
        student = _calibrated_twin(teacher, cfg, split, out, rank)
    else:
        student = apply_atme(copy.deepcopy(teacher), split.layout)
    # No channel budget (R = 0, e.g. training a teacher, or a layout that alone meets R): no CDCP at all. Identity
    # compactors would only cost time (2x per step on CPU for DeiT-Tiny, benchmarks/finetune_step.py).
    spec = describe(student)                              # the same with compactors: they fold away
    cdcp = split.target_flops < spec.flops()
    student = (add_compactors(student) if cdcp else student).to(device)
    trainee = (TokenLabelled(student, len(data.classes)) if cfg.token_labels > 0
               else WithTokens(student, cfg.token_distill_blocks == "all") if cfg.token_distill > 0 else student)
    try:                                                  # fail now, not after hours, if the target is out of reach
        if cdcp:
            select_channels(compactor_scores(student), spec, split.target_flops, cfg.min_channels, cfg.round_to)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    # docs/method.md: fine-tuning recipe: α = 0.1 for DeiT-Tiny, 0.25 for Small/Base, read from the teacher's
    # architecture (not its path).
    default_alpha = 0.1 if architecture(teacher) == "deit_tiny_patch16_224" else 0.25
    alpha = (cfg.distill_alpha if cfg.distill_alpha is not None else default_alpha) if teaches else 0.0
    if cfg.labels == "none" and not teaches:
        raise FinetuneError("--labels none learns from the teacher alone, and this teacher has no trained weights "
                            "for these classes (use --pretrained or a checkpoint directory)")
    return Networks(teacher.to(device).eval().requires_grad_(False), teaches, source, split, spec, cdcp, student,
                    trainee, alpha)


def _calibrated_twin(teacher: nn.Module, cfg: FinetuneConfig, split: BudgetSplit, out: Path, rank: int
                     ) -> nn.Module:
    """The student as the app's calibrated twin (:func:`cait.compress.compress`): the planned ATME layout, channels
    chosen by Fisher scores on the teacher's own predictions, and each block's fusion, ``proj`` and ``fc2`` refit to
    the teacher's tokens, on ``cfg.calibrate`` unlabelled images of ``cfg.calibration_data``; it already meets the
    FLOPs target, so the run distills it without compactors. With ``--calibrate-start merges``, the layout refit
    alone (:func:`cait.compress.calibrate_merges`), every channel kept for CDCP to prune. Kept in
    ``out/calibrated``, from which a resume reads it back (the same widths, without calibrating again); every DDP
    rank makes the same twin (a seeded draw)."""
    kept = out / "calibrated"
    if cfg.resume and (kept / "config.json").is_file():
        try:
            return load_checkpoint(kept)
        except CheckpointError as e:
            raise FinetuneError(f"{kept}: the run's calibrated start cannot be read ({e})") from None
    try:
        if cfg.calibrate_start == "merges":
            twin = calibrate_merges(teacher, split.layout, cfg.calibration_data, cfg.calibrate, seed=cfg.seed)
        else:
            twin = compress(teacher, split.total_reduction, layout=split.layout, min_channels=cfg.min_channels,
                            round_to=cfg.round_to, calibration=cfg.calibration_data, calibration_size=cfg.calibrate,
                            seed=cfg.seed)
    except (DataError, ValueError) as e:
        raise FinetuneError(f"--calibrate: {e}") from None
    if rank == 0:
        save_pretrained(twin, kept)
    return twin


def _optimisation(cfg: FinetuneConfig, nets: Networks, num_classes: int) -> Optimisation:
    """AdamW (compactors in their own group), cosine LR with warm-up, Mixup/CutMix, the loss, CDCP's schedule."""
    opt = create_optimizer_v2(_param_groups(nets.student, cfg), opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = CosineLRScheduler(opt, t_initial=cfg.steps, lr_min=cfg.min_lr,
                              warmup_t=int(cfg.lr_warmup * cfg.steps), warmup_lr_init=cfg.min_lr, t_in_epochs=False)
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                   num_classes=num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.label_smoothing)
    schedule = FlopsSchedule(cfg.steps, nets.spec.flops(), nets.split.target_flops, cfg.cdcp_warmup, cfg.cdcp_ramp,
                             cfg.mask_interval)
    shrink = shrink_per_step(cfg, schedule)
    if shrink < 0:
        raise FinetuneError(f"--mask-shrink must be >= 0, got {shrink}")
    return Optimisation(opt, sched, mixup, criterion, schedule, shrink)


def shrink_per_step(cfg: FinetuneConfig, schedule: FlopsSchedule) -> float:
    """Norm removed from each masked compactor row per step (choice, see :mod:`cait.finetune.lasso`):
    ``--mask-shrink``, or 2 / hold steps, so that a unit-norm row entering S when the hold starts is exactly 0
    halfway through the hold and the model trains without it for the rest of the run."""
    if cfg.mask_shrink is not None:
        return cfg.mask_shrink
    return 2.0 / max(1, cfg.steps - schedule.hold_step)


def _stored(spec: str) -> nn.Module | None:
    """The model a stored spelling names (a checkpoint directory, ``hf-hub:owner/name`` from the Hub or the local
    cache, ``bundled``), loaded; None for a timm name (:class:`cait.io.source.ModelSource`)."""
    try:
        source = ModelSource.parse(spec)
    except ValueError as e:
        raise FinetuneError(f"unknown model {spec!r}: {e}") from None
    if source.kind == "timm":
        return None
    try:
        return source.load()[0]
    except (CheckpointError, ValueError) as e:
        raise FinetuneError(str(e)) from None


def _teacher(cfg: FinetuneConfig, num_classes: int, stored: nn.Module | None) -> tuple[nn.Module, bool, str]:
    """The uncompressed model (``stored``, when it is one, else made from its timm name); returns (model, whether it
    can teach these classes, where it came from)."""
    if stored is not None:
        return _checkpoint_teacher(cfg, num_classes, stored)
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


def _checkpoint_teacher(cfg: FinetuneConfig, num_classes: int, model: nn.Module) -> tuple[nn.Module, bool, str]:
    """An uncompressed stored model (a checkpoint directory, a Hub repository, the bundled original) as the teacher,
    resized (FixRes-style) when ``--img-size`` asks for another size."""
    if get_layout(model) or is_pruned(model):
        raise FinetuneError(f"{cfg.model}: fine-tuning starts from an uncompressed model; this checkpoint is "
                            "already merged or pruned")
    if model.num_classes != num_classes:
        raise FinetuneError(f"{cfg.model}: the checkpoint has {model.num_classes} classes, the data "
                            f"{cfg.data!r} has {num_classes}")
    trained_at = int(model.patch_embed.img_size[0])
    if not cfg.img_size or cfg.img_size == trained_at:
        return model, True, f"checkpoint {cfg.model}"
    if cfg.img_size % model.patch_embed.patch_size[0]:
        raise FinetuneError(f"--img-size {cfg.img_size} is not a multiple of the patch size "
                            f"{model.patch_embed.patch_size[0]}")
    resize_input(model, cfg.img_size)                               # timm resamples the position embedding
    return model, True, f"checkpoint {cfg.model} (trained at {trained_at} px, resized to {cfg.img_size} px)"


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
        {"params": compactors, "weight_decay": 0.0, "betas": (cfg.compactor_beta1, 0.999),    # docs/method.md: CDCP
         "lr": cfg.lr if cfg.compactor_lr is None else cfg.compactor_lr},
    ]


def _teacher_classes(stored: nn.Module | None) -> list[str]:
    """The class names (or indices as text) the teacher's head predicts, for data that has no labels."""
    if stored is not None:
        names = meta_of(stored).classes
        return list(names) if names else [str(i) for i in range(int(stored.num_classes))]
    return [str(i) for i in range(1000)]                  # timm's ImageNet-1k heads


def _default_img_size(cfg: FinetuneConfig, stored: nn.Module | None) -> int:
    if stored is not None:
        return int(stored.patch_embed.img_size[0])
    if not timm.is_model(cfg.model):
        raise FinetuneError(f"unknown model {cfg.model!r} (neither a timm name, an hf-hub: id, a checkpoint "
                            "directory nor 'bundled')")
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.model)
    return int(pretrained_cfg.input_size[-1]) if pretrained_cfg else 224
