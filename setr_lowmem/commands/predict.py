"""Predict with a trained SETR and write colour overlays:
`python launch/predict.py --cfg pup_ade20k.yaml --checkpoint PATH --input IMAGES_DIR --out OUT_DIR`.

For each image in IMAGES_DIR (jpg/png) writes OUT_DIR/<name>.png (prediction blended over
the image) and OUT_DIR/<name>_label.png (the class map), using the config's test protocol.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from setr_lowmem.cli import fail, run_main


SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=None,
                        help="config file (default: the one the checkpoint or exported file carries)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    import numpy as np

    from setr_lowmem.data.base import open_image
    from setr_lowmem.data.classes import class_names, class_palette
    from setr_lowmem.engine.evaluate import predict_probs
    from setr_lowmem.engine.inference import (
        label_png,
        load_trained,
        model_config,
        overlay,
    )
    from setr_lowmem.engine.rundir import writable_dir

    src = Path(args.input)
    if not src.is_dir():
        fail(f"input folder not found: {src}")
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        fail(f"no images ({', '.join(sorted(SUFFIXES))}) in {src}")
    cfg = model_config(args.checkpoint, args.cfg, args.overrides)
    out = writable_dir(Path(args.out), "--out")
    model, autocast = load_trained(cfg, args.checkpoint)
    device = next(model.parameters()).device
    names = class_names(cfg.data.dataset, cfg.data.num_classes)
    palette = class_palette(cfg.data.dataset, cfg.data.num_classes)
    for path in files:
        image = np.array(open_image(path, "RGB"))
        pred = predict_probs(model, image, cfg, device, autocast).argmax(0).cpu().numpy().astype(np.uint8)
        overlay(image, pred, palette, names).save(out / f"{path.stem}.png")
        label_png(pred, palette).save(out / f"{path.stem}_label.png")
        print(f"{path.name}: {len(np.unique(pred))} classes -> {out / (path.stem + '.png')}")


def cli() -> None:
    """The `setr-predict` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
