"""A fine-tune run directory: the files the engine (:mod:`cait.finetune`) writes and the app reads back.

::

    OUTPUT/log.jsonl                        one typed record per line (cait.finetune.records)
    OUTPUT/train_state-0000300.json         step, masked set S, optimizer groups, config, history (written last)
    OUTPUT/train_state-0000300.safetensors  model.* and opt.<param>.<moment> tensors (no pickle anywhere)
    OUTPUT/teacher/, OUTPUT/compact/        checkpoints (:mod:`cait.io.checkpoint`)

Training states are written atomically and the newest two kept. Readers never import the training engine.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..compress.importance import ChannelScores
from ..compress.select import ChannelMask
from ..io.checkpoint import CONFIG_NAME, atomic_write, build_skeleton, read_config
from ..models.atme import apply_atme
from ..models.spec import ModelSpec, describe
from .config import FinetuneError
from .records import Record, StartRecord, TrainRecord, from_json, of_type

LOG_NAME = "log.jsonl"


class RunDirError(RuntimeError):
    """A run directory that lacks what was asked of it (no training state yet, an unreadable state)."""


# ----------------------------------------------------------------------------------------------------------------
# Training states
# ----------------------------------------------------------------------------------------------------------------
def state_files(out: str | os.PathLike) -> list[tuple[int, Path, Path]]:
    """``(step, json, safetensors)`` of every complete training state in ``out``, oldest first."""
    found = []
    for j in Path(out).glob("train_state-*.json"):
        st = j.with_suffix(".safetensors")
        try:
            step = int(j.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if st.is_file():
            found.append((step, j, st))
    return sorted(found)


def save_state(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, mask: ChannelMask | None,
               extra: dict) -> None:
    """Write the training state of ``step`` (model, optimizer moments, S, ``extra``); keep the newest two."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    groups = [dict(g) for g in osd["param_groups"]]
    meta = {"step": step, "mask": None if mask is None else mask.to_dict(), "opt_groups": groups, **extra}
    stem = out / f"train_state-{step:07d}"
    atomic_write(stem.with_suffix(".safetensors"), lambda f: save_file(tensors, f))
    atomic_write(stem.with_suffix(".json"), lambda f: Path(f).write_text(json.dumps(meta)))   # written last
    for _, j, st in state_files(out)[:-2]:
        j.unlink(missing_ok=True)
        st.unlink(missing_ok=True)


def read_state(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The newest training state: ``(meta, tensors)``.

    Raises:
        RunDirError: no state, or an unreadable one.
    """
    states = state_files(out)
    if not states:
        raise RunDirError(f"{out}: there is no training state to resume from")
    step, jfile, sfile = states[-1]
    try:
        return json.loads(jfile.read_text()), load_file(sfile)
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise RunDirError(f"{jfile.parent}: training state of step {step} is unreadable ({e})") from None


def restore_state(model: nn.Module, opt: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]
                  ) -> None:
    """Load a state from :func:`read_state` into a model and its optimizer (built as for the saved run)."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    osd = {"state": {}, "param_groups": meta["opt_groups"]}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            osd["state"].setdefault(int(pid), {})[name] = v
    for g in osd["param_groups"]:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict(osd)


def prepare_output(output: str | os.PathLike, resume: bool) -> Path:
    """A run's ``--output``: created, checked writable, and holding no earlier run unless resuming (rank 0 calls it).

    Raises:
        FinetuneError: a directory that cannot be written, or one with an earlier run and no ``resume``.
    """
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise FinetuneError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    if not resume and state_files(out):
        raise FinetuneError(f"{out}: holds an earlier run; pass --resume to continue it or choose a new --output")
    return out


def changed_fields(cfg, logged: dict) -> list[str]:
    """The fields of ``type(cfg).IDENTITY`` (those that define a run) whose logged value differs from ``cfg``'s; a
    field the log predates counts as its default."""
    defaults = type(cfg)().to_dict()
    return [k for k in type(cfg).IDENTITY if logged.get(k, defaults[k]) != getattr(cfg, k)]


def resume_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg) -> dict:
    """Restore the newest training state of ``out`` into ``model`` and ``opt``, after checking it was written by the
    same configuration (:func:`changed_fields`); returns the state's JSON part (``step``, ``mask``, ...).

    Raises:
        FinetuneError: no readable state, or a different configuration (each changed field with both values).
    """
    try:
        meta, tensors = read_state(out)
    except RunDirError as e:
        raise FinetuneError(f"--resume given, but {e}") from None
    before = meta.get("config", {})
    diff = changed_fields(cfg, before)
    if diff:
        raise FinetuneError(f"{out}: cannot resume a different configuration; changed: "
                            + ", ".join(f"{k} ({before.get(k)!r} → {getattr(cfg, k)!r})" for k in diff))
    restore_state(model, opt, meta, tensors)
    return meta


