"""Export the consolidated fp32 model of any checkpoint (ZeRO ones included) as one safetensors file:
`python launch/export.py runs/pup_ade20k/checkpoints/iter_0160000 pup_ade20k.safetensors`.

The file loads with `launch/evaluate.py --checkpoint` and `launch/predict.py --checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from setr_lowmem.cli import fail, prepare_environment, run_main  # noqa: E402

prepare_environment()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory (runs/<name>/checkpoints/iter_...)")
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args()

    from setr_lowmem.engine.checkpoint import export_fp32
    from setr_lowmem.engine.rundir import writable_dir

    if not Path(args.checkpoint).is_dir():
        fail(f"checkpoint directory not found: {args.checkpoint}")
    writable_dir(Path(args.out).parent, "the directory of the output")
    out = export_fp32(Path(args.checkpoint), Path(args.out))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, fp32)")


if __name__ == "__main__":
    run_main(main)
