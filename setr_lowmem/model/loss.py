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
kept alive. A `HeadLoss` asks its head for the logits before the head's last upsample and
hands them to its `criterion`: by default the upsample and the cross-entropy above; the
fused-loss technique (`memory.decoder.apply_fused_upsample_loss`) puts one there that never
builds the full-resolution logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from setr_lowmem.config import LossConfig
from setr_lowmem.model.heads import upsample


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


# (logits before the head's last upsample, that upsample's factor, labels, loss config) -> loss
Criterion = Callable[[torch.Tensor, int, torch.Tensor, LossConfig], torch.Tensor]


def resized_cross_entropy(logits: torch.Tensor, scale: int, labels: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The plain criterion: the head's last upsample (by `scale`), then `seg_cross_entropy`."""
    return seg_cross_entropy(upsample(logits, scale), labels, cfg.ignore_index, cfg.avg_non_ignore)


class HeadLoss(nn.Module):
    """One head and its weighted loss, as one callable unit.

    The head is a submodule here *and* in the model, where its parameters belong: `SegmentationLoss`
    keeps the units in a plain list, outside its module tree, so no parameter is counted twice.
    """

    def __init__(self, head: nn.Module, weight: float, cfg: LossConfig):
        super().__init__()
        self.head = head
        self.weight = weight
        self.cfg = cfg
        self.criterion: Criterion = resized_cross_entropy

    def forward(self, inputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, scale = self.head.forward_deferred(inputs)
        return self.weight * self.criterion(logits, scale, labels, self.cfg)


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
