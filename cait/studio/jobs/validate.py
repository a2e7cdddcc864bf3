"""Checking a job request before anything is written: every field of a fine-tune (:func:`validate_request`) or a
segmentation run (:func:`validate_segment_request`), named as the Fine-tune tab names it."""
from __future__ import annotations

from pathlib import Path

from ...data.calibration import CALIBRATION_SOURCES
from ...data.datasets import DataError
from ...data.hub import HubSpec, is_hub
from ...data.segmentation import check_folder
from ...dense.train import SegmentConfig
from ...finetune.config import CALIBRATE_STARTS, TOKEN_DISTILL_BLOCKS, FinetuneConfig
from ...finetune.report import REPORT_TO
from ...io.bundled import ASSETS_DIR, ORIGINAL_DIR
from ...models.deit import PATCH_SIZES
from ...models.layout import MAX_LAYOUT_CHARS
from ..public import Limits
from .model import FIELD_NAMES, JobError

MANAGED = {"output", "resume", "device", "stop_at", "time_limit_s"}
"""Set by the job manager, never by a request (``time_limit_s``: the public time budget)."""
REQUEST_FIELDS = frozenset(FinetuneConfig.__dataclass_fields__) - MANAGED
"""The :class:`FinetuneConfig` fields a request may set (the job manager sets the others)."""
SEGMENT_FIELDS = frozenset(SegmentConfig.__dataclass_fields__) - MANAGED
"""The :class:`SegmentConfig` fields a segmentation request may set."""
BUNDLED_BACKBONES = ("bundled:original", "bundled:cait")
BASELINES = ("none", "tome", "token_pruning", "atme", "cdcp")
PUBLIC_MAX_IMAGES = 2000
"""On a public Space: at most this many synthetic training, held-out or calibration images per segmentation job."""


def _bad(key: str, why: str) -> JobError:
    return JobError(f"{FIELD_NAMES.get(key, key)}: {why}")


def validate_request(args: dict, limits: Limits, uploads: Path, upload: Path | None = None) -> dict:
    """A job's options checked, naming the field; returned with ``model`` resolved (``"bundled"`` → its directory).

    Args:
        args: :class:`FinetuneConfig` fields.
        limits: what this server allows (public mode: caps, no server paths).
        uploads: the directory under which uploaded archives are unpacked.
        upload: the folder this request's own archive was unpacked into: in public mode the only data path taken
            (a typed path, even one under ``uploads``, is refused without being echoed).

    Raises:
        JobError: an unknown option, or a value outside what these limits allow.
    """
    unknown = sorted(set(args) - REQUEST_FIELDS)
    if unknown:
        raise JobError(f"unknown fine-tune options: {', '.join(unknown)}")
    args = dict(args)
    for key, lo, hi in (("steps", 1, limits.steps_cap()), ("batch_size", 2, limits.batch_cap())):
        _whole(args, key, lo, hi, FinetuneConfig, limits.public)
    if args.get("batch_size", FinetuneConfig.batch_size) % 2:
        raise _bad("batch_size", f"{args['batch_size']} is odd; Mixup/CutMix pair images, so it must be even")
    r = args.get("flops_reduction", FinetuneConfig.flops_reduction)
    if not isinstance(r, (int, float)) or not 0.0 <= r <= 0.95:
        raise _bad("flops_reduction", f"{r!r} is outside 0 to 0.95")
    if args.get("labels", "data") not in ("data", "none"):
        raise _bad("labels", f"{repr(args['labels'])[:40]} is not 'data' or 'none'")
    t = args.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 20:
        raise _bad("temperature", f"{repr(t)[:40]} is outside (0, 20]")
    size = args.get("img_size")
    if size is not None and (not isinstance(size, int) or not 16 <= size <= limits.img_size_cap()):
        raise _bad("img_size", f"{size!r} is outside 16 to {limits.img_size_cap()}")
    _label_free(args, limits)
    _finetune_numbers(args, limits)
    args["model"] = _model(str(args.get("model", FinetuneConfig.model)).strip(), limits)
    if args.get("labels") == "none" and not Path(args["model"]).is_dir() and args.get("pretrained") is not True:
        raise _bad("labels", "the original's predictions teach only with trained weights: choose the bundled model, "
                             "or a DeiT with its pretrained weights")
    args["data"] = _data(str(args.get("data", "synthetic")).strip() or "synthetic", limits, uploads,
                         label_free=args.get("labels") == "none", upload=upload)
    return args


