"""A fine-tune run's options: one dataclass, one command-line flag per field (nanoGPT-style), and its error type."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

PATH_FIELDS = ("model", "data", "backbone")
"""Config fields that may name a place on the machine that ran the job."""


class FinetuneError(RuntimeError):
    """A run that cannot start or continue; earlier checkpoints are left intact."""


def option(default, help: str, **kw):
    """A config field with its command-line help text (read by :func:`cait.cli.flags.dataclass_parser`)."""
    return field(default=default, metadata={"help": help, **kw})



TOKEN_DISTILL_BLOCKS = ("last", "all")
"""The values of ``--token-distill-blocks``."""
CALIBRATE_STARTS = ("twin", "merges")
"""The values of ``--calibrate-start``."""


@dataclass
class FinetuneConfig:
    """Every option of a run; the command line has one flag per field (``--flops-reduction`` for flops_reduction)."""

    model: str = option("deit_tiny_patch16_224", "the uncompressed model: a timm name (DeiT, DINOv2, EVA-02, ...), "
                        "hf-hub:owner/name, a checkpoint directory, or 'bundled'")
    pretrained: bool = option(False, "start from timm's ImageNet weights when the Hub is reachable")
    data: str = option("synthetic", "'synthetic' or an ImageFolder root with train/ and val/")
    flops_reduction: float = option(0.5, "total FLOPs reduction R (ATME planned first, CDCP the rest)")
    merge: str | None = option(None, "explicit ATME layout, e.g. h4,v7 (default: planned from R)")
    atme_share: float = option(0.8, "share of R planned for ATME when --merge is not given")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(64, "global batch size (split across processes)")
    img_size: int | None = option(None, "input side in pixels (default: the model's; a checkpoint trained at another "
                                  "size has its position embedding resampled)")
    device: str | None = option(None, "cpu or cuda (default: cuda when available)")
    output: str = option("runs/finetune", "run directory")
    resume: bool = option(False, "continue the run in --output from its newest training state")
    lr: float = option(1e-4, "peak learning rate (paper: 1e-4 at batch 256)")
    min_lr: float = option(1e-6, "final learning rate of the cosine decay")
    lr_warmup: float = option(0.05, "fraction of steps of linear LR warm-up")
    weight_decay: float = option(0.05, "AdamW weight decay (not on compactors, biases, norms, tokens)")
    compactor_beta1: float = option(0.99, "AdamW beta1 of the compactor group (0.9 elsewhere)")
    compactor_lr: float | None = option(None, "peak LR of the compactors, on the model's cosine schedule (default: lr)")
    mask_shrink: float | None = option(None, "norm taken off each masked compactor row per step by the proximal "
                                       "group-lasso step (default: 2 / hold steps, so a unit row reaches 0 halfway "
                                       "through the hold; 0: Eq. 2's lasso gradient inside AdamW instead)")
    label_smoothing: float = option(0.1, "label smoothing")
    mixup: float = option(0.8, "Mixup alpha (0 disables)")
    cutmix: float = option(1.0, "CutMix alpha (0 disables)")
    distill_alpha: float | None = option(None, "weight of hard distillation (default: 0.1 for Tiny, 0.25 otherwise)")
    labels: str = option("data", "where the targets come from: 'data' (the dataset's labels, with hard distillation) "
                         "or 'none' (label-free: the teacher's soft outputs alone, KL at --temperature; the loader "
                         "yields 0 in place of every training label, so none is ever read)")
    temperature: float = option(1.0, "softmax temperature of label-free distillation (--labels none)")
    token_distill: float = option(0.0, "weight of token distillation with --labels none: the student's final tokens "
                                  "also match the teacher's pooled onto its merged grid (relative MSE, "
                                  "cait.finetune.token_distill); 0: logits only")
    token_distill_blocks: str = option("last", "which tokens --token-distill matches: 'last' (the final-norm "
                                       "features) or 'all' (every block's output too, each pooled onto that "
                                       "block's grid, the relative errors averaged)")
    calibrate: int = option(0, "start from the calibrated twin (cait.compress.compress): ATME, channels chosen by "
                            "Fisher scores on the teacher's predictions and each block refit to the teacher's tokens "
                            "on this many unlabelled images (--calibration-data); it already meets the FLOPs target, "
                            "so no compactors are trained. 0: merges start as average pooling, CDCP prunes")
    calibrate_start: str = option("twin", "what --calibrate starts from: 'twin' (the calibrated twin above) or "
                                  "'merges' (the ATME layout with each block refit on those images, every channel "
                                  "kept: CDCP's compactors then prune to the FLOPs target during training)")
    calibration_data: str = option("default", "the images --calibrate draws: 'default' (bundled photos and "
                                   "synthetic shapes), 'photos', 'synthetic', a folder of images, or "
                                   "hf:NAME[:CONFIG][@SPLIT]")
    token_labels: float = option(0.0, "weight of token labelling: each patch token also predicts its patch's label "
                                 "(object class by covered share, else background) through a training-only head "
                                 "(LV-ViT; cait.finetune.token_labels); needs --data synthetic and no Mixup/CutMix")
    lasso: float = option(1e-5, "group-lasso strength lambda of Eq. 2")
    mask_interval: int = option(10, "rebuild the masked set S every this many steps")
    cdcp_warmup: float = option(0.1, "fraction of steps before S is first built")
    cdcp_ramp: float = option(0.4, "fraction of steps over which the FLOPs target ramps to its final value")
    min_channels: int = option(1, "channels kept at least per head and per FFN")
    round_to: int = option(1, "kept widths in multiples of this (8 suits tensor cores and CPU vector units)")
    eval_interval: int = option(100, "evaluate every this many steps (and at the end)")
    val_size: int = option(512, "validation images of the synthetic set")
    synthetic_size: int = option(20000, "training images of the synthetic set (one epoch)")
    log_interval: int = option(10, "log every this many steps")
    ckpt_interval: int = option(100, "write a training state every this many steps")
    workers: int = option(0, "data-loader worker processes per rank")
    seed: int = option(0, "seed of data order, augmentation and selection ties")
    amp: bool = option(True, "bfloat16 autocast on CUDA")
    cpu_bf16: bool = option(False, "bfloat16 autocast on the CPU as well (AMX / AVX-512-BF16 units; master weights "
                            "and the optimizer stay float32)")
    report_to: str = option("none", "also log every record to 'trackio' (local store, no Hub needed) or "
                            "'tensorboard' (<output>/tensorboard); 'none': log.jsonl only")
    stop_at: int | None = option(None, "stop after this step as if killed (for tests and time-boxed runs)")
    time_limit_s: float | None = option(None, "stop cleanly after this many seconds of training in this process: the "
                                        "training state is written and a 'stopped' record says why")

    # Fields that define a run: a resume must match them.
    IDENTITY = ("model", "pretrained", "data", "flops_reduction", "merge", "atme_share", "steps", "batch_size",
                "img_size", "lr", "min_lr", "lr_warmup", "weight_decay", "compactor_beta1", "compactor_lr",
                "mask_shrink", "label_smoothing", "mixup", "cutmix", "distill_alpha", "labels", "temperature",
                "token_distill", "token_distill_blocks", "calibrate", "calibrate_start", "calibration_data",
                "token_labels", "lasso", "mask_interval", "cdcp_warmup", "cdcp_ramp", "min_channels", "round_to",
                "val_size", "synthetic_size", "seed")

    def to_dict(self) -> dict:
        """All fields, JSON-ready."""
        return dataclasses.asdict(self)

    def provenance(self) -> dict:
        """The fields as a model made by this run carries them (:func:`without_paths`): no server path."""
        return without_paths(self.to_dict())


def without_paths(config: dict) -> dict:
    """A run's config as the model it made may carry it (``config.json``'s ``meta.config``, shared on the Hub or
    downloaded from a public Space): ``output`` and ``resume`` dropped, and a ``model``, ``data`` or ``backbone``
    that names a folder reduced to that folder's name. Names that are not paths stay as they are (``"synthetic"``,
    ``"photos"``, a timm name, ``hf:NAME``, ``bundled:cait``).

    >>> without_paths({"model": "/srv/runs/jobs/x/teacher", "data": "synthetic", "output": "/srv/runs/x/run"})
    {'model': 'teacher', 'data': 'synthetic'}
    """
    out = {k: v for k, v in config.items() if k not in ("output", "resume")}
    for key in PATH_FIELDS:
        v = out.get(key)
        if isinstance(v, str) and not v.startswith("hf:") and (os.sep in v or "/" in v or os.path.isdir(v)):
            out[key] = os.path.basename(os.path.normpath(v))
    return out
