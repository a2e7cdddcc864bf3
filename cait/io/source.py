"""One typed model source for the library, the command lines and the app: where a model comes from, parsed once.

Four spellings, one :class:`ModelSource` each:

- a timm name: ``deit_small_patch16_224``, ``vit_small_patch14_reg4_dinov2``, ``vit_base_patch16_clip_224.openai``
  (timm's ImageNet or pretraining weights from the Hub when reachable; random weights otherwise, and
  :class:`cait.models.deit.WeightsInfo` says so);
- ``hf-hub:owner/name[@revision]``: a model on the Hugging Face Hub (timm's own convention), either a timm model
  (``config.json`` with ``architecture`` + ``model.safetensors``, e.g. ``hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k``
  or your fine-tune pushed with timm) or a CAIT checkpoint (:func:`cait.push_to_hub`); downloaded once, then read
  from the local Hugging Face cache, offline too;
- a directory: a CAIT checkpoint written by :func:`cait.save_pretrained` (or a timm-format folder);
- ``bundled``: the DeiT-Tiny trained here on synthetic shapes, shipped with the package.

Weights are read with safetensors only: a Hub repository that has only ``pytorch_model.bin`` is refused, never
unpickled.

>>> ModelSource.parse("hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k@main")
ModelSource(kind='hub', name='timm/vit_small_patch16_224.augreg_in21k_ft_in1k', revision='main')
>>> str(ModelSource.parse("vit_small_patch14_reg4_dinov2"))
'vit_small_patch14_reg4_dinov2'
>>> ModelSource.parse("resnet_imaginary")
Traceback (most recent call last):
    ...
ValueError: model 'resnet_imaginary' is neither a timm model name, an hf-hub:owner/name id, a checkpoint directory nor 'bundled'
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..models.deit import WeightsInfo, create_model as create_timm_model, update_cfg
from .bundled import bundled_pair
from ..models.arch import MAX_PARAMS
from .checkpoint import CONFIG_NAME, DATA_KEYS, FORMAT, NUM_CLASSES_RANGE, WEIGHTS_NAME, CheckpointError, \
    load_checkpoint, read_json_file
from .hub import HUB_PREFIX, HubError, download, parse_hub_id

KINDS = ("timm", "hub", "dir", "bundled")
NOT_MODEL_ARGS = (set(inspect.signature(timm.create_model).parameters) - {"kwargs"}) | {
    "features_only", "feature_cfg", "pretrained_strict", "pretrained_filter_fn", "device", "dtype"}
"""Keys a Hub ``config.json``'s ``model_args`` may not set: timm's loading options, not the model's."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from (module docstring).

    Attributes:
        kind: ``"timm"`` (``name`` a timm model name), ``"hub"`` (``name`` ``owner/name``, ``revision`` optional),
            ``"dir"`` (``name`` a directory) or ``"bundled"``.
    """

    kind: str
    name: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"{HUB_PREFIX}{self.name}" + (f"@{self.revision}" if self.revision else "")
        return "bundled" if self.kind == "bundled" else self.name

    @classmethod
    def parse(cls, text: "str | os.PathLike | ModelSource") -> "ModelSource":
        """The source a spelling names.

        Raises:
            ValueError: for anything that is none of the four spellings (a malformed Hub id says why).
        """
        if isinstance(text, ModelSource):
            return text
        text = str(text).strip()
        if not text:
            raise ValueError("model: empty; give a timm model name, an hf-hub:owner/name id, a checkpoint directory "
                             "or 'bundled'")
        if text == "bundled":
            return cls("bundled")
        if text.startswith(HUB_PREFIX):
            try:
                repo, revision = parse_hub_id(text)
            except HubError as e:
                raise ValueError(str(e)) from None
            return cls("hub", repo, revision)
        if Path(text).is_dir():
            return cls("dir", text)
        if timm.is_model(text):
            return cls("timm", text)
        raise ValueError(f"model {text[:120]!r} is neither a timm model name, an hf-hub:owner/name id, a checkpoint "
                         f"directory nor 'bundled'")

    def load(self, pretrained: bool = True, **kwargs) -> tuple[nn.Module, WeightsInfo]:
        """Build the model, in eval mode on the CPU.

        Args:
            pretrained: for a timm name, try timm's weights (else random, said in the returned info).
            **kwargs: for a timm name, passed to ``timm.create_model`` (e.g. ``img_size``, ``num_classes``).

        Returns:
            ``(model, info)``.

        Raises:
            CheckpointError: a directory or Hub repository that is not a loadable checkpoint, a Hub id that cannot
                be fetched, or one with no ``model.safetensors``.
            ValueError: ``bundled`` when this installation has no bundled pair.
        """
        if self.kind == "timm":
            return create_timm_model(self.name, pretrained=pretrained, **kwargs)
        if self.kind == "bundled":
            pair = bundled_pair()
            if pair is None:
                raise ValueError("this installation has no bundled pair (assets/deit_tiny_synthetic)")
            return pair.load()[0], WeightsInfo("checkpoint", "the bundled DeiT-Tiny, trained here on synthetic shapes")
        if self.kind == "dir":
            return _load_folder(Path(self.name), None), WeightsInfo("checkpoint", f"checkpoint {Path(self.name).name}")
        try:
            folder = download(str(self))
        except HubError as e:
            raise CheckpointError(str(e)) from None
        return _load_folder(folder, self.name), WeightsInfo("hub", f"{self} (from the Hub or the local cache)")


def create_model(source: "str | os.PathLike | ModelSource", pretrained: bool = True, **kwargs
                 ) -> tuple[nn.Module, WeightsInfo]:
    """Create a model from any source: a timm name, ``hf-hub:owner/name[@revision]``, a checkpoint directory or
    ``"bundled"`` (:class:`ModelSource`); ``cait.create_model`` is this function.

    Args:
        source: the spelling or a :class:`ModelSource`.
        pretrained: for a timm name, try timm's weights; when the Hub cannot be reached the model is randomly
            initialised and the returned :class:`cait.models.deit.WeightsInfo` says why.
        **kwargs: for a timm name, passed to ``timm.create_model`` (``num_classes``, ``img_size``, ...).

    Returns:
        ``(model, info)``; the model is in eval mode on the CPU.

    Raises:
        ValueError: for a spelling that names no model.
        CheckpointError: for a directory or Hub repository that cannot be loaded (the message says why).
    """
    return ModelSource.parse(source).load(pretrained=pretrained, **kwargs)


def _load_folder(folder: Path, hub_id: str | None) -> nn.Module:
    """A CAIT checkpoint (``config.json`` format :data:`cait.io.checkpoint.FORMAT`) or a timm-format folder."""
    cfile = folder / CONFIG_NAME
    config = read_json_file(cfile, missing=f"missing (the folder has no {CONFIG_NAME}: not a checkpoint)")
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfile}: not a JSON object")
    if config.get("format") == FORMAT:
        return load_checkpoint(folder, hub_id=hub_id)
    return _load_timm_folder(folder, config, hub_id)


def _load_timm_folder(folder: Path, config: dict, hub_id: str | None) -> nn.Module:
    """timm's Hub format: ``config.json`` (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) and
    ``model.safetensors``; shapes checked from the header on the ``meta`` device before anything is allocated."""
    where = hub_id or folder.name
    arch, args = config.get("architecture"), config.get("model_args", {})
    classes = config.get("num_classes", config.get("pretrained_cfg", {}).get("num_classes"))
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise CheckpointError(f"{where}: config.json names no timm architecture (got {str(arch)[:80]!r})")
    if not isinstance(args, dict) or not all(isinstance(v, (int, float, str, bool, list)) for v in args.values()):
        raise CheckpointError(f"{where}: config.json 'model_args' must map names to plain values")
    loaders = sorted(set(args) & NOT_MODEL_ARGS)
    if loaders:                       # e.g. checkpoint_path would make timm read (and unpickle) another file
        raise CheckpointError(f"{where}: config.json 'model_args' may not set {loaders}")
    if classes is not None and (not isinstance(classes, int) or not NUM_CLASSES_RANGE[0] <= classes <= NUM_CLASSES_RANGE[1]):
        raise CheckpointError(f"{where}: config.json 'num_classes' out of bounds ({classes!r})")
    wfile = folder / WEIGHTS_NAME
    if not wfile.is_file():
        raise CheckpointError(f"{where}: no {WEIGHTS_NAME} (weights are read with safetensors only, never unpickled)")
    kwargs = dict(args, **({} if classes is None else {"num_classes": classes}))
    try:
        with torch.device("meta"):
            expected = timm.create_model(arch, pretrained=False, **kwargs).state_dict()
        if sum(t.numel() for t in expected.values()) > MAX_PARAMS:
            raise ValueError(f"more than {MAX_PARAMS:,} parameters")
        with safe_open(wfile, framework="pt") as f:
            header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: cannot be checked ({type(e).__name__}: {str(e)[:160]})") from None
    wrong = sorted(set(expected) ^ set(header)) or [k for k in expected if header[k] != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{where}: {WEIGHTS_NAME} does not match {arch} (tensors {wrong[:3]})")
    model = timm.create_model(arch, pretrained=False, **kwargs)
    model.load_state_dict(load_file(wfile), strict=True)
    cfg = {k: v for k, v in (config.get("pretrained_cfg") or {}).items()
           if k in DATA_KEYS + ("input_size", "license") and isinstance(v, (int, float, str, list))}
    return update_cfg(model, **cfg, architecture=arch, hf_hub_id=hub_id).eval()
