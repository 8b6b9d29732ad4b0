"""Peak memory and speed of SETR-PUP training as each memory technique is added in turn.

    python benchmarks/memory.py                     # ADE20K geometry on the GPU (tiny model on a CPU)
    python benchmarks/memory.py --cap-gib 24        # emulate a 24 GB card
    python benchmarks/memory.py --batches 8 16 --steps 5 --rows naive bf16 head+loss

(`setr-benchmark` when installed.)
Rows, each adding one technique to the one before: naive (fp32, eager attention, no
checkpointing, as the original code ran), bf16 autocast, SDPA attention, every encoder block
checkpointed, each head checkpointed with its loss, the classifier moved before the last
upsample, the upsample fused into the cross-entropy (PyTorch bands, then the Triton kernels:
GPU only), the heads' upsample backward as matrix products, channels-last decoder weights,
torch.compile'd conv units, 8-bit SGD (which also leaves the weights contiguous: bitsandbytes re-lays
them out at its first step, so channels-last weights are not applied with it); then ZeRO-2 and ZeRO-3 with CPU offload (on top of the
rows before 8-bit except channels-last, which DeepSpeed refuses; the paper's torch SGD offloaded). Each row
runs at every micro-batch (random data; the median step after the first is timed). For each:
peak allocated / reserved / device-level, host RSS, the breakdown by category (PyTorch's
MemTracker), images per second, and MFU from FLOPs counted with torch.utils.flop_counter.
Writes Markdown, CSV, JSON and a PNG chart named by GPU and date under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
from pathlib import Path

import torch

from setr_lowmem.cli import command_parser, positive_gib, positive_int, prepare_environment, run_main
from setr_lowmem.config import load_config
from setr_lowmem.memory.registry import benchmark_rows
from setr_lowmem.sizing.measure import (
    benchmark_overrides,
    build_step,
    device_tag,
    fmt,
    fmt_mfu,
    measure,
    set_memory_cap,
)
from setr_lowmem.sizing.meters import memory_timeline_png, record_snapshot

# (row name, overrides added to every row before it, GPU only): from the techniques' levers
ROWS = benchmark_rows()


def row_overrides(upto: str, cuda: bool = True) -> list[str]:
    out = []
    for name, extra, gpu_only in ROWS:
        if cuda or not gpu_only:
            out += extra
        if name == upto:
            return out
    raise SystemExit(f"unknown row {upto!r}; rows: {', '.join(n for n, _, _ in ROWS)}")


def refusal(args: argparse.Namespace) -> str:
    """What is wrong with the arguments ('' when nothing is), found before any row runs."""
    names = [n for n, _, _ in ROWS]
    unknown = [r for r in args.rows if r not in names]
    if unknown:
        return f"--rows: unknown row {unknown[0]!r}; rows: {', '.join(names)}"
    if args.steps < 2:
        return f"--steps must be 2 or more (the first step warms up and is not timed), got {args.steps}"
    if args.cap_gib is not None and not torch.cuda.is_available():
        return "--cap-gib needs a GPU (it caps the CUDA allocator; the CPU run of a tiny model has no card to emulate)"
    from setr_lowmem.engine.rundir import RunDirError, writable_dir

    try:
        writable_dir(Path(args.out), "--out")  # before any row runs, not after all of them
    except RunDirError as err:
        return str(err)
    return ""


def table(results: list[dict], cuda: bool) -> str:
    """One line per row and micro-batch; on the CPU (a tiny model) in MiB, where GiB would read 0.01."""
    unit, k = ("GiB", 1) if cuda else ("MiB", 1024)
    head = (f"| row | micro-batch | fits | peak alloc {unit} | peak reserved {unit} | device {unit} | host RSS GiB | "
            f"params {unit} | grads | optimizer | activations | temporaries | img/s | MFU | note |")
    lines = [head, "|" + "---|" * 15]
    for r in results:
        c = r["categories"]
        lines.append("| " + " | ".join([
            r["label"], str(r["micro_batch"]), "yes" if r["fits"] else "**no**", fmt(_times(r["allocated"], k)),
            fmt(_times(r["reserved"], k)), fmt(_times(r["device"], k)), fmt(r["host_rss"]),
            *(fmt(_times(c.get(x, float("nan")), k), 3) for x in ("params", "grads", "optimizer", "activations",
                                                                  "temporaries")),
            fmt(r["img_s"], 1), fmt_mfu(r["mfu"]), r["note"]]) + " |")
    if not cuda:
        lines.append("\nCPU run on a tiny model: peak alloc is MemTracker's tracked peak; reserved and device "
                     "figures need a GPU.")
    return "\n".join(lines)


def _times(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def row_style(i: int) -> dict:
    """The i-th row's own colour and marker (tab20's ten strong colours first, then their light ones)."""
    import matplotlib.pyplot as plt

    tab20 = plt.get_cmap("tab20")(range(20))
    return {"color": tab20[2 * (i % 10) + (i // 10) % 2], "marker": "osD^v<>pPX*hH8d"[i % 15]}


def chart(results: list[dict], path: Path, title: str, cuda: bool) -> None:
    """Peak memory and speed against the micro-batch, a colour and a marker of its own per row. On a
    GPU memory is the peak reserved by the allocator; on the CPU the tracked peak allocated, in MiB
    where GiB would read 0.01."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in results))
    key = "reserved" if cuda else "allocated"
    small = not cuda or max((r[key] for r in results if r[key] == r[key]), default=1.0) < 1.0
    scale, unit = (1024, "MiB") if small else (1, "GiB")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=100)
    for i, label in enumerate(labels):
        rows = [r for r in results if r["label"] == label and r["fits"]]
        style = dict(row_style(i), label=label)
        for ax, values in ((ax1, [r[key] * scale for r in rows]), (ax2, [r["img_s"] for r in rows])):
            points = [(r["micro_batch"], v) for r, v in zip(rows, values, strict=True) if v == v]
            if points:  # a row without figures stays out of that panel and its legend
                ax.plot(*zip(*points, strict=True), **style)
    batches = sorted({r["micro_batch"] for r in results})
    what = "peak reserved" if cuda else "peak allocated (tracked)"
    for ax, ylabel in ((ax1, f"{what} ({unit})"), (ax2, "images / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("micro-batch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("--cfg", default="pup_ade20k.yaml")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=None, help="micro-batches (GPU: 1 2 4 8 16)")
    parser.add_argument("--steps", type=int, default=5, help="steps per row, the first not timed (2 or more)")
    parser.add_argument("--cap-gib", type=positive_gib, default=None, help="emulate a card of this size (GPU only)")
    parser.add_argument("--rows", nargs="+", default=[n for n, _, _ in ROWS])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the MemTracker pass (faster)")
    parser.add_argument("--timeline", action="store_true",
                        help="also draw a PNG of the memory timeline over one step of the last non-ZeRO row that fitted")
    parser.add_argument("--snapshot", action="store_true",
                        help="also dump a CUDA memory snapshot of that step (open it at https://pytorch.org/memory_viz)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    problem = refusal(args)
    if problem:
        parser.error(problem)
    prepare_environment()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    base = benchmark_overrides(args.overrides, cuda)
    batches = args.batches or ([1, 2, 4, 8, 16] if cuda else [1, 2, 4])
    if not cuda:
        print("no GPU: running the same matrix on a tiny SETR-PUP on the CPU (64x64 crops, 4 blocks, 64 wide)")
    set_memory_cap(args.cap_gib, device)
    results = []
    for name in args.rows:
        if not cuda and any(gpu_only for row, _, gpu_only in ROWS if row == name):
            print(f"{name:>15}: not run (needs a GPU)")
            continue
        failed_at = None
        for mb in batches:
            if failed_at is not None:
                print(f"{name:>15} mb {mb:>3}: not run (micro-batch {failed_at} did not fit)")
                continue
            cfg = load_config(args.cfg, base + row_overrides(name, cuda) + [f"train.micro_batch={mb}",
                                                                      f"train.total_batch={mb}"])
            m = measure(cfg, label=name, steps=args.steps, device=device, breakdown=not args.no_breakdown,
                        cap_gib=args.cap_gib).as_dict()
            results.append(m)
            print(f"{name:>15} mb {mb:>3}: " + (f"alloc {fmt(m['allocated'])} reserved {fmt(m['reserved'])} "
                  f"device {fmt(m['device'])} host {fmt(m['host_rss'])} GiB, {fmt(m['img_s'], 1)} img/s"
                  if m["fits"] else f"does not fit: {m['note']}"), flush=True)
            if not m["fits"]:
                failed_at = mb
    date = datetime.date.today().isoformat()
    stem = f"memory_{device_tag(device)}_{date}" + (f"_cap{args.cap_gib:g}" if args.cap_gib else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = f"SETR-PUP {args.cfg}" if cuda else f"tiny SETR-PUP (CPU stand-in for {args.cfg}, 64x64 crops)"
    title = (f"{model} on {device_tag(device)}" + (f", capped at {args.cap_gib:g} GiB" if args.cap_gib else "")
             + f", {date}")
    md = f"# {title}\n\n{table(results, cuda)}\n"
    (out / f"{stem}.md").write_text(md)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        keys = [k for k in results[0] if k not in ("categories", "phases")] + \
               ["params", "grads", "optimizer", "activations", "temporaries"]
        writer = csv.writer(f)
        writer.writerow(keys)
        for r in results:
            writer.writerow([r[k] if k in r else r["categories"].get(k, "") for k in keys])
    (out / f"{stem}.json").write_text(json.dumps({"title": title, "config": args.cfg, "overrides": base,
                                                  "results": results}, indent=1))
    chart(results, out / f"{stem}.png", title, cuda)
    fitted = [r for r in results if r["fits"] and not r["label"].startswith("ZeRO")]  # DeepSpeed's buffers hide the step
    if (args.timeline or args.snapshot) and fitted:
        last = fitted[-1]
        cfg = load_config(args.cfg, base + row_overrides(last["label"], cuda) + [
            f"train.micro_batch={last['micro_batch']}", f"train.total_batch={last['micro_batch']}"])
        step = build_step(cfg, device)
        step()  # optimizer states exist from here on
        what = f"{last['label']}, micro-batch {last['micro_batch']}"
        if args.timeline:
            print("wrote", memory_timeline_png(step, str(out / f"{stem}_timeline.png"), device, f"one step: {what}"))
        if args.snapshot and cuda:
            print("wrote", record_snapshot(step, str(out / f"{stem}_snapshot.pickle")))
    print("\n" + md)
    print(f"wrote {out / stem}.md, .csv, .json, .png")


def cli() -> None:
    """The `setr-benchmark` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
