"""CDCP fine-tuning with hard distillation: :func:`finetune` (``python -m cait.finetune``), docs/method.md: CDCP,
fine-tuning.

One process or many (``torchrun --nproc_per_node=N -m cait.finetune ...``: DDP, NCCL on GPU, Gloo on CPU).

The run (built by :func:`cait.finetune.build.build_run`): the student (ATME layout from the budget split, identity
compactors) made from an uncompressed teacher; AdamW (compactors in their own group: β₁ 0.99, no weight decay),
cosine LR, Mixup/CutMix with soft-target cross-entropy, and hard distillation from the teacher; or, label-free
(``--labels none``), the teacher's softened outputs alone (:func:`soft_distillation`). Each step below:
rebuild S every ``mask_interval`` steps after the warm-up from the compactor row norms with both consistencies while
the FLOPs target ramps, then hold; after the backward rewrite the compactor gradients by Eq. 2, and take the masked
rows' group-lasso step in proximal form after the optimizer step (:mod:`cait.finetune.lasso`). At the end zero S's
rows, prune and fold, and write a compact checkpoint that :func:`cait.load_pretrained` (and the app) loads.

Files in ``--output`` (:mod:`cait.finetune.rundir`): ``log.jsonl`` (one typed record per line,
:mod:`cait.finetune.records`), ``train_state-*.json`` + ``.safetensors`` (atomic, last two kept; ``--resume``
continues from the newest), ``teacher/``, ``compact/`` (the result).
"""
from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..compress.importance import compactor_scores
from ..compress.prune import fold_compactors, prune
from ..compress.select import ChannelMask, select_channels
from ..io.checkpoint import save_pretrained
from ..models.deit import architecture
from ..models.meta import ModelMeta
from ..models.spec import describe
from .build import Run, build_run
from .config import FinetuneConfig, FinetuneError
from .distributed import broadcast, out_of_time, seed_step, setup_distributed
from .lasso import (apply_gradient_rule, max_masked_row_norm, reset_optimizer_rows_, shrink_masked_rows_,
                    zero_masked_rows_)
from .records import EvalRecord, FinalRecord, StoppedRecord, TrainRecord
from .token_distill import forward_tokens, tokens_loss
from .token_labels import drop_token_head, token_label_loss, token_targets


def finetune(cfg: FinetuneConfig) -> FinalRecord | StoppedRecord:
    """Run CDCP fine-tuning.

    Returns:
        The :class:`~cait.finetune.records.FinalRecord` (also the last line of ``log.jsonl``, there without its
        ``mask``), or a :class:`~cait.finetune.records.StoppedRecord` for a run stopped by ``stop_at``.

    Raises:
        FinetuneError: a class mismatch with a checkpoint, an unreachable FLOPs target, a resume of a different
            configuration, or a NaN loss (bad data raises :class:`cait.data.datasets.DataError` as is). Earlier
            training states are left intact.
    """
    rank, world, device = setup_distributed(cfg.device)
    try:
        return _train(build_run(cfg, rank, world, device))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(run: Run) -> FinalRecord | StoppedRecord:
    """The loop: a step, then (on their intervals) a log line, an evaluation and a training state."""
    cfg = run.cfg
    bar = tqdm(total=cfg.steps, initial=run.start, desc="cait.finetune", dynamic_ncols=True) \
        if run.rank == 0 and sys.stderr.isatty() else None
    t_last, seen = time.perf_counter(), 0
    t0 = t_last
    for step, batch in enumerate(run.loader, start=run.start):
        loss = _step(run, step, batch)
        seen += batch[0].shape[0] * run.world
        done = step + 1
        if run.rank == 0 and (done % cfg.log_interval == 0 or done == cfg.steps):
            now = time.perf_counter()
            run.emit(TrainRecord(
                step=done, epoch=done * cfg.batch_size / len(run.data.train_set), loss=loss,
                lr=run.optim.opt.param_groups[0]["lr"], flops_target=run.optim.schedule.target(step),
                s_size=0 if run.mask is None else run.mask.size(), s_entered=run.entered,
                max_masked_norm=max_masked_row_norm(run.nets.student, run.mask) if run.nets.cdcp else 0.0,
                images_per_s=seen / (now - t_last)))
            t_last, seen = now, 0
        if done % cfg.eval_interval == 0 and done < cfg.steps:
            top1, agree = run.top1(run.nets.student), run.agreement(run.nets.student)
            run.evaluate_teacher_once()
            run.history[str(done)] = top1
            run.emit(EvalRecord(step=done, top1_student=top1, top1_teacher=run.top1_teacher,
                                agreement=agree and agree.agreement, kl=agree and agree.kl))
        if done % cfg.ckpt_interval == 0 and done < cfg.steps:
            run.save(done)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", S=0 if run.mask is None else run.mask.size())
        late = done < cfg.steps and out_of_time(t0, cfg.time_limit_s, run.world, run.device)
        if late or (cfg.stop_at is not None and done >= cfg.stop_at):
            run.save(done)
            stopped = StoppedRecord(step=done, mask=None if run.mask is None else run.mask.to_dict(),
                                    reason="time_limit" if late else "stop_at")
            run.emit(stopped)
            if run.log:
                run.log.close()
            if bar:
                bar.close()
            return stopped
    if bar:
        bar.close()
    return _export(run)


