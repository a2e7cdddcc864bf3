"""A semantic segmenter over any backbone of this package: Semantic FPN on a plain ViT (paper §IV-B1).

::

    images (B, 3, S, S)
      → backbone: four blocks' outputs on the patch grid, (B, C, S/16, S/16) each        (cait.dense.features)
      → SimpleFeaturePyramid (ViTDet, Li et al. 2022 §3): ×4, ×2, ×1, ×½ → strides 4, 8, 16, 32
      → segmentation_models_pytorch's FPNDecoder (Kirillov et al. 2019's Semantic FPN head) → (B, D, S/4, S/4)
      → 1×1 conv, ×4 bilinear → logits (B, K, S, S)

The decoder is smp's own module fed our pyramid (smp has no ViT encoder whose tokens a merged or pruned backbone
could replace, but its decoders take any list of maps at strides 4–32). Worked example, DeiT-Tiny at 224 px:
blocks 2, 5, 8, 11 → maps (B, 192, 14, 14) → pyramid (48, 56²), (96, 28²), (192, 14²), (192, 7²) → decoder
(32, 56²) → logits (B, 9, 224, 224). A frozen backbone is a *probe* (only the pyramid, decoder and head train).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

from .features import default_blocks, dense_features


@dataclass(frozen=True)
class DecoderConfig:
    """The segmenter's own layers: pyramid channels per level and the Semantic FPN widths (smp's names)."""

    pyramid_channels: int = 64
    segmentation_channels: int = 32
    dropout: float = 0.0


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple pyramid from four maps ``(B, C, h, w)`` on the patch grid (stride 16): two stride-2
    deconvolutions (×4), one (×2), identity (×1), 2×2 max-pool (×½) → channels ``C/4, C/2, C, C``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.down = nn.MaxPool2d(2, ceil_mode=True)
        self.out_channels = [dim // 4, dim // 2, dim, dim]

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        a, b, c, d = maps
        return [self.up4(a), self.up2(b), c, self.down(d)]


class Segmenter(nn.Module):
    """Backbone + pyramid + Semantic FPN decoder + 1×1 head (module docstring).

    Args:
        backbone: any DeiT of this package (original, ATME, CDCP, CAIT, ToMe, token pruning).
        num_classes: K, background included.
        blocks: the backbone blocks read (default :func:`~cait.dense.features.default_blocks`).
        decoder: the decoder's widths.
        frozen: keep the backbone fixed (a probe): it runs in eval mode without gradients.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, blocks: list[int] | None = None,
                 decoder: DecoderConfig = DecoderConfig(), frozen: bool = True) -> None:
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.blocks = list(blocks) if blocks is not None else default_blocks(len(backbone.blocks))
        depth = len(backbone.blocks)
        if len(self.blocks) != 4 or len({b % depth for b in self.blocks}) != 4 or \
                any(not -depth <= b < depth for b in self.blocks):
            raise ValueError(f"the pyramid reads four different blocks of the {depth}, got {self.blocks}")
        self.decoder_config = decoder
        self.pyramid = SimpleFeaturePyramid(backbone.embed_dim)
        self.decoder = FPNDecoder(self.pyramid.out_channels, encoder_depth=3,
                                  pyramid_channels=decoder.pyramid_channels,
                                  segmentation_channels=decoder.segmentation_channels, dropout=decoder.dropout)
        self.head = nn.Conv2d(decoder.segmentation_channels, num_classes, 1)
        self.num_classes = num_classes
        if frozen:
            backbone.requires_grad_(False)
        else:                                        # end to end: what the pyramid never reads stays fixed, so
            for part in self._unread(backbone):      # DDP sees no parameter without a gradient
                part.requires_grad_(False)

    def _unread(self, backbone: nn.Module) -> list[nn.Module]:
        """The backbone's modules after the last block read: its final norm, classifier head, later blocks."""
        last = max(b % len(backbone.blocks) for b in self.blocks)
        parts = [getattr(backbone, n) for n in ("norm", "fc_norm", "head_drop", "head") if hasattr(backbone, n)]
        return parts + list(backbone.blocks[last + 1:])

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()                     # a probe never changes its backbone (dropout, drop path)
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's four maps on the patch grid."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return dense_features(self.backbone, x, self.blocks)

    def decode(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Four maps → logits ``(B, K, *size)``."""
        y = self.head(self.decoder(self.pyramid(maps)))                       # (B, K, h·4, w·4)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.features(x), x.shape[-2:])

    def decoder_modules(self) -> nn.ModuleDict:
        """The layers a probe trains (and a checkpoint of the segmenter stores beside its backbone)."""
        return nn.ModuleDict({"pyramid": self.pyramid, "decoder": self.decoder, "head": self.head})
