"""CAIT: asymmetric token merging (ATME) + consistent dynamic channel pruning (CDCP) for DeiT.

The pipeline, one module per step::

    models          get a DeiT (timm weights when the Hub is reachable, a visible random fallback otherwise)
    merge           ATME: HTM/VTM token merges at chosen blocks                        (paper §III-B)
    plan            where to merge for a FLOPs target; ATME/CDCP budget split          (§III-B, §IV-C1)
    compactor       CDCP: identity compactors on q/k/v per head and on the FFN         (§III-C)
    select          the masked set S with head- and attention-level consistency        (Alg. 1–3)
    lasso           CDCP's training rule: masked group lasso, FLOPs-target schedule    (Eq. 2, SPEC §2)
    finetune        the fine-tuning engine, ``python -m cait.finetune``                (SPEC §2–3)
    prune           fold compactors and remove S → compact model                       (§III-C)
    compress        one-shot compression (preview, or calibrated), ``python -m cait.compress``
    calibrate       training-free: Fisher channel scores and a least-squares refit     (Kwon et al. 2022)
    baselines       ToMe token merging, for comparison                                 (Bolya et al. 2023)
    checkpoint      safetensors + JSON save/load; ``meta``: what a model says about itself
    hub             push_to_hub and ``load_pretrained("hf-hub:owner/name")``
    export          ONNX / TorchScript / torch.export with a parity check, ``python -m cait.export``
    flops           FLOPs (fvcore and closed form), params                             (SPEC §4)
    bench           throughput, ``python -m cait.bench``
    attention_maps  CLS attention maps through the merged grid; localisation score     (Fig. 8)
    bundled         the trained offline pair that ships in ``assets/``
"""
from . import models as _models  # noqa: F401  (registers the tiny test DeiT with timm)
from .attention_maps import ClsAttention, attention_in_mask, attention_probs, cls_attention, localisation_score
from .baselines import apply_tome, tome_flops, tome_schedule
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .compress import compress              # a package: `python -m cait.compress` runs its __main__
from .compactor import add_compactors, has_compactors, iter_compactors
from .flops import analytic_flops, count_flops, count_params, describe, flops_by_block
from .hub import push_to_hub
from .merge import apply_atme, format_layout, get_layout, parse_layout, upsample_to_patch_grid
from .models import DEIT_MODELS, TEST_MODEL, WeightsInfo, create_model
from .plan import BudgetSplit, atme_reduction, plan_atme, split_budget
from .prune import PrunedAttention, fold_compactors, prune
from .select import ChannelMask, ChannelScores, compactor_scores, select_channels, weight_scores

__version__ = "0.1.0"

# Modules with a command line (python -m cait.<name>) load on first use, so running one does not import it twice.
_LAZY = {"compare_throughput": "bench", "measure_throughput": "bench", "export_model": "export"}
_LAZY_MODULES = {"bench", "export"}


def __getattr__(name: str):
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _LAZY_MODULES:                       # `cait.bench.resolve_device(...)` after a bare `import cait`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cait' has no attribute {name!r}")

__all__ = [
    "ClsAttention", "attention_in_mask", "attention_probs", "cls_attention", "localisation_score",
    "apply_tome", "tome_flops", "tome_schedule",
    "compare_throughput", "measure_throughput",
    "export_model", "push_to_hub",
    "CheckpointError", "load_pretrained", "save_pretrained",
    "add_compactors", "has_compactors", "iter_compactors",
    "compress",
    "analytic_flops", "count_flops", "count_params", "describe", "flops_by_block",
    "apply_atme", "format_layout", "get_layout", "parse_layout", "upsample_to_patch_grid",
    "DEIT_MODELS", "TEST_MODEL", "WeightsInfo", "create_model",
    "BudgetSplit", "atme_reduction", "plan_atme", "split_budget",
    "PrunedAttention", "fold_compactors", "prune",
    "ChannelMask", "ChannelScores", "compactor_scores", "select_channels", "weight_scores",
]