def _step(run: Run, step: int, batch: list[torch.Tensor]) -> float:
    """One optimisation step (rebuilding S when the schedule says so); returns the loss.

    Raises:
        FinetuneError: when the loss is not finite (nothing of this step is saved).
    """
    cfg, nets, optim, device = run.cfg, run.nets, run.optim, run.device
    x, y = batch[0], batch[1]
    run.model.train()
    if nets.cdcp and optim.schedule.rebuild_at(step):
        m = (select_channels(compactor_scores(nets.student), nets.spec, optim.schedule.target(step),
                             cfg.min_channels, cfg.round_to) if run.rank == 0 else None)
        m = broadcast(m, run.rank, run.world)
        run.entered = reset_optimizer_rows_(nets.student, optim.opt, run.mask, m)
        run.mask = m
    seed_step(cfg.seed, step * run.world + run.rank)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if optim.mixup:
        x, y = optim.mixup(x, y)
    loss = _loss(run, x, y, batch)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise FinetuneError(f"loss became {loss_value} at step {step}; stopped without saving this state "
                            f"(earlier training states in {run.out} are intact). Try a lower --lr.")
    optim.opt.zero_grad(set_to_none=True)
    loss.backward()
    if nets.cdcp:
        apply_gradient_rule(nets.student, run.mask, cfg.lasso, proximal=optim.shrink > 0)  # after the DDP all-reduce
    optim.opt.step()
    if nets.cdcp and optim.shrink > 0:
        shrink_masked_rows_(nets.student, run.mask, optim.shrink)   # the masked rows' lasso step, same on every rank
    optim.sched.step_update(step + 1)
    return loss_value


