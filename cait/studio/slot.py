"""The compute slot: the app's heavy requests (build a twin, attention, cost, estimates, downloads) run one at a time,
first come first served, and on a public Space each visitor holds at most one place in the line.

Without it one client could queue sixteen ``/cost`` calls and hold every other visitor behind them; with it, a
visitor's second heavy request while the first is waiting or running is refused at once, saying why, and everyone
else keeps their turn. Locally (not public) a second request simply waits its turn.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator


class SlotBusy(RuntimeError):
    """A request the compute slot refuses: this visitor already has one in line, or the wait ran out."""


class ComputeSlot:
    """One computation at a time, in arrival order, with at most one place per visitor when ``per_visitor``.

    Args:
        per_visitor: refuse a visitor's second request while its first is waiting or running (public mode).
        max_wait_s: how long a request waits for its turn before it is refused (seconds).

    >>> slot = ComputeSlot(per_visitor=True)
    >>> with slot.turn("a"):
    ...     slot.holders()
    ['a']
    """

    def __init__(self, per_visitor: bool = True, max_wait_s: float = 600.0) -> None:
        self.per_visitor, self.max_wait_s = per_visitor, max_wait_s
        self._line: deque[tuple[int, str | None]] = deque()          # (ticket, visitor); the head runs
        self._tickets = itertools.count()
        self._cond = threading.Condition()

    def holders(self) -> list[str | None]:
        """Visitors in line, the running one first."""
        with self._cond:
            return [v for _, v in self._line]

    @contextlib.contextmanager
    def turn(self, visitor: str | None) -> Iterator[None]:
        """Wait for this request's turn, then hold the slot for the ``with`` body.

        Raises:
            SlotBusy: ``visitor`` already has a request waiting or running (``per_visitor``), or its turn did not
                come within ``max_wait_s``.
        """
        with self._cond:
            if self.per_visitor and visitor is not None and any(v == visitor for _, v in self._line):
                raise SlotBusy("you already have a computation running or waiting on this server; it answers "
                               "first, then ask again")
            ticket = next(self._tickets)
            self._line.append((ticket, visitor))
            deadline = time.monotonic() + self.max_wait_s
            while self._line[0][0] != ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._line.remove((ticket, visitor))
                    self._cond.notify_all()
                    raise SlotBusy(f"the server stayed busy for {self.max_wait_s / 60:g} min; try again later")
                self._cond.wait(left)
        try:
            yield
        finally:
            with self._cond:
                self._line.remove((ticket, visitor))
                self._cond.notify_all()
