"""The admission layer of public mode: an ASGI middleware every HTTP request to the app passes before Gradio sees it.

Gradio takes files into its cache, queues events and fetches URLs given as file inputs before any handler of ours
runs, so the checks that must hold for every request live here, in one place (:class:`AdmissionGuard`):

- **Routes.** Only the POST routes the app uses are open: the event routes (``queue/join``, ``call``, ``run``,
  ``api``), ``cancel``, ``reset`` and ``upload``. Any other that accepts a body (``process_recording``, which stores
  multipart files outside every budget; ``stream``; ``component_server``; …) is refused with 403.
- **Uploads** (``/gradio_api/upload``): the declared size is read first, and a body without a length, one that would
  take its visitor past ``max_visitor_upload_bytes_per_hour``, or one that does not fit the runs directory's budget
  (:mod:`cait.studio.jobs.disk`) is refused before a byte is stored.
- **Event bodies** are read (at most :data:`MAX_EVENT_BODY` bytes) and refused when they hold a string with a lone
  surrogate (it broke the reply stream) or a file input given as an ``http(s)`` URL (Gradio would fetch it with no
  size cap): files come through the upload route.
- **A share of the queue per visitor**: an event is refused with 429 while its visitor (network address, as
  :func:`cait.studio.public.client_address` decides) already has ``max_events_per_visitor`` events queued or running,
  so one address cannot fill Gradio's queue for everyone (the compute slot, :mod:`cait.studio.slot`, orders only the
  heavy ones).
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable

from ..public import Limits, client_address, visitor_key

UPLOAD_PATH = "/gradio_api/upload"
EVENT_ROUTES = ("queue/join", "call/", "run/", "api/")
"""Routes whose body is an event's inputs (checked, and counted against the visitor's share of the queue)."""
OPEN_ROUTES = ("upload", "cancel", "reset") + EVENT_ROUTES
"""POST routes under ``/gradio_api/`` the app uses; every other POST route is refused in public mode."""
MAX_EVENT_BODY = 1_000_000
"""Bytes of an event's JSON body (its inputs; files go through the upload route)."""


def _route(path: str) -> str:
    """``/gradio_api/queue/join`` → ``queue/join``; a path outside Gradio's API → itself without the slash."""
    return path.split("/gradio_api/", 1)[1] if "/gradio_api/" in path else path.lstrip("/")


def body_problem(body: bytes) -> str | None:
    """Why an event's JSON body is refused (None if it is not): a lone surrogate in any string, or a file input
    (``{"meta": {"_type": "gradio.FileData"}, ...}``) whose path or URL is an ``http(s)`` address.

    >>> body_problem(b'{"data": ["ok", 1]}') is None
    True
    >>> body_problem(b'{"data": ["\\\\ud800"]}')
    'a text field holds an invalid character (a lone surrogate)'
    """
    try:
        value = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None                                   # Gradio answers a malformed body itself
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in v):
                return "a text field holds an invalid character (a lone surrogate)"
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            meta = v.get("meta")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
                for key in ("path", "url"):
                    if str(v.get(key) or "").lower().startswith(("http://", "https://")):
                        return "files are uploaded on this public Space, not fetched from a URL"
            stack.extend(v.keys())
            stack.extend(v.values())
    return None


class AdmissionGuard:
    """ASGI middleware: ``AdmissionGuard(app, limits, room)``; ``room(bytes, visitor)`` raises (any exception, its
    message shown) when the runs directory, or that visitor's share of it, has no room for that many bytes, and
    charges an accepted upload to the visitor. In local mode (``limits.public`` false) it passes everything
    through."""

    def __init__(self, app, limits: Limits, room: Callable[[int, str | None], None] | None = None) -> None:
        self.app, self.limits, self.room = app, limits, room
        self._sent: dict[str | None, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def refusal(self, who: str | None, length: str | None, now: float | None = None) -> tuple[int, str] | None:
        """``(HTTP status, message)`` if an upload of ``length`` bytes from visitor ``who`` is refused, else None (and
        the bytes are counted to the visitor's hour)."""
        if length is None or not length.isdigit():
            return 411, "uploads must say their size (Content-Length) on this public Space"
        size, now = int(length), time.time() if now is None else now
        cap = self.limits.max_visitor_upload_bytes_per_hour
        with self._lock:
            sent = self._sent.setdefault(who, deque())
            while sent and now - sent[0][0] > 3600:
                sent.popleft()
            used = sum(n for _, n in sent)
            if used + size > cap:
                return 429, (f"you have uploaded {used / 1e6:,.0f} MB in the last hour; at most {cap / 1e6:,.0f} MB "
                             "an hour on this public Space")
            if self.room is not None:
                try:
                    self.room(size, who)
                except Exception as e:
                    return 507, str(e)
            sent.append((now, size))
        return None

    def events_of(self, app, who: str | None) -> int:
        """Events of visitor ``who`` queued or running in Gradio's queue now."""
        try:
            events = list(app.get_blocks()._queue.event_ids_to_events.values())
        except AttributeError:                        # not a Gradio app (tests), or no queue yet
            return 0
        n = 0
        for e in events:
            request = getattr(e, "request", None)
            headers = getattr(request, "headers", None) or {}
            peer = request.client.host if request is not None and request.client else None
            n += visitor_key(client_address(peer, headers.get("x-forwarded-for"))) == who
        return n

    async def __call__(self, scope, receive, send) -> None:
        if not self.limits.public or scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        who = visitor_key(client_address((scope.get("client") or (None,))[0], headers.get("x-forwarded-for")))
        route = _route(scope["path"])
        if route == "upload":
            refused = self.refusal(who, headers.get("content-length"))
        elif not route.startswith(OPEN_ROUTES):
            refused = 403, "this route is not available on this public Space"
        elif route.startswith(EVENT_ROUTES):
            body, refused = await _read_body(receive, headers)
            if refused is None:
                refused = self._event_refusal(scope, who, body)
            if refused is None:
                return await self.app(scope, _replay(body, receive), send)
        else:
            refused = None
        if refused is not None:
            return await _answer(send, *refused)
        await self.app(scope, receive, send)

    def _event_refusal(self, scope, who: str | None, body: bytes) -> tuple[int, str] | None:
        problem = body_problem(body)
        if problem is not None:
            return 400, problem
        share = self.limits.max_events_per_visitor
        if _route(scope["path"]) == "queue/join" and self.events_of(scope.get("app"), who) >= share:
            return 429, (f"you already have {share} requests waiting or running; wait for one to finish (each "
                         "visitor has a share of the queue on this public Space)")
        return None


async def _read_body(receive, headers: dict) -> tuple[bytes, tuple[int, str] | None]:
    """The request body, or a refusal when it is (or declares itself) larger than :data:`MAX_EVENT_BODY`."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_EVENT_BODY:
        return b"", (413, f"a request body is at most {MAX_EVENT_BODY:,} bytes (files go through the upload)")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_EVENT_BODY:
            return b"", (413, f"a request body is at most {MAX_EVENT_BODY:,} bytes (files go through the upload)")
        if not message.get("more_body"):
            break
    return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A ``receive`` that gives the already-read body once, then the connection's own messages."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again


async def _answer(send, status: int, message: str) -> None:
    body = message.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
