"""The training loop: build, apply the memory techniques, prepare, then accumulate and step.

    config -> build_setr -> SegmentationLoss -> apply_* techniques -> optimizer, schedule
    -> accelerate/DeepSpeed prepare -> per iteration: `accumulation` micro-batches of
    forward + loss + backward, one optimizer step, one lr step -> log, validate, checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, ProjectConfiguration,
                               set_seed)

from setr_lowmem.config import Config, config_to_dict, save_config
from setr_lowmem.data.loader import build_train_loader, stream_state
from setr_lowmem.data.sources import open_source
from setr_lowmem.engine import checkpoint as ckpt
from setr_lowmem.engine.evaluate import evaluate
from setr_lowmem.engine.loss import SegmentationLoss
from setr_lowmem.engine.schedule import build_scheduler
from setr_lowmem.memory.checkpointing import apply_activation_checkpointing
from setr_lowmem.memory.decoder import apply_decoder_rewrites
from setr_lowmem.memory.deepspeed import check_deepspeed, deepspeed_config, prepare_single_process_env
from setr_lowmem.memory.kernels import apply_channels_last, apply_compiled_convs
from setr_lowmem.memory.optim import build_optimizer, expected_optimizer_class
from setr_lowmem.memory.precision import (apply_attention_kernel, apply_fp32_batchnorm, autocast_factory,
                                          input_dtype)
from setr_lowmem.model import build_setr
from setr_lowmem.profiler import MemoryMeter, fit_line

log = logging.getLogger("setr_lowmem")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


class OutOfMemory(RuntimeError):
    """A CUDA out-of-memory error, with the peak measured and what to change."""


@dataclass
class TrainState:
    """What the loop needs beyond model/optimizer/schedule to continue exactly (checkpointed)."""

    iteration: int = 0
    skipped: int = 0
    bad_streak: int = 0
    history: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "skipped": self.skipped, "bad_streak": self.bad_streak}

    def load_state_dict(self, sd: dict) -> None:
        self.iteration, self.skipped, self.bad_streak = sd["iteration"], sd["skipped"], sd["bad_streak"]


def make_accelerator(cfg: Config, run_dir: Path, trackers: bool = True) -> tuple[Accelerator, int]:
    """The Accelerator (with a DeepSpeed plugin when a ZeRO stage is set) and the accumulation."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.train.micro_batch * world
    if cfg.train.total_batch % per_step:
        raise ValueError(f"train.total_batch {cfg.train.total_batch} is not train.micro_batch "
                         f"{cfg.train.micro_batch} x accumulation x {world} process(es)")
    accumulation = cfg.train.total_batch // per_step
    plugin, handlers = None, []
    if cfg.memory.deepspeed.stage > 0:
        prepare_single_process_env()
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, accumulation))
        if not torch.cuda.is_available():
            # accelerate finds no backend for DeepSpeed on the CPU and would count one process
            # per rank; naming gloo gives it the real world size.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        # Without a GPU, several processes need accelerate's MULTI_CPU (gloo) mode, which it
        # only picks with cpu=True; DeepSpeed on the CPU must not get it (it would drop the plugin).
        cpu=not torch.cuda.is_available() and plugin is None,
        mixed_precision="bf16" if cfg.memory.precision == "bf16_weights" else "no",
        gradient_accumulation_steps=accumulation,
        deepspeed_plugin=plugin,
        log_with="tensorboard" if trackers else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )
    return accelerator, accumulation


def build_for_training(cfg: Config, world: int = 1, device: torch.device | None = None):
    """(SETR with its loss, optimizer): the model built plain, then each technique applied in order:
    decoder rewrites, attention kernel, activation checkpointing, SyncBN, fp32 BatchNorm (bf16 weights),
    channels-last, compiled conv units."""
    model = build_setr(cfg)
    train_module = SegmentationLoss(model, cfg.loss)
    apply_decoder_rewrites(train_module, cfg.memory)
    apply_attention_kernel(model, cfg.memory.attention)
    apply_activation_checkpointing(train_module, cfg.memory)
    if world > 1 and cfg.train.sync_bn:
        if device is not None and device.type == "cuda":
            model = train_module.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            log.info("BatchNorm synchronised across %d processes", world)
        else:
            log.warning("train.sync_bn: SyncBatchNorm needs GPUs; BatchNorm statistics stay per process")
    if cfg.memory.precision == "bf16_weights":
        apply_fp32_batchnorm(model)
    if cfg.memory.channels_last:
        apply_channels_last(model)
    if cfg.memory.compile_convs:
        apply_compiled_convs(model)
    return train_module, build_optimizer(model, cfg.optim)


