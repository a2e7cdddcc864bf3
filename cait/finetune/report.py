"""A run's log: ``log.jsonl`` (the record every reader trusts) mirrored, on request, where researchers look.

:class:`RunLog` writes each typed record (:mod:`cait.finetune.records`) as one JSON line and, with ``--report-to``,
the same record's numbers to a tracker: ``trackio`` (a local SQLite store under ``$TRACKIO_DIR``, by default
``~/.cache/huggingface/trackio``; no Hub needed; ``trackio show --project cait`` opens its dashboard) or
``tensorboard`` (event files in ``<run>/tensorboard``). A record becomes the scalars ``"<type>/<field>"`` at its
``step``; the start record's configuration becomes the tracker run's config. Worked example::

    TrainRecord(step=10, loss=2.07, lr=1e-4, ...)  →  {"train/loss": 2.07, "train/lr": 0.0001, ...} at step 10

The fine-tuning and the segmentation engines both log through it, so the app's live curves, the JSON lines and the
tracker always show the same numbers.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .config import FinetuneError
from .records import Record, to_json

REPORT_TO = ("none", "trackio", "tensorboard")
"""Values of ``--report-to``."""
TRACKIO_PROJECT = "cait"


def check_report_to(value: str) -> None:
    """Raises :class:`FinetuneError` unless ``value`` is one of :data:`REPORT_TO` whose package is installed."""
    if value not in REPORT_TO:
        raise FinetuneError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {str(value)[:20]!r}")
    try:
        if value == "trackio":
            import trackio  # noqa: F401
        elif value == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FinetuneError(f"--report-to {value} needs the {value} package (pip install {value})") from None


def scalars(record: Record) -> dict[str, float]:
    """The record's finite numbers as ``{"<type>/<field>": value}`` (booleans, text, lists and None left out)."""
    out = {}
    for k, v in dataclasses.asdict(record).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
            out[f"{record.TYPE}/{k}"] = float(v)
    return out


class RunLog:
    """Append-only ``log.jsonl`` of one run, with an optional tracker mirror (module docstring).

    Args:
        path: the run's ``log.jsonl`` (appended to).
        report_to: ``"none"``, ``"trackio"`` or ``"tensorboard"``.
        name: the tracker run's name (default: the run directory's name); TensorBoard writes to
            ``<run directory>/tensorboard``.

    Raises:
        FinetuneError: an unknown ``report_to`` or its package missing.
    """

    def __init__(self, path: Path, report_to: str = "none", name: str | None = None) -> None:
        check_report_to(report_to)
        self.out, self.report_to = Path(path).parent, report_to
        self.name = name or self.out.resolve().name
        self.file = Path(path).open("a")
        self._tracker = None

    def write(self, record: Record) -> None:
        """One JSON line (flushed), then the record's scalars to the tracker."""
        self.file.write(to_json(record) + "\n")
        self.file.flush()
        if self.report_to == "none":
            return
        if self._tracker is None:
            self._tracker = self._open(getattr(record, "config", None))
        step = getattr(record, "step", None)
        values = scalars(record)
        if values:
            self._tracker.log(values, step)

    def _open(self, config: dict | None):
        if self.report_to == "trackio":
            return _Trackio(self.name, config)
        return _TensorBoard(self.out / "tensorboard", config)

    def close(self) -> None:
        """Close the file and finish the tracker run."""
        self.file.close()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


class _Trackio:
    def __init__(self, name: str, config: dict | None) -> None:
        import trackio
        self.trackio = trackio
        trackio.init(project=TRACKIO_PROJECT, name=name, config=config, resume="allow", embed=False,
                     auto_log_gpu=False, auto_log_cpu=False)

    def log(self, values: dict, step: int | None) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _TensorBoard:
    def __init__(self, log_dir: Path, config: dict | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if config:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, values: dict, step: int | None) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
