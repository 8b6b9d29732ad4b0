"""Dataset sources: the official layouts of ADE20K, Cityscapes and Pascal Context, any dataset
that HF `datasets` can open, and the built-in synthetic scenes, each as a `datasets.Dataset`.

Every source gives a `Source`: a `datasets.Dataset` with undecoded `image` and `label`
columns (`datasets.Image(decode=False)`: a path or encoded bytes), plus the lookup table
that maps the stored label values to training ids (0..C-1, 255 ignored). Decoding happens
in the loader, so a corrupt file is reported by name when it is read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from setr_lowmem.config import DataConfig
from setr_lowmem.data.base import IGNORE, DataError, Source, identity_lut, open_image, pair_rows
from setr_lowmem.data.synthetic import synthetic_source

log = logging.getLogger(__name__)


def reduce_zero_lut() -> np.ndarray:
    """mmseg's reduce_zero_label: 0 ('other') -> 255, k -> k-1, 255 stays 255."""
    lut = (np.arange(256) - 1).astype(np.uint8)
    lut[0] = IGNORE
    lut[IGNORE] = IGNORE
    return lut


# cityscapesscripts' labels.py: labelId (0..33) -> trainId (19 classes, 255 ignored).
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


def _pairs(images: list[Path], labels: list[Path], key_img, key_lbl, where: str) -> tuple[list[str], list[str]]:
    """Match images with labels by key; unmatched files on either side are an error listing a few."""
    by_img = {key_img(p): p for p in images}
    by_lbl = {key_lbl(p): p for p in labels}
    lonely_img = sorted(set(by_img) - set(by_lbl))
    lonely_lbl = sorted(set(by_lbl) - set(by_img))
    if lonely_img:
        raise DataError(f"{where}: {len(lonely_img)} image(s) without a label, e.g. "
                        + ", ".join(str(by_img[k]) for k in lonely_img[:3]))
    if lonely_lbl:
        raise DataError(f"{where}: {len(lonely_lbl)} label(s) without an image, e.g. "
                        + ", ".join(str(by_lbl[k]) for k in lonely_lbl[:3]))
    keys = sorted(by_img)
    if not keys:
        raise DataError(f"{where}: the split is empty")
    return [str(by_img[k]) for k in keys], [str(by_lbl[k]) for k in keys]


