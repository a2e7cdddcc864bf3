"""Models in and out: the safetensors + JSON checkpoint format, the Hugging Face Hub, deployment exports, and the
trained pair that ships in ``assets/``.

::

    checkpoint   save_pretrained / load_checkpoint: bounded config, architecture hash, never a pickle
    hub          load_pretrained (a directory or "hf-hub:owner/name"), push_to_hub with a measured model card
    export       ONNX / TorchScript / torch.export with a parity check
    bundled      the offline pair (DeiT-Tiny trained here on synthetic shapes, and its CAIT twin)
"""
