"""Pure tensor modules, no model surgery: what the patches in :mod:`cait.models` put into a timm DeiT.

::

    token_merge       HTM / VTM: pair neighbouring tokens, fuse each pair with Linear(2C, C)     (paper §III-B)
    compactor         CDCP's compactors: identity-initialised Q after qkv (per head) and fc1     (§III-C, ResRep)
    pruned_attention  the compact attention: per-head q/k width ≠ v width, original scale        (docs/method.md: CDCP)
"""
