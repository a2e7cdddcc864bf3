"""How long a public-mode Cost request takes, whole (*Safe to host, part three*, probe 5); prints one JSON object.

    python benchmarks/public_cost.py [--model deit_base_patch16_224] [--batch-size 32] [--precisions fp32,bf16,int8]

For each precision it times what one ``/cost`` call does on a public Space, from the pair's build (random weights:
the preview twin) to the table: FLOPs, the precision's copies, the timing (or its refusal up front when it cannot fit
the budget even in one round, :func:`cait.studio.cost.cost_view`). Reported per precision: seconds, whether it was
refused and why, the rounds timed, and the budget.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precisions", default="fp32,bf16,bf16-autocast,int8")
    a = p.parse_args()
    import torch

    from cait.studio.cost import cost_view
    from cait.studio.engine import Studio
    from cait.studio.public import Limits
    limits = Limits(public=True)
    rows = []
    for precision in a.precisions.split(","):
        studio = Studio(device="cpu", pretrained=False, jobs=None, bundled=None, segmenters=None, limits=limits)
        t0 = time.perf_counter()
        try:
            pair = studio.pair(f"deit:{a.model}", 0.5, "")
            table, _, _ = cost_view(pair, limits, measure=True, batch_size=a.batch_size, precision=precision,
                                    started=t0)
            rows.append({"precision": precision, "seconds": round(time.perf_counter() - t0, 1), "refused": None,
                         "rounds": [int(r) for r in table["rounds"]]})
        except ValueError as e:
            rows.append({"precision": precision, "seconds": round(time.perf_counter() - t0, 1), "refused": str(e),
                         "rounds": None})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"model": a.model, "batch_size": a.batch_size, "budget_s": limits.measure_budget(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
