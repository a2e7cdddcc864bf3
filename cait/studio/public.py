"""Public mode: what an anonymous visitor of a public Space may ask of the server.

On a Hugging Face Space (``SPACE_ID`` set), with ``CAIT_PUBLIC=1`` or ``python app.py --public``, every input from
the browser is hostile until validated. :class:`Limits` holds the caps; :func:`extract_archive` is the one way a
visitor's data reaches the server (a ``.zip`` of an ImageFolder tree, checked member by member); the job manager
(:mod:`cait.studio.jobs`) enforces the rest: job ownership, queue quotas and retention. Locally (not public) the full
power stays: server paths, any step count, no quotas.

Defaults in public mode::

    fine-tune   models: the bundled DeiT-Tiny, DeiT-Tiny/Small, the tiny test DeiT (never a path)
                data: 'synthetic' or an uploaded .zip (≤ 50 MB unpacked, ≤ 20,000 images); server paths refused
                steps ≤ 2,000, batch ≤ 64, image size ≤ 224 px
                ≤ 2 active jobs per visitor (by address), ≤ 8 in total; a job is cancelled only by its session
    cost        batch ≤ 32, timed for ≤ 30 s;  uploads ≤ 16 MP
    disk        5 GB in all, 2.5 GB per visitor, 2 GB per job, 300 MB of uploads per visitor per hour: a request
                that does not fit is refused, nothing another visitor made is deleted for it
    retention   finished jobs and uploads deleted 24 h after they end; downloads and caches after 1 h
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..data.photos import MAX_PIXELS
from ..models.deit import TEST_MODEL


def on_space() -> bool:
    """True when running on a Hugging Face Space (it sets ``SPACE_ID``)."""
    return bool(os.environ.get("SPACE_ID"))


SPACE_PROXIES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
"""Where a Space's own proxy connects from (its private network); never loopback, which any local process can use."""


def trusted_proxies() -> list:
    """The networks whose ``X-Forwarded-For`` is believed: ``$CAIT_TRUSTED_PROXIES`` (comma-separated CIDRs; empty:
    none), else on a Space :data:`SPACE_PROXIES`, else none."""
    text = os.environ.get("CAIT_TRUSTED_PROXIES")
    if text is None:
        text = ",".join(SPACE_PROXIES) if on_space() else ""
    nets = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue                                   # a typo trusts nothing rather than everything
    return nets


def client_address(peer: str | None, forwarded: str | None) -> str | None:
    """The address a request's quota counts: the last ``X-Forwarded-For`` entry (what the proxy itself appended)
    when the connection comes from a trusted proxy (:func:`trusted_proxies`), else the peer itself. A header a
    visitor writes is never believed from an untrusted peer, so it cannot mint new addresses.

    >>> client_address("127.0.0.1", "10.0.0.7")        # off a Space, or straight from loopback: the peer
    '127.0.0.1'
    """
    if not peer or not forwarded:
        return peer
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if not any(ip in net for net in trusted_proxies()):
        return peer
    last = forwarded.split(",")[-1].strip()
    return last or peer


