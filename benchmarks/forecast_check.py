"""The memory forecast against every GPU measurement there is: the reference's rows
(`setr_lowmem.sizing.reference`, an H100) and, once they exist, the GPU suite's paper configs
(`benchmarks/results/paper_<gpu>_<date>.json`). Writes `forecast_check_<date>.{md,json}`.

    python benchmarks/forecast_check.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from setr_lowmem.cli import prepare_environment

prepare_environment()
from setr_lowmem.sizing import reference
from setr_lowmem.config import load_config
from setr_lowmem.sizing.forecast import OVERHEADS, forecast


def reference_rows() -> list[dict]:
    out = []
    for r in reference.ROWS:
        if not r.config:
            continue
        f = forecast(r.configured(), label=r.label, plain_loop=True)  # the reference is a plain PyTorch loop
        out.append(compared("docs/reference-measurements.md (H100, plain PyTorch)", r.config, f, r.allocated,
                            r.reserved, r.expandable))
        print(f"{r.label}, mb {r.micro_batch}: predicted {f.allocated:.2f} GiB, measured {r.allocated:.2f} "
              f"({f.seconds:.0f} s)", flush=True)
    return out


def suite_rows(results: Path) -> list[dict]:
    """The GPU suite's paper configs (measured at 24 GiB cap, each at its own micro-batch)."""
    out = []
    for path in sorted(results.glob("paper_*.json")):
        for row in json.loads(path.read_text()).get("rows", []):
            mem = row.get("mem") or {}  # the run's last logged peaks (MemoryMeter.measured)
            if not mem.get("allocated"):
                continue
            f = forecast(load_config(row["config"], ["model.pretrained="]))
            out.append(compared(f"benchmarks/results/{path.name}", row["config"], f, mem["allocated"],
                                mem.get("reserved"), True))
    return out


def compared(source: str, config: str, f, measured: float, measured_reserved: float | None,
             expandable: bool) -> dict:
    """One row of the table: forecast `f` of `config` next to what `source` measured (GiB)."""
    return {"source": source, "label": f.label, "config": config, "micro_batch": f.micro_batch,
            "predicted": f.allocated, "measured": measured, "measured_reserved": measured_reserved,
            "predicted_reserved": f.reserved(), "expandable": expandable, "categories": f.categories,
            "seconds": f.seconds}


def table(rows: list[dict]) -> list[str]:
    lines = ["| source | row | micro-batch | predicted allocated GiB | measured | gap | predicted reserved | "
             "measured reserved |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = (r["predicted"] - r["measured"]) / r["measured"]
        reserved = "-" if r["measured_reserved"] is None else f"{r['measured_reserved']:.2f}"
        lines.append(f"| {r['source'].split(' ')[0].rsplit('/', 1)[-1]} | {r['label']} | {r['micro_batch']} | "
                     f"{r['predicted']:.2f} | {r['measured']:.2f} | {100 * gap:+.1f}% | {r['predicted_reserved']:.2f} | "
                     f"{reserved}{'' if r['expandable'] else ' (no expandable segments)'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    start = time.time()
    rows = reference_rows() + suite_rows(Path(args.out))
    gaps = [abs(r["predicted"] - r["measured"]) / r["measured"] for r in rows]
    within = sum(g <= 0.10 for g in gaps)
    date = datetime.date.today().isoformat()
    lines = [f"# The memory forecast against GPU measurements, {date}", "",
             "Predicted on fake tensors on a CPU (`setr_lowmem.sizing.forecast`, the full-size model as each row configures "
             "it), measured on a GPU (the source column). The reference's rows are predicted as its plain "
             "PyTorch loop runs them: the model returns each head's full-size output and the loop holds it "
             "through the backward (`forecast(..., plain_loop=True)`; heads checkpointed with their loss "
             "hold nothing outside the checkpoint); the suite's rows as the toolkit runs them, its loss "
             "freeing each output. Predicted reserved = allocated x "
             f"{OVERHEADS.reserved:.3f} (expandable segments, the toolkit's setting; DeepSpeed rows "
             f"x {OVERHEADS.reserved_deepspeed:.3f}); rows measured without expandable segments reserve more.", "",
             *table(rows), "",
             f"{within} of {len(rows)} rows within 10% of the measured peak allocated; largest gap "
             f"{100 * max(gaps):.1f}%. {time.time() - start:.0f} s for all forecasts."]
    out = Path(args.out)
    (out / f"forecast_check_{date}.md").write_text("\n".join(lines) + "\n")
    (out / f"forecast_check_{date}.json").write_text(json.dumps({"rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
