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
from setr_lowmem.data.base import IGNORE


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale).
    A side never rounds down to 0 (mmcv's would for a 3 x 2000 strip): it keeps at least one pixel."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


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


def _convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """One photometric step as mmseg computes it: float32 `image * alpha + beta`, clipped to 0..255
    and truncated back to uint8."""
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an HxWx3 uint8 RGB image, draw for draw: brightness +-32,
    contrast 0.5..1.5 (first or last, one coin), saturation 0.5..1.5 and hue an integer in -18..17
    (numpy's exclusive high, of OpenCV's 0..180), each applied with probability 0.5. Saturation
    and hue go through OpenCV's uint8 HSV conversion and back, as mmcv's `bgr2hsv`/`hsv2bgr` do
    (RGB<->HSV here on RGB data gives the same HSV as mmcv's BGR<->HSV on BGR data)."""
    import cv2  # opencv-python-headless: only the photometric step needs it

    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-18, 18))) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        image = contrast(image)
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
    if cfg.photometric:
        hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        img = torch.from_numpy(photometric_distortion(hwc, rng)).permute(2, 0, 1)
    img, lbl = normalize_and_pad(img.float(), lbl, cfg, cfg.crop)
    return img.contiguous(), lbl.long().contiguous()


def test_transform(image: np.ndarray, cfg: DataConfig, ratio: float = 1.0, ratio_of: str = "base_scale"
                   ) -> torch.Tensor:
    """Test-time: resize to base_scale x ratio keeping the aspect ratio (or, `ratio_of='image'`, the
    image itself by the ratio, as mmseg 1.x's TestTimeAug), normalise (no padding)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    h, w = img.shape[-2:]
    if ratio_of == "image":
        size = (int(h * ratio + 0.5), int(w * ratio + 0.5))  # mmcv's rescale by a factor
    else:
        size = rescale_size(h, w, (int(cfg.base_scale[0] * ratio), int(cfg.base_scale[1] * ratio)))
    img, _ = resize_pair(img, None, size)
    img, _ = normalize_and_pad(img.float(), None, cfg, None)
    return img
