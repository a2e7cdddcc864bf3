"""The package as a user installs it: a wheel built from the repository declares what it needs, installs into a
fresh virtual environment, and finds the bundled pair without the checkout."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_installs_and_loads_the_bundled_pair_outside_the_checkout(tmp_path):
    src = tmp_path / "src"                                # build from a copy: nothing is written into the checkout
    for name in ("cait", "assets"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("cait_studio-*.whl"))
    venv = tmp_path / "venv"                              # torch and friends from this interpreter, cait from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAIT_ASSETS_DIR")}
    check = ("import importlib.metadata as md, cait\n"
             "assert 'site-packages' in cait.__file__, cait.__file__\n"
             "needs = ' '.join(md.requires('cait-studio'))\n"
             "assert all(n in needs for n in ('torch', 'timm', 'gradio', 'fvcore', 'safetensors')), needs\n"
             "original, twin = cait.bundled_pair().load()\n"
             "import pathlib\n"
             "packages = sorted(str(p.parent.relative_to(pathlib.Path(cait.__file__).parents[1]))\n"
             "                  for p in pathlib.Path(cait.__file__).parent.rglob('__init__.py'))\n"
             "print(cait.count_flops(original), cait.count_flops(twin), ','.join(packages))\n")
    out = subprocess.run([str(python), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flops_original, flops_twin, installed = out.stdout.split()
    assert int(flops_twin) <= 0.5 * int(flops_original)         # the real pair, not an empty stand-in
    source = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "cait").rglob("__init__.py"))
    assert installed.split(",") == source                      # every subpackage made it into the wheel
