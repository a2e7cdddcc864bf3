"""What every tab of the UI shares: the compute queue, visitor identity, field parsing and turning refusals into
Gradio errors that name the field (never a server path or a traceback)."""
from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator

import gradio as gr

from ..jobs.disk import acting_for
from ..jobs.model import FIELD_NAMES, JobError
from ..public import Limits, client_address, visitor_key
from ..slot import ComputeSlot, SlotBusy

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COMPUTE = dict(concurrency_id="compute", concurrency_limit=8)
"""Heavy events: up to 8 handlers in flight, which :func:`heavy` lines up in one :class:`cait.studio.slot.ComputeSlot`
(one computes, the others wait their turn or, a visitor's second, are refused at once), so no client can fill
Gradio's queue with its own requests."""


def refusal(message: str) -> gr.Error:
    """A ``gr.Error`` for a refused input: the visitor sees ``message``; the server's terminal gets one line saying
    what was refused, not a traceback (a refusal is the app working, not failing)."""
    print(f"cait.studio: refused: {message.splitlines()[0][:200] if message else ''}", file=sys.stderr, flush=True)
    return gr.Error(message, print_exception=False)


@contextlib.contextmanager
def refusing(*errors: type[Exception]) -> Iterator[None]:
    """Inside a handler: an exception of these types reaches the browser as a ``gr.Error`` with its message
    (:func:`refusal`)."""
    try:
        yield
    except errors as e:
        raise refusal(str(e)) from None


def heavy(slot: ComputeSlot, fn: Callable) -> Callable:
    """``fn`` (a handler with a ``gr.Request`` parameter) run in its visitor's turn of ``slot``; a refused turn is a
    ``gr.Error`` saying why. While it runs, :data:`cait.studio.jobs.disk.acting_for` names the visitor, so what it
    writes (a download, a calibrated twin) is charged to them. The wrapper keeps ``fn``'s signature, so Gradio still
    passes the request and progress.
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
        address = visitor(request)[1]
        token = acting_for.set(address)                # what the handler writes is charged to this visitor
        try:
            with refusing(SlotBusy), slot.turn(address):
                return fn(*args, **kwargs)
        finally:
            acting_for.reset(token)
    return run


def whole(value, key: str) -> int:
    """A whole number from a Number field, or a :class:`JobError` naming the field. The fields keep their decimals
    (``precision=None``), so 10.5 is refused here rather than rounded by Gradio; so are ``inf`` and ``nan``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise JobError(f"{FIELD_NAMES.get(key, key)}: {repr(value)[:40]} is not a whole number")
    return int(value)


def live_intervals(steps: int, evaluations: int) -> dict[str, int]:
    """Log, evaluation and checkpoint intervals of a job started from the browser, for a live view whatever its
    length: a log line every ~2% of the steps (1 to 50), ``evaluations`` held-out scores and 4 training states
    (each at least every 10 steps apart, at most every 1000 / 500)."""
    return dict(eval_interval=min(1000, max(10, steps // evaluations)), log_interval=min(50, max(1, steps // 50)),
                ckpt_interval=min(500, max(10, steps // 4)))


def visitor(request: gr.Request | None) -> tuple[str | None, str | None]:
    """Hashed ``(session, address)`` of a request: the session owns its jobs, the address has a quota. The address
    is the connection's peer, or the last ``X-Forwarded-For`` entry when the peer is a trusted proxy
    (:func:`cait.studio.public.client_address`)."""
    if request is None:
        return None, None
    peer = request.client.host if request.client else None
    address = client_address(peer, (request.headers or {}).get("x-forwarded-for"))
    return visitor_key(getattr(request, "session_hash", None)), visitor_key(address)


def host_warning(host: str, port: int, limits: Limits) -> str | None:
    """The warning printed when the app listens beyond loopback without public mode's caps (else None)."""
    if host in LOOPBACK or limits.public:
        return None
    return (f"warning: listening on {host} without --public: anyone who can reach port {port} can start jobs that "
            "read server paths and run for as long as they ask")
