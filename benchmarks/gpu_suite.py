"""Every GPU figure of the project in one command, stage by stage, for a short-lived GPU machine.

    export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1     # the packages the GPU image lacks
    python benchmarks/gpu_suite.py --out $OUT --minutes 9
    python benchmarks/gpu_suite.py --out $OUT --stages memory profile     # what a first call left

Stages, in order of value (each writes its own files under --out as soon as it ends and prints
its time, so a run cut short still returns what it measured):

  env       versions, GPU name and memory; stops the suite at once when deepspeed,
            bitsandbytes, datasets or pydantic (.site) or a private PyTorch API
            (`setr_lowmem.compat`) is missing                                 env_<gpu>_<date>.json
  gputests  pytest -m gpu (Triton at the paper's shapes, matmul upsample
            backward, 8-bit SGD, ZeRO-2 offload, compiled convs) and the
            Triton tests of test_decoder.py compiled for this GPU             gputests_<gpu>_<date>.txt
  paper     the nine paper configs (--configs) through the real launcher, --cap-gib 24,
            the built-in data at each config's crop and classes, the config's
            micro-batch, --iters iterations                                 paper_<gpu>_<date>.{md,json}
  resume    pup_ade20k with ZeRO-2 offload: stopped half-way and resumed
            against the same run uninterrupted                               resume_<gpu>_<date>.json
  memory    benchmarks/memory.py --cap-gib 24 at micro-batch 16 (--batches)  memory_<gpu>_<date>.*
  profile   torch.profiler over three steps of pup_ade20k as configured     profile_<gpu>_<date>.md
  hidden    what the memory forecast cannot see (`setr_lowmem.sizing.gpu_overheads`): the
            CUDA context, cuBLAS workspaces, and for the forecast check's
            worst rows (as the toolkit runs them) the allocations alive at
            the peak and the operators' transients; on the CPU the
            forecasts only                                                  hidden_<gpu>_<date>.{md,json}

`--minutes` is the whole budget: a stage (or paper config) that would start after it is written
as skipped. Without a GPU (`--tiny`, implied) everything runs on a tiny model on the CPU: that
times the suite, it measures nothing of the GPU's. Exits 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ["model.embed_dim=64", "model.depth=4", "model.num_heads=4", "model.out_indices=[0,1,2,3]",
        "model.head_channels=32", "model.mla_channels=32", "data.crop=64", "data.base_scale=[128,64]",
        "eval.crop=64", "eval.stride=48", "train.total_batch=4", "train.micro_batch=4"]


class Suite:
    def __init__(self, args):
        import torch

        self.args, self.start = args, time.time()
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.tag = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-") if self.cuda else "cpu-tiny"
        self.date = datetime.date.today().isoformat()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.minutes * 60 - (time.time() - self.start)

    def path(self, stem: str, suffix: str) -> Path:
        return self.out / f"{stem}_{self.tag}_{self.date}.{suffix}"

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.start:6.0f} s] {text}", flush=True)

    def sh(self, args: list[str], timeout: float, log: Path | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=max(timeout, 10), env=env)
        except subprocess.TimeoutExpired as err:
            proc = subprocess.CompletedProcess(args, 124, _text(err.stdout), _text(err.stderr) + "\n(timed out)")
        if log is not None:
            log.write_text(f"$ {' '.join(map(str, args))}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def launch_args(self) -> list[str]:
        return ["--cap-gib", "24"] if self.cuda else []

    def common(self, name: str) -> list[str]:
        """The built-in data at the config's crop and classes, no download, few images."""
        from setr_lowmem.config import load_config

        cfg = load_config(name)
        size = 64 if not self.cuda else cfg.data.crop
        return ["data.dataset=synthetic", "data.root=", f"data.synthetic.size={size}", "data.synthetic.num_train=64",
                "data.synthetic.num_val=2", "train.val_every=0", "train.val_max_images=2", "train.ckpt_every=0",
                "train.keep_last=1", "train.log_every=1", "model.pretrained=", "model.mmseg_checkpoint=",
                f"data.num_workers={4 if self.cuda else 0}"] + ([] if self.cuda else TINY)


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def stage_env(s: Suite) -> None:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "gpu": s.tag, "date": s.date}
    for pkg in ("torch", "triton", "timm", "accelerate", "deepspeed", "bitsandbytes", "transformers", "datasets",
                "pydantic", "numpy"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    from setr_lowmem import compat

    # what would otherwise stop a later stage minutes in: a package the image lacks (.site not on the
    # path), a private PyTorch API this torch does not have
    info["missing"] = [pkg for pkg in ("deepspeed", "bitsandbytes", "datasets", "pydantic") if info[pkg] is None]
    info["private_apis_missing"] = [a.path for a in compat.APIS.values() if a.required and not a.present()]
    if s.cuda:
        props = torch.cuda.get_device_properties(0)
        info |= {"cuda": torch.version.cuda, "gpu_memory_gib": round(props.total_memory / 2**30, 2),
                 "capability": f"{props.major}.{props.minor}"}
    s.path("env", "json").write_text(json.dumps(info, indent=1))
    s.say("env: " + ", ".join(f"{k} {v}" for k, v in info.items() if not isinstance(v, list)))
    if info["missing"] or info["private_apis_missing"]:
        raise RuntimeError(f"missing packages {info['missing']} (carry .site, PYTHONPATH=$PWD/.site:$PWD), "
                           f"private APIs {info['private_apis_missing']} (python -m setr_lowmem.compat)")


def stage_gputests(s: Suite) -> None:
    log = s.path("gputests", "txt")
    if not s.cuda:
        log.write_text("no GPU: the gpu tests run only on CUDA\n")
        s.say("gputests: skipped (no GPU)")
        return
    a = s.sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"],
             s.left())
    b = s.sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_decoder.py", "-k", "triton"],
             s.left())
    log.write_text(f"pytest -m gpu tests/test_gpu.py: exit {a.returncode}\n{a.stdout[-6000:]}\n{a.stderr[-3000:]}\n"
                   f"pytest tests/test_decoder.py -k triton: exit {b.returncode}\n{b.stdout[-4000:]}\n{b.stderr[-2000:]}")
    s.say(f"gputests: exit {a.returncode} / {b.returncode}: {_last(a.stdout)} / {_last(b.stdout)}")


