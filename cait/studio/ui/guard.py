"""Gradio's upload route under the public budgets: an ASGI middleware in front of ``/gradio_api/upload``.

Gradio takes any number of files (each up to ``max_file_size``) into its cache before any handler sees them; on a
public Space :class:`UploadGuard` first reads the request's declared size and refuses, before a byte is stored, a
body without a length, one that would take its visitor past ``max_visitor_upload_bytes_per_hour``, or one that does
not fit the runs directory's budget (:mod:`cait.studio.jobs.disk`; Gradio's cache lives there in public mode).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ..public import Limits, client_address, visitor_key

UPLOAD_PATH = "/gradio_api/upload"


class UploadGuard:
    """ASGI middleware: ``UploadGuard(app, limits, room)``; ``room(bytes)`` raises (any exception, its message shown)
    when the runs directory has no room for that many bytes."""

    def __init__(self, app, limits: Limits, room: Callable[[int], None] | None = None) -> None:
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
                    self.room(size)
                except Exception as e:
                    return 507, str(e)
            sent.append((now, size))
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith(UPLOAD_PATH):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            peer = (scope.get("client") or (None,))[0]
            who = visitor_key(client_address(peer, headers.get("x-forwarded-for")))
            refused = self.refusal(who, headers.get("content-length"))
            if refused is not None:
                status, message = refused
                body = message.encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
