"""How many images per second one CPU core prepares for training: decode, the training pipeline
(random resize, crop, flip, photometric distortion, normalise, pad), for a paper config's dataset.

    python benchmarks/loader.py [--cfg pup_ade20k.yaml pup_cityscapes.yaml ...] [--images 48]

Without the real dataset at hand it writes images of the dataset's usual size and format in its
official layout (ADE20K: 683 x 512 JPEG photos with PNG labels; Cityscapes: 2048 x 1024 PNG;
Pascal Context: 500 x 375 JPEG) from the built-in scene generator, and times the real pipeline
(`data.loader.TrainStream`) on one core, in this process: the rate a DataLoader worker reaches.
Writes `benchmarks/results/loader_<cpu>_<date>.json`; `setr-plan --predict` reads the newest one to
say how many cores each card's predicted speed needs (a DataLoader worker is one process on one core).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# dataset -> (image size (width, height), image suffix) of its typical photos
TYPICAL = {"ade20k": ((683, 512), ".jpg"), "cityscapes": ((2048, 1024), ".png"),
           "pascal_context": ((500, 375), ".jpg"), "pascal_context59": ((500, 375), ".jpg")}


def write_layout(dataset: str, root: Path, n: int, num_classes: int) -> Path:
    """`n` training images and labels of `dataset`'s usual size in its official layout under `root`."""
    import numpy as np
    from PIL import Image

    from setr_lowmem.data.synthetic import make_scene

    (w, h), suffix = TYPICAL[dataset]
    rng = np.random.default_rng(0)
    for i in range(n):
        image, label = make_scene(max(w, h), min(num_classes, 9), rng)
        image, label = image[:h, :w], label[:h, :w]
        if dataset == "ade20k":
            img = root / "ADEChallengeData2016/images/training" / f"ADE_train_{i:08d}{suffix}"
            lbl = root / "ADEChallengeData2016/annotations/training" / f"ADE_train_{i:08d}.png"
            label = label + 1  # stored 1..150, 0 is "other"
        elif dataset == "cityscapes":
            img = root / "cityscapes/leftImg8bit/train/city" / f"city_{i:06d}_000019_leftImg8bit.png"
            lbl = root / "cityscapes/gtFine/train/city" / f"city_{i:06d}_000019_gtFine_labelTrainIds.png"
        else:
            img = root / "VOCdevkit/VOC2010/JPEGImages" / f"2008_{i:06d}.jpg"
            lbl = root / "VOCdevkit/VOC2010/SegmentationClassContext" / f"2008_{i:06d}.png"
        for path, array in ((img, image), (lbl, label.astype(np.uint8))):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(array).save(path)
    if dataset.startswith("pascal_context"):
        listing = root / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"2008_{i:06d}\n" for i in range(n)))
    return {"ade20k": root / "ADEChallengeData2016", "cityscapes": root / "cityscapes"}.get(
        dataset, root / "VOCdevkit/VOC2010")


def rate(cfg_name: str, images: int) -> dict:
    """Images per second of the training pipeline of `cfg_name`'s dataset and crop, on one core."""
    import torch

    from setr_lowmem.config import load_config, replace_keys
    from setr_lowmem.data.loader import TrainStream
    from setr_lowmem.data.sources import open_source

    torch.set_num_threads(1)  # one DataLoader worker: one core
    cfg = load_config(cfg_name)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_layout(cfg.data.dataset, Path(tmp), images, cfg.data.num_classes)
        cfg = replace_keys(cfg, {"data.root": str(root)})
        stream = TrainStream(open_source(cfg.data, cfg.data.train_split), cfg.data, cfg.train.seed)
        stream[0]  # first-use costs (imports, caches) are not a worker's steady rate
        start = time.perf_counter()
        for position in range(1, images + 1):
            stream[position]
        seconds = time.perf_counter() - start
    (w, h), suffix = TYPICAL[cfg.data.dataset]
    return {"config": cfg.name, "dataset": cfg.data.dataset, "crop": cfg.data.crop,
            "image": f"{w}x{h}{suffix}", "images": images, "seconds": round(seconds, 3),
            "img_s_per_core": round(images / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", nargs="+", default=["pup_ade20k", "pup_cityscapes", "pup_pascal_context"])
    parser.add_argument("--images", type=int, default=48, help="images timed per config (after one warm-up)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images must be at least 1, got {args.images}")
    rows = []
    for name in args.cfg:
        row = rate(name, args.images)
        rows.append(row)
        print(f"{row['config']:<22} {row['image']:>14} -> crop {row['crop']}: {row['img_s_per_core']:6.1f} img/s per "
              f"core ({row['images']} images in {row['seconds']:.1f} s)", flush=True)
    cpu = platform.processor() or platform.machine()
    out = Path(args.out) / f"loader_{cpu}_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "python": platform.python_version(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