FINETUNE_NUMBERS = {"atme_share": (0.0, 1.0), "lr": (1e-8, 1.0), "min_lr": (0.0, 1.0), "lr_warmup": (0.0, 1.0),
                    "weight_decay": (0.0, 1.0), "compactor_beta1": (0.0, 0.9999), "label_smoothing": (0.0, 0.99),
                    "mixup": (0.0, 10.0), "cutmix": (0.0, 10.0), "token_labels": (0.0, 100.0), "lasso": (0.0, 1.0),
                    "cdcp_warmup": (0.0, 1.0), "cdcp_ramp": (0.0, 1.0)}
FINETUNE_OPTIONAL = {"compactor_lr": (1e-8, 1.0), "mask_shrink": (0.0, 1.0), "distill_alpha": (0.0, 1.0)}
FINETUNE_WHOLE = {"mask_interval": (1, 10**6), "min_channels": (1, 4096), "round_to": (1, 256),
                  "eval_interval": (1, 10**7), "log_interval": (1, 10**7), "ckpt_interval": (1, 10**7),
                  "seed": (0, 2**31 - 1)}
"""Bounds of the fine-tune options a request may set beyond steps, batch, reduction and the label-free ones: a
value outside them (or NaN, or of the wrong type) is refused, naming the field, before anything is written."""


def _finetune_numbers(args: dict, limits: Limits) -> None:
    """Every other numeric option of a fine-tune request, against :data:`FINETUNE_NUMBERS` and the image counts
    against what this server allows (public: :data:`PUBLIC_MAX_IMAGES` held-out images, no data-loader workers)."""
    for key, (lo, hi) in FINETUNE_NUMBERS.items():
        _number(args, key, lo, hi, cls=FinetuneConfig)
    for key, (lo, hi) in FINETUNE_OPTIONAL.items():
        _number(args, key, lo, hi, optional=True, cls=FinetuneConfig)
    for key, (lo, hi) in FINETUNE_WHOLE.items():
        _whole(args, key, lo, hi, FinetuneConfig)
    public = limits.public
    _whole(args, "val_size", 1, PUBLIC_MAX_IMAGES if public else 1_000_000, FinetuneConfig, public)
    _whole(args, "synthetic_size", 1, 10**6 if public else 10**9, FinetuneConfig, public)
    _whole(args, "workers", 0, 0 if public else 64, FinetuneConfig, public)
    merge = args.get("merge")
    if merge is not None and (not isinstance(merge, str) or len(merge) > 100):
        raise _bad("merge", "must be a layout such as 'h4,v9', 'none' or 'auto'")
    if not isinstance(args.get("amp", True), bool):
        raise _bad("amp", "must be true or false")


