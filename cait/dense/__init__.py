"""Dense transfer (paper §IV-B1): any backbone of this package inside a segmenter — ATME keeps the patch grid a
grid, token merging and pruning must be undone first.

::

    features    dense_features: chosen blocks' outputs on the full patch grid, for every kind of backbone
    segmenter   Segmenter: backbone → simple feature pyramid (ViTDet) → Semantic FPN decoder (smp) → classes
"""
