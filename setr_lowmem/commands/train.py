"""Train SETR: `accelerate launch launch/train.py --cfg pup_ade20k.yaml [key.sub=value ...]`.

Also runs as plain `python launch/train.py ...`. `--resume auto` continues from the newest
complete checkpoint of the run; `--resume PATH` from a given one. `--auto-fit GIB` first
picks the fastest memory plan that fits that budget (see `setr-plan`).
"""

from __future__ import annotations

import os
import sys

from setr_lowmem.cli import command_parser, fail, positive_gib, positive_int, prepare_environment, run_main


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("--cfg", help="config file; a bare name is looked up in the shipped configs (--list-configs)")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint directory")
    parser.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                        help="stop after N iterations of this session, with a checkpoint (a resumed run counts from "
                             "its resume point: --resume auto --stop-after 100 runs 100 more)")
    parser.add_argument("--allow-change", default="", metavar="KEY[,KEY]",
                        help="with --resume: keys whose new value is a deliberate change, e.g. "
                             "`--allow-change optim.lr optim.lr=0.0005` (optim.lr, schedule.iters, ...; logged and "
                             "added to the run's config_history.jsonl)")
    parser.add_argument("--auto-fit", type=positive_gib, default=None, metavar="GIB",
                        help="choose micro-batch/checkpointing/8-bit/offload to fit GIB of GPU memory")
    parser.add_argument("--cap-gib", type=positive_gib, default=None, metavar="GIB",
                        help="cap this process's GPU memory, to see whether a smaller card would hold the run")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the file with the overrides applied, every key) and exit")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=0.01 train.micro_batch=4")
    args = parser.parse_intermixed_args()

    from setr_lowmem.config import dump_config, load_config, shipped_configs

    if args.list_configs:
        for name, title in shipped_configs():
            print(f"{name:<22} {title}")
        return
    if not args.cfg:
        fail("--cfg is required: a config file, or a shipped config's name (--list-configs lists them)")
    if args.allow_change and not args.resume:
        fail("--allow-change needs --resume: it names what may differ from the checkpoint's config")
    cfg = load_config(args.cfg, args.overrides)
    if args.print_config:
        print(dump_config(cfg, f"{args.cfg}" + (f" with {' '.join(args.overrides)}" if args.overrides else "")), end="")
        return
    prepare_environment()
    if args.cap_gib is not None:
        import torch

        from setr_lowmem.sizing.measure import set_memory_cap

        if not torch.cuda.is_available():
            fail("--cap-gib needs a GPU")
        set_memory_cap(args.cap_gib, torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    if args.auto_fit is not None:
        from setr_lowmem.sizing.planner import auto_fit

        cfg = auto_fit(cfg, args.auto_fit)
    check_host_memory(cfg)
    from setr_lowmem.engine.train import train

    allow = tuple(k for k in args.allow_change.split(",") if k)
    summary = train(cfg, resume=args.resume, stop_after=args.stop_after, allow_change=allow)
    report(summary, cfg.schedule.iters)


LARGE = 20_000_000  # parameters: a model this large is forecast before it trains on a CPU


def check_host_memory(cfg) -> None:
    """Without a GPU the model trains in host memory: a full-size SETR at the paper's batch needs tens of
    GiB, and the kernel would kill the run without a word. A large model's step is forecast first
    (`sizing.forecast` on the CPU's rules, seconds) and compared with the memory available."""
    import psutil
    import torch

    from setr_lowmem.config import without_initial_weights
    from setr_lowmem.model import build_setr

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    with torch.device("meta"):
        params = sum(p.numel() for p in build_setr(without_initial_weights(cfg)).parameters())
    if params < LARGE:
        return
    from setr_lowmem.sizing.forecast import forecast

    need = forecast(cfg, cuda=False).allocated + 1.0  # + the interpreter, torch and the data workers
    free = psutil.virtual_memory().available / 2**30
    if need > free:
        fail(f"no GPU: this run would train in host memory and needs about {need:.1f} GiB (forecast for "
             f"train.micro_batch={cfg.train.micro_batch}, {params / 1e6:.0f}M parameters), but {free:.1f} GiB is "
             "available: lower train.micro_batch (accumulation keeps the batch) or train on a GPU")


def report(summary: dict, iters: int) -> None:
    """The final line, once: by the main process (the others only share its exit code)."""
    say = fail if summary["main_process"] else lambda message, code=2: sys.exit(code)
    if summary.get("final_line"):  # the main process's
        print(summary["final_line"])
    if summary.get("val_error") and summary["iteration"] == iters:
        say(f"training finished (model in {summary['run_dir']}) but the final validation failed: "
             f"{summary['val_error']}")
    if summary.get("stopped_by"):
        say(f"stopped by {summary['stopped_by']} at iteration {summary['iteration']}; "
             f"continue with --resume auto", code=130)


def cli() -> None:
    """The `setr-train` console command."""
    run_main(main)


if __name__ == "__main__":
    cli()
