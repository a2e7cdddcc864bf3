"""The Hugging Face Hub: publish a model with a generated model card, and load one back by ``hf-hub:owner/name``.

A repository holds what :func:`cait.save_pretrained` writes (``model.safetensors`` + ``config.json``) and a
``README.md`` model card with the measured FLOPs, parameters, CPU speed-up against the uncompressed architecture,
the ATME layout, the kept widths and how the model was made (fine-tuned, calibrated or preview)::

    cait.push_to_hub(model, "you/deit-s-cait")                   # create the repo if needed, upload
    model = cait.load_pretrained("hf-hub:you/deit-s-cait")        # download once, then from the local cache
    model = cait.load_pretrained("hf-hub:you/deit-s-cait@v1")     # a tag, branch or commit

Loading goes through ``huggingface_hub.snapshot_download`` with only those two files allowed, so it works offline
from the local Hugging Face cache (``HF_HUB_OFFLINE=1``), and nothing but safetensors and JSON is ever read.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi, snapshot_download

from ..measure.flops import count_flops, count_params
from ..measure.speed import compare_throughput, speedup_spread
from ..models.deit import architecture
from ..models.meta import meta_of
from ..models.spec import describe
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_checkpoint, save_pretrained

HUB_PREFIX = "hf-hub:"
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubError(RuntimeError):
    """A Hub operation that failed (bad repository id, no network, no permission); the message says which."""


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """``"hf-hub:owner/name@rev"`` (prefix optional) → ``("owner/name", "rev")``.

    Raises:
        HubError: for anything that is not ``owner/name`` with an optional ``@revision``.
    """
    spec = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    repo, at, revision = spec.partition("@")
    if not _REPO.match(repo) or (at and not re.match(r"^[\w./-]{1,128}$", revision)):
        raise HubError(f"{spec!r} is not a Hub model id (expected owner/name or owner/name@revision)")
    return repo, revision or None


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`cait.save_pretrained`, from a directory or from the Hub; never unpickles.

    Args:
        path: a checkpoint directory, or ``"hf-hub:owner/name[@revision]"`` (downloaded once, then read from the local
            Hugging Face cache, offline too).
        device: where to put the model.

    Returns:
        The model in eval mode, float32 (fp16 checkpoints are upcast), with ``model.cait_meta``
        (:class:`cait.models.meta.ModelMeta`) from its config.

    Raises:
        CheckpointError: naming the file and the problem (:func:`cait.io.checkpoint.load_checkpoint`), or a Hub id
            that is malformed or cannot be fetched.
    """
    if not str(path).startswith(HUB_PREFIX):
        return load_checkpoint(path, device)
    try:
        repo = parse_hub_id(str(path))[0]
        folder = download(str(path))
    except HubError as e:
        raise CheckpointError(str(e)) from None
    return load_checkpoint(folder, device, hub_id=repo)


def download(spec: str) -> Path:
    """The local folder of a Hub checkpoint (``config.json`` + ``model.safetensors``), from the cache if present.

    Raises:
        HubError: an invalid id, or the files are neither cached nor downloadable (offline, missing, private).
    """
    repo, revision = parse_hub_id(spec)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as e:  # network, auth, missing repo, offline cache miss: one message, the cause attached
        raise HubError(f"{HUB_PREFIX}{repo}: cannot be fetched ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no detail'})") from e


def measure(model: nn.Module, batch_size: int = 8, rounds: int = 3) -> dict:
    """What the model card reports: FLOPs and params of the model and of its uncompressed architecture, and the CPU
    speed-up between them (both timed in alternation here; weights do not affect speed): the median over ``rounds``
    and its lowest and highest round (``cpu_speedup_range``)."""
    base = timm.create_model(architecture(model), pretrained=False, num_classes=model.num_classes,
                             img_size=model.patch_embed.img_size[0]).eval()
    speed = compare_throughput({"base": base, "model": model}, batch_size=batch_size, device="cpu", warmup=1,
                               iters=2, rounds=rounds)
    up = speedup_spread(speed, "model", "base")
    return {"flops": count_flops(model), "base_flops": count_flops(base), "params": count_params(model),
            "base_params": count_params(base), "cpu_speedup": up.median, "cpu_speedup_range": [up.low, up.high],
            "rounds": up.n, "batch_size": batch_size}


