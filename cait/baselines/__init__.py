"""The baselines CAIT is compared with in the same run, written from their papers (never from their code).

::

    tome            ToMe: bipartite soft matching, size-weighted merges, proportional attention  (Bolya et al. 2023);
                    its merges undone for dense outputs (source tracking)
    token_pruning   EViT: keep the most CLS-attended tokens, fuse the rest          (Liang et al. 2022);
                    dropped positions keep their last value for dense outputs
"""
