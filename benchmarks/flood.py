"""Replay of the public-mode flood (*Safe to host, part three*, probe 1): one address floods the app while another
visitor asks for CLS attention maps; prints one JSON object.

    python benchmarks/flood.py [--seconds 45] [--sessions 18]

It starts the app in public mode on a free loopback port (random weights, a temporary runs directory, the address
taken from ``X-Forwarded-For`` as behind a Space's proxy), uploads one zip that declares 41,000 members, then runs
``--sessions`` sessions of one address in a separate process for ``--seconds``: half re-send that upload to
``/start_finetune``, half poll ``/job_status``, each retrying at once when refused. Meanwhile another address calls
``/attention`` again and again. Reported: that visitor's time alone and each call's time during the flood (seconds),
how many of the flood's calls were refused (its share of the queue, the member cap) or answered, and any ``503 Queue
is full`` anyone got (there should be none).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOOD = """
import json, sys, threading, time
from gradio_client import Client
url, uploaded, label, seconds, sessions = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4]), \\
    int(sys.argv[5])
counts = {"refused": 0, "answered": 0, "errors": []}
ready = threading.Barrier(sessions + 1)
def flood(i):
    c = Client(url, verbose=False, headers={"X-Forwarded-For": "203.0.113.66"})
    ready.wait()
    end = time.time() + seconds
    while time.time() < end:
        try:
            if i % 2:
                c.predict(None, api_name="/job_status")
            else:
                c.predict(label, "the data's labels", "synthetic", uploaded, 0.5, 20, 8, "cpu", 128, 256,
                          api_name="/start_finetune")
            counts["answered"] += 1
        except Exception as e:
            if "429" in str(e) or "40,000" in str(e):
                counts["refused"] += 1
            else:
                counts["errors"].append(str(e)[:200])
threads = [threading.Thread(target=flood, args=(i,)) for i in range(sessions)]
[t.start() for t in threads]
ready.wait()                                   # every session connected: the flood starts now
print("flooding", flush=True)
[t.join() for t in threads]
print(json.dumps(counts))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=45.0, help="how long the flood lasts")
    p.add_argument("--sessions", type=int, default=18, help="sessions of the flooding address")
    a = p.parse_args()
    os.environ["CAIT_TRUSTED_PROXIES"] = "127.0.0.1/32"         # this script plays the Space's proxy
    import httpx
    from gradio_client import Client

    import app
    from cait.models.deit import TEST_MODEL
    from cait.studio.engine import Studio
    from cait.studio.jobs.manager import JobManager
    from cait.studio.public import Limits
    from cait.studio.ui.finetune_tab import FINETUNE_MODELS
    tmp = Path(tempfile.mkdtemp(prefix="cait-flood-"))
    jobs = JobManager(tmp / "runs", poll_interval=0.5, limits=Limits(public=True))
    studio = Studio(device="cpu", pretrained=False, jobs=jobs, bundled=None)
    demo = app.build_app(studio, poll_s=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue(max_size=16, default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port,
                                                                prevent_thread_lock=True, quiet=True,
                                                                **app.launch_options(studio))
    url = f"http://127.0.0.1:{port}/"
    try:
        bomb = tmp / "members.zip"
        with zipfile.ZipFile(bomb, "w") as z:
            for i in range(41_000):
                z.writestr(f"j/{i}", "")
        sent = httpx.post(url + "gradio_api/upload", files={"files": ("members.zip", bomb.read_bytes())},
                          headers={"X-Forwarded-For": "203.0.113.66"}, timeout=60)
        uploaded = {"path": sent.json()[0], "meta": {"_type": "gradio.FileData"}}
        label = next(k for k, v in FINETUNE_MODELS.items() if v == TEST_MODEL)
        b = Client(url, verbose=False, headers={"X-Forwarded-For": "203.0.113.99"})
        attention = ("deit:deit_tiny_patch16_224", 0.5, "", "astronaut (scikit-image)", None, 11)
        b.predict(*attention, api_name="/attention")             # built and warm
        alone = []
        for _ in range(3):
            t0 = time.time()
            b.predict(*attention, api_name="/attention")
            alone.append(round(time.time() - t0, 2))
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, url, json.dumps(uploaded), label, str(a.seconds),
                                  str(a.sessions)], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        time.sleep(2)
        during, end = [], time.time() + a.seconds - 4
        while time.time() < end:
            t0 = time.time()
            b.predict(*attention, api_name="/attention")
            during.append(round(time.time() - t0, 2))
        out, _ = flood.communicate(timeout=a.seconds + 120)
        counts = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({"seconds": a.seconds, "sessions": a.sessions, "attention_alone_s": alone,
                          "attention_during_s": during, "flood_refused": counts["refused"],
                          "flood_answered": counts["answered"],
                          "queue_full": sum("503" in e or "Queue is full" in e for e in counts["errors"]),
                          "other_errors": counts["errors"][:3], "cpu": os.cpu_count()}, indent=1))
    finally:
        demo.close()


if __name__ == "__main__":
    main()