def _require(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DataError(f"dataset directory not found: {path} (expected the {layout})")


def ade20k(root: Path, split: str) -> Source:
    """ADEChallengeData2016: images/{training,validation}/*.jpg, annotations/.../*.png; reduce_zero_label."""
    sub = {"train": "training", "val": "validation"}.get(split, split)
    layout = f"ADE20K layout <root>/images/{sub}/*.jpg and <root>/annotations/{sub}/*.png"
    _require(root / "images" / sub, layout)
    _require(root / "annotations" / sub, layout)
    imgs, lbls = _pairs(sorted((root / "images" / sub).glob("*.jpg")), sorted((root / "annotations" / sub).glob("*.png")),
                        lambda p: p.stem, lambda p: p.stem, f"ADE20K {root} split {sub}")
    return Source(pair_rows(imgs, lbls), reduce_zero_lut(), f"ade20k/{sub}")


def cityscapes(root: Path, split: str) -> Source:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png.

    Where only `*_gtFine_labelIds.png` exist, the official 34->19 conversion is written
    once next to them (or under ~/.cache/setr_lowmem when the dataset is read-only).
    """
    layout = (f"Cityscapes layout <root>/leftImg8bit/{split}/<city>/*_leftImg8bit.png and "
              f"<root>/gtFine/{split}/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)")
    _require(root / "leftImg8bit" / split, layout)
    _require(root / "gtFine" / split, layout)
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    train_ids = sorted((root / "gtFine" / split).glob("*/*_gtFine_labelTrainIds.png"))
    if not train_ids:
        train_ids = _convert_cityscapes(sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png")), root)
    imgs, lbls = _pairs(images, train_ids, lambda p: p.name.removesuffix("_leftImg8bit.png"),
                        lambda p: p.name.removesuffix("_gtFine_labelTrainIds.png"), f"Cityscapes {root} split {split}")
    return Source(pair_rows(imgs, lbls), identity_lut(), f"cityscapes/{split}")


def _convert_cityscapes(label_ids: list[Path], root: Path) -> list[Path]:
    lut = cityscapes_lut()
    out = []
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "setr_lowmem" / "cityscapes"
    writable = all(os.access(d, os.W_OK) for d in {p.parent for p in label_ids})
    if label_ids:
        log.info("converting %d Cityscapes labelIds files to trainIds (once)", len(label_ids))
    for src in label_ids:
        name = src.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")
        dst = src.with_name(name) if writable else cache / src.relative_to(root).with_name(name)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            arr = np.asarray(open_image(src, "L"))
            tmp = dst.with_suffix(".tmp.png")
            Image.fromarray(lut[arr]).save(tmp)
            os.replace(tmp, dst)  # a crash never leaves a half-written trainIds file
        out.append(dst)
    return out


def pascal_context(root: Path, split: str, drop_background: bool) -> Source:
    """VOC2010: JPEGImages/*.jpg, SegmentationClassContext/*.png, ImageSets/SegmentationContext/<split>.txt.

    60 classes with background as 0; the 59-class variant maps background to 255.
    """
    layout = ("Pascal Context layout <root>/JPEGImages/*.jpg, <root>/SegmentationClassContext/*.png and "
              f"<root>/ImageSets/SegmentationContext/{split}.txt")
    _require(root / "JPEGImages", layout)
    _require(root / "SegmentationClassContext", layout)
    listing = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"split list not found: {listing} (expected the {layout})")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"Pascal Context {root} split {split}: the split is empty ({listing})")
    imgs = [root / "JPEGImages" / f"{n}.jpg" for n in names]
    lbls = [root / "SegmentationClassContext" / f"{n}.png" for n in names]
    missing = [str(p) for p in imgs + lbls if not p.is_file()]
    if missing:
        raise DataError(f"Pascal Context {root} split {split}: {len(missing)} file(s) listed in {listing.name} "
                        f"are missing, e.g. " + ", ".join(missing[:3]))
    lut = reduce_zero_lut() if drop_background else identity_lut()
    return Source(pair_rows([str(p) for p in imgs], [str(p) for p in lbls]), lut,
                  f"pascal_context{'59' if drop_background else ''}/{split}")


# the names the toolkit's `train` and `val` go by in Hub datasets
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "validation", "valid")}


def hf_split(split: str, have: list[str], root: str) -> str:
    """The dataset's own name for `split` (`val` finds `validation`), or a one-line error."""
    for name in SPLIT_NAMES.get(split, (split,)):
        if name in have:
            return name
    raise DataError(f"{root}: no split {split!r} (has {sorted(have)}); set data.train_split / data.val_split")


def hf_dataset(cfg: DataConfig, split: str) -> Source:
    """Anything `datasets` opens: a save_to_disk directory, a parquet/imagefolder directory, a hub name."""
    root = cfg.root
    try:
        if Path(root, "dataset_dict.json").is_file() or Path(root, "state.json").is_file():
            ds = datasets.load_from_disk(root)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[hf_split(split, list(ds), root)]
        else:
            ds = datasets.load_dataset(root, split=split)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; report in one line
        raise DataError(f"cannot open dataset {root!r} split {split!r}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
    for col in (cfg.image_column, cfg.label_column):
        if col not in ds.column_names:
            raise DataError(f"{root} split {split}: no column {col!r} (columns: {ds.column_names}); "
                            "set data.image_column / data.label_column")
        if not isinstance(ds.features[col], datasets.Image):
            raise DataError(f"{root} split {split}: column {col!r} is {type(ds.features[col]).__name__}, not Image")
    ds = ds.select_columns([cfg.image_column, cfg.label_column])
    ds = ds.rename_columns({cfg.image_column: "image", cfg.label_column: "label"})
    ds = ds.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    if len(ds) == 0:
        raise DataError(f"{root} split {split}: the split is empty")
    lut = reduce_zero_lut() if cfg.reduce_zero_label else identity_lut()
    return Source(ds, lut, f"hf:{root}/{split}")


def open_source(cfg: DataConfig, split: str) -> Source:
    """The split of the configured dataset."""
    root = Path(cfg.root).expanduser()
    if cfg.dataset == "synthetic":
        return synthetic_source(cfg, split)
    if cfg.dataset == "ade20k":
        return ade20k(root, split)
    if cfg.dataset == "cityscapes":
        return cityscapes(root, split)
    if cfg.dataset in ("pascal_context", "pascal_context59"):
        return pascal_context(root, split, drop_background=cfg.dataset == "pascal_context59")
    return hf_dataset(cfg, split)
