"""Exact rewrites of the decoder's full-resolution work, applied from outside the model.

SETR's time and memory go to the decoder's full-resolution tensors (bilinear upsampling and
its backward, 150 x 512 x 512 logits per head and their softmax), not to the encoder. Two
rewrites remove most of that without changing the result:

- **Classifier before the last upsample** (`apply_classifier_first`). A 1x1 classifier and
  bilinear upsampling are both linear and bilinear weights sum to one, so they commute:
  classify at the lower resolution and upsample `num_classes` channels instead of 256. The
  parameters are untouched (checkpoints load either way); logits agree to rounding.
- **Upsample fused into the cross-entropy** (`upsample_cross_entropy`). The loss reads the
  low-resolution logits and interpolates them to the label's size a band of rows at a time,
  in forward and again in backward, so full-resolution logits, their softmax and their
  gradient never exist for the whole image. Bilinear interpolation is separable: each band is
  the column interpolation of the few input rows it needs, blended between two rows, exactly
  as `F.interpolate(..., mode="bilinear", align_corners=False)` computes it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def apply_classifier_first(model: nn.Module) -> int:
    """Move each head's 1x1 classifier ahead of its last bilinear upsample; returns the heads changed."""
    n = 0
    for module in model.modules():
        if hasattr(module, "classify_before_last_upsample"):
            module.classify_before_last_upsample = True
            n += 1
    log.info("classifier before the last upsample in %d heads", n)
    return n


def apply_fused_upsample_loss(train_module: nn.Module) -> int:
    """Let every head's loss take the logits before the last upsample and interpolate them band by band."""
    units = train_module.head_losses
    for unit in units:
        inner = getattr(unit, "_checkpoint_wrapped_module", unit)
        inner.fused_upsample = True
    log.info("upsample fused into the cross-entropy for %d heads", len(units))
    return len(units)


def apply_decoder_rewrites(train_module: nn.Module, cfg) -> None:
    """Both rewrites as `cfg` (a MemoryConfig) asks; the model's evaluation path gets the classifier order too."""
    if cfg.classifier_first:
        apply_classifier_first(train_module.model)
    if cfg.fused_upsample_loss:
        apply_fused_upsample_loss(train_module)


def _source_rows(out_size: int, in_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear source index (align_corners False): rows y0, y1 and the weight of y1."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    y0 = src.floor().long().clamp_max(in_size - 1)
    y1 = (y0 + 1).clamp_max(in_size - 1)
    return y0, y1, (src - y0).float()


def _band(low: torch.Tensor, rows: slice, y0: torch.Tensor, y1: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The input rows that output rows `rows` read: (first input row, the slice of `low`)."""
    first, last = int(y0[rows].min()), int(y1[rows].max())
    return first, low[:, :, first:last + 1]


def _band_loss(band: torch.Tensor, first: int, labels: torch.Tensor, rows: slice, y0, y1, w1, width: int,
               ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy of output rows `rows`, interpolated from `band` (input rows from `first`)."""
    # columns: bilinear to the full width; rows: same height, which bilinear leaves unchanged
    band = F.interpolate(band, size=(band.shape[2], width), mode="bilinear", align_corners=False)
    a = band.index_select(2, y0[rows] - first)
    b = band.index_select(2, y1[rows] - first)
    logits = a + (b - a) * w1[rows].view(1, 1, -1, 1).to(band.dtype)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax of 150 classes in bf16 loses the small ones
    return F.cross_entropy(logits, labels[:, rows], ignore_index=ignore_index, reduction="sum")


class _UpsampleCrossEntropy(torch.autograd.Function):
    """Saves only the low-resolution logits; backward recomputes each band and its gradient."""

    @staticmethod
    def forward(ctx, low, labels, ignore_index, denom, rows_per_band):
        h_out, w_out = labels.shape[-2:]
        y0, y1, w1 = _source_rows(h_out, low.shape[2], low.device)
        total = torch.zeros((), device=low.device, dtype=torch.promote_types(low.dtype, torch.float32))
        for start in range(0, h_out, rows_per_band):
            rows = slice(start, min(start + rows_per_band, h_out))
            first, band = _band(low, rows, y0, y1)
            total += _band_loss(band, first, labels, rows, y0, y1, w1, w_out, ignore_index)
        ctx.save_for_backward(low, labels, denom)
        ctx.args = (ignore_index, rows_per_band)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        low, labels, denom = ctx.saved_tensors
        ignore_index, rows_per_band = ctx.args
        h_out, w_out = labels.shape[-2:]
        y0, y1, w1 = _source_rows(h_out, low.shape[2], low.device)
        grad = torch.zeros_like(low, dtype=torch.promote_types(low.dtype, torch.float32))
        for start in range(0, h_out, rows_per_band):
            rows = slice(start, min(start + rows_per_band, h_out))
            first, band = _band(low.detach(), rows, y0, y1)
            with torch.enable_grad():
                band = band.requires_grad_()
                loss = _band_loss(band, first, labels, rows, y0, y1, w1, w_out, ignore_index)
                (g,) = torch.autograd.grad(loss, band, grad_out / denom)
            grad[:, :, first:first + g.shape[2]] += g
        return grad.to(low.dtype), None, None, None, None


# Output pixels per image in one band: 64 rows of a 512-wide crop. Smaller bands hold less at
# once; larger ones launch fewer kernels.
BAND_PIXELS = 2**15


def upsample_cross_entropy(low: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255,
                           avg_non_ignore: bool = False, band_pixels: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.interpolate(low, labels.shape[-2:], bilinear), labels)` with mmseg's reduction,
    without materialising the full-resolution logits (bands of about `band_pixels` output pixels per image)."""
    from setr_lowmem.engine.loss import seg_cross_entropy

    rows = max(1, math.ceil((band_pixels or BAND_PIXELS) / labels.shape[-1]))
    if rows >= labels.shape[-2]:  # one band is the whole image: the plain ops are the same and cheaper
        return seg_cross_entropy(low, labels, ignore_index, avg_non_ignore)
    denom = (labels != ignore_index).sum().clamp_min(1) if avg_non_ignore else labels.new_tensor(labels.numel())
    return _UpsampleCrossEntropy.apply(low, labels, ignore_index, denom.to(torch.promote_types(low.dtype, torch.float32)),
                                       rows)
