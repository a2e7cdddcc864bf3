"""Cost of the app's job polling with many jobs in the runs directory (public mode keeps polling every second).

    python benchmarks/job_polling.py --jobs 2000

Writes ``--jobs`` finished jobs into a temporary runs directory, then times, with a fresh
:class:`cait.studio.jobs.manager.JobManager`
on it (as a second app or a restart would): the first ``list()`` (every ``job.json`` parsed once), and the median of
later ``list()`` calls and scheduler ticks (``refresh()``) when nothing changed (files are only stat-ed). Prints one
JSON object; seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cait.studio.jobs.manager import JobManager
from cait.studio.jobs.model import Job  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        writer = JobManager(d, poll_interval=0)
        stamp = time.strftime("%Y%m%d-%H%M%S-")
        for i in range(a.jobs):
            writer.store.save(Job(id=f"{stamp}{i:012x}", args={"steps": 10}, status="done"))
        jm = JobManager(d, poll_interval=0)
        t0 = time.perf_counter()
        n = len(jm.list())
        first = time.perf_counter() - t0
        lists, ticks = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jm.list()
            lists.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jm.refresh()
            ticks.append(time.perf_counter() - t0)
    out = {"jobs": n, "first_list_s": round(first, 4), "list_s": round(statistics.median(lists), 4),
           "tick_s": round(statistics.median(ticks), 4)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
