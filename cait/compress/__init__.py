"""Compression: plan the merges, score the units, select S, prune and fold, refit; one-shot ``compress``.

Torch-Pruning's split: importance (how much a unit matters), algorithm (which units go), function (removing them)::

    plan        plan_atme, split_budget: where to merge, ATME first and CDCP the rest         (§III-B, §IV-C1)
    importance  compactor norms, weight norms, Fisher scores per FLOP
    select      the masked set S with head- and attention-level consistency                 (Alg. 1–3)
    prune       fold compactors and remove S → the compact model                            (§III-C)
    refit       training-free least-squares refit of each block's output Linears            (Kwon et al. 2022)
    oneshot     compress(model, R[, calibration=...]): all of the above without training;
                calibrate_merges(model, layout, images): ATME refit alone, a start for CDCP fine-tuning

``python -m cait.compress`` runs :mod:`cait.cli.compress`.
"""
from .oneshot import calibrate_merges, compress

__all__ = ["calibrate_merges", "compress"]
