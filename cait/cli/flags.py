"""One command-line flag per field of a config dataclass (``--flops-reduction`` for ``flops_reduction``), with the
field's help text and default, shared by every engine's command line."""
from __future__ import annotations

import argparse
import dataclasses


def dataclass_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A parser for ``cls`` (a dataclass whose fields carry ``metadata["help"]``): bools as ``--x/--no-x``, ints and
    floats typed (``| None`` fields default to None), the rest strings."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return p