def _last(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def run_summary(name: str, run_dir: Path, proc: subprocess.CompletedProcess, batch: int, secs: float) -> dict:
    """What one launcher run measured, from its metrics.jsonl and train.log."""
    logged = [r for r in _records(run_dir) if "loss" in r]
    row = {"config": name, "exit": proc.returncode, "seconds": round(secs, 1), "iterations": len(logged)}
    if proc.returncode != 0:
        row["error"] = next((x for x in reversed(proc.stderr.splitlines()) if x.startswith("error")),
                            _last(proc.stderr))[:300]
    if logged:
        steady = [r for r in logged if r["iteration"] >= 3] or logged  # past compilation and warm-up
        span = steady[-1]["time"] - steady[0]["time"]
        row |= {"loss_first": logged[0]["loss"], "loss_last": logged[-1]["loss"], "mem": logged[-1]["mem"],
                "img_s": round((len(steady) - 1) * batch / span, 2) if span > 0 else None,
                "data_wait": round(sum(r["data_wait"] for r in steady) / len(steady), 4)}
    log = run_dir / "train.log"
    fit = [x for x in log.read_text().splitlines() if "GB card" in x or "peak host memory" in x] if log.is_file() else []
    row["verdict"] = fit[-1].split(" INFO ")[-1] if fit else "-"
    return row


def stage_paper(s: Suite) -> None:
    from setr_lowmem.config import load_config, with_overrides

    rows = []
    for name in s.args.configs:
        if s.left() < 30:
            rows.append({"config": name, "exit": None, "error": "skipped: out of time (run --stages paper again)"})
            continue
        over = s.common(name) + [f"schedule.iters={s.args.iters}", f"train.out_dir={s.out / 'runs' / name}"]
        batch = with_overrides(load_config(name), over).train.total_batch
        t = time.time()
        proc = s.sh([sys.executable, "launch/train.py", "--cfg", name, *s.launch_args(), *over], s.left(),
                    log=s.out / "runs" / f"{name}.out")
        row = run_summary(name, s.out / "runs" / name, proc, batch, time.time() - t)
        rows.append(row)
        s.say(f"paper {name}: exit {row['exit']}, loss {row.get('loss_first', float('nan')):.3f} -> "
              f"{row.get('loss_last', float('nan')):.3f}, {row.get('img_s')} img/s, {row['verdict']}")
        write_paper(s, rows)
    write_paper(s, rows)


def write_paper(s: Suite, rows: list[dict]) -> None:
    s.path("paper", "json").write_text(json.dumps({"gpu": s.tag, "date": s.date, "iters": s.args.iters,
                                                   "rows": rows}, indent=1))
    lines = [f"# The paper configs on {s.tag}, {s.date}: {s.args.iters} iterations each, "
             + ("capped at 24 GiB" if s.cuda else "tiny model on the CPU (times the suite only)"), "",
             "| config | exit | loss first -> last | img/s | data wait | peak reserved GiB | device GiB | host GiB | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("mem", {})
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else r.get("error", "-")
        wait = f"{100 * r['data_wait']:.0f}%" if "data_wait" in r else "-"
        cells = [r["config"], r["exit"], loss, r.get("img_s", "-"), wait,
                 *(_gib(m.get(k)) for k in ("reserved", "device", "host_rss")), r.get("verdict", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    s.path("paper", "md").write_text("\n".join(lines) + "\n")


def _gib(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def stage_resume(s: Suite) -> None:
    name, iters = "pup_ade20k", s.args.resume_iters
    base = s.common(name) + [f"schedule.iters={iters}", "memory.deepspeed.stage=2",
                             "memory.deepspeed.offload_optimizer=true", "memory.compile_convs=false",
                             "memory.channels_last=false"]
    runs = s.out / "runs" / "resume"
    whole = s.sh([sys.executable, "launch/train.py", "--cfg", name, *s.launch_args(), *base,
                  f"train.out_dir={runs / 'whole'}"], s.left(), log=runs.parent / "resume_whole.out")
    first = s.sh([sys.executable, "launch/train.py", "--cfg", name, *s.launch_args(), *base,
                  f"train.out_dir={runs / 'split'}", "--stop-after", str(iters // 2)], s.left(),
                 log=runs.parent / "resume_first.out")
    second = s.sh([sys.executable, "launch/train.py", "--cfg", name, *s.launch_args(), *base,
                   f"train.out_dir={runs / 'split'}", "--resume", "auto"], s.left(), log=runs.parent / "resume_second.out")
    a = {r["iteration"]: r["loss"] for r in _records(runs / "whole") if "loss" in r}
    b = {r["iteration"]: r["loss"] for r in _records(runs / "split") if "loss" in r}
    out = {"config": name, "iters": iters, "stopped_at": iters // 2,
           "exits": [whole.returncode, first.returncode, second.returncode],
           "loss_whole": a.get(iters), "loss_resumed": b.get(iters),
           "equal": a.get(iters) is not None and a.get(iters) == b.get(iters),
           "max_abs_diff": max((abs(a[k] - b[k]) for k in a if k in b), default=None)}
    s.path("resume", "json").write_text(json.dumps(out, indent=1))
    s.say(f"resume: exits {out['exits']}, loss at {iters}: {out['loss_whole']} uninterrupted, "
          f"{out['loss_resumed']} resumed (equal: {out['equal']})")


def stage_memory(s: Suite) -> None:
    batches = [str(b) for b in s.args.batches] if s.cuda else ["1", "2"]
    rows = [] if s.cuda else ["--rows", "naive", "bf16", "head+loss", "8-bit SGD", "ZeRO-2 offload"]
    proc = s.sh([sys.executable, "benchmarks/memory.py", *(["--cap-gib", "24"] if s.cuda else []), "--batches",
                 *batches, "--steps", "3", "--out", s.out, *rows], s.left(), log=s.out / "memory_stage.out")
    s.say(f"memory: exit {proc.returncode}; " + ", ".join(p.name for p in s.out.glob(f"memory_{s.tag}_*")))


# kernel name -> part of the step, first match wins
PARTS = [("attention", r"flash|fmha|attention|sdpa|softmax_kernel.*attn"),
         ("cross-entropy", r"nll|log_softmax|cross_entropy|_forward_kernel|_backward_kernel|lse"),
         ("upsampling", r"upsample|interp|bilinear"),
         ("GEMM", r"gemm|gemv|cutlass|xmma|nvjet|matmul|conv|cudnn|implicit_convolve|wgrad|dgrad"),
         ("BatchNorm/ReLU", r"batch_norm|batchnorm|bn_|relu|threshold"),
         ("optimizer", r"sgd|adam|multi_tensor|foreach|optim"),
         ("copies", r"copy|memcpy|memset|cat|pad|transpose|permute|contiguous"),
         ("other element-wise", r"elementwise|vectorized|reduce|unrolled|mul|add|div|sum|mean")]


def stage_profile(s: Suite) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from setr_lowmem.config import load_config
    from setr_lowmem.sizing.measure import benchmark_overrides, build_step

    cuda = s.cuda
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config("pup_ade20k", benchmark_overrides([], cuda) + ([] if cuda else ["train.total_batch=4",
                                                                                        "train.micro_batch=4"]))
    step = build_step(cfg, device)
    try:
        step()  # warm-up: optimizer states, kernel selection, compilation
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        step.close()  # the stages after this one start from an empty card
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0 and (not cuda or e.device_type.name == "CUDA")]
    total = sum(getattr(e, key) for e in events) or 1.0
    parts: dict[str, float] = {}
    for e in events:
        part = next((p for p, rx in PARTS if re.search(rx, e.key, re.I)), "other")
        parts[part] = parts.get(part, 0.0) + getattr(e, key)
    top = sorted(events, key=lambda e: -getattr(e, key))[:25]
    what = "CUDA kernels" if cuda else "CPU operators (tiny model: times the suite only)"
    lines = [f"# Profile of pup_ade20k as configured on {s.tag}, {s.date}: three steps, micro-batch "
             f"{cfg.train.micro_batch}", "", f"{what}, {total / 3 / 1000:.1f} ms per step of self time.", "",
             "| part of the step | ms per step | share |", "|---|---|---|"]
    lines += [f"| {p} | {t / 3 / 1000:.1f} | {100 * t / total:.1f}% |" for p, t in sorted(parts.items(), key=lambda x: -x[1])]
    lines += ["", "| kernel | calls | ms per step | share |", "|---|---|---|---|"]
    lines += [f"| `{e.key[:90]}` | {e.count // 3} | {getattr(e, key) / 3 / 1000:.2f} | {100 * getattr(e, key) / total:.1f}% |"
              for e in top]
    s.path("profile", "md").write_text("\n".join(lines) + "\n")
    s.say(f"profile: {total / 3 / 1000:.1f} ms per step; " + ", ".join(
        f"{p} {100 * t / total:.0f}%" for p, t in sorted(parts.items(), key=lambda x: -x[1])[:4]))


# by (label, micro-batch) in `setr_lowmem.sizing.reference`: the forecast check's rows that miss by more than
# 10% (the first and third), one that does not (the second), and ZeRO-2 offload (-9.3%: its buffers)
HIDDEN_ROWS = [("+ each head and its loss in one checkpoint", 16), ("head-and-loss checkpointing + classifier first", 16),
               ("head-and-loss + classifier first + SGD8bit", 2), ("ZeRO-2, optimizer offloaded (torch SGD), bf16", 16)]


def stage_hidden(s: Suite) -> None:
    import torch

    from setr_lowmem.sizing import reference
    from setr_lowmem.sizing.forecast import forecast
    from setr_lowmem.sizing.gpu_overheads import context, probe

    device = torch.device("cuda")
    out: dict = {"gpu": s.tag, "date": s.date, "rows": []}
    if s.cuda:
        out["context_first"] = context(device)
    for label, mb in HIDDEN_ROWS:
        r = next(r for r in reference.ROWS if r.label == label and r.micro_batch == mb)
        if s.left() < 90:
            out["rows"].append({"label": label, "micro_batch": mb, "skipped": "out of time (--stages hidden)"})
            continue
        cfg = r.configured()
        t = time.time()
        if s.cuda:
            row = probe(cfg, device, label)  # keeps what it measured when a part fails
        else:
            row = {"label": label, "micro_batch": mb, "forecast_gib": round(forecast(cfg, label).allocated, 3),
                   "measured_gib": None}
        row |= {"reference_gib": r.allocated, "seconds": round(time.time() - t, 1)}
        out["rows"].append(row)
        s.say(f"hidden {label}, mb {mb}: forecast {row.get('forecast_gib')} GiB, measured {row.get('measured_gib')}")
        write_hidden(s, out)
    if s.cuda:
        out["context_last"] = context(device)
    write_hidden(s, out)


def write_hidden(s: Suite, out: dict) -> None:
    s.path("hidden", "json").write_text(json.dumps(out, indent=1))
    lines = [f"# What the memory forecast cannot see, on {s.tag}, {s.date}", ""]
    for key in ("context_first", "context_last"):
        if key in out:
            lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in out[key].items()))
    for r in out["rows"]:
        lines += ["", f"## {r['label']}, micro-batch {r['micro_batch']}", "",
                  (f"forecast {r.get('forecast_gib')} GiB, measured {r.get('measured_gib')} GiB (the toolkit's step; "
                   f"the reference's plain loop measured {r.get('reference_gib')}) "
                   f"{r.get('error') or r.get('skipped') or ''}")]
        if "at_peak" in r:
            p = r["at_peak"]
            lines += ["", f"Alive at the replayed peak ({p['peak_mib']} MiB requested, measured "
                      f"{r.get('measured_requested_gib')} GiB; {p['before_mib']} MiB before the step):", "",
                      "| MiB | blocks | made by |", "|---|---|---|"]
            lines += [f"| {x['mib']} | {x['blocks']} | `{x['where']}` |" for x in p["live"]]
        if "transients" in r:
            lines += ["", "Largest operator transients:", "", "| MiB | calls | operator |", "|---|---|---|"]
            lines += [f"| {x['mib']} | {x['calls']} | `{x['op'][:160]}` |" for x in r["transients"]]
    s.path("hidden", "md").write_text("\n".join(lines) + "\n")


STAGES = {"env": stage_env, "gputests": stage_gputests, "paper": stage_paper, "resume": stage_resume,
          "memory": stage_memory, "profile": stage_profile, "hidden": stage_hidden}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--iters", type=int, default=30, help="iterations per paper config")
    parser.add_argument("--configs", nargs="+", default=None, help="the paper stage's configs (default: all nine)")
    parser.add_argument("--resume-iters", type=int, default=12, help="the resume stage's run, stopped half-way")
    parser.add_argument("--batches", type=int, nargs="+", default=[16], help="the memory stage's micro-batches")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU even with a GPU")
    args = parser.parse_args()
    from setr_lowmem.cli import prepare_environment
    from setr_lowmem.config import PAPER_CONFIGS

    args.configs = args.configs or list(PAPER_CONFIGS)

    prepare_environment()
    suite = Suite(args)
    suite.say(f"gpu suite on {suite.tag}: stages {' '.join(args.stages)}, {args.minutes:g} min, files in {suite.out}")
    failed = []
    for name in args.stages:
        if suite.left() < 20:
            suite.say(f"{name}: skipped, out of time (run --stages {name} again)")
            continue
        t = time.time()
        try:
            STAGES[name](suite)
        except Exception as err:  # noqa: BLE001 - one stage failing must not cost the others
            suite.path(f"failed-{name}", "txt").write_text(f"{type(err).__name__}: {err}\n")
            suite.say(f"{name}: FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            failed.append(name)
        suite.say(f"{name}: {time.time() - t:.0f} s")
        if failed == ["env"]:  # every later stage would fail on it, minutes in
            suite.say("stopping: fix the environment first")
            break
    if failed:
        sys.exit(f"gpu suite: stages failed: {' '.join(failed)}")


if __name__ == "__main__":
    main()
