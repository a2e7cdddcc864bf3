"""The baselines CAIT is compared with in the same run, written from their papers (never from their code).

::

    tome   ToMe: bipartite soft matching, size-weighted merges, proportional attention   (Bolya et al. 2023)
"""
