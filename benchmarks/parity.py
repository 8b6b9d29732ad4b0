"""Do the memory techniques keep accuracy? The same small SETR trained once per technique, against
the fp32 baseline and the spread of three baseline seeds.

    python benchmarks/parity.py                      # tiny_synthetic.yaml, every row, CPU or GPU
    python benchmarks/parity.py --iters 300 --rows "fp32 baseline" bf16 "8-bit SGD"
    python benchmarks/parity.py --full               # GPU: pup_ade20k at full size, a short run
    python benchmarks/parity.py --tiny --out /tmp/p  # that the script runs: test_tiny, 4 iterations, 2 rows

Each row is a real training run through `launch/train.py` (two processes through `accelerate
launch --multi_gpu`), with the technique's overrides on top of the plain baseline (fp32, no
checkpointing, no decoder rewrites), all with seed 0 but the two extra baseline seeds. For each:
the final validation mIoU, the mean loss over the last 50 iterations, the largest gap between
its loss curve and the seed-0 baseline's, and whether the row lies within the noise band (its
largest gap no larger than the largest gap between baseline seeds, and its mIoU within the
seeds' range widened by their spread). Writes `benchmarks/results/parity_<device>_<date>.{md,json,png}`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from setr_lowmem.commands.benchmark import row_style  # noqa: E402

PLAIN = ["memory.precision=fp32", "memory.checkpointing=none", "memory.classifier_first=false",
         "memory.fused_upsample_loss=false", "memory.upsample_backward=stock", "optim.bits=32",
         "memory.deepspeed.stage=0"]
ZERO2 = ["memory.deepspeed.stage=2", "memory.deepspeed.offload_optimizer=true"]
# row -> (overrides on top of PLAIN, processes)
ROWS = {
    "fp32 baseline": ([], 1),
    "fp32 baseline, seed 1": (["train.seed=1"], 1),
    "fp32 baseline, seed 2": (["train.seed=2"], 1),
    "bf16 autocast": (["memory.precision=bf16"], 1),
    "bf16 weights, fp32 master": (["memory.precision=bf16_weights", "memory.deepspeed.stage=2"], 1),
    "8-bit SGD": (["optim.bits=8"], 1),
    "ZeRO-2 offload": (ZERO2, 1),
    "ZeRO-3 param offload": (["memory.deepspeed.stage=3", "memory.deepspeed.offload_optimizer=true",
                              "memory.deepspeed.offload_params=true"], 1),
    "accumulation 2 x 8": (["train.micro_batch=2"], 1),
    "full ckpt + decoder rewrites": (["memory.checkpointing=full", "memory.classifier_first=true",
                                      "memory.fused_upsample_loss=true", "memory.upsample_backward=matmul"], 1),
    "2 processes": (["train.micro_batch=8"], 2),
    "paper combination": (["memory.checkpointing=full", "memory.precision=bf16", "memory.classifier_first=true",
                           "memory.fused_upsample_loss=true"], 1),
}
SEEDS = ["fp32 baseline", "fp32 baseline, seed 1", "fp32 baseline, seed 2"]


def run_row(name: str, cfg: str, iters: int, work: Path, extra: list[str]) -> dict:
    overrides, procs = ROWS[name]
    out = work / name.replace(" ", "_").replace(",", "")
    args = [f"train.out_dir={out}", f"schedule.iters={iters}", "train.log_every=10", "train.val_every=0",
            "train.ckpt_every=0", "train.keep_last=1", "model.pretrained=", *PLAIN, *overrides, *extra]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"] if procs > 1 else [sys.executable]
    start = time.time()
    proc = subprocess.run([*launcher, "launch/train.py", "--cfg", cfg, *args], cwd=ROOT, capture_output=True,
                          text=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
    curve = {r["iteration"]: r["loss"] for r in records if "loss" in r}
    val = [r["val"] for r in records if "val" in r]
    row = {"row": name, "exit": proc.returncode, "seconds": round(time.time() - start, 1), "curve": curve,
           "mIoU": val[-1]["mIoU"] if val else None, "overrides": overrides, "processes": procs}
    if proc.returncode != 0:
        row["error"] = next((x for x in reversed(proc.stderr.splitlines()) if x.startswith("error")),
                            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
    return row


def gap(a: dict, b: dict) -> float:
    common = [k for k in a if k in b]
    return max((abs(a[k] - b[k]) for k in common), default=float("nan"))


def last_loss(curve: dict, iters: int) -> float:
    tail = [v for k, v in curve.items() if k > iters - 50]
    return sum(tail) / len(tail) if tail else float("nan")


def judge(rows: list[dict], iters: int) -> None:
    """Columns against the seed-0 baseline and the band of the three seeds."""
    seeds = [r for r in rows if r["row"] in SEEDS and r["curve"]]
    base = next((r for r in seeds if r["row"] == SEEDS[0]), None)
    noise = max((gap(s["curve"], base["curve"]) for s in seeds if s is not base), default=float("nan")) if base else float("nan")
    mious = [s["mIoU"] for s in seeds if s["mIoU"] is not None]
    lo, hi = (min(mious), max(mious)) if mious else (float("nan"), float("nan"))
    spread = hi - lo
    for r in rows:
        r["last50"] = last_loss(r["curve"], iters)
        r["gap"] = gap(r["curve"], base["curve"]) if base and r["curve"] else float("nan")
        r["within"] = bool(r["curve"] and r["mIoU"] is not None and r["gap"] <= noise
                           and lo - spread <= r["mIoU"] <= hi + spread)
    for r in rows:
        r["noise"], r["mIoU_band"] = noise, [lo, hi]


def table(rows: list[dict], title: str) -> str:
    seeds = [r["mIoU"] for r in rows if r["row"] in SEEDS and r["mIoU"] is not None]
    lines = [f"# {title}", ""]
    if seeds:
        mean = sum(seeds) / len(seeds)
        lines += [f"Baseline mIoU over {len(seeds)} seeds: {mean:.2f} (range {min(seeds):.2f} .. {max(seeds):.2f}); "
                  f"largest gap between a seed's loss curve and seed 0's: {rows[0]['noise']:.4f}.", ""]
    lines += ["| row | mIoU | loss, last 50 it | largest gap to the baseline's curve | within the noise band | time s |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        miou = f"{r['mIoU']:.2f}" if r["mIoU"] is not None else f"failed: {r.get('error', '')[:80]}"
        lines.append(f"| {r['row']} | {miou} | {r['last50']:.4f} | {r['gap']:.4f} | "
                     f"{'yes' if r['within'] else '**no**'} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = [r for r in rows if r["row"] in SEEDS and r["curve"]]
    fig, ax = plt.subplots(figsize=(11, 6), dpi=100)
    if seeds:
        its = sorted(set.intersection(*(set(s["curve"]) for s in seeds)))
        ax.fill_between(its, [min(s["curve"][i] for s in seeds) for i in its],
                        [max(s["curve"][i] for s in seeds) for i in its], color="0.8", label="baseline, 3 seeds")
    for i, r in enumerate(x for x in rows if x["row"] not in SEEDS[1:] and x["curve"]):
        its = sorted(r["curve"])
        ax.plot(its, [r["curve"][k] for k in its], **row_style(i), lw=1.2, markevery=max(1, len(its) // 8), ms=4,
                label=r["row"])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (mean over 10 iterations)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="tiny_synthetic")
    parser.add_argument("--iters", type=int, default=None, help="600 (--tiny: 4)")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                        help="default: every row (--tiny: the baseline and bf16 autocast)")
    parser.add_argument("--full", action="store_true", help="GPU: pup_ade20k at full size on the built-in data")
    parser.add_argument("--tiny", action="store_true", help="a check that the script runs (the tests' run of it): "
                        "test_tiny's 2-block model, a few iterations, logged each")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="runs/parity", help="where the runs are written")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from tqdm.auto import tqdm

    import torch

    cfg, extra = args.cfg, list(args.overrides)
    if args.tiny:
        cfg, extra = "test_tiny", ["train.log_every=1", "data.num_workers=0", *extra]
    args.iters = args.iters or (4 if args.tiny else 600)
    args.rows = args.rows or (["fp32 baseline", "bf16 autocast"] if args.tiny else list(ROWS))
    if args.full:
        cfg = "pup_ade20k"
        extra = ["data.dataset=synthetic", "data.root=", "data.synthetic.size=512", "data.synthetic.num_train=256",
                 "data.synthetic.num_val=16", "data.num_workers=4", *extra]
    rows_wanted = [r for r in ROWS if r in args.rows]
    if SEEDS[0] not in rows_wanted:
        rows_wanted.insert(0, SEEDS[0])  # every row is judged against it
    device = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-") if torch.cuda.is_available() else "cpu"
    rows, started = [], time.time()
    bar = tqdm(rows_wanted, desc="parity", unit="row")
    for name in bar:
        bar.set_postfix_str(name)
        rows.append(run_row(name, cfg, args.iters, Path(args.work), extra))
        done = time.time() - started
        bar.write(f"{name}: mIoU {rows[-1]['mIoU']}, {rows[-1]['seconds']:.0f} s; about "
                  f"{done / len(rows) * (len(rows_wanted) - len(rows)) / 60:.0f} min left")
    judge(rows, args.iters)
    date = datetime.date.today().isoformat()
    title = f"Parity of the memory techniques: {cfg}, {args.iters} iterations, {device}, {date}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"parity_{device}{'-full' if args.full else ''}_{date}"
    stem.with_suffix(".json").write_text(json.dumps({"title": title, "config": cfg, "iters": args.iters,
                                                     "extra": extra, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(table(rows, title))
    plot(rows, stem.with_suffix(".png"), title)
    print(table(rows, title))
    print(f"wrote {stem}.md, .json, .png")


if __name__ == "__main__":
    main()