def setup_logging(run_dir: Path, main: bool) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if getattr(h, "_setr", False):
            log.removeHandler(h)
            h.close()
    if not main:
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    for h in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler()):
        h.setFormatter(fmt)
        h._setr = True
        log.addHandler(h)
    log.propagate = False


class _Signals:
    """SIGTERM/SIGINT ask the loop to save and stop at the end of the current iteration."""

    def __init__(self):
        self.stop = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this iteration", self.stop)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A loss of exactly zero that reaches every parameter (keeps DeepSpeed's bookkeeping in step)."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


def train(cfg: Config, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train per `cfg`; returns a summary (iteration, losses, skipped steps, peaks, mIoU)."""
    run_dir = cfg.run_dir
    # what to continue from is settled before anything is built: a wrong resume fails at once
    start = ckpt.find_resume(run_dir, resume)
    existing = ckpt.list_checkpoints(run_dir)
    if start is None and existing and resume != "auto":
        raise ckpt.CheckpointError(
            f"{run_dir} already holds checkpoints (newest {existing[-1].name}): continue it with --resume auto, "
            "or set train.out_dir to a new directory")
    if start is not None:
        ckpt.check_compatible(start, cfg)
    accelerator, accumulation = make_accelerator(cfg, run_dir)
    setup_logging(run_dir, accelerator.is_main_process)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        ckpt.clean_partial(run_dir)
    log.info("run %s: %d process(es) on %s, micro-batch %d x accumulation %d x %d = batch %d",
             run_dir, world, device, cfg.train.micro_batch, accumulation, world, cfg.train.total_batch)

    # the data first: a missing dataset fails before minutes of model building and weight download
    source = open_source(cfg.data, cfg.data.train_split)
    set_seed(cfg.train.seed)
    train_module, optimizer = build_for_training(cfg, world, device)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    train_module, optimizer = accelerator.prepare(train_module, optimizer)
    check_deepspeed(accelerator, optimizer, expected_optimizer_class(cfg.optim), cfg)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    if start is not None:
        accelerator.load_state(str(start))
        log.info("resumed from %s at iteration %d", start, state.iteration)
    accelerator.init_trackers("tb", config=_flat(config_to_dict(cfg)))

    loader = build_train_loader(cfg, state.iteration, rank, world, source)
    batches = iter(loader)
    autocast = autocast_factory(cfg.memory.precision, device)
    dtype = input_dtype(cfg.memory.precision)
    meter = MemoryMeter(device)
    meter.reset()
    unwrapped = accelerator.unwrap_model(train_module).model
    summary = {"start_iteration": state.iteration, "losses": [], "skipped": state.skipped}
    session_start, stop_at = state.iteration, cfg.schedule.iters
    if stop_after is not None:
        stop_at = min(stop_at, state.iteration + stop_after)
    progress = _progress(accelerator, cfg, state.iteration)
    t0, last_loss = time.time(), float("nan")

    with _Signals() as signals:
        while state.iteration < stop_at and signals.stop is None:
            it = state.iteration
            bad = False
            step_loss = torch.zeros((), device=device)
            try:
                # ---- one iteration: `accumulation` micro-batches, then one optimizer step ----
                for _ in range(accumulation):
                    images, labels = next(batches)
                    images = images.to(device, dtype, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    with accelerator.accumulate(train_module):
                        if bad and not deepspeed:
                            continue  # the rest of a skipped iteration: data consumed, nothing computed
                        with autocast():
                            loss, parts = train_module(images, labels)
                        finite = torch.isfinite(loss.detach()).float().reshape(1)
                        if accelerator.reduce(finite, reduction="sum").item() < world:
                            bad = True  # every process agrees, so collective ops stay matched
                            if deepspeed:  # DeepSpeed counts micro-steps: give it a zero gradient
                                accelerator.backward(_zero_loss(train_module))
                            continue
                        accelerator.backward(loss)
                        step_loss += loss.detach() / accumulation
                if bad:
                    state.skipped += 1
                    state.bad_streak += 1
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("iteration %d: non-finite loss, step skipped (%d skipped in all, %d in a row)",
                                it, state.skipped, state.bad_streak)
                    if state.bad_streak >= cfg.train.max_bad_steps:
                        raise NonFiniteLossError(
                            f"{state.bad_streak} consecutive non-finite losses at iteration {it}: stopping without "
                            "a checkpoint; lower optim.lr or resume from the last good checkpoint")
                else:
                    state.bad_streak = 0
                    if not deepspeed:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.iteration += 1
                meter.sample()
            except torch.OutOfMemoryError as err:
                peaks = meter.peaks()
                raise OutOfMemory(
                    f"CUDA out of memory at iteration {it} (peak {peaks.allocated:.1f} GiB allocated, "
                    f"{peaks.reserved:.1f} GiB reserved): lower train.micro_batch (accumulation keeps the batch), "
                    "set memory.checkpointing=full, memory.precision=bf16, optim.bits=8, or "
                    "memory.deepspeed.stage=2 with offload_optimizer; `python -m setr_lowmem.plan` picks a plan "
                    f"({str(err).splitlines()[0]})") from None

            # ---- log, validate, checkpoint ----
            if not bad:
                last_loss = accelerator.reduce(step_loss, reduction="mean").item()
                summary["losses"].append(last_loss)
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(scheduler.optimizer.param_groups)}
            progress(1, loss=last_loss, lr=min(lrs.values()), mem=meter.short())
            if state.iteration % cfg.train.log_every == 0 or state.iteration == stop_at:
                elapsed = time.time() - t0
                ips = (state.iteration - session_start) * cfg.train.total_batch / max(elapsed, 1e-9)
                log.info("iter %d/%d loss %.4f lr %s %.1f img/s skipped %d mem %s", state.iteration,
                         cfg.schedule.iters, last_loss, " ".join(f"{k}={v:.3g}" for k, v in lrs.items()), ips,
                         state.skipped, meter.short())
                accelerator.log({"loss": last_loss, "img_per_s": ips, "skipped": state.skipped,
                                 **{f"lr/{k}": v for k, v in lrs.items()},
                                 **{f"mem/{k}": v for k, v in meter.peaks().as_dict().items()}},
                                step=state.iteration)
            final = state.iteration == cfg.schedule.iters
            if (cfg.train.val_every and state.iteration % cfg.train.val_every == 0) or final:
                summary["val"] = _validate(accelerator, unwrapped, cfg, device, autocast, state.iteration)
            # a checkpoint is written only after a good step: never in the middle of a run of non-finite losses
            if not bad and ((cfg.train.ckpt_every and state.iteration % cfg.train.ckpt_every == 0) or final
                            or state.iteration == stop_at or signals.stop):
                ckpt.save_checkpoint(accelerator, run_dir, state.iteration, cfg,
                                     {"loss": last_loss, "data": stream_state(state.iteration, cfg.train.total_batch,
                                                                              cfg.train.seed, len(source))},
                                     cfg.train.keep_last)

    progress.close()
    if state.iteration == cfg.schedule.iters and accelerator.is_main_process:
        out = ckpt.export_fp32(ckpt.list_checkpoints(run_dir)[-1], run_dir / "model.safetensors")
        log.info("exported the fp32 model to %s", out)
    accelerator.wait_for_everyone()
    peaks = meter.peaks()
    log.info(fit_line(peaks, cuda=device.type == "cuda"))
    accelerator.end_training()
    summary.update(iteration=state.iteration, skipped=state.skipped, peaks=peaks.as_dict(),
                   stopped_by=signals.stop, run_dir=str(run_dir))
    return summary


def _validate(accelerator, model, cfg, device, autocast, iteration) -> dict:
    start = time.time()
    metrics = evaluate(model, cfg, device, max_images=cfg.train.val_max_images, rank=accelerator.process_index,
                       world=accelerator.num_processes,
                       reduce=lambda t: accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t,
                       autocast=autocast)
    log.info("iter %d val mIoU %.2f aAcc %.2f mAcc %.2f (%d images, %.1f s)", iteration, metrics["mIoU"],
             metrics["aAcc"], metrics["mAcc"], metrics["images"], time.time() - start)
    accelerator.log({"val/mIoU": metrics["mIoU"], "val/aAcc": metrics["aAcc"], "val/mAcc": metrics["mAcc"]},
                    step=iteration)
    return metrics


def _progress(accelerator, cfg: Config, start: int):
    """A tqdm bar (main process) with it/s, ETA, loss, lr and peak memory."""
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.schedule.iters, initial=start, disable=not accelerator.is_main_process,
               dynamic_ncols=True, desc=cfg.name, mininterval=1.0)

    def update(n: int, loss: float, lr: float, mem: str) -> None:
        bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} mem {mem}", refresh=False)
        bar.update(n)

    update.close = bar.close
    return update


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out

