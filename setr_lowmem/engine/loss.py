"""The SETR loss: cross-entropy of the main head (weight 1.0) plus each aux head (0.4).

mmsegmentation resizes each head's logits to the label's size (bilinear, align_corners
False) and, with its default `avg_non_ignore=False` (every SETR config), averages the
per-pixel loss over *all* pixels of the batch, the ignored ones counting as zero.
PyTorch's `F.cross_entropy(..., ignore_index=255)` averages over the labelled pixels only;
the two differ by the ignored fraction, which changes the effective learning rate, so the
paper's reduction is the default here.

`SegmentationLoss` wraps a model so that one call gives the weighted loss of a batch. It
keeps one `HeadLoss` per head: the unit that `apply_activation_checkpointing(..., 'full')`
wraps, so that a head's full-resolution logits are recomputed in backward instead of being
kept alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from setr_lowmem.config import LossConfig


def resize_to(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def seg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                      avg_non_ignore: bool = False) -> torch.Tensor:
    """Cross-entropy of logits (resized to the labels) with mmseg's reduction."""
    logits = resize_to(logits, labels.shape[-2:])
    if logits.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(logits.device.type):
        logits = logits.float()  # bf16 weights (DeepSpeed): a softmax in bf16 loses the small classes
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if avg_non_ignore:
        return total / (labels != ignore_index).sum().clamp_min(1)
    return total / labels.numel()


class HeadLoss(nn.Module):
    """One head and its weighted loss, as one callable unit (it owns no parameters of its own:
    the head stays registered in the model)."""

    def __init__(self, head: nn.Module, weight: float, cfg: LossConfig):
        super().__init__()
        # A plain attribute, not a submodule: the head's parameters belong to the model.
        object.__setattr__(self, "head", head)
        self.weight = weight
        self.ignore_index = cfg.ignore_index
        self.avg_non_ignore = cfg.avg_non_ignore
        self.fused_upsample = ""  # a backend name, set by memory.decoder.apply_fused_upsample_loss

    def forward(self, inputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if not self.fused_upsample:
            logits = self.head(inputs)
            return self.weight * seg_cross_entropy(logits, labels, self.ignore_index, self.avg_non_ignore)
        from setr_lowmem.memory.decoder import upsample_cross_entropy

        logits, scale = self.head.forward_deferred(inputs)
        if scale > 1 and (logits.shape[-2] * scale, logits.shape[-1] * scale) != tuple(labels.shape[-2:]):
            # the head's own last upsample does not end at the label's size: keep it, fuse the resize after
            logits = F.interpolate(logits, scale_factor=scale, mode="bilinear", align_corners=False)
        return self.weight * upsample_cross_entropy(logits, labels, self.ignore_index, self.avg_non_ignore,
                                                    backend=self.fused_upsample)


class SegmentationLoss(nn.Module):
    """model + loss: `forward(images, labels)` returns (total loss, per-head losses detached).

    The model is its only submodule, so its state dict is the model's with a `model.`
    prefix, and DeepSpeed/DDP can wrap this module as a whole.
    """

    def __init__(self, model: nn.Module, cfg: LossConfig):
        super().__init__()
        self.model = model
        weights = [cfg.main_weight] + [cfg.aux_weight] * (len(model.heads) - 1)
        self.head_losses = [HeadLoss(h, w, cfg) for h, w in zip(model.heads, weights)]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.model.encode(images)
        losses = [unit(inputs, labels) for unit in self.head_losses]
        total = torch.stack(losses).sum()
        return total, torch.stack([x.detach() for x in losses])
