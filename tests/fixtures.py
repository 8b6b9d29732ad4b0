"""Tiny datasets written in each official layout (and in HF formats), for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _img(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def scene(h: int, w: int, seed: int, values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A label of vertical bands with the given stored values; the image encodes the band index."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.uint8)
    bounds = np.linspace(0, w, len(values) + 1).astype(int)
    image = np.zeros((h, w, 3), np.uint8)
    for k, v in enumerate(values):
        label[:, bounds[k]:bounds[k + 1]] = v
        image[:, bounds[k]:bounds[k + 1]] = (40 * k + 20, 255 - 40 * k, rng.integers(0, 255))
    return image, label


def make_ade(root: Path, n: int = 3) -> Path:
    root = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(n):
            image, label = scene(24, 40, i, [0, 1, 2, 150])  # 0 = "other"
            _img(root / "images" / split / f"ADE_{split[:5]}_{i:08d}.jpg", image)
            _img(root / "annotations" / split / f"ADE_{split[:5]}_{i:08d}.png", label)
    return root


def make_cityscapes(root: Path, train_ids: bool = False) -> Path:
    root = root / "cityscapes"
    for split, cities in (("train", ["aachen", "bremen"]), ("val", ["lindau"])):
        for city in cities:
            for i in range(2):
                stem = f"{city}_{i:06d}_000019"
                image, label = scene(16, 32, i, [7, 8, 26, 0])  # road, sidewalk, car, unlabeled
                _img(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
                gt = root / "gtFine" / split / city
                _img(gt / f"{stem}_gtFine_labelIds.png", label)
                if train_ids:
                    lut = {7: 0, 8: 1, 26: 13, 0: 255}
                    _img(gt / f"{stem}_gtFine_labelTrainIds.png", np.vectorize(lut.get)(label).astype(np.uint8))
    return root


def make_pascal_context(root: Path) -> Path:
    root = root / "VOCdevkit" / "VOC2010"
    names = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    for split, stems in names.items():
        for i, stem in enumerate(stems):
            image, label = scene(20, 30, i, [0, 1, 59])
            _img(root / "JPEGImages" / f"{stem}.jpg", image)
            _img(root / "SegmentationClassContext" / f"{stem}.png", label)
        listing = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(stems) + "\n")
    return root


def make_imagefolder(root: Path) -> Path:
    """HF imagefolder: train/ with images, label maps and a metadata.jsonl pairing them."""
    root = root / "imagefolder"
    (root / "train").mkdir(parents=True)
    with open(root / "train" / "metadata.jsonl", "w") as f:
        for i in range(3):
            image, label = scene(16, 16, i, [0, 1, 2])
            _img(root / "train" / f"img{i}.png", image)
            _img(root / "train" / f"seg{i}.png", label)
            f.write(json.dumps({"image_file_name": f"img{i}.png", "seg_file_name": f"seg{i}.png"}) + "\n")
    return root
