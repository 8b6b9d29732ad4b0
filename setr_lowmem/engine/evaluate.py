"""Inference (whole image or sliding window, multi-scale and flip) and confusion-matrix mIoU.

The protocol is mmsegmentation's: resize the image to the base scale (x each test ratio)
keeping its aspect ratio, run the model on the whole image or on crop-sized windows at the
configured stride (overlapping logits averaged), resize the logits back to the original
image, average the softmax probabilities over scales and flips, and compare the argmax with
the original-size label. IoU of a class that is neither labelled nor predicted is NaN and
left out of the mean, as in mmseg.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from setr_lowmem.config import Config
from setr_lowmem.data.loader import EvalSet, eval_inputs
from setr_lowmem.data.base import IGNORE, Source
from setr_lowmem.data.sources import open_source
from setr_lowmem.memory.decoder import bilinear_matrix
from setr_lowmem.model.loss import resize_to

Predict = Callable[[torch.Tensor], torch.Tensor]


def whole_logits(predict: Predict, image: torch.Tensor) -> torch.Tensor:
    """mmseg's whole inference: the image as it is (the encoder pads it at the bottom/right to a
    multiple of the patch size), the logits resized to the image's size (not cropped)."""
    return resize_to(predict(image), image.shape[-2:])


def slide_logits(predict: Predict, image: torch.Tensor, num_classes: int, crop: int, stride: int,
                 batch: int = 4) -> torch.Tensor:
    """mmseg's slide inference: windows of `crop` every `stride`, the last one flush with the edge,
    overlapping logits averaged. Where the image is smaller than the crop on a side, the window is
    that side (not padded to the crop): the model runs on the smaller window and its logits are
    resized back to the window's size."""
    h, w = image.shape[-2:]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    window = (min(crop, h), min(crop, w))  # every box has this size
    n = image.shape[0]
    out = image.new_zeros((n, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        windows = torch.cat([image[..., y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = resize_to(predict(windows), window).float()
        for j, (y1, y2, x1, x2) in enumerate(chunk):
            out[..., y1:y2, x1:x2] += logits[j * n:(j + 1) * n]
            count[..., y1:y2, x1:x2] += 1
    return out / count


def _views(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device,
           autocast: Callable[[], contextlib.AbstractContextManager]):
    """The logits (1 x C x h x w, float32, at the test size of each scale, a flipped view flipped back)
    of every scale and flip of the test protocol."""
    e, classes = cfg.eval, cfg.data.num_classes
    dtype = next(model.parameters()).dtype

    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model.predict(x.to(dtype))

    for x in eval_inputs(image, cfg.data, e.scales, e.ratio_of):
        x = x[None].to(device)
        for flip in ([False, True] if e.flip else [False]):
            xi = x.flip(-1) if flip else x
            if e.mode == "slide":
                logits = slide_logits(predict, xi, classes, e.crop, e.stride)
            else:
                logits = whole_logits(predict, xi)
            yield (logits.flip(-1) if flip else logits).float()


@torch.no_grad()
def predict_probs(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Class probabilities (C x H x W, at the image's original size) averaged over scales and flips."""
    h, w = image.shape[:2]
    total = torch.zeros((cfg.data.num_classes, h, w), device=device)
    views = 0
    for logits in _views(model, image, cfg, device, autocast):
        total += resize_to(logits, (h, w))[0].softmax(0)
        views += 1
    return total / views


PROBS_BUDGET = 2**28  # bytes of original-size probabilities held at once; beyond, the class map is made in bands


@torch.no_grad()
def predict_classes(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    budget: int = PROBS_BUDGET) -> torch.Tensor:
    """The predicted class of every pixel (H x W, int64, on the CPU): the argmax of `predict_probs`.
    An image whose probabilities would take more than `budget` bytes (150 classes of a 10000 x 10000
    photo: 60 GB) is done in bands of rows: each view's logits are resized to the band alone, as two
    products with bilinear interpolation matrices (the weights `F.interpolate` uses), so that only
    one band's probabilities exist at a time."""
    h, w = image.shape[:2]
    classes = cfg.data.num_classes
    if classes * h * w * 4 <= budget:
        return predict_probs(model, image, cfg, device, autocast).argmax(0).cpu()
    views = list(_views(model, image, cfg, device, autocast))
    rows_at_once = max(1, budget // (classes * w * 4))
    out = torch.empty((h, w), dtype=torch.int64)
    widths = [bilinear_matrix(w, v.shape[-1], device, torch.float32) for v in views]
    heights = [bilinear_matrix(h, v.shape[-2], device, torch.float32) for v in views]
    for top in range(0, h, rows_at_once):
        band = slice(top, min(top + rows_at_once, h))
        total = sum((a_h[band] @ v[0] @ a_w.t()).softmax(0) for v, a_h, a_w in zip(views, heights, widths))
        out[band] = total.argmax(0).cpu()
    return out


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows: ground truth, columns: prediction; ignored pixels left out."""
    keep = label != IGNORE
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu().double()


def metrics_from_confusion(cm: torch.Tensor) -> dict[str, float | list[float]]:
    """aAcc, mIoU, mAcc (percent) and per-class IoU/Acc (NaN for classes absent from labels and predictions)."""
    cm = cm.double()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
    return {
        "aAcc": 100 * float(tp.sum() / cm.sum().clamp_min(1)),
        "mIoU": 100 * float(iou.nanmean()),
        "mAcc": 100 * float(acc.nanmean()),
        "IoU": [100 * float(v) for v in iou],
        "Acc": [100 * float(v) for v in acc],
    }


def evaluate(model: nn.Module, cfg: Config, device: torch.device, source: Source | None = None,
             max_images: int = 0, rank: int = 0, world: int = 1,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             progress: bool = False) -> dict:
    """mIoU of `model` on the validation split (this process's share; `reduce` sums the matrices),
    with a progress bar of this process's images if `progress`."""
    source = source or open_source(cfg.data, cfg.data.val_split)
    images = EvalSet(source, cfg.data, max_images)
    bar = tqdm(total=len(range(rank, len(images), world)), desc="validation", unit="img", leave=False,
               dynamic_ncols=True, disable=None if progress else True)  # None: only on a terminal
    was_training = model.training
    model.eval()
    classes = cfg.data.num_classes
    cm = torch.zeros((classes, classes), dtype=torch.float64)
    try:
        for i in range(rank, len(images), world):
            image, label, _ = images[i]
            pred = predict_classes(model, image, cfg, device, autocast)
            cm += confusion_matrix(pred, torch.from_numpy(label), classes)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if reduce is not None:
        cm = reduce(cm.to(device)).cpu()
    out = metrics_from_confusion(cm)
    out["images"] = len(images)
    return out


def format_table(metrics: dict, class_names: list[str] | None = None) -> str:
    """Per-class IoU/Acc table followed by the summary line."""
    names = class_names or [str(i) for i in range(len(metrics["IoU"]))]
    width = max(8, max(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {iou:6.2f}  {acc:6.2f}")
    lines.append(f"aAcc {metrics['aAcc']:.2f}  mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}"
                 f"  ({metrics['images']} images)")
    return "\n".join(lines)
