"""Predict with a trained SETR and write colour overlays:
`setr-predict --checkpoint PATH --input IMAGES --out OUT_DIR` (`python launch/predict.py` from a clone).

IMAGES is a folder (its .jpg/.png/... files), one image file, or a glob pattern in quotes
(`'photos/**/*.jpg'`). For each image it writes OUT_DIR/<name>_overlay.png (the prediction blended
over the image, with a legend of the classes present) and OUT_DIR/<name>_label.png (the class map:
pixel values are class indices), using the config's test protocol. Two inputs of the same name
(a.png, a.jpg) get a_png / a_jpg; OUT_DIR may not be an input folder, and no input is ever written over.
"""

from __future__ import annotations

import glob
from pathlib import Path

from setr_lowmem.cli import command_parser, fail, prepare_environment, run_main

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def input_images(spec: str) -> list[Path]:
    """The images `--input` names: a folder's image files, one file, or a glob pattern's matches."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            fail(f"no images ({', '.join(sorted(SUFFIXES))}) in {path}")
        return files
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            fail(f"{path} is not an image file ({', '.join(sorted(SUFFIXES))})")
        return [path]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).suffix.lower() in SUFFIXES)
        if not files:
            fail(f"no images ({', '.join(sorted(SUFFIXES))}) match {spec}")
        return files
    fail(f"input not found: {spec} (give a folder, an image file or a glob pattern)")


# what is written per input: the overlay and the class map. No name + one tail can equal another
# name + the other tail (they end differently), so distinct names never write the same file.
TAILS = ("_overlay.png", "_label.png")


def resolved(path: Path) -> Path:
    """`path` with its links followed; a symlink loop is one line."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:
        fail(f"cannot use {path}: {getattr(err, 'strerror', None) or err}")


def output_names(files: list[Path]) -> list[str]:
    """A distinct output name per input: its stem, stem_suffix where two inputs share a stem, and a
    number on top where even that is taken (a.png, a.jpg and a_png.bmp)."""
    stems = [p.stem for p in files]
    names, taken = [], set()
    for p in files:
        name = p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
        base, n = name, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("--cfg", default=None,
                        help="config file (default: the one the checkpoint or exported file carries)")
    parser.add_argument("--checkpoint", required=True, help="an exported model.safetensors, a checkpoint directory or a Hub directory")
    parser.add_argument("--input", required=True, help="a folder of images, one image file, or a glob pattern")
    parser.add_argument("--out", required=True, help="the folder to write the overlays and class maps into")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.mode=whole")
    args = parser.parse_intermixed_args()

    files = input_images(args.input)
    out = Path(args.out)
    inputs = {resolved(p) for p in files}
    if resolved(out) in {p.parent for p in inputs}:
        fail(f"--out {out} holds input images: write the predictions to another folder")
    names = output_names(files)
    clash = next((out / f"{n}{tail}" for n in names for tail in TAILS if resolved(out / f"{n}{tail}") in inputs), None)
    if clash is not None:
        fail(f"--out would write over the input image {clash}: choose another folder")
    prepare_environment()

    import numpy as np

    from setr_lowmem.data.base import open_image
    from setr_lowmem.data.classes import class_names, class_palette
    from setr_lowmem.engine.evaluate import predict_classes
    from setr_lowmem.engine.inference import label_png, load_trained, model_config, overlay
    from setr_lowmem.engine.rundir import writable_dir

    cfg = model_config(args.checkpoint, args.cfg, args.overrides)
    writable_dir(out, "--out")
    model, autocast = load_trained(cfg, args.checkpoint)
    device = next(model.parameters()).device
    classes = class_names(cfg.data.dataset, cfg.data.num_classes)
    palette = class_palette(cfg.data.dataset, cfg.data.num_classes)
    for path, name in zip(files, names, strict=True):
        image = np.array(open_image(path, "RGB"))
        pred = predict_classes(model, image, cfg, device, autocast).numpy().astype(np.uint8)
        overlay(image, pred, palette, classes).save(out / f"{name}{TAILS[0]}")
        label_png(pred, palette).save(out / f"{name}{TAILS[1]}")
        print(f"{path}: {len(np.unique(pred))} classes -> {out / (name + TAILS[0])}")


def cli() -> None:
    """The `setr-predict` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
