"""SETR decoders: Naive and PUP (mmseg's SETRUPHead), MLA (neck + head) and the aux heads.

Module names follow mmsegmentation 1.x (`norm`, `up_convs.{j}.0.conv`, `up_convs.{j}.0.bn`,
`conv_seg`, `mla.channel_proj`, ...), so its checkpoints load with a key rename of the
encoder only. Every head takes the list of decoder inputs (NCHW maps) and picks its own by
`in_index`, as mmseg's `_transform_inputs` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_2d(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels of an NCHW map (mmseg flattens to NLC, normalises, and reshapes back)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bilinear upsampling by `scale` (align_corners=False); `x` itself at scale 1."""
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) if scale > 1 else x


class ConvModule(nn.Module):
    """conv (no bias) + BatchNorm + ReLU, named as mmcv's ConvModule."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class Upsample(nn.Module):
    """Bilinear upsampling by an integer factor (align_corners False).

    `resize` (None: `F.interpolate`) is a drop-in `resize(x, size)` with the same result, which a
    memory technique may set (`memory.decoder.apply_matmul_upsample_backward`)."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale
        self.resize = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            return self.resize(x, (x.shape[-2] * self.scale, x.shape[-1] * self.scale))
        return upsample(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class ClassifierHead(nn.Module):
    """What every mmseg decode head ends with: dropout then a 1x1 classifier with bias."""

    def __init__(self, channels: int, num_classes: int, dropout: float, in_index: int):
        super().__init__()
        self.in_index = in_index
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)


class UpHead(ClassifierHead):
    """Naive and PUP head: LayerNorm, then `num_convs` x [conv + BN + ReLU, bilinear x up_scale], classifier.

    Naive: one 1x1 stage, x4 (aux: one or two 1x1 stages). PUP: four 3x3 stages, x2 each
    (aux: two 3x3 stages, x4 each).

    `classify_before_last_upsample` (off by default; `memory.decoder.apply_classifier_first`
    turns it on) applies the 1x1 classifier before the last bilinear upsample instead of
    after it. Both are linear and bilinear weights sum to one, so the logits are the same up
    to rounding, but the upsample then moves num_classes channels instead of 256 and the
    classifier sees 1/scale^2 of the pixels.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int,
                 up_scale: int, kernel_size: int, dropout: float = 0.0, in_index: int = -1):
        super().__init__(channels, num_classes, dropout, in_index)
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.up_convs = nn.ModuleList()
        for j in range(num_convs):
            stage_in = in_channels if j == 0 else channels
            self.up_convs.append(nn.Sequential(ConvModule(stage_in, channels, kernel_size), Upsample(up_scale)))
        self.classify_before_last_upsample = False

    def forward_deferred(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(logits, scale): with the classifier first, the logits before the last upsample and its
        factor; otherwise the final logits and 1. The loss can then fuse that upsample."""
        x = layer_norm_2d(self.norm, inputs[self.in_index])
        last = len(self.up_convs) - 1
        for j, (conv, up) in enumerate(self.up_convs):
            x = conv(x)
            if j == last and self.classify_before_last_upsample:
                return self.cls_seg(x), up.scale
            x = up(x)
        return self.cls_seg(x), 1

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        logits, scale = self.forward_deferred(inputs)
        return upsample(logits, scale)


class MLANeck(nn.Module):
    """SETR-MLA neck: per level LayerNorm and 1x1 projection, top-down cumulative sum, 3x3 conv.

    As in mmseg, `feat_extract[i]` is applied to the i-th cumulative sum counted from the
    deepest level, so output i comes from levels >= 3 - i.
    """

    def __init__(self, in_channels: int, channels: int, num_levels: int = 4):
        super().__init__()
        self.norm = nn.ModuleList(nn.LayerNorm(in_channels, eps=1e-6) for _ in range(num_levels))
        self.mla = nn.Module()
        self.mla.channel_proj = nn.ModuleList(ConvModule(in_channels, channels, 1) for _ in range(num_levels))
        self.mla.feat_extract = nn.ModuleList(ConvModule(channels, channels, 3) for _ in range(num_levels))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        projected = [proj(layer_norm_2d(norm, x))
                     for x, norm, proj in zip(inputs, self.norm, self.mla.channel_proj)]
        outs, running = [], None
        for feat, conv in zip(reversed(projected), self.mla.feat_extract):
            running = feat if running is None else running + feat
            outs.append(conv(running))
        return outs


class MLABranch(nn.Sequential):
    """One level of the MLA head: two 3x3 conv units, then bilinear upsampling (mmseg's
    `up_convs.{i}`: indices 0, 1 the convs, 2 the upsample)."""

    def __init__(self, in_channels: int, mla_channels: int, up_scale: int):
        super().__init__(ConvModule(in_channels, mla_channels, 3), ConvModule(mla_channels, mla_channels, 3),
                         Upsample(up_scale))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The branch before its upsample."""
        return self[1](self[0](x))

    @property
    def upsample(self) -> Upsample:
        return self[2]


class MLAHead(ClassifierHead):
    """SETR-MLA head: per level two 3x3 convs (channels -> mla_channels) and bilinear x4, concat, classifier."""

    def __init__(self, in_channels: int, mla_channels: int, num_classes: int, num_levels: int = 4,
                 up_scale: int = 4, dropout: float = 0.0):
        super().__init__(num_levels * mla_channels, num_classes, dropout, in_index=-1)
        self.up_convs = nn.ModuleList(MLABranch(in_channels, mla_channels, up_scale) for _ in range(num_levels))
        self.classify_before_last_upsample = False

    def forward_deferred(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(logits, scale) as `UpHead.forward_deferred`. With the classifier first, the branches are
        concatenated before their (shared, linear) x4 upsample and classified at 1/4 resolution."""
        if self.classify_before_last_upsample:
            feats = [branch.features(x) for x, branch in zip(inputs, self.up_convs)]
            return self.cls_seg(torch.cat(feats, dim=1)), self.up_convs[0].upsample.scale
        return self.cls_seg(torch.cat([branch(x) for x, branch in zip(inputs, self.up_convs)], dim=1)), 1

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        logits, scale = self.forward_deferred(inputs)
        return upsample(logits, scale)


class FCNAuxHead(ClassifierHead):
    """MLA's aux heads: mmseg's FCNHead with num_convs=0, i.e. only the 1x1 classifier on one neck level."""

    def __init__(self, channels: int, num_classes: int, in_index: int, dropout: float = 0.0):
        super().__init__(channels, num_classes, dropout, in_index)

    def forward_deferred(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.cls_seg(inputs[self.in_index]), 1

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(inputs[self.in_index])
