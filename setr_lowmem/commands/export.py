"""Export the consolidated fp32 model of any checkpoint (ZeRO ones included) as one safetensors file:
`python launch/export.py runs/pup_ade20k/checkpoints/iter_0160000 pup_ade20k.safetensors`.

The file carries the run's config, so it loads with `launch/evaluate.py --checkpoint FILE` and
`launch/predict.py --checkpoint FILE` without `--cfg`. With `--hub` OUT is a Hugging Face Hub
directory instead (`PretrainedSETR.from_pretrained(OUT)`, `push_to_hub`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setr_lowmem.cli import command_parser, fail, prepare_environment, run_main


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("checkpoint", help="a checkpoint directory (runs/<name>/checkpoints/iter_...)")
    parser.add_argument("out", help="the .safetensors file to write; an existing directory, or a path ending in '/', "
                                    "gets model.safetensors inside (with --hub: the directory to write)")
    parser.add_argument("--hub", action="store_true",
                        help="write a Hugging Face Hub directory (model.safetensors, config.json, README.md) that "
                             "PretrainedSETR.from_pretrained loads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args()
    prepare_environment()

    from setr_lowmem.engine.checkpoint import export_fp32, intact, writable_target
    from setr_lowmem.engine.rundir import writable_dir

    if not Path(args.checkpoint).is_dir():
        fail(f"checkpoint directory not found: {args.checkpoint}")
    intact(Path(args.checkpoint), quick=True)  # at once, before any writing; the checksums when it is read
    if args.hub:
        from setr_lowmem.engine.hub import PretrainedSETR

        out = Path(args.out)
        writable_target(out / "model.safetensors", args.overwrite)
        created = not out.exists()
        writable_dir(out, "the output directory")
        model = PretrainedSETR.from_checkpoint(args.checkpoint)
        try:
            model.save_pretrained(out)
        except Exception as err:  # noqa: BLE001 - a full disk, whatever the writer raises: one line, no half folder
            if created:
                shutil.rmtree(out, ignore_errors=True)
            fail(f"cannot write {out}: {getattr(err, 'strerror', None) or (str(err).splitlines() or [''])[0]}")
        print(f"wrote {out}: load it with PretrainedSETR.from_pretrained({str(out)!r})")
        return
    out = Path(args.out)
    if args.out.endswith(("/", os.sep)) or out.is_dir():
        out = out / "model.safetensors"
    writable_target(out, args.overwrite)
    writable_dir(out.parent, "the directory of the output")
    out = export_fp32(Path(args.checkpoint), out, args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, fp32)")


def cli() -> None:
    """The `setr-export` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
