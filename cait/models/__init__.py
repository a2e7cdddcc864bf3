"""Models: DeiT creation, ATME and compactor patches of timm, layouts, shapes and what a model says about itself.

::

    deit        create_model: timm DeiTs with a visible offline fallback; the tiny test DeiT
    layout      Layout: where HTM/VTM merges sit ("h4,v7"), parsed once, one typed record
    atme        apply_atme: merges into a timm ViT or Eva; per-block grids; dense up-sampling (paper §III-B)
    rope        RoPE codes (EVA-02, DINOv3) at merged positions (docs/method.md: Rotary position codes)
    compactors  add_compactors: identity compactors into every block                         (§III-C)
    parts       a block's q/k/v and FFN read the same way across timm's ViT and Eva layers
    family      which models CAIT compresses, judged by their modules
    arch        ViTArch, EvaArch: a model's options as JSON, what a checkpoint rebuilds it from
    spec        ModelSpec: per-block widths and tokens, FLOPs by the closed form             (docs/method.md: FLOPs)
    meta        ModelMeta: how a model was made (preview, calibrated, fine-tuned, teacher)
"""