def _loss(run: Run, x: torch.Tensor, y: torch.Tensor, batch: list[torch.Tensor]) -> torch.Tensor:
    """The step's loss on ``x`` (B, 3, S, S): labels (+ hard distillation) or, label-free, the teacher's soft
    outputs (+ its pooled tokens with ``--token-distill``); token labelling on top when asked."""
    cfg, nets = run.cfg, run.nets
    bf16 = cfg.amp if run.device.type == "cuda" else cfg.cpu_bf16
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = run.model(x)
        extra = out[1] if isinstance(out, tuple) else None  # token logits (TokenLabelled) or tokens (WithTokens)
        logits = out[0] if isinstance(out, tuple) else out
        if cfg.labels == "none":                           # label-free: the teacher's outputs are the targets
            with torch.no_grad():                          # [..., (B, 1 + H·W, C) final features]
                t_tokens = forward_tokens(nets.teacher, x, cfg.token_distill_blocks == "all")
                t_logits = nets.teacher.forward_head(t_tokens[-1])
            loss = soft_distillation(logits, t_logits, cfg.temperature)
            if cfg.token_distill > 0:
                loss = loss + cfg.token_distill * tokens_loss(extra, t_tokens, nets.teacher, nets.student)
            return loss
        loss = run.optim.criterion(logits, y)
        if nets.alpha > 0:
            with torch.no_grad():
                hard = nets.teacher(x).argmax(-1)
            loss = (1 - nets.alpha) * loss + nets.alpha * F.cross_entropy(logits, hard)
        if cfg.token_labels > 0:
            targets = token_targets(batch[2].to(run.device), y, len(run.data.classes), nets.student)
            loss = loss + cfg.token_labels * token_label_loss(extra, targets)
    return loss


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened outputs, times T² (Hinton et al., 2015), averaged over the batch:
    the label-free loss of ``--labels none``. ``student``, ``teacher``: logits ``(B, classes)``."""
    t = temperature
    student, teacher = student.float(), teacher.float()             # bfloat16 logits can make the KL negative
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def _export(run: Run) -> FinalRecord:
    """Zero S's rows, prune and fold, evaluate, and (rank 0) save ``compact/`` and the final log line."""
    cfg, nets = run.cfg, run.nets
    student, split = nets.student, nets.split
    run.save(cfg.steps)                                    # the compactors as trained (the compactor view reads it)
    drop_token_head(student)                               # training-only: the result is a plain CAIT DeiT
    if nets.cdcp:
        mask = run.mask
        needs_final = mask is None or run.optim.schedule.target(cfg.steps - 1) != split.target_flops
        final_mask = (select_channels(compactor_scores(student), nets.spec, split.target_flops, cfg.min_channels,
                                      cfg.round_to) if run.rank == 0 and needs_final else None)
        if final_mask is not None or run.world > 1:
            mask = broadcast(final_mask if final_mask is not None else mask, run.rank, run.world)
        removed = zero_masked_rows_(student, mask)
    else:
        mask, removed = ChannelMask.keep_all(nets.spec), 0.0
    top1_masked = run.top1(student)
    run.evaluate_teacher_once()
    # Nothing to remove: fold only (or nothing to fold), so the result stays an uncompressed (or ATME) DeiT.
    compact = (student if not nets.cdcp else fold_compactors(student) if mask.size() == 0
               else prune(student, mask)).eval()
    flops = describe(compact).flops()
    agree = run.agreement(compact)
    final = FinalRecord(step=cfg.steps, merge=str(split.layout), base_flops=split.base_flops, flops=flops,
                        flops_reduction=1 - flops / split.base_flops, top1_teacher=run.top1_teacher,
                        top1_masked=top1_masked, top1_student=run.top1(compact), max_removed_row_norm=removed,
                        s_size=mask.size(), mask=mask.to_dict(), agreement=agree and agree.agreement,
                        kl=agree and agree.kl, held_out=len(run.data.val_set))
    if run.rank == 0:
        compact.cait_meta = ModelMeta(
            kind="finetuned", base_model=architecture(compact), flops_reduction=cfg.flops_reduction,
            achieved_reduction=final.flops_reduction, merge=final.merge, atme_reduction=split.atme_reduction,
            round_to=cfg.round_to, classes=run.data.classes, finetune=final.summary(), config=cfg.provenance(),
            note=(f"fine-tuned with CDCP for {cfg.steps} steps (python -m cait.finetune)" if nets.cdcp or split.layout
                  else f"trained for {cfg.steps} steps, uncompressed (python -m cait.finetune)"))
        save_pretrained(compact, run.out / "compact")
        run.emit(final)
        run.log.close()
    if run.world > 1:
        (run.out / f"final_mask_rank{run.rank}.json").write_text(json.dumps(mask.to_dict()))
    return final
