"""CAIT: asymmetric token merging (ATME) + consistent dynamic channel pruning (CDCP) for DeiT.

The pipeline, one module per step::

    models      get a DeiT (timm weights when the Hub is reachable, a visible random fallback otherwise)
    merge       ATME: HTM/VTM token merges at chosen blocks                       (paper §III-B)
    plan        where to merge for a FLOPs target; ATME/CDCP budget split         (§III-B, §IV-C1)
    compactor   CDCP: identity compactors on q/k/v per head and on the FFN        (§III-C)
    select      the masked set S with head- and attention-level consistency      (Alg. 1–3)
    prune       fold compactors and remove S → compact model                      (§III-C)
    compress    one-shot compression (untrained preview)
    checkpoint  safetensors + JSON save/load
    flops       FLOPs (fvcore and closed form), params                           (SPEC §4)
    bench       throughput, ``python -m cait.bench``
    attention   CLS attention maps through the merged grid; localisation score    (Fig. 8)
    bundled     the trained offline pair that ships in ``assets/``
"""
from . import models as _models  # noqa: F401  (registers the tiny test DeiT with timm)
from .attention import ClsAttention, attention_in_mask, attention_probs, cls_attention, localisation_score
from .bench import compare_throughput, measure_throughput
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .compactor import add_compactors, has_compactors, iter_compactors
from .compress import compress
from .flops import analytic_flops, count_flops, count_params, describe, flops_by_block
from .merge import apply_atme, format_layout, get_layout, parse_layout, upsample_to_patch_grid
from .models import DEIT_MODELS, TEST_MODEL, WeightsInfo, create_model
from .plan import BudgetSplit, atme_reduction, plan_atme, split_budget
from .prune import PrunedAttention, fold_compactors, prune
from .select import ChannelMask, ChannelScores, compactor_scores, select_channels, weight_scores

__version__ = "0.1.0"

__all__ = [
    "ClsAttention", "attention_in_mask", "attention_probs", "cls_attention", "localisation_score",
    "compare_throughput", "measure_throughput",
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
