"""The built-in dataset: procedurally generated scenes, so that training runs with no download.

Each scene is a textured, shaded background (class 0) with one to four objects drawn over
it; an object's kind fixes its shape, its texture and the range of its colour, but its
size, position, rotation, exact hue and brightness vary, and later objects occlude
earlier ones. A model has to use shape and texture as well as colour, yet a small SETR
learns it in minutes on a CPU. Everything is a function of (seed, split, index), at any
size. There are eight object kinds; a head of more than 9 classes (a paper config on the
built-in data) sees them spread over its label range (`label_of`), the other labels unused.
"""

from __future__ import annotations

import io

import datasets
import numpy as np
from PIL import Image

from setr_lowmem.config import DataConfig
from setr_lowmem.data.base import DataError, Source, identity_lut, pair_rows

# class id -> (name, shape, texture, base hue in [0, 1))
CLASSES = [
    ("background", None, None, None),
    ("disc", "disc", "solid", 0.00),
    ("square", "square", "stripes", 0.33),
    ("triangle", "triangle", "solid", 0.62),
    ("ring", "ring", "solid", 0.15),
    ("bar", "bar", "checker", 0.83),
    ("ellipse", "ellipse", "dots", 0.50),
    ("cross", "cross", "stripes", 0.08),
    ("diamond", "diamond", "checker", 0.72),
]
KINDS = len(CLASSES)  # background and eight object kinds


def label_of(kind: int, num_classes: int) -> int:
    """The label of object kind `kind`: the kind itself for up to 9 classes; for a larger head (a
    paper config's 150, 19 or 60 classes) the eight kinds spread evenly over 1..num_classes - 1."""
    return kind if num_classes <= KINDS else round(kind * (num_classes - 1) / (KINDS - 1))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of a unit shape in rotated, centred, radius-normalised coordinates (u, v)."""
    au, av = np.abs(u), np.abs(v)
    if kind == "disc":
        return u * u + v * v <= 1
    if kind == "square":
        return (au <= 0.8) & (av <= 0.8)
    if kind == "triangle":
        return (v <= 0.7) & (v >= 2 * au - 1.0)
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.45)
    if kind == "bar":
        return (au <= 1.0) & (av <= 0.35)
    if kind == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1
    if kind == "cross":
        return ((au <= 1.0) & (av <= 0.28)) | ((av <= 1.0) & (au <= 0.28))
    if kind == "diamond":
        return au + av <= 1.0
    raise ValueError(kind)


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Brightness modulation in [0.55, 1]."""
    period = rng.uniform(0.06, 0.12) * size
    if kind == "solid":
        return np.ones_like(yy)
    if kind == "stripes":
        theta = rng.uniform(0, np.pi)
        return np.where(np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0, 1.0, 0.55)
    if kind == "checker":
        return np.where((np.floor(xx / period) + np.floor(yy / period)) % 2 == 0, 1.0, 0.6)
    if kind == "dots":
        cy, cx = (yy % period) - period / 2, (xx % period) - period / 2
        return np.where(cy * cy + cx * cx < (period / 3.2) ** 2, 0.55, 1.0)
    raise ValueError(kind)


def make_scene(size: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, label uint8 HxW) scene of `size` x `size` pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # background: a low-saturation gradient between two random colours, with soft noise blobs
    h0, h1 = rng.uniform(0, 1, 2)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / size + 1) / 2
    hue = (h0 + (h1 - h0) * ramp) % 1.0
    sat = np.full_like(yy, rng.uniform(0.05, 0.3))
    coarse = rng.normal(0, 1, (max(2, size // 16),) * 2)
    blob = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BILINEAR))
    val = np.clip(rng.uniform(0.35, 0.75) + 0.08 * blob, 0.05, 1.0)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(1, min(num_classes, KINDS)))
        _, shape, texture, base_hue = CLASSES[kind]
        radius = rng.uniform(0.12, 0.3) * size
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        theta = rng.uniform(0, 2 * np.pi) if shape not in ("disc", "ring") else 0.0
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / radius
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / radius
        mask = _shape_mask(shape, u, v)
        shade = _texture(texture, yy, xx, rng, size)
        hue[mask] = (base_hue + rng.uniform(-0.04, 0.04)) % 1.0
        sat[mask] = rng.uniform(0.55, 0.95)
        val[mask] = (rng.uniform(0.65, 1.0) * shade)[mask]
        label[mask] = label_of(kind, num_classes)
    rgb = _hsv_to_rgb(hue, sat, val) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), label


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def generate(num: int, size: int, num_classes: int, seed: int, split: str) -> datasets.Dataset:
    """`num` scenes as a datasets.Dataset with PNG-encoded `image` and `label` columns."""
    if not 2 <= num_classes <= 255:
        raise ValueError(f"the synthetic dataset has 2..255 classes; data.num_classes is {num_classes}")
    split_id = {"train": 0, "val": 1}.get(split, 2)
    images, labels = [], []
    for i in range(num):
        img, lbl = make_scene(size, num_classes, np.random.default_rng([seed, split_id, i]))
        images.append({"bytes": _png(img), "path": None})
        labels.append({"bytes": _png(lbl), "path": None})
    return pair_rows(images, labels)


def synthetic_source(cfg: DataConfig, split: str) -> Source:
    s = cfg.synthetic
    num = {"train": s.num_train, "val": s.num_val}.get(split)
    if num is None:
        raise DataError(f"the synthetic dataset has splits train and val, not {split!r}")
    if num == 0:
        raise DataError(f"synthetic split {split}: the split is empty (data.synthetic.num_{split} is 0)")
    try:
        rows = generate(num, s.size, cfg.num_classes, s.seed, split)
    except ValueError as err:
        raise DataError(str(err)) from None
    return Source(rows, identity_lut(), f"synthetic/{split}")