# ----------------------------------------------------------------------------------------------------------------
# The log
# ----------------------------------------------------------------------------------------------------------------
def read_log(run_dir: str | os.PathLike) -> list[Record]:
    """The records of a run's ``log.jsonl`` (a partial last line, still being written, is skipped)."""
    return LogReader(Path(run_dir) / LOG_NAME).records()


def training_seconds(records: list[Record], train: type = TrainRecord, start: type = StartRecord) -> float:
    """Wall-clock seconds a run spent training, from its log: each ``train`` record covers the images since the
    previous one at its measured ``images_per_s`` (evaluations and checkpoints included). A resumed run logs some
    steps twice; the last record of a step counts, so work lost to an interruption is not counted and an
    interruption (which writes nothing) does not lose the time before it. ``train`` and ``start`` are the record
    classes of the engine that wrote the log (the segmentation engine's: ``SegmentTrainRecord``, ...)."""
    last = {r.step: r for r in of_type(records, train)}
    batch = next(r.config["batch_size"] for r in of_type(records, start))
    seconds, previous = 0.0, 0
    for step in sorted(last):
        seconds += (step - previous) * batch / last[step].images_per_s
        previous = step
    return seconds


class LogReader:
    """Reads a growing ``log.jsonl`` incrementally: each call parses only the lines appended since the last one
    (a partial last line waits for its newline). Polling a finished run costs one ``stat``.

    Args:
        path: the log file (it may not exist yet).
    """

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._records = Path(path), 0, []

    def records(self) -> list[Record]:
        """Every complete record so far (the same list object, grown in place); lines that are not JSON, of a kind
        this version does not know, or lacking a required field are skipped."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return self._records
        if size < self._offset:                               # truncated or replaced: start over
            self._offset, self._records = 0, []
        if size > self._offset:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read(size - self._offset)
            end = chunk.rfind(b"\n") + 1                      # only whole lines
            for line in chunk[:end].splitlines():
                try:
                    record = from_json(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                    continue
                if record is not None:
                    self._records.append(record)
            self._offset += end
        return self._records


# ----------------------------------------------------------------------------------------------------------------
# The compactors of a run (the app's Compactors tab)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CompactorSnapshot:
    """The compactors of a run at its newest training state.

    Attributes:
        step: the training step of the state.
        scores: compactor row norms (:class:`cait.compress.importance.ChannelScores`).
        mask: the masked set S at that step (None before the first selection).
        spec: the student's shape before pruning (ATME applied), for FLOPs.
        target_flops: the run's final FLOPs target.
    """

    step: int
    scores: ChannelScores
    mask: ChannelMask | None
    spec: ModelSpec
    target_flops: int


def compactor_snapshot(run_dir: str | os.PathLike) -> CompactorSnapshot:
    """Read the newest training state of a run directory (running or finished).

    Raises:
        RunDirError: if the run has no training state or no start record yet, or trained no compactors.
    """
    run = Path(run_dir)
    states = state_files(run)
    start = next(iter(of_type(read_log(run), StartRecord)), None)
    if not states or start is None or not (run / "teacher" / CONFIG_NAME).is_file():
        raise RunDirError(f"{run}: no training state yet")
    step, jfile, sfile = states[-1]
    meta = json.loads(jfile.read_text())
    tensors = load_file(sfile)
    if "model.blocks.0.attn.qkv.q" not in tensors:
        raise RunDirError(f"{run}: this run has no compactors (no channel budget: nothing for CDCP to do)")
    skeleton = apply_atme(build_skeleton(read_config(run / "teacher")), start.merge)
    spec = describe(skeleton)
    norms = {kind: [tensors[f"model.blocks.{l}.{path}"].float().norm(dim=-1) for l in range(len(spec.blocks))]
             for kind, path in (("q", "attn.qkv.q"), ("k", "attn.qkv.k"), ("v", "attn.qkv.v"), ("ffn", "mlp.fc1.q"))}
    mask = None if meta.get("mask") is None else ChannelMask.from_dict(meta["mask"])
    return CompactorSnapshot(step, ChannelScores(**norms), mask, spec, int(start.target_flops))
