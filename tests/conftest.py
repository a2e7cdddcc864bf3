import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="cait-trackio-"))   # never the user's store
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import cait  # noqa: E402,F401  (registers the tiny test model)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
