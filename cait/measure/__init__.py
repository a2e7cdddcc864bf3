"""Measurement: FLOPs in the paper's convention, throughput and latency, CLS attention, held-out top-1.

::

    flops      count_flops (fvcore, with an SDPA handle) = analytic_flops; params           (docs/method.md: FLOPs)
    speed      compare_throughput: images/s of models timed in alternation on one input
    attention  CLS attention through the merged grid; its share inside a known object       (Fig. 8)
    accuracy   evaluate: top-1 on a held-out set, across DDP ranks
    segmentation  mIoU and per-class IoU (torchmetrics), pixel accuracy
"""