def public_by_default() -> bool:
    """Public mode unless told otherwise: on a Space, or with ``CAIT_PUBLIC=1`` (``CAIT_PUBLIC=0`` turns it off)."""
    flag = os.environ.get("CAIT_PUBLIC", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return on_space()


@dataclass(frozen=True)
class Limits:
    """Caps on what the app does for a request. ``public=False`` (local use) lifts every cap but the sanity ones.

    Attributes:
        public: anonymous visitors (a Space): caps on, server paths refused, jobs owned by their session.
        models: fine-tune model keys a public visitor may pick (never a path; ``"bundled"`` is the bundled DeiT).
        max_steps, max_batch_size, max_img_size: per fine-tune job.
        max_jobs_per_visitor: queued + running jobs of one visitor (by network address).
        max_events_per_visitor: requests of one visitor (by network address) queued or running in Gradio's queue;
            the next is refused (:class:`cait.studio.ui.guard.AdmissionGuard`), so one address cannot fill the queue.
        max_active_jobs: queued + running jobs in total.
        max_cost_batch: batch size of a throughput measurement.
        max_measure_seconds: how long a throughput measurement or a fine-tune time estimate may time (then it
            reports what it measured); locally ``local_max_measure_seconds`` for a throughput measurement.
        max_estimate_batch: images a fine-tune time estimate times one step on (scaled to the job's batch).
        max_upload_bytes, max_upload_files: an uploaded archive, unpacked.
        max_image_pixels: an uploaded image (decoding a larger one is refused from its header).
        max_train_image_pixels, max_upload_pixels: each image of an uploaded set, and all of them together (from
            their headers, before any is decoded: a training image is resized to at most 224 px anyway).
        retention_s: finished jobs and uploads older than this are deleted.
        max_job_seconds: a job's training time in public mode; then it stops cleanly, its training state kept.
        max_runs_bytes: everything under the runs directory (jobs, uploads, downloads, caches, Gradio's upload
            cache); a request that would pass it is refused (:mod:`cait.studio.jobs.disk`), nobody's work deleted.
        max_visitor_bytes: one visitor's jobs and uploads, counted while they are written and until deleted.
        max_job_bytes: what one job may write; a job past its share is stopped, its state kept.
        max_visitor_upload_bytes_per_hour: files one visitor may send to Gradio's upload route in an hour.
        cache_retention_s: twins made for download and Gradio's cached files are deleted after this (cheap to remake).
        local_max_*: the sanity bounds of local use; ``*_cap()`` gives the one that applies.
    """

    public: bool = False
    models: tuple[str, ...] = ("bundled", TEST_MODEL, "deit_tiny_patch16_224", "deit_small_patch16_224")
    max_steps: int = 2000
    max_batch_size: int = 64
    max_img_size: int = 224
    max_jobs_per_visitor: int = 2
    max_events_per_visitor: int = 4
    max_active_jobs: int = 8
    max_cost_batch: int = 32
    max_measure_seconds: float = 30.0
    max_estimate_batch: int = 8
    max_upload_bytes: int = 50_000_000
    max_upload_files: int = 20_000
    max_image_pixels: int = 16_000_000
    max_train_image_pixels: int = 4_000_000
    max_upload_pixels: int = 400_000_000
    retention_s: float = 24 * 3600.0
    max_job_seconds: float = 2 * 3600.0
    max_runs_bytes: int = 5_000_000_000
    max_visitor_bytes: int = 2_500_000_000
    max_job_bytes: int = 2_000_000_000
    max_visitor_upload_bytes_per_hour: int = 300_000_000
    cache_retention_s: float = 3600.0
    local_max_steps: int = 10_000_000
    local_max_batch_size: int = 4096
    local_max_img_size: int = 1024
    local_max_cost_batch: int = 1024
    local_max_measure_seconds: float = 90.0
    local_max_image_pixels: int = MAX_PIXELS
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_environment(cls, public: bool | None = None) -> "Limits":
        """Limits for this process: public per :func:`public_by_default` unless ``public`` says otherwise."""
        return cls(public=public_by_default() if public is None else public)

    def steps_cap(self) -> int:
        return self.max_steps if self.public else self.local_max_steps

    def batch_cap(self) -> int:
        return self.max_batch_size if self.public else self.local_max_batch_size

    def img_size_cap(self) -> int:
        return self.max_img_size if self.public else self.local_max_img_size

    def cost_batch_cap(self) -> int:
        return self.max_cost_batch if self.public else self.local_max_cost_batch

    def measure_budget(self) -> float:
        """Seconds a throughput measurement may time (no round starts past it; at least one is always timed)."""
        return self.max_measure_seconds if self.public else self.local_max_measure_seconds

    def estimate_batch_cap(self) -> int | None:
        """Images a public fine-tune estimate times; None locally (the job's own batch)."""
        return self.max_estimate_batch if self.public else None

    def max_archive_members(self) -> int:
        """Members of any kind an uploaded ``.zip`` may declare: twice ``max_upload_files`` (folders, a
        ``classes.json``, stray files beside the images)."""
        return 2 * self.max_upload_files

    def image_pixels_cap(self) -> int:
        return self.max_image_pixels if self.public else self.local_max_image_pixels

    def train_pixels_caps(self) -> tuple[int, int | None]:
        """(each image, all together) of an uploaded set; locally the per-image sanity bound and no total."""
        return (self.max_train_image_pixels, self.max_upload_pixels) if self.public else \
            (self.local_max_image_pixels, None)


def visitor_key(value: str | None) -> str | None:
    """A short, stable, non-reversible key for a session id or a network address (what is stored in job files)."""
    if not value:
        return None
    return hashlib.sha256(value.encode()).hexdigest()[:16]


_SAFE_NAME = re.compile(r"^[\w\-. ()+,@]+$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ArchiveError(ValueError):
    """An uploaded archive that cannot be used; the message says why and names only the archive."""


CLASSES_FILE = "classes.json"
MAX_CLASSES_BYTES = 65_536
"""A segmentation set's optional class names (:mod:`cait.data.segmentation`) travel with its images."""


MAX_NAMED = 5


def check_images(name: str, dest: Path, members: list[str], limits: Limits) -> None:
    """Every unpacked image is an image this app can decode, within the pixel caps: sizes from the headers first
    (each image, then all together), then each decoded.

    Raises:
        ArchiveError: naming up to :data:`MAX_NAMED` members and how many more failed.
    """
    each, total = limits.train_pixels_caps()
    problems, pixels = [], 0
    for member in members:
        try:
            with Image.open(dest / member) as img:
                w, h = img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            problems.append(f"{member}: not an image we can read")
            continue
        pixels += w * h
        if w * h > each:
            problems.append(f"{member}: {w}×{h} is more than {each / 1e6:g} MP")
    if total is not None and pixels > total:
        raise ArchiveError(f"{name}: its images hold {pixels / 1e6:.0f} MP, at most {total / 1e6:g} MP")
    if not problems:
        for member in members:
            try:
                with Image.open(dest / member) as img:
                    img.load()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                problems.append(f"{member}: corrupt or truncated image")
    if problems:
        more = f"; and {len(problems) - MAX_NAMED} more" if len(problems) > MAX_NAMED else ""
        raise ArchiveError(f"{name}: {len(problems)} image(s) refused: {'; '.join(problems[:MAX_NAMED])}{more}")


MAX_NAME_CHARS = 100
MAX_DEPTH = 8
"""A member's path: each part at most this many characters, at most this many parts (an ImageFolder tree needs 4)."""
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, ValueError)
"""What reading or writing a member can raise: a bad CRC, corrupt deflate data, encryption, an unknown method, a path
the file system refuses (a member where a folder is, a name too long)."""


def _check_member(name: str, m: zipfile.ZipInfo) -> None:
    parts = Path(m.filename).parts
    if m.filename.startswith(("/", "\\")) or ".." in parts or any(not _SAFE_NAME.match(p) for p in parts):
        raise ArchiveError(f"{name}: unsafe member name {m.filename[:80]!r}")
    if len(parts) > MAX_DEPTH or any(len(p) > MAX_NAME_CHARS for p in parts):
        raise ArchiveError(f"{name}: member {m.filename[:80]!r}... is nested deeper than {MAX_DEPTH} folders or has "
                           f"a name over {MAX_NAME_CHARS} characters")
    if stat.S_ISLNK(m.external_attr >> 16):
        raise ArchiveError(f"{name}: links are not allowed ({m.filename[:80]!r})")


def _unpack(name: str, zf: zipfile.ZipFile, images: list[zipfile.ZipInfo], dest: Path, limits: Limits) -> None:
    """Write ``images`` under ``dest``, holding each to the size it claims and all to ``limits.max_upload_bytes``."""
    too_big = ArchiveError(f"{name}: unpacks to more than {limits.max_upload_bytes // 1_000_000} MB")
    written = 0
    for m in images:
        target = (dest / m.filename).resolve()
        if not target.is_relative_to(dest.resolve()):
            raise ArchiveError(f"{name}: unsafe member name {m.filename[:80]!r}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, target.open("xb") as out:
                size = 0
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    written += len(chunk)
                    if written > limits.max_upload_bytes:
                        raise too_big
                    if size > m.file_size:
                        raise ArchiveError(f"{name}: {m.filename[:80]!r} holds more than the {m.file_size} bytes "
                                           "the archive says")
                    out.write(chunk)
        except ArchiveError:
            raise
        except FileExistsError:
            raise ArchiveError(f"{name}: {m.filename[:80]!r} is in the archive twice, or where a folder is") from None
        except _READ_ERRORS as e:
            why = ("a file stands where a folder of that name is needed"
                   if isinstance(e, (NotADirectoryError, IsADirectoryError)) else
                   "bad CRC or corrupt data" if isinstance(e, (zipfile.BadZipFile, zlib.error, EOFError)) else
                   "unreadable (encrypted, an unknown compression, or a path this server cannot write)")
            raise ArchiveError(f"{name}: member {m.filename[:80]!r}: {why}") from None


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, limits: Limits, unlabelled: bool = False
                    ) -> Path:
    """Unpack an uploaded ``.zip`` of an ImageFolder tree (``train/<class>/*`` and ``val/<class>/*``) or a segmentation
    set (``train|val/images/*`` + ``masks/*.png``, an optional ``classes.json``) into ``dest``; with ``unlabelled``
    (a label-free job), images in any folders will do (:class:`cait.data.datasets.ImageFiles`).

    Only image files (and ``classes.json``) are written; every member is checked first: no absolute path, no ``..``,
    no link, names of ordinary characters (each part at most :data:`MAX_NAME_CHARS`, at most :data:`MAX_DEPTH` deep),
    at most ``limits.max_upload_files`` images and ``limits.max_upload_bytes`` unpacked (the sizes the archive claims
    are checked before reading and enforced, member by member, while reading, so a zip bomb stops early). Then every
    image is checked (:func:`check_images`). A top-level folder wrapping ``train/`` and ``val/`` is accepted. On any
    refusal ``dest`` is removed: nothing of a refused archive stays on disk.

    Returns:
        The root holding ``train/`` and ``val/``, else (``unlabelled``) ``dest``.

    Raises:
        ArchiveError: not a zip, an unsafe, corrupt or oversized member, no images, or (unless ``unlabelled``) no
            ``train/``/``val/`` of images; the message names the archive and the member, never a server path.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        return _extract(archive, dest, limits, unlabelled)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def zip_entries(archive: str | os.PathLike) -> int | None:
    """How many members a ``.zip`` declares, read from its end-of-central-directory record (and the ZIP64 one when
    the count overflows 16 bits) without parsing the directory; None when no such record is found (not a zip).

    ``zipfile.ZipFile`` builds an object per member of the central directory before anything can be checked: 900,000
    members took 14.5 s and hundreds of MB. This count lets an archive be refused first.
    """
    with open(archive, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 22 - 65_535))                         # the record, after a comment of up to 64 KiB
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        total = int.from_bytes(tail[at + 10:at + 12], "little")
        locator = at - 20                                             # ZIP64 end-of-central-directory locator
        if total == 0xFFFF and locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
            f.seek(int.from_bytes(tail[locator + 8:locator + 16], "little"))
            record = f.read(56)
            if record[:4] == b"PK\x06\x06":
                total = int.from_bytes(record[32:40], "little")
        return total


def _extract(archive: Path, dest: Path, limits: Limits, unlabelled: bool = False) -> Path:
    name = archive.name[:80]
    try:
        declared = zip_entries(archive)
    except OSError:
        declared = None
    cap = limits.max_archive_members()
    if declared is not None and declared > cap:                    # before the directory is parsed at all
        raise ArchiveError(f"{name}: {declared:,} members, at most {cap:,} (images, folders and other files)")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise ArchiveError(f"{name}: not a .zip archive") from None
    with zf:
        if len(zf.infolist()) > cap:                               # a record that under-declared its members
            raise ArchiveError(f"{name}: {len(zf.infolist()):,} members, at most {cap:,}")
        members = [m for m in zf.infolist() if not m.is_dir()]
        images = []
        for m in members:
            _check_member(name, m)
            if m.filename.lower().endswith(IMAGE_SUFFIXES) or (Path(m.filename).name == CLASSES_FILE
                                                                and m.file_size <= MAX_CLASSES_BYTES):
                images.append(m)                   # images, PNG masks, and a segmentation set's class names
        if len(images) > limits.max_upload_files:
            raise ArchiveError(f"{name}: {len(images)} images, at most {limits.max_upload_files}")
        if sum(m.file_size for m in images) > limits.max_upload_bytes:
            raise ArchiveError(f"{name}: unpacks to more than {limits.max_upload_bytes // 1_000_000} MB")
        dest.mkdir(parents=True, exist_ok=True)
        _unpack(name, zf, images, dest, limits)
    check_images(name, dest, [m.filename for m in images if m.filename.lower().endswith(IMAGE_SUFFIXES)], limits)
    for root in (dest, *[p for p in dest.iterdir() if p.is_dir()]):
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root
    if unlabelled and any(m.filename.lower().endswith(IMAGE_SUFFIXES) for m in images):
        return dest
    raise ArchiveError(f"{name}: expected train/ and val/ folders (train/<class>/ images, or train/images/ and "
                       "train/masks/ for segmentation)")
