"""Checking a fine-tune request before anything is written: every field, named as the Fine-tune tab names it."""
from __future__ import annotations

from pathlib import Path

from ...finetune.config import FinetuneConfig
from ...io.bundled import ASSETS_DIR, ORIGINAL_DIR
from ...models.deit import PATCH_SIZES
from ..public import Limits
from .model import FIELD_NAMES, JobError

REQUEST_FIELDS = frozenset(FinetuneConfig.__dataclass_fields__) - {"output", "resume", "device", "stop_at"}
"""The :class:`FinetuneConfig` fields a request may set (the job manager sets the others)."""


def _bad(key: str, why: str) -> JobError:
    return JobError(f"{FIELD_NAMES.get(key, key)}: {why}")


def validate_request(args: dict, limits: Limits, uploads: Path) -> dict:
    """A job's options checked, naming the field; returned with ``model`` resolved (``"bundled"`` → its directory).

    Args:
        args: :class:`FinetuneConfig` fields.
        limits: what this server allows (public mode: caps, no server paths).
        uploads: the directory under which uploaded archives are unpacked (the only data paths public mode takes).

    Raises:
        JobError: an unknown option, or a value outside what these limits allow.
    """
    unknown = sorted(set(args) - REQUEST_FIELDS)
    if unknown:
        raise JobError(f"unknown fine-tune options: {', '.join(unknown)}")
    args = dict(args)
    for key, lo, hi in (("steps", 1, limits.steps_cap()), ("batch_size", 2, limits.batch_cap())):
        v = args.get(key, getattr(FinetuneConfig, key))
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _bad(key, f"{v!r} is not a whole number from {lo} to {hi}"
                            + (" on this public Space" if limits.public else ""))
    if args.get("batch_size", FinetuneConfig.batch_size) % 2:
        raise _bad("batch_size", f"{args['batch_size']} is odd; Mixup/CutMix pair images, so it must be even")
    r = args.get("flops_reduction", FinetuneConfig.flops_reduction)
    if not isinstance(r, (int, float)) or not 0.0 <= r <= 0.95:
        raise _bad("flops_reduction", f"{r!r} is outside 0 to 0.95")
    size = args.get("img_size")
    if size is not None and (not isinstance(size, int) or not 16 <= size <= limits.img_size_cap()):
        raise _bad("img_size", f"{size!r} is outside 16 to {limits.img_size_cap()}")
    args["model"] = _model(str(args.get("model", FinetuneConfig.model)).strip(), limits)
    args["data"] = _data(str(args.get("data", "synthetic")).strip() or "synthetic", limits, uploads)
    return args


def _model(model: str, limits: Limits) -> str:
    if model == "bundled":
        return str(ASSETS_DIR / ORIGINAL_DIR)
    if limits.public and model not in limits.models:
        raise _bad("model", f"choose one of the listed models ({', '.join(limits.models)}); paths are not accepted "
                            "on this public Space")
    if not limits.public and model not in PATCH_SIZES and not Path(model).is_dir():
        raise _bad("model", f"{model!r} is neither a DeiT name ({', '.join(PATCH_SIZES)}) nor a checkpoint directory")
    return model


def _data(data: str, limits: Limits, uploads: Path) -> str:
    if data == "synthetic":
        return data
    path = Path(data).resolve()
    if limits.public and not path.is_relative_to(uploads.resolve()):
        raise _bad("data", "on this public Space, data is 'synthetic' or an uploaded .zip archive; server paths are "
                           "not accepted")
    if not (path / "train").is_dir() or not (path / "val").is_dir():
        raise _bad("data", f"{data}: expected an ImageFolder root with train/ and val/ (one folder per class) or "
                           "'synthetic'")
    return data
