"""Models: DeiT creation, ATME and compactor patches of timm, layouts, shapes and what a model says about itself.

::

    deit        create_model: timm DeiTs with a visible offline fallback; the tiny test DeiT
    layout      Layout: where HTM/VTM merges sit ("h4,v7"), parsed once, one typed record
    atme        apply_atme: merges into a timm DeiT; per-block grids; dense up-sampling       (paper §III-B)
    compactors  add_compactors: identity compactors into every block                         (§III-C)
    arch        ViTArch: a plain ViT's options as JSON, what a checkpoint rebuilds it from
    spec        ModelSpec: per-block widths and tokens, FLOPs by the closed form             (docs/method.md: FLOPs)
    meta        ModelMeta: how a model was made (preview, calibrated, fine-tuned, teacher)
"""
