"""Fine-tuning a DeiT into its CAIT twin (docs/method.md: CDCP, fine-tuning): CDCP's training rule, the engine, its run
directory.

::

    config        FinetuneConfig: every option, one flag each
    lasso         Eq. 2's masked group lasso, the proximal shrink, the FLOPs-target schedule
    token_labels  token labelling for training a DeiT from scratch (LV-ViT)
    token_distill label-free token distillation: the teacher's tokens pooled onto the merged grid
    records       the typed lines of log.jsonl, shared by the writer and every reader
    report        log.jsonl and its optional mirror in trackio or TensorBoard
    rundir        a run directory's files: training states, the log, a compactor snapshot
    build         data, teacher, student and optimisation of a run
    engine        finetune(cfg): the loop, one step, prune-and-fold export
"""
from .config import FinetuneConfig, FinetuneError
from .engine import finetune

__all__ = ["FinetuneConfig", "FinetuneError", "finetune"]