def _label_free(args: dict, limits: Limits) -> None:
    """The label-free options: token distillation's weight and blocks, calibration images, their source and the
    start they calibrate, bf16 on the CPU, and (not on a public Space, where nothing is written outside the runs
    directory) a tracker."""
    w = args.get("token_distill", 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 100:
        raise _bad("token_distill", f"{repr(w)[:40]} is outside 0 to 100")
    if w > 0 and args.get("labels", "data") != "none":
        raise _bad("token_distill", "applies only when the targets are the original's predictions (labels: none)")
    for key, allowed in (("token_distill_blocks", TOKEN_DISTILL_BLOCKS), ("calibrate_start", CALIBRATE_STARTS)):
        value = args.get(key, allowed[0])
        if value not in allowed:
            raise _bad(key, f"{repr(value)[:20]} is not {' or '.join(repr(a) for a in allowed)}")
    _whole(args, "calibrate", 0, PUBLIC_MAX_IMAGES if limits.public else 100_000, FinetuneConfig, limits.public)
    source = args.get("calibration_data", "default")
    if source not in CALIBRATION_SOURCES:
        raise _bad("calibration_data", f"{str(source)[:40]!r} is not one of {', '.join(CALIBRATION_SOURCES)}")
    for key in ("cpu_bf16", "pretrained"):
        if not isinstance(args.get(key, False), bool):
            raise _bad(key, "must be true or false")
    _report_to(args, limits)


def _report_to(args: dict, limits: Limits) -> None:
    """A tracker, locally; none on a public Space (nothing is written outside the runs directory there)."""
    report = args.get("report_to", "none")
    if report not in REPORT_TO or (limits.public and report != "none"):
        raise _bad("report_to", f"{str(report)[:20]!r} is not " + ("'none' on this public Space" if limits.public
                                                                     else f"one of {', '.join(REPORT_TO)}"))


def _whole(args: dict, key: str, lo: int, hi: int, cls=SegmentConfig, public: bool = False) -> int:
    """``args[key]`` (else ``cls``'s default) if a whole number in ``[lo, hi]``, else a :class:`JobError` naming it."""
    v = args.get(key, getattr(cls, key))
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(key, f"{repr(v)[:40]} is not a whole number from {lo} to {hi}"
                        + (" on this public Space" if public else ""))
    return v


def _number(args: dict, key: str, lo: float, hi: float, optional: bool = False, cls=SegmentConfig) -> float | None:
    v = args.get(key, getattr(cls, key))
    if v is None and optional:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(key, f"{repr(v)[:40]} is outside {lo:g} to {hi:g}")
    return float(v)


def validate_segment_request(args: dict, limits: Limits, uploads: Path, job_models: dict[str, str],
                             upload: Path | None = None) -> dict:
    """A segmentation job's options checked, naming the field; ``backbone`` resolved (``job:<id>`` → its model's
    directory) and the data folder checked image by image (:func:`cait.data.segmentation.check_folder`).

    Args:
        args: :class:`cait.dense.train.SegmentConfig` fields.
        limits: what this server allows.
        uploads: where uploaded archives are unpacked.
        upload: this request's own unpacked archive, the only data path public mode takes.
        job_models: ``{"job:<id>": directory}`` of the finished fine-tunes this visitor may segment with.

    Raises:
        JobError: an unknown option, a value outside these limits, or data that would fail (each problem named).
    """
    unknown = sorted(set(args) - SEGMENT_FIELDS)
    if unknown:
        raise JobError(f"unknown segmentation options: {', '.join(unknown)[:200]}")
    args, public = dict(args), limits.public
    _whole(args, "steps", 1, limits.steps_cap(), public=public)
    _whole(args, "batch_size", 1, limits.batch_cap(), public=public)
    for key in ("train_size", "val_size", "calibration_size"):
        _whole(args, key, 1, PUBLIC_MAX_IMAGES if public else 1_000_000, public=public)
    for key in ("eval_interval", "log_interval", "ckpt_interval"):
        _whole(args, key, 1, 1_000_000)
    _whole(args, "seed", 0, 2**31 - 1)
    _whole(args, "pyramid_channels", 8, 512)
    if _whole(args, "segmentation_channels", 32, 512) % 32:
        raise _bad("segmentation_channels", "must be a multiple of 32 (GroupNorm)")
    _number(args, "flops_reduction", 0.0, 0.95)
    _number(args, "lr", 1e-7, 1.0)
    _number(args, "backbone_lr", 1e-8, 1.0, optional=True)
    _number(args, "weight_decay", 0.0, 1.0)
    _number(args, "lr_warmup", 0.0, 1.0)
    size = args.get("img_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or not 16 <= size <= limits.img_size_cap()):
        raise _bad("img_size", f"{repr(size)[:40]} is outside 16 to {limits.img_size_cap()}")
    _report_to(args, limits)
    baseline = args.get("baseline", SegmentConfig.baseline)
    if baseline not in BASELINES:
        raise _bad("baseline", f"{str(baseline)[:40]!r} is not one of {', '.join(BASELINES)}")
    merge = args.get("merge")
    if merge is not None and (not isinstance(merge, str) or len(merge) > MAX_LAYOUT_CHARS):
        raise _bad("merge", f"at most {MAX_LAYOUT_CHARS} characters, e.g. h5,v10")
    args["backbone"] = _backbone(str(args.get("backbone", SegmentConfig.backbone)).strip(), limits, job_models)
    args["data"] = _data(str(args.get("data", "synthetic")).strip() or "synthetic", limits, uploads, segmentation=True,
                         upload=upload)
    return args


def _backbone(name: str, limits: Limits, job_models: dict[str, str]) -> str:
    if name in BUNDLED_BACKBONES or (name in limits.models and name != "bundled"):
        return name
    if name in job_models:
        return job_models[name]
    if name.startswith("job:"):
        raise _bad("backbone", f"{name[:40]!r} is not one of your finished fine-tune jobs")
    if limits.public:
        raise _bad("backbone", f"choose one of {', '.join(BUNDLED_BACKBONES)}, a listed DeiT or a finished job; "
                               "paths are not accepted on this public Space")
    if name not in PATCH_SIZES and not Path(name).is_dir():
        raise _bad("backbone", f"{name[:80]!r} is neither bundled:original|cait, a DeiT name nor a checkpoint "
                               "directory")
    return name


def _model(model: str, limits: Limits) -> str:
    if model == "bundled":
        return str(ASSETS_DIR / ORIGINAL_DIR)
    if limits.public and model not in limits.models:
        raise _bad("model", f"choose one of the listed models ({', '.join(limits.models)}); paths are not accepted "
                            "on this public Space")
    if not limits.public and model not in PATCH_SIZES and not Path(model).is_dir():
        raise _bad("model", f"{model!r} is neither a DeiT name ({', '.join(PATCH_SIZES)}) nor a checkpoint directory")
    return model


def _data(data: str, limits: Limits, uploads: Path, segmentation: bool = False, label_free: bool = False,
          upload: Path | None = None) -> str:
    """The data field: ``synthetic``, ``photos`` (classification), locally also a folder or ``hf:`` spec; in public
    mode a path only when it is this request's own upload (never typed), and no refusal shows the path."""
    if data == "synthetic" or (data == "photos" and not segmentation):
        return data
    if is_hub(data) and not limits.public:             # read by the job itself (cait.data.hub), named if it fails
        try:
            return str(HubSpec.parse(data))
        except DataError as e:
            raise _bad("data", str(e)) from None
    path = Path(data).resolve()
    if limits.public and (upload is None or not path.is_relative_to(Path(upload).resolve())):
        raise _bad("data", "on this public Space, data is 'synthetic', 'photos' or the .zip archive you upload with "
                           "this request; typed paths are not accepted")
    shown = "the uploaded set" if limits.public else data             # no server path reaches the browser
    if segmentation:
        try:
            check_folder(path)
        except DataError as e:
            text = str(e).replace(f"{path}: ", f"{shown}: ").replace(str(path), shown) if limits.public else str(e)
            raise _bad("data", text[:1000]) from None
        return data
    flat = label_free and path.is_dir() and not (path / "train").exists() and not (path / "val").exists()
    if not flat and (not (path / "train").is_dir() or not (path / "val").is_dir()):
        raise _bad("data", f"{shown}: expected an ImageFolder root with train/ and val/ (one folder per class), "
                           + ("a folder of images, " if label_free else "") + "or 'synthetic'")
    return data
