import os
import tempfile

# Under pytest-xdist (`-n 2`, pyproject's addopts) each worker, and every process a test starts (benchmarks, jobs,
# notebook kernels), gets its share of the cores: two workers never run four busy threads on two cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="cait-trackio-"))   # never the user's store
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import cait  # noqa: E402,F401  (registers the tiny test model)

torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


# The slowest tests, slowest first (measured by `--durations`): they start first, so that under `-n 2` the short
# tests fill the other worker around them instead of one long test running alone at the end.
SLOW_FIRST = (
    "test_browser.py::", "test_frontier.py::test_calibrated_is_no_worse",
    "test_notebooks.py::test_notebook_runs_and_is_stripped[01", "test_benchmarks.py::test_speed_benchmark_under_onnx",
    "test_public.py::test_cost_and_estimates", "test_benchmarks.py::test_dense_benchmark",
    "test_benchmarks.py::test_speed_benchmark_in_every_precision", "test_bundled.py::test_shipped_pair_classifies",
    "test_segment_jobs.py::test_a_fine_tuned_twin", "test_docs.py::test_the_readme_and_getting_started",
    "test_notebooks.py::", "test_jobs.py::test_job_life_cycle", "test_public.py::test_one_address",
    "test_benchmarks.py::", "test_packaging.py::", "test_space.py::",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return next((i for i, key in enumerate(SLOW_FIRST) if key in item.nodeid), len(SLOW_FIRST))
    items.sort(key=rank)                                 # stable: the rest keep their order


@pytest.fixture
def tiny():
    """Factory for the tiny test DeiT (32 px, 8×8 grid, C=48, 3 heads of 16, depth 6), seeded, eval mode."""
    def make(seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        return timm.create_model(cait.TEST_MODEL, **kwargs).eval()
    return make


@pytest.fixture(scope="module")
def deit_s():
    """DeiT-Small (random weights, eval mode): the paper's worked examples are on it."""
    return timm.create_model("deit_small_patch16_224").eval()


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter so that no test passes by accident of a symmetric initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model
