"""Hugging Face datasets as image data: ``hf:NAME[:CONFIG][@SPLIT]`` for fine-tuning, calibration and segmentation.

``NAME`` is a Hub dataset id (``ILSVRC/imagenet-1k``, ``frgfm/imagenette``) or a local directory: one written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``), or any folder ``load_dataset``
reads (parquet, an ``imagefolder`` tree). Offline (``HF_DATASETS_OFFLINE=1`` or no network) the HF cache serves a
dataset downloaded before; one that is not cached fails with a :class:`DataError` that names it. Streaming is not
used: step-indexed batches (:class:`cait.data.datasets.StepBatchSampler`) need random access.

Columns are found by type: the first ``Image`` column is the image, the first ``ClassLabel`` the label (its names are
the classes; none: the data is unlabelled), and for segmentation a second ``Image`` column is the mask. Splits: the
training split is ``SPLIT`` (default ``train``); the held-out one is the first of ``validation``, ``val``, ``test``
that exists, else the last ``val_size`` rows of the training split are held out. Worked example::

    hf:frgfm/imagenette:320px@train  →  load_dataset("frgfm/imagenette", "320px"), train on "train", hold out
                                         "validation"; classes from the "label" ClassLabel
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from .errors import DataError

PREFIX = "hf:"
_HELD_OUT = ("validation", "val", "test")


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf:NAME[:CONFIG][@SPLIT]``."""

    name: str
    config: str | None = None
    split: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "HubSpec":
        """Raises :class:`DataError` unless ``spec`` is ``hf:NAME[:CONFIG][@SPLIT]`` with a non-empty NAME."""
        if not is_hub(spec):
            raise DataError(f"{str(spec)[:80]!r} is not a Hub dataset (expected hf:NAME[:CONFIG][@SPLIT])")
        rest, _, split = spec[len(PREFIX):].partition("@")
        name, _, config = rest.partition(":")
        if not name or (not config and ":" in rest) or ("@" in spec and not split):
            raise DataError(f"{spec[:80]!r}: expected hf:NAME[:CONFIG][@SPLIT]")
        return cls(name, config or None, split or None)

    def __str__(self) -> str:
        return PREFIX + self.name + (f":{self.config}" if self.config else "") + (f"@{self.split}" if self.split
                                                                                else "")


def is_hub(data) -> bool:
    """Whether ``data`` names a Hub dataset (``hf:...``)."""
    return isinstance(data, str) and data.startswith(PREFIX)


def load_splits(spec: str, val_size: int) -> tuple:
    """``(train, held_out, image_column, label_column or None, other_image_columns)`` of a Hub dataset.

    Raises:
        DataError: the ``datasets`` package missing, a dataset not on the Hub and not cached (offline), no such
            config or split, or no image column.
    """
    s = HubSpec.parse(spec)
    dd = _load(s)
    split = s.split or "train"
    if split not in dd:
        raise DataError(f"{s}: no split {split!r} (it has {', '.join(dd)})")
    train = dd[split]
    held = next((dd[k] for k in _HELD_OUT if k in dd and k != split), None)
    if held is None:
        if len(train) <= val_size:
            raise DataError(f"{s}: no held-out split and only {len(train)} rows in {split!r}, {val_size} to hold out")
        held = train.select(range(len(train) - val_size, len(train)))
        train = train.select(range(len(train) - val_size))
    images, label = _columns(train, s)
    return train, held, images[0], label, images[1:]


def _load(s: HubSpec):
    """The dataset as a ``DatasetDict`` (a single saved ``Dataset`` becomes ``{"train": it}``)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{s}: Hub datasets need the datasets package (pip install datasets)") from None
    local = Path(s.name)
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file()):
            d = datasets.load_from_disk(str(local))
        else:
            d = datasets.load_dataset(s.name, s.config)
    except FileNotFoundError as e:
        raise DataError(f"{s}: not found ({_short(e)})") from None
    except (ConnectionError, OSError) as e:
        raise DataError(f"{s}: not in the Hugging Face cache and the Hub is unreachable ({_short(e)})") from None
    except ValueError as e:                              # e.g. an unknown config
        raise DataError(f"{s}: {_short(e)}") from None
    return d if isinstance(d, datasets.DatasetDict) else datasets.DatasetDict({"train": d})


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _columns(ds, s: HubSpec) -> tuple[list[str], str | None]:
    import datasets
    images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    if not images:
        raise DataError(f"{s}: no image column (columns: {', '.join(ds.features)})")
    return images, (labels[0] if labels else None)


class HubImages(Dataset):
    """Rows of a Hub dataset as ``(transform(image), label)``; label 0 where the data has none.

    Args:
        ds: a ``datasets.Dataset``.
        image: its image column; label: its ``ClassLabel`` column or None.
        transform: PIL image → ``(3, S, S)`` tensor.
    """

    def __init__(self, ds, image: str, label: str | None, transform) -> None:
        self.ds, self.image, self.label, self.transform = ds, image, label, transform
        self.classes = list(ds.features[label].names) if label else []

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple:
        row = self.ds[int(i)]
        return self.transform(row[self.image].convert("RGB")), (int(row[self.label]) if self.label else 0)
