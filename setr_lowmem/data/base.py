"""What every dataset source is: undecoded (image, label) rows, the lookup table of their label
values, and the one decoder that reads a row (and names the file when it cannot).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from setr_lowmem.errors import SetrError

IGNORE = 255


class DataError(SetrError, ValueError):
    """A dataset problem (missing root, unmatched files, bad labels), in one line."""


@dataclass
class Source:
    """A split ready for the loader: undecoded (image, label) rows and the label lookup table."""

    rows: datasets.Dataset
    lut: np.ndarray  # uint8[256]: stored value -> training id (255 = ignore)
    name: str

    def __len__(self) -> int:
        return len(self.rows)


def identity_lut() -> np.ndarray:
    return np.arange(256, dtype=np.uint8)


def pair_rows(images: list, labels: list) -> datasets.Dataset:
    """Undecoded `image` and `label` columns: paths, or datasets.Image dicts with encoded bytes."""
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Image(decode=False)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def open_image(ref: str | Path | dict, mode: str) -> Image.Image:
    """Decode one image (a path, or a datasets.Image dict with path/bytes) and convert it to `mode`."""
    if isinstance(ref, dict):
        where = ref.get("path") or "<embedded image>"
        data = ref.get("bytes")
        src = io.BytesIO(data) if data else ref.get("path")
    else:
        where = src = str(ref)
    try:
        img = Image.open(src)
        img.load()
    except FileNotFoundError:
        raise DataError(f"file not found: {where}") from None
    except Exception as err:  # noqa: BLE001 - PIL raises several kinds for corrupt files
        raise DataError(f"cannot read image {where}: {type(err).__name__}: {err}") from None
    if mode == "L" and img.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"label {where} is {img.mode}, not a single-channel class map")
    if mode == "L" and img.mode in ("I", "I;16"):
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise DataError(f"label {where} has values up to {arr.max()}, beyond 255")
        return Image.fromarray(arr.astype(np.uint8))
    if mode == "L" and img.mode == "P":
        return Image.fromarray(np.asarray(img))  # the palette indices are the classes
    if mode == "RGB" and img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # a 16-bit (or float) photo: PIL's convert would clip it to white; scale its range to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max(initial=0)), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8))
    return img.convert(mode)


def load_pair(rows: datasets.Dataset, index: int, lut: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode row `index`: RGB uint8 HxWx3 image, uint8 HxW training-id label, and the label's name."""
    row = rows[index]
    image = np.array(open_image(row["image"], "RGB"))  # a writable copy for torch.from_numpy
    label_ref = row["label"]
    label = lut[np.asarray(open_image(label_ref, "L"))]
    where = (label_ref.get("path") if isinstance(label_ref, dict) else str(label_ref)) or f"row {index}"
    if image.shape[:2] != label.shape:
        raise DataError(f"image and label sizes differ for {where}: {image.shape[:2]} vs {label.shape}")
    bad = label[(label >= num_classes) & (label != IGNORE)]
    if bad.size:
        raise DataError(f"label {where} has value {int(bad.max())} outside 0..{num_classes - 1} (and {IGNORE}) "
                        "after the dataset's label mapping; check data.num_classes")
    return image, label, where


def check_some_labels(source: Source, num_classes: int, samples: int = 16) -> None:
    """A split whose sampled labels are all ignored (255) would train on a loss of 0 at every step:
    an error naming the split, before any model is built. Up to `samples` rows are decoded, spread
    over the split."""
    n = len(source)
    for index in sorted({int(i) for i in np.linspace(0, n - 1, min(samples, n))}):
        _, label, _ = load_pair(source.rows, index, source.lut, num_classes)
        if (label != IGNORE).any():
            return
    raise DataError(f"{source.name}: every pixel of {min(samples, n)} label maps spread over the split is ignored "
                    f"({IGNORE} after the dataset's label mapping): nothing to learn from; check the label files "
                    "and data.reduce_zero_label")
