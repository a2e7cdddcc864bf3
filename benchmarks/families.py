"""Which timm ViTs CAIT compresses: every architecture of timm's ``vision_transformer``, ``deit`` and ``eva`` modules,
built on the ``meta`` device (shapes only, no weights, nothing downloaded), judged by its modules
(:func:`cait.models.family.unsupported_reason`), and, when supported, checked to save: its architecture record
(:class:`cait.models.arch.ViTArch` or :class:`~cait.models.arch.EvaArch`) must rebuild the same tensors. A model
whose timm default is a dynamic image size (DINOv3) is built at its fixed default size, as ``cait.create_model``
builds it. Prints one JSON object: counts, and the names
grouped by what they lack.

    python benchmarks/families.py                   # ~1 min on a 2-core CPU
    python benchmarks/families.py --markdown        # the table of the docs' families page
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from cait.models.arch import arch_of  # noqa: E402
from cait.models.deit import fixed_grid_kwargs  # noqa: E402
from cait.models.family import unsupported_reason  # noqa: E402

MODULES = ("vision_transformer", "deit", "eva")


def judge(name: str) -> tuple[str | None, int | None]:
    """``(reason, prefix tokens)``: None when CAIT compresses it and its checkpoint record rebuilds its tensors."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
            if fixed_grid_kwargs(model):                             # as cait.create_model builds it
                model = timm.create_model(name, pretrained=False, **fixed_grid_kwargs(model))
    except Exception as e:  # an architecture timm cannot build without downloads or extra packages
        return f"timm cannot build it here ({type(e).__name__})", None
    reason = unsupported_reason(model)
    if reason is None:
        try:
            arch = arch_of(model)
            rebuilt = arch.build(model.patch_embed.img_size[0], model.num_classes, device="meta").state_dict()
        except ValueError as e:
            return f"compresses, but its checkpoint cannot record it: {e}", None
        if {k: v.shape for k, v in rebuilt.items()} != {k: v.shape for k, v in model.state_dict().items()}:
            return "compresses, but its checkpoint record rebuilds other tensors", None
    return reason, int(getattr(model, "num_prefix_tokens", 1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON")
    args = p.parse_args(argv)
    supported, refused, prefixes = [], defaultdict(list), defaultdict(int)
    for name in timm.list_models(module=list(MODULES)):
        reason, prefix = judge(name)
        if reason is None:
            supported.append(name)
            prefixes[prefix] += 1
        else:
            refused[reason.split(":")[0] if reason.startswith("block ") else reason].append(name)
    out = {"timm": timm.__version__, "architectures": len(supported) + sum(map(len, refused.values())),
           "supported": len(supported), "prefix_tokens": dict(sorted(prefixes.items())),
           "supported_names": supported, "refused": {k: v for k, v in sorted(refused.items(), key=lambda kv: -len(kv[1]))}}
    if args.markdown:
        print(f"| | architectures | examples |\n| --- | --- | --- |\n| **supported** | {len(supported)} | "
              f"{', '.join(f'`{n}`' for n in supported[:6])}, … |")
        for reason, names in out["refused"].items():
            print(f"| {reason} | {len(names)} | {', '.join(f'`{n}`' for n in names[:3])}{', …' if len(names) > 3 else ''} |")
    else:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
