"""Evaluate a trained SETR: `python launch/evaluate.py --checkpoint PATH [--cfg pup_ade20k.yaml]`.

PATH is an exported `model.safetensors` or a checkpoint directory (ZeRO ones included).
Prints the per-class table and aAcc / mIoU / mAcc, and writes them as JSON. `--ms-flip`
uses the paper's multi-scale (0.5 ... 1.75) and flip protocol.
"""

from __future__ import annotations

import json
from pathlib import Path

from setr_lowmem.cli import command_parser, fail, prepare_environment, run_main


MS_SCALES = "[0.5, 0.75, 1.0, 1.25, 1.5, 1.75]"


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("--cfg", default=None,
                        help="config file (default: the one the checkpoint or exported file carries)")
    parser.add_argument("--checkpoint", required=True,
                        help="an exported model.safetensors, a checkpoint directory or a Hub directory")
    parser.add_argument("--ms-flip", action="store_true", help="multi-scale 0.5..1.75 and flip")
    parser.add_argument("--out", default=None, help="JSON file for the metrics (default: next to the checkpoint)")
    parser.add_argument("--max-images", type=int, default=0, metavar="N",
                        help="evaluate only the first N images of the split (0: all of them)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.mode=whole data.root=/data/ade")
    args = parser.parse_intermixed_args()
    if args.max_images < 0:
        fail(f"--max-images must be 0 (every image) or a positive number, got {args.max_images}")
    prepare_environment()

    from setr_lowmem.data.classes import class_names
    from setr_lowmem.engine.evaluate import evaluate, format_table
    from setr_lowmem.engine.inference import load_trained, model_config
    from setr_lowmem.engine.rundir import writable_dir

    overrides = list(args.overrides) + ([f"eval.scales={MS_SCALES}", "eval.flip=true"] if args.ms_flip else [])
    cfg = model_config(args.checkpoint, args.cfg, overrides)
    ckpt = Path(args.checkpoint)
    out = output_path(args.out, ckpt)
    writable_dir(out.parent, "the directory of --out")  # before the evaluation, not after it
    model, autocast = load_trained(cfg, args.checkpoint)
    device = next(model.parameters()).device
    metrics = evaluate(model, cfg, device, max_images=args.max_images, autocast=autocast, progress=True)
    names = class_names(cfg.data.dataset, cfg.data.num_classes)
    print(format_table(metrics, names))
    out.write_text(json.dumps({"config": str(args.cfg or "stored in the checkpoint"), "checkpoint": str(ckpt), "scales": cfg.eval.scales,
                               "flip": cfg.eval.flip, "mode": cfg.eval.mode, "classes": names, **metrics}, indent=1))
    print(f"wrote {out}")


def output_path(given: str | None, checkpoint: Path) -> Path:
    """Where the metrics go: `--out`, else beside the model (a checkpoint's go to its run directory as
    eval_<checkpoint>.json: a checkpoint is never written into). Never over a file that is not an
    earlier evaluation's JSON."""
    from setr_lowmem.engine.checkpoint import MANIFEST, writable_target

    if given:
        out = Path(given)
    elif (checkpoint / MANIFEST).is_file():
        out = checkpoint.resolve().parents[1] / f"eval_{checkpoint.name}.json"
    else:
        out = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval.json"
    if Path(out).is_dir():
        fail(f"--out {out} is a directory; give the JSON file to write")
    writable_target(out, overwrite=True)  # not inside a checkpoint, not a symlink loop
    if out.is_file() and not _earlier_evaluation(out):
        fail(f"--out {out} exists and is not an earlier evaluation's JSON: not written over")
    return out


def _earlier_evaluation(path: Path) -> bool:
    try:
        return "mIoU" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def cli() -> None:
    """The `setr-evaluate` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
