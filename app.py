"""CAIT Studio: compare a DeiT with its CAIT-compressed twin in the browser.

    python app.py [--host 127.0.0.1] [--port 7860] [--device cpu|cuda] [--offline] [--public | --no-public]

Listens on 127.0.0.1 unless told otherwise (``--host`` or ``GRADIO_SERVER_NAME``). Public mode (on by default on a
Hugging Face Space, ``CAIT_PUBLIC=1``, ``--public``) caps every heavy request and accepts no server path
(:mod:`cait.studio.public`). This file only launches the app: the page is :mod:`cait.studio.ui`, its answers come
from :mod:`cait.studio`.
"""
from __future__ import annotations

import argparse
import os
import sys

from cait.studio.engine import Studio
from cait.studio.jobs.manager import JobManager
from cait.studio.public import Limits
from cait.studio.ui import build_app, launch_options
from cait.studio.ui.common import host_warning


def main() -> None:
    p = argparse.ArgumentParser(description="CAIT Studio")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--offline", action="store_true", help="do not try the Hugging Face Hub (random weights)")
    p.add_argument("--public", action=argparse.BooleanOptionalAction, default=None,
                   help="caps for anonymous visitors and no server paths (default: on on a Space or with "
                        "CAIT_PUBLIC=1)")
    a = p.parse_args()
    limits = Limits.for_environment(a.public)
    warning = host_warning(a.host, a.port, limits)
    if warning:
        print(warning, file=sys.stderr)
    studio = Studio(device=a.device, pretrained=not a.offline, jobs=JobManager(limits=limits))
    print(studio.startup_line(), file=sys.stderr, flush=True)
    app = build_app(studio)
    queue = dict(max_size=16, default_concurrency_limit=1) if limits.public else dict(default_concurrency_limit=1)
    app.queue(**queue).launch(server_name=a.host, server_port=a.port, **launch_options(studio))


if __name__ == "__main__":
    main()
