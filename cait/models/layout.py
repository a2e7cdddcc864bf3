"""ATME layouts: where HTM and VTM merges sit, as one typed record (paper §III-B, docs/method.md: ATME).

A :class:`Layout` maps 0-based block indices to ``"h"`` (HTM) or ``"v"`` (VTM), ordered by block. It is immutable
and hashable, compares equal to the plain dict with the same merges, and is written ``"h4,v8"`` everywhere a layout
is text (command lines, ``config.json``, the app). The paper's "HTM at the 5th layer, VTM at the 9th" is::

    >>> Layout.parse("h4,v8")
    Layout('h4,v8')
    >>> str(Layout({4: "h", 8: "v"})), dict(Layout.parse("h4,v8"))
    ('h4,v8', {4: 'h', 8: 'v'})
    >>> token_grids((14, 14), 12, "h4,v8") == [(14, 14)] * 4 + [(14, 7)] * 4 + [(7, 7)] * 4   # each block's grid
    True

Text is parsed once, where it enters (:meth:`Layout.parse`); everything below takes a ``Layout`` or anything
:meth:`Layout.parse` accepts (:data:`LayoutLike`). An odd side is padded by repeating its last row/column, so a
merged side is ``ceil(side / 2)``: DeiT-T's 3-merge layout goes 14×14 → 14×7 → 7×7 → 7×4.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Union

from ..layers.token_merge import merged_grid

MAX_LAYOUT_CHARS = 200
"""Longest layout text accepted (a 12-block model's longest sensible layout is ~40 characters)."""
_ITEM = re.compile(r"^\s*([hv])\s*(\d+)\s*$", re.IGNORECASE)


class Layout(Mapping[int, str]):
    """An ATME layout: block index → ``"h"`` | ``"v"``, sorted by block (see the module docstring).

    Args:
        merges: ``{block: direction}``; default: no merge (``str(Layout()) == ""``).

    Raises:
        ValueError: for a block index that is not a non-negative int or a direction other than h/v.
    """

    __slots__ = ("_merges",)

    def __init__(self, merges: Mapping[int, str] | None = None) -> None:
        out = {}
        for idx, direction in (merges or {}).items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise ValueError(f"merge layout block index must be a non-negative int, got {idx!r}")
            d = str(direction).lower()
            if d not in ("h", "v"):
                raise ValueError(f"merge direction for block {idx} must be 'h' or 'v', got {direction!r}")
            out[idx] = d
        self._merges = dict(sorted(out.items()))

    @classmethod
    def parse(cls, layout: "LayoutLike") -> "Layout":
        """``"h4,v8"``, ``{4: "h", 8: "v"}``, a ``Layout``, ``""``, ``"none"`` or ``None`` → a ``Layout``.

        Raises:
            ValueError: for text over :data:`MAX_LAYOUT_CHARS`, items that are not ``h<int>`` / ``v<int>`` or name a
                block twice (every problem at once), or a value that is neither text nor a mapping (``[4, 7]`` says
                no direction).
        """
        if isinstance(layout, Layout):
            return layout
        if layout is None:
            return cls()
        if isinstance(layout, Mapping):
            return cls(layout)
        if not isinstance(layout, str):
            raise ValueError(f"a merge layout is a string such as 'h4,v7' or a mapping such as {{4: 'h', 7: 'v'}}, "
                             f"got {type(layout).__name__} {str(layout)[:80]!r}")
        if len(layout) > MAX_LAYOUT_CHARS:
            raise ValueError(f"a merge layout is at most {MAX_LAYOUT_CHARS} characters, got {len(layout)}")
        if layout.strip().lower() == "none":             # CDCP only, written out
            return cls()
        out: dict[int, str] = {}
        problems = []
        for item in filter(None, (s.strip() for s in layout.split(","))):
            m = _ITEM.match(item)
            if not m:
                problems.append(f"{item!r} is not hN or vN")
                continue
            direction, idx = m.group(1).lower(), int(m.group(2))
            if idx in out:
                problems.append(f"block {idx} is named twice")
            out[idx] = direction
        if problems:                     # every problem at once; no angle brackets (an HTML toast would eat them)
            raise ValueError(f"bad merge layout {layout!r}: {'; '.join(problems)} (write e.g. 'h4,v8': HTM before "
                             "block 4, VTM before block 8, 0-based)")
        return cls(out)

    def __getitem__(self, block: int) -> str:
        return self._merges[block]

    def __iter__(self) -> Iterator[int]:
        return iter(self._merges)

    def __len__(self) -> int:
        return len(self._merges)

    def __hash__(self) -> int:
        return hash(tuple(self._merges.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._merges) == dict(other.items())

    def __str__(self) -> str:
        return ",".join(f"{d}{i}" for i, d in self._merges.items())

    def __repr__(self) -> str:
        return f"Layout({str(self)!r})"

    def grids(self, grid: tuple[int, int], depth: int) -> list[tuple[int, int]]:
        """The patch grid each of ``depth`` blocks sees from an input grid ``(H, W)`` (:func:`token_grids`)."""
        return token_grids(grid, depth, self)


LayoutLike = Union[str, Mapping[int, str], None]
"""Anything :meth:`Layout.parse` accepts."""


def parse_layout(layout: LayoutLike) -> Layout:
    """``Layout.parse(layout)``: ``"h4,v8"`` → ``Layout('h4,v8')``, equal to ``{4: "h", 8: "v"}``.

    Raises:
        ValueError: as :meth:`Layout.parse`.
    """
    return Layout.parse(layout)


def format_layout(layout: LayoutLike) -> str:
    """``{4: "h", 8: "v"}`` → ``"h4,v8"`` (``""`` for no merge).

    Raises:
        ValueError: as :meth:`Layout.parse`.
    """
    return str(Layout.parse(layout))


def token_grids(grid: tuple[int, int], depth: int, layout: LayoutLike) -> list[tuple[int, int]]:
    """The patch grid ``(H, W)`` that each block's attention sees (after that block's merge, if any).

    Raises:
        ValueError: if the layout names a block ``>= depth`` or merges a side that is already 1 (every such
            problem in one message).
    """
    layout = Layout.parse(layout)
    problems, bad = [], [i for i in layout if i >= depth]
    if bad:
        problems.append(f"merge layout names block{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}, but "
                        f"the model has {depth} blocks (0..{depth - 1})")
    grids, g = [], tuple(grid)
    for i in range(depth):
        if i in layout:
            side = g[1] if layout[i] == "h" else g[0]
            if side < 2:
                problems.append(f"cannot merge at block {i}: the {'width' if layout[i] == 'h' else 'height'} "
                                f"of the {g[0]}×{g[1]} grid is already 1")
            else:
                g = merged_grid(g, layout[i])
        grids.append(g)
    if problems:                                     # every problem at once, as Layout.parse does
        raise ValueError("; ".join(problems))
    return grids
