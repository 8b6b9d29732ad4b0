"""The training and test pipelines of mmsegmentation's SETR configs, on torchvision's v2 ops.

Training, in mmseg's order: RandomResize (base scale x ratio in [0.5, 2], keep ratio),
RandomCrop with the category-ratio retry, RandomFlip, PhotoMetricDistortion, then (in
mmseg's data preprocessor) normalise and pad to the crop with 0 (image) and 255 (label).
Labels are always resized with nearest neighbour.

Every random draw comes from a `numpy.random.Generator` passed in by the caller, which
seeds it from (run seed, position of the sample in the data stream): a sample is
augmented the same way whichever worker loads it, and a resumed run sees exactly the
samples it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from setr_lowmem.config import DataConfig
from setr_lowmem.data.sources import IGNORE


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_pair(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    """Bilinear (no antialias, as cv2) for the image, nearest for the label."""
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
    if label is not None:
        label = TF.resize(label[None], list(size), interpolation=InterpolationMode.NEAREST)[0]
    return image, label


def random_resize(image, label, cfg: DataConfig, rng: np.random.Generator):
    lo, hi = cfg.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    scale = (int(cfg.base_scale[0] * ratio), int(cfg.base_scale[1] * ratio))
    return resize_pair(image, label, rescale_size(*image.shape[-2:], scale))


def crop_box(h: int, w: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    y = int(rng.integers(0, max(h - crop, 0) + 1))
    x = int(rng.integers(0, max(w - crop, 0) + 1))
    return y, min(y + crop, h), x, min(x + crop, w)


def random_crop(image, label, crop: int, cat_max_ratio: float, rng: np.random.Generator):
    """mmseg's RandomCrop: up to 10 retries while one class covers >= cat_max_ratio of the labelled
    pixels (or only one class is present); after 10 failures the 11th box is used as drawn."""
    h, w = label.shape
    box = crop_box(h, w, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            counts = torch.bincount(label[y1:y2, x1:x2].flatten().long(), minlength=256)[:IGNORE]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = crop_box(h, w, crop, rng)
    y1, y2, x1, x2 = box
    return image[:, y1:y2, x1:x2], label[y1:y2, x1:x2]


def _u8(x: torch.Tensor) -> torch.Tensor:
    """mmcv converts back to uint8 (clip, truncate) after each photometric step."""
    return x.clamp(0, 255).floor()


def scale_saturation(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """Multiply S of HSV by `alpha` (clipped at 1) on a 3xHxW RGB image, without leaving RGB.

    Hue and value stay: each channel moves away from the maximum (V) by the same factor,
    and S saturates when the minimum channel reaches 0."""
    vmax = image.max(dim=0, keepdim=True).values
    vmin = image.min(dim=0, keepdim=True).values
    s = torch.where(vmax > 0, (vmax - vmin) / vmax.clamp_min(1e-6), torch.zeros_like(vmax))
    factor = torch.where(s * alpha > 1, 1 / s.clamp_min(1e-6), torch.full_like(s, alpha))
    return vmax - (vmax - image) * factor


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a float 0..255 RGB image: brightness +-32, contrast
    0.5..1.5 (randomly first or last), saturation 0.5..1.5 and hue +-18 (of OpenCV's 180) in HSV,
    each applied with probability 0.5."""
    if rng.integers(2):
        image = _u8(image + rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = _u8(image * rng.uniform(0.5, 1.5))
    if rng.integers(2):
        image = _u8(scale_saturation(image, rng.uniform(0.5, 1.5)))
    if rng.integers(2):
        delta = int(rng.integers(-18, 19))  # OpenCV hue units (0..180), as mmseg
        image = _u8(TF.adjust_hue(image / 255.0, delta / 180.0) * 255.0)
    if not contrast_first and rng.integers(2):
        image = _u8(image * rng.uniform(0.5, 1.5))
    return image


def normalize_and_pad(image: torch.Tensor, label: torch.Tensor | None, cfg: DataConfig, size: int | None):
    """(float 0..255 image) -> normalised, padded at the bottom/right to `size` with 0 / 255."""
    image = TF.normalize(image, list(cfg.mean), list(cfg.std))
    if size is not None:
        ph, pw = max(size - image.shape[-2], 0), max(size - image.shape[-1], 0)
        if ph or pw:
            image = TF.pad(image, [0, 0, pw, ph], fill=0.0)
            if label is not None:
                label = TF.pad(label[None], [0, 0, pw, ph], fill=IGNORE)[0]
    return image, label


def train_transform(image: np.ndarray, label: np.ndarray, cfg: DataConfig, rng: np.random.Generator):
    """HxWx3 uint8 image, HxW uint8 label -> (3xCxC float image, CxC int64 label), C = cfg.crop."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    lbl = torch.from_numpy(np.ascontiguousarray(label))
    img, lbl = random_resize(img, lbl, cfg, rng)
    img, lbl = random_crop(img, lbl, cfg.crop, cfg.cat_max_ratio, rng)
    if rng.random() < cfg.flip_prob:
        img, lbl = TF.horizontal_flip(img), TF.horizontal_flip(lbl)
    img = img.float()
    if cfg.photometric:
        img = photometric_distortion(img, rng)
    img, lbl = normalize_and_pad(img, lbl, cfg, cfg.crop)
    return img.contiguous(), lbl.long().contiguous()


def test_transform(image: np.ndarray, cfg: DataConfig, ratio: float = 1.0) -> torch.Tensor:
    """Test-time: resize to base_scale x ratio keeping the aspect ratio, normalise (no padding)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    scale = (int(cfg.base_scale[0] * ratio), int(cfg.base_scale[1] * ratio))
    img, _ = resize_pair(img, None, rescale_size(*img.shape[-2:], scale))
    img, _ = normalize_and_pad(img.float(), None, cfg, None)
    return img
