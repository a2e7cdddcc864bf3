"""CAIT: asymmetric token merging (ATME) + consistent dynamic channel pruning (CDCP) for plain ViTs (DeiT, DeiT III,
DINOv2 with registers, CLIP, SigLIP: docs/models.md).

The pipeline, one package per stage, imports pointing down this list only (``tests/test_layers.py`` checks it)::

    layers     pure tensor modules: HTM/VTM token merge, compactors, pruned attention
    data       synthetic shapes with masks, bundled photos, datasets, calibration images
    models     model creation, supported families, architecture records; ATME and compactor patches of timm; Layout,
               ModelSpec, ModelMeta
    compress   plan → importance → select S → prune and fold → refit; one-shot compress()
    baselines  ToMe and EViT-style token pruning, measured beside CAIT in the same run
    measure    FLOPs (docs/method.md: FLOPs), throughput, CLS attention, top-1; the measured ATME/CDCP frontier
    io         model sources (timm names, hf-hub:, folders), safetensors + JSON checkpoints, the Hub, exports, the
               bundled pair
    finetune   CDCP fine-tuning: Eq. 2, typed log records, run directory, the engine
    dense      dense transfer: any backbone's blocks on the patch grid, a Semantic FPN segmenter
    viz        overlays and charts
    cli        every command line (python -m cait.finetune / compress / bench / export)
    studio     the app's engine: model pairs, tab answers, background jobs, public-mode limits, the Gradio UI

The names below are the public API; ``import cait`` needs neither Gradio nor the app.
"""
from .baselines.tome import apply_tome, tome_flops, tome_schedule
from .compress.importance import ChannelScores, compactor_scores, weight_scores
from .compress.oneshot import compress
from .compress.plan import BudgetSplit, atme_reduction, plan_atme, split_budget
from .compress.prune import fold_compactors, prune
from .compress.select import ChannelMask, select_channels
from .io.bundled import BundledPair, bundled_pair
from .io.checkpoint import CheckpointError, save_pretrained
from .io.export import export_model
from .io.hub import load_pretrained, push_to_hub
from .io.source import ModelSource, create_model          # a timm name, hf-hub:owner/name, a directory, "bundled"
from .layers.pruned_attention import PrunedAttention
from .measure.attention import ClsAttention, attention_in_mask, attention_probs, cls_attention, localisation_score
from .measure.flops import analytic_flops, count_flops, count_params, flops_by_block
from .measure.frontier import Candidate, LayoutSearch, search_layouts
from .measure.speed import compare_throughput, measure_throughput, resolve_device
from .models.atme import apply_atme, get_layout, upsample_to_patch_grid
from .models.compactors import add_compactors, has_compactors, iter_compactors
from .models.deit import DEIT_MODELS, TEST_MODEL, WeightsInfo   # registers the tiny test DeiT
from .models.layout import Layout, format_layout, parse_layout
from .models.spec import describe

__version__ = "0.1.0"

__all__ = [
    "ClsAttention", "attention_in_mask", "attention_probs", "cls_attention", "localisation_score",
    "apply_tome", "tome_flops", "tome_schedule",
    "compare_throughput", "measure_throughput", "resolve_device",
    "Candidate", "LayoutSearch", "search_layouts",
    "export_model", "push_to_hub",
    "BundledPair", "bundled_pair", "CheckpointError", "load_pretrained", "save_pretrained",
    "add_compactors", "has_compactors", "iter_compactors",
    "compress",
    "analytic_flops", "count_flops", "count_params", "describe", "flops_by_block",
    "Layout", "apply_atme", "format_layout", "get_layout", "parse_layout", "upsample_to_patch_grid",
    "DEIT_MODELS", "TEST_MODEL", "WeightsInfo", "ModelSource", "create_model",
    "BudgetSplit", "atme_reduction", "plan_atme", "split_budget",
    "PrunedAttention", "fold_compactors", "prune",
    "ChannelMask", "ChannelScores", "compactor_scores", "select_channels", "weight_scores",
]
