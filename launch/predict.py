"""Predict with a trained SETR and write colour overlays:
`python launch/predict.py --cfg pup_ade20k.yaml --checkpoint PATH --input IMAGES_DIR --out OUT_DIR`.

For each image in IMAGES_DIR (jpg/png) writes OUT_DIR/<name>.png (prediction blended over
the image) and OUT_DIR/<name>_label.png (the class map), using the config's test protocol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.cli import fail, prepare_environment, run_main  # noqa: E402

prepare_environment()

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    import numpy as np
    from PIL import Image

    from setr_lowmem.config import load_config
    from setr_lowmem.data.base import open_image
    from setr_lowmem.engine.evaluate import predict_probs
    from setr_lowmem.engine.inference import load_trained, overlay
    from setr_lowmem.engine.rundir import writable_dir

    src = Path(args.input)
    if not src.is_dir():
        fail(f"input folder not found: {src}")
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        fail(f"no images ({', '.join(sorted(SUFFIXES))}) in {src}")
    cfg = load_config(args.cfg, args.overrides)
    out = writable_dir(Path(args.out), "--out")
    model, autocast = load_trained(cfg, args.checkpoint)
    device = next(model.parameters()).device
    for path in files:
        image = np.array(open_image(path, "RGB"))
        pred = predict_probs(model, image, cfg, device, autocast).argmax(0).cpu().numpy().astype(np.uint8)
        Image.fromarray(overlay(image, pred, cfg.data.num_classes)).save(out / f"{path.stem}.png")
        Image.fromarray(pred).save(out / f"{path.stem}_label.png")
        print(f"{path.name}: {len(np.unique(pred))} classes -> {out / (path.stem + '.png')}")


if __name__ == "__main__":
    run_main(main)