def model_card(model: nn.Module, repo_id: str, numbers: dict | None = None) -> str:
    """A ``README.md`` for the repository: what the model is, its measured cost, how it was made, how to load it."""
    meta = meta_of(model)
    layout = meta.merge or "none"
    blocks = describe(model).blocks
    widths = ", ".join(f"{b.qk_dim}/{b.v_dim}/{b.ffn_dim}" for b in blocks)
    if meta.finetune is not None:
        f = meta.finetune
        how = f"Fine-tuned with CDCP (`python -m cait.finetune`): held-out {f.score_text(_val_size(meta))}."
    elif meta.calibration:
        c = meta.calibration
        how = (f"Calibrated without training (`python -m cait.compress`): Fisher channel scores and a least-squares "
               f"refit on {c.images} unlabelled images ({c.source}).")
    elif meta.preview:
        how = "An untrained preview (`cait.compress` without calibration): for its architecture and speed only."
    else:
        how = "Saved with `cait.save_pretrained`."
    rows = ""
    if numbers:
        rows = ("\n| | uncompressed | this model |\n| --- | --- | --- |\n"
                f"| FLOPs (multiply-adds, one image) | {numbers['base_flops'] / 1e9:.3f} G | "
                f"{numbers['flops'] / 1e9:.3f} G "
                f"({100 * (1 - numbers['flops'] / numbers['base_flops']):.1f}% fewer) |\n"
                f"| parameters | {numbers['base_params'] / 1e6:.2f} M | {numbers['params'] / 1e6:.2f} M |\n"
                f"| CPU throughput, batch {numbers['batch_size']} (measured when pushed) | 1.00× | "
                f"{numbers['cpu_speedup']:.2f}×" + (f" ({numbers['cpu_speedup_range'][0]:.2f}–"
                                                     f"{numbers['cpu_speedup_range'][1]:.2f} over "
                                                     f"{numbers['rounds']} rounds)" if "rounds" in numbers else "")
                + " |\n")
    planner = meta.planner or {}
    if planner.get("planner") == "measured":
        how += (f" Layout chosen by the measured planner (`--plan measured`): {planner.get('rule', '')}; "
                f"{planner.get('candidates', '?')} layouts scored.")
    elif planner.get("planner") == "paper":
        how += f" Layout by the paper's rule (ATME planned for {100 * planner.get('atme_share', 0.8):.0f}% of R)."
    classes = meta.classes
    named = f" ({', '.join(classes)})" if classes and len(classes) <= 20 else ""
    return f"""---
tags: [image-classification, vision-transformer, cait, token-merging, pruning]
library_name: cait-studio
---

# {repo_id.split('/')[-1]}

A CAIT-compressed {architecture(model)} (asymmetric token merging + consistent dynamic channel pruning),
{model.patch_embed.img_size[0]} px, {model.num_classes} classes{named}.
{rows}
- ATME layout: `{layout}` (0-based blocks: HTM/VTM before each named block)
- kept widths per block (q/k per head / v per head / FFN): {widths}
- how it was made: {how}

## Use

```python
import cait
model = cait.load_pretrained("hf-hub:{repo_id}")     # safetensors + JSON only, never a pickle
```

Made with CAIT Studio; `config.json` is format `cait-studio/compact-v1`.
"""


def push_to_hub(model: nn.Module, repo_id: str, private: bool = False, token: str | None = None,
                folder: str | None = None, measure_speed: bool = True, upload: bool = True,
                commit_message: str = "Upload CAIT model") -> str:
    """Write the model, its config and a model card into a folder and upload it to ``repo_id``.

    Args:
        model: a model built by this package (compactors folded).
        repo_id: ``owner/name``; the repository is created if it does not exist.
        private: create it private.
        token: a Hub token (default: the logged-in one).
        folder: where to write the files first (default: a temporary directory).
        measure_speed: time the model against its uncompressed architecture for the card (seconds on a CPU).
        upload: False only writes the folder (to inspect it, or to upload it yourself).

    Returns:
        The commit URL, or the folder when ``upload`` is False.

    Raises:
        HubError: an invalid id, or the Hub refused or could not be reached.
    """
    repo, _ = parse_hub_id(repo_id)
    where = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="cait-hub-"))
    save_pretrained(model, where)
    numbers = measure(model) if measure_speed else None
    (where / "README.md").write_text(model_card(model, repo, numbers))
    if not upload:
        return str(where)
    try:
        api = HfApi(token=token)
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(where), repo_id=repo, commit_message=commit_message)
    except Exception as e:  # network, auth, quota: one message, the cause attached
        raise HubError(f"{repo}: upload failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from e
    return str(getattr(info, "commit_url", info))


def _val_size(meta) -> int | None:
    """The held-out images of the run that made a model (its config's ``val_size``), for records without their n."""
    return (meta.config or {}).get("val_size")
