"""The speed model against every measured step there is: the H100 reference rows
(`docs/reference/h100_plain_pytorch.csv`, images/s beside each memory figure).

Each row's step is counted on fake tensors as its plain PyTorch loop runs it (`forecast(...,
plain_loop=True)`, as `forecast_check.py` does for memory), the time model's efficiencies are
fitted to all rows, and each row is predicted by a fit on the other rows alone (leave-one-out).
Writes `speed_check_<date>.{md,json}` and the fit that the planner reads
(`setr_lowmem/sizing/data/speed_model.json`).

    python benchmarks/speed_check.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from setr_lowmem.cli import prepare_environment  # noqa: E402

prepare_environment()
from setr_lowmem.sizing import reference, speed  # noqa: E402
from setr_lowmem.sizing.cards import CARDS  # noqa: E402
from setr_lowmem.sizing.forecast import forecast  # noqa: E402

CARD = CARDS["h100"]  # the card the reference rows were measured on


def counted_rows() -> list[tuple[reference.Row, speed.StepCounts]]:
    out = []
    for r in reference.ROWS:
        if not r.config:
            continue  # no configuration of the toolkit runs its step
        f = forecast(r.configured(), label=r.label, plain_loop=True)
        out.append((r, f.counts))
        print(f"{r.label}, mb {r.micro_batch}: {f.counts.flops_per_image / 1e12:.3f} TFLOP/image, "
              f"{f.counts.micro_batch.kernels} kernels per micro-batch ({f.seconds:.0f} s)", flush=True)
    return out


def leave_one_out(data: list[tuple[speed.StepCounts, float]]) -> list[float]:
    """Each row predicted by a fit on the others: predicted / measured - 1."""
    errors = []
    for i, (counts, measured) in enumerate(data):
        eff = speed.fit(data[:i] + data[i + 1:], CARD)
        errors.append(speed.images_per_second(counts, CARD, eff) / measured - 1)
    return errors


def record(r: reference.Row, counts: speed.StepCounts, eff: speed.Efficiencies, error: float) -> dict:
    split = speed.time_split(counts, CARD, eff)
    step = sum(split.values())
    return {"label": r.label, "config": r.config, "micro_batch": r.micro_batch, "accumulation": r.accumulation,
            "measured_img_s": r.img_s, "fitted_img_s": counts.images / step,
            "loo_img_s": r.img_s * (1 + error), "loo_error": error,
            "tflop_per_image": counts.flops_per_image / 1e12,
            "gb_per_image": counts.micro_batch.bytes * counts.accumulation / counts.images / 1e9,
            "kernels_per_micro_batch": counts.micro_batch.kernels,
            "time_split": {k: v / step for k, v in split.items()}}


def table(rows: list[dict]) -> list[str]:
    lines = ["| row | micro-batch | measured img/s | fitted | left out: predicted | error | TFLOP/img | GB/img "
             "| kernels | predicted time: arithmetic / memory / kernels / host / python |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = " / ".join(f"{100 * v:.0f}%" for v in r["time_split"].values())
        lines.append(f"| {r['label']} | {r['micro_batch']}{' x ' + str(r['accumulation']) if r['accumulation'] > 1 else ''}"
                     f" | {r['measured_img_s']:.1f} | {r['fitted_img_s']:.1f} | {r['loo_img_s']:.1f} | "
                     f"{100 * r['loo_error']:+.1f}% | {r['tflop_per_image']:.2f} | {r['gb_per_image']:.1f} | "
                     f"{r['kernels_per_micro_batch']} | {split} |")
    return lines


def report(rows: list[dict], eff: speed.Efficiencies, errors: list[float], seconds: float) -> list[str]:
    worst = sorted(rows, key=lambda r: -abs(r["loo_error"]))[:3]
    e = eff
    return [f"# The speed model against the measured H100 rows, {datetime.date.today().isoformat()}", "",
            "Counted on fake tensors on a CPU (`setr_lowmem.sizing.speed`, each row's step as its plain PyTorch "
            "loop runs it), timed by the model on the H100 of `docs/reference/cards.csv`, compared with the "
            "images/s of `docs/reference/h100_plain_pytorch.csv`. 'fitted': the fit on all rows; 'left out': "
            "the fit on the other rows alone. The time split is the fitted model's.", "",
            f"Fitted on all {len(rows)} rows: compute efficiency {e.compute:.3f}, memory efficiency {e.memory:.3f}, "
            f"{e.kernel_us:.2f} us per kernel, host optimizer step {e.host_gbs:.2f} GB/s, "
            f"{e.param_us:.0f} us per parameter stepped from Python.", "",
            *table(rows), "",
            f"Leave-one-out error: median {100 * statistics.median(map(abs, errors)):.1f}%, largest "
            f"{100 * max(map(abs, errors)):.1f}% (from {100 * min(errors):+.1f}% to {100 * max(errors):+.1f}%). "
            "Worst rows: " + "; ".join(f"{r['label']} at micro-batch {r['micro_batch']} ({100 * r['loo_error']:+.1f}%)"
                                      for r in worst) + f". {seconds:.0f} s in all."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    start = time.time()
    counted = counted_rows()
    data = [(counts, r.img_s) for r, counts in counted]
    eff = speed.fit(data, CARD)
    errors = leave_one_out(data)
    rows = [record(r, counts, eff, err) for (r, counts), err in zip(counted, errors)]
    lines = report(rows, eff, errors, time.time() - start)
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed_check_{date}.md").write_text("\n".join(lines) + "\n")
    (out / f"speed_check_{date}.json").write_text(json.dumps({"card": CARD.key, "efficiencies": asdict(eff),
                                                              "rows": rows}, indent=1) + "\n")
    speed.SpeedModel(eff, errors, f"{len(rows)} rows of docs/reference/h100_plain_pytorch.csv, {date}").save()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
