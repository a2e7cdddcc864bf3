"""Hugging Face Spaces: the README's front matter, and the app started the way Spaces starts it."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio
import pytest

ROOT = Path(__file__).resolve().parents[1]


def front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "README.md must start with Spaces front matter"
    block = text[4:text.index("\n---\n", 4)]
    out = {}
    for line in block.splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip().strip('"')
    return out


def test_front_matter_keys_and_values():
    fm = front_matter()
    assert fm["sdk"] == "gradio"
    assert fm["sdk_version"] == gradio.__version__                    # pinned to the version we test with
    assert fm["app_file"] == "app.py" and (ROOT / fm["app_file"]).is_file()
    assert fm["python_version"] in ("3.10", "3.11", "3.12")
    assert fm["suggested_hardware"] in ("cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "a10g-small")
    assert fm["title"] and fm["colorFrom"] and fm["colorTo"] and len(fm.get("short_description", "")) <= 60


def _tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_app_starts_like_a_space_and_writes_nothing_into_the_repo(tmp_path):
    repo = tmp_path / "space"
    for f in _tracked_files():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    before = _listing(repo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, SPACE_ID="cait/cait-studio", GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(port),
               HF_HUB_OFFLINE="1", TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    env.pop("CAIT_RUNS_DIR", None)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                assert time.time() < deadline, "the app did not start"
                time.sleep(1)
        from gradio_client import Client
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status = client.predict("deit:deit_tiny_patch16_224", 0.5, "", api_name="/build")[0]
        assert "CAIT twin" in status
        from cait.io.bundled import bundled_pair
        if bundled_pair() is not None:                                     # the fresh offline default: trained
            status = client.predict("bundled", 0.5, "", api_name="/build")[0]
            assert "bundled weights trained by this project" in status and "HF_HUB_OFFLINE" in status
        assert (tmp / "cait-runs" / "jobs").is_dir()                       # runs go to the ephemeral disk
        assert _listing(repo) == before                                    # nothing written into the repo
        # A refused input is one line in the terminal, not a traceback.
        with pytest.raises(Exception, match="is not a job id"):
            client.predict("../nope", api_name="/cancel_finetune")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = proc.stdout.read()
    assert "CAIT Studio on cpu: opens on" in log and "public mode" in log       # what it started on, said once
    assert "Traceback" not in log, log[-3000:]
