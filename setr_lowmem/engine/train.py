"""The training loop: prepare the step, then iterate: step, log, validate, checkpoint.

    config -> build_setr -> SegmentationLoss -> apply_* techniques -> optimizer, schedule
    -> accelerate/DeepSpeed prepare (`engine.step`) -> per iteration: `accumulation`
    micro-batches of forward + loss + backward, one optimizer step, one lr step -> then, when
    due: log (train.log, metrics.jsonl, TensorBoard), validate, checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from safetensors import safe_open
from tqdm.contrib.logging import logging_redirect_tqdm

from setr_lowmem.config import Config, config_to_dict, dump_config, save_config
from setr_lowmem.data.base import check_some_labels
from setr_lowmem.data.loader import build_train_loader, stream_state
from setr_lowmem.data.sources import Source, open_source
from setr_lowmem.engine import checkpoint as ckpt
from setr_lowmem.engine.evaluate import evaluate
from setr_lowmem.engine.rundir import RunLock, writable_dir
from setr_lowmem.engine.schedule import reapply_hyperparameters
from setr_lowmem.engine.step import TrainingStep, make_accelerator, prepare_step, warn_single_process_launch
from setr_lowmem.errors import SetrError
from setr_lowmem.sizing.meters import MemoryMeter, fit_line

log = logging.getLogger("setr_lowmem")


class NonFiniteLossError(SetrError):
    """Too many consecutive non-finite losses."""


class OutOfMemory(SetrError):
    """A CUDA out-of-memory error, with the peak measured and what to change."""


class NonFiniteWeightsError(SetrError):
    """Weights that are not finite: no checkpoint or export is written from them."""


@dataclass
class TrainState:
    """What the loop needs beyond model/optimizer/schedule to continue exactly (checkpointed)."""

    iteration: int = 0
    skipped: int = 0
    bad_streak: int = 0

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "skipped": self.skipped, "bad_streak": self.bad_streak}

    def load_state_dict(self, sd: dict) -> None:
        self.iteration, self.skipped, self.bad_streak = sd["iteration"], sd["skipped"], sd["bad_streak"]


@dataclass
class Run:
    """One training session: the prepared step, its data, what is logged and summarised."""

    cfg: Config
    accelerator: Accelerator
    step: TrainingStep
    state: TrainState
    source: Source
    val_source: Source
    lock: RunLock | None
    batches: object  # iterator of (images, labels) micro-batches
    meter: MemoryMeter
    stop_at: int
    progress: object
    start: int = 0  # the iteration this session started from
    resumed_from: Path | None = None  # the checkpoint it started from: never pruned during the session
    started: float = field(default_factory=time.time)
    window: list[float] = field(default_factory=list)  # losses since the last log line
    window_parts: list[list[float]] = field(default_factory=list)  # and their per-head parts
    last_loss: float = float("nan")
    last_parts: list[float] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    val_error: str = ""  # the last validation's failure, if it failed
    data_wait: float = 0.0  # seconds the loop waited for batches since the last log line
    logged_at: float = field(default_factory=time.time)  # when the last log line was written
    logged_iteration: int = 0  # the iteration of the last log line (or the start)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def setup_logging(run_dir: Path, main: bool) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if getattr(h, "_setr", False):
            log.removeHandler(h)
            h.close()
    if not main:
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")  # runs last days
    run_dir.mkdir(parents=True, exist_ok=True)
    for h in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler()):
        h.setFormatter(fmt)
        h._setr = True
        log.addHandler(h)
    log.propagate = False


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C while the run was finishing its iteration: it stops at once, without a checkpoint.
    A KeyboardInterrupt, so that no `except Exception` on its way (an image reader, an export) takes
    it for a failure of its own; the launchers print its message in one line (exit 130)."""


class _Signals:
    """SIGTERM/SIGINT/SIGHUP ask the loop to save and stop at the end of the current iteration. A second
    Ctrl-C stops at once, except while a checkpoint is being written: that save finishes first (an
    interrupted save would cost every iteration since the previous checkpoint)."""

    def __init__(self):
        self.stop = None
        self.saving = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: the terminal closed
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.saving:
            log.warning("%s received while a checkpoint is being written: the save finishes, then the run stops", name)
            self.stop = self.stop or name
            return
        if self.stop is not None and signum == signal.SIGINT:
            raise Interrupted("stopped at once by a second Ctrl-C: the iteration in progress is not saved; "
                              "continue from the newest checkpoint with --resume auto")
        self.stop = name
        log.warning("%s received: saving a checkpoint at the end of this iteration", self.stop)

    @contextlib.contextmanager
    def deferred(self):
        """Signals that arrive within only ask for a stop: used around a checkpoint's save."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, resume: str | None = None, stop_after: int | None = None,
          allow_change: tuple[str, ...] = ()) -> dict:
    """Train per `cfg`; returns a summary (iteration, losses, skipped steps, peaks, mIoU). `allow_change`:
    keys that may differ from the resumed checkpoint's config (`checkpoint.CHANGEABLE`)."""
    run = open_run(cfg, resume, stop_after, allow_change)
    # log lines print above the progress bar, not glued to its end
    with _Signals() as signals, logging_redirect_tqdm(loggers=[log]), _ending(run):
        while run.state.iteration < run.stop_at and signals.stop is None:
            skipped = iterate(run)
            if not skipped:
                run.window.append(run.last_loss)
                run.window_parts.append(run.last_parts)
            run.progress(1, loss=run.last_loss, lr=min(_lrs(run).values()), mem=run.meter.short())
            log_if_due(run)
            # checkpoint first: a validation that fails must not take the training with it. A checkpoint
            # follows a good step (never inside a run of non-finite losses), and always ends the schedule.
            if checkpoint_due(run, signals.stop) and (not skipped or run.state.iteration == run.cfg.schedule.iters):
                with signals.deferred():
                    save(run)
            validate_if_due(run)
        return close_run(run, signals.stop)


@contextlib.contextmanager
def _ending(run: Run):
    """However the session ends: the progress bar ends its line (so an error prints on a line of its
    own), the DataLoader workers stop and the run directory's lock is released, even while a caller
    still holds the error and, through it, this run."""
    try:
        yield
    finally:
        run.progress.close()
        run.batches = iter(())  # the last reference to the loader's iterator: its workers end now
        if run.lock is not None:
            run.lock.release()


def open_run(cfg: Config, resume: str | None, stop_after: int | None, allow_change: tuple[str, ...] = ()) -> Run:
    """Settle what to resume from, then build everything a session needs, in an order that fails early:
    the resume point and the run directory first, both data splits before the model. A start that
    fails leaves no run directory behind that it created."""
    run_dir = cfg.run_dir
    accelerator = make_accelerator(cfg, run_dir, trackers=True)
    created = not run_dir.exists()
    lock = None
    if accelerator.is_main_process:
        writable_dir(run_dir, "train.out_dir")
        lock = RunLock(run_dir).acquire()  # before anything in the directory is read, written or cleaned
    try:
        return _open(cfg, accelerator, lock, resume, stop_after, allow_change)
    except BaseException:
        if lock is not None:
            lock.release()
            setup_logging(run_dir, False)  # closes train.log before its directory goes
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _open(cfg: Config, accelerator: Accelerator, lock: RunLock | None, resume: str | None, stop_after: int | None,
          allow_change: tuple[str, ...]) -> Run:
    run_dir = cfg.run_dir
    setup_logging(run_dir, accelerator.is_main_process)
    start = ckpt.find_resume(run_dir, resume)
    if start is None:
        _refuse_earlier_results(run_dir, resume)
    changes = [] if start is None else ckpt.check_compatible(start, cfg, allow_change)
    world = accelerator.num_processes
    log.info("run %s: %d process(es) on %s, micro-batch %d x accumulation %d x %d = batch %d", run_dir, world,
             accelerator.device, cfg.train.micro_batch, accelerator.gradient_accumulation_steps, world,
             cfg.train.total_batch)
    warn_single_process_launch()
    # the data first: a missing split fails before minutes of model building, downloads and training
    source = open_source(cfg.data, cfg.data.train_split)
    val_source = open_source(cfg.data, cfg.data.val_split)
    check_some_labels(source, cfg.data.num_classes)
    step = prepare_step(cfg, accelerator)
    state = TrainState()
    accelerator.register_for_checkpointing(step.scheduler, state)
    if start is not None:
        _resume(accelerator, start, cfg, state)
        if changes:
            reapply_hyperparameters(step.scheduler, cfg)
    accelerator.wait_for_everyone()  # every process has loaded `start` before the directory changes

    def first_writes() -> None:  # into the run directory (the main process's): every check has passed
        if start is not None:
            ckpt.set_aside_newer(run_dir, start)
        ckpt.clean_partial(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        if changes:
            _record_changes(run_dir, start, changes)

    failure = ckpt.on_every_process(accelerator, first_writes if accelerator.is_main_process else None)
    if failure:
        raise ckpt.CheckpointError(f"cannot prepare the run directory {run_dir}: {failure}")
    _init_trackers(accelerator, cfg)
    loader = build_train_loader(cfg, step.accumulation, state.iteration, accelerator.process_index, world, source)
    meter = MemoryMeter(accelerator.device)
    meter.reset()
    stop_at = cfg.schedule.iters if stop_after is None else min(cfg.schedule.iters, state.iteration + stop_after)
    return Run(cfg, accelerator, step, state, source, val_source, lock, iter(loader), meter, stop_at,
               _progress(accelerator, cfg, state.iteration), start=state.iteration, resumed_from=start,
               logged_iteration=state.iteration,
               summary={"start_iteration": state.iteration, "losses": [], "skipped": state.skipped})


# what an earlier run leaves in its directory; a run that starts from iteration 0 never writes over them
RESULTS = ("model.safetensors", "best_*.safetensors", "metrics.jsonl", "eval*.json", "config.yaml")


def _refuse_earlier_results(run_dir: Path, resume: str | None) -> None:
    """A run starting from iteration 0 may not write into the results of an earlier one. The one
    exception: `--resume auto` after a run that stopped before its first checkpoint (a requeued job)
    starts again there, adding to its metrics; an exported model is never written over."""
    found = [p.name for pattern in RESULTS for p in sorted(run_dir.glob(pattern))]
    root = ckpt.checkpoint_dir(run_dir)
    if root.is_dir() and any(root.iterdir()):
        found.insert(0, "checkpoints/")
    if resume == "auto" and "model.safetensors" not in found and "checkpoints/" not in found:
        return
    if found:
        newest = ckpt.list_checkpoints(run_dir)
        raise ckpt.CheckpointError(
            f"{run_dir} already holds the results of an earlier run ({', '.join(found)}"
            + (f"; newest checkpoint {newest[-1].name}" if newest else "") + "): "
            + ("continue it with --resume auto, or " if newest else "") + "set train.out_dir to a new directory")


def _record_changes(run_dir: Path, start: Path, changes: list[str]) -> None:
    """Log the deliberate changes of a resume (`--allow-change`) and add them to the run's history."""
    log.warning("resuming from %s with deliberate changes: %s", start, "; ".join(changes))
    with open(run_dir / "config_history.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": str(start),
                            "iteration": ckpt.iteration_of(start), "changes": changes}) + "\n")


def _resume(accelerator: Accelerator, start: Path, cfg: Config, state: TrainState) -> None:
    try:
        accelerator.load_state(str(start))
    except Exception as err:  # noqa: BLE001 - a checkpoint that passed its manifest but does not load
        raise ckpt.CheckpointError(f"cannot resume from {start}: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from None
    log.info("resumed from %s at iteration %d", start, state.iteration)
    saved = yaml.safe_load((start / "config.yaml").read_text())["train"]["micro_batch"]
    if saved != cfg.train.micro_batch:
        log.warning("train.micro_batch is %d, the checkpoint was trained with %d: the effective batch is kept "
                    "(accumulation %d), but BatchNorm now sees batches of %d, so its statistics change",
                    cfg.train.micro_batch, saved, accelerator.gradient_accumulation_steps,
                    cfg.train.micro_batch)


def _timed_batches(run: Run):
    """This iteration's micro-batches, adding the time spent waiting for each to `run.data_wait`."""
    for _ in range(run.step.accumulation):
        start = time.perf_counter()
        batch = next(run.batches)
        run.data_wait += time.perf_counter() - start
        yield batch


def iterate(run: Run) -> bool:
    """One iteration of the step on the next micro-batches; counts a skipped step. Returns whether it was skipped."""
    state, it = run.state, run.state.iteration
    micro_batches = _timed_batches(run)
    try:
        outcome = run.step.run(micro_batches)
    except torch.OutOfMemoryError as err:
        peaks = run.meter.peaks()
        raise OutOfMemory(
            f"CUDA out of memory at iteration {it + 1} (peak {peaks.allocated:.1f} GiB allocated, "
            f"{peaks.reserved:.1f} GiB reserved): lower train.micro_batch (accumulation keeps the batch), "
            "set memory.checkpointing=full, memory.precision=bf16, optim.bits=8, or "
            "memory.deepspeed.stage=2 with offload_optimizer; `setr-plan` picks a plan "
            f"({str(err).splitlines()[0]})") from None
    state.iteration += 1
    run.meter.sample()
    if outcome.skipped:
        state.skipped += 1
        state.bad_streak += 1
        log.warning("iteration %d: non-finite loss or gradients, step skipped (%d skipped in all, %d in a row)",
                    state.iteration, state.skipped, state.bad_streak)
        if state.bad_streak >= run.cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"{state.bad_streak} consecutive non-finite losses at iteration {state.iteration}: stopping without "
                f"a checkpoint; {_advice(run)}")
        return True
    state.bad_streak = 0
    # the loss and its parts in one reduction (one device sync per iteration, not two)
    both = run.accelerator.reduce(torch.cat([outcome.loss.reshape(1), outcome.parts]), reduction="mean").tolist()
    run.last_loss, run.last_parts = both[0], both[1:]
    run.summary["losses"].append(run.last_loss)
    return False


def _lrs(run: Run) -> dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.step.scheduler.optimizer.param_groups)}


def write_metrics(run: Run, record: dict) -> None:
    """Append one record to `metrics.jsonl` (main process): the run's figures as data."""
    if run.accelerator.is_main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def head_names(n: int) -> list[str]:
    """The per-head loss names, as mmsegmentation logs them: the main head, then each aux head."""
    return ["decode.loss_ce"] + [f"aux_{i}.loss_ce" for i in range(n - 1)]


def _duration(seconds: float) -> str:
    """'2d 03:04:05' (days when there are any): an ETA a multi-day run can read."""
    if seconds != seconds or seconds == float("inf"):
        return "-"
    days, rest = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


def log_if_due(run: Run) -> None:
    """Every `train.log_every` iterations and at the last one: the mean loss over the window since the
    last line and each head's part of it, lr per group, speed, seconds per iteration and the time
    left, memory, to train.log, metrics.jsonl and the trackers."""
    it = run.state.iteration
    if it % run.cfg.train.log_every and it != run.stop_at:
        return
    loss = sum(run.window) / len(run.window) if run.window else float("nan")
    parts = [sum(col) / len(col) for col in zip(*run.window_parts)] if run.window_parts else []
    losses = dict(zip(head_names(len(parts)), parts))
    run.window.clear()
    run.window_parts.clear()
    lrs = _lrs(run)
    now = time.time()
    ips = (it - run.start) * run.cfg.train.total_batch / max(now - run.started, 1e-9)
    per_it = (now - run.logged_at) / max(it - run.logged_iteration, 1)  # validations and saves included
    eta = per_it * (run.cfg.schedule.iters - it)
    peaks = run.meter.measured()  # without a GPU: host memory only, never a GPU figure of 0
    waited = run.data_wait / max(now - run.logged_at, 1e-9)  # the share of the window spent waiting for data
    run.data_wait, run.logged_at, run.logged_iteration = 0.0, now, it
    log.info("iter %d/%d loss %.4f (%s) lr %s %.1f img/s %.3g s/it eta %s skipped %d mem %s data wait %.0f%%", it,
             run.cfg.schedule.iters, loss, " ".join(f"{k.removesuffix('.loss_ce')} {v:.4f}" for k, v in losses.items()),
             " ".join(f"{k}={v:.3g}" for k, v in lrs.items()), ips, per_it, _duration(eta), run.state.skipped,
             run.meter.short(), 100 * waited)
    write_metrics(run, {"iteration": it, "loss": loss, "losses": losses, "lr": lrs, "img_s": ips,
                        "s_per_it": round(per_it, 4), "eta_s": round(eta), "skipped": run.state.skipped,
                        "mem": peaks, "data_wait": round(waited, 4), "time": round(now, 3)})
    run.accelerator.log({"loss": loss, **{f"loss/{k}": v for k, v in losses.items()}, "img_per_s": ips,
                         "skipped": run.state.skipped, **{f"lr/{k}": v for k, v in lrs.items()},
                         **{f"mem/{k}": v for k, v in peaks.items()}}, step=it)


def validation_due(run: Run) -> bool:
    it, every = run.state.iteration, run.cfg.train.val_every
    return bool((every and it % every == 0) or it == run.cfg.schedule.iters)


def validate_if_due(run: Run) -> None:
    """Validate when due, and keep the best model so far. A validation that fails (a corrupt image, a
    full disk) is reported, and the training goes on: its checkpoint is already written."""
    it = run.state.iteration
    if not validation_due(run):
        return
    try:
        run.summary["val"] = _validate(run)
        run.val_error = ""
    except (SetrError, OSError) as err:
        run.val_error = str(err).splitlines()[0] if str(err) else type(err).__name__
        run.summary.pop("val", None)
        log.error("iteration %d: validation failed, training goes on: %s", it, run.val_error)
        write_metrics(run, {"iteration": it, "val_error": run.val_error})
        return
    try:
        _keep_best(run, run.summary["val"])
    except (SetrError, OSError) as err:  # the validation stands; only its copy as the best model is missing
        log.error("iteration %d: the best model was not saved, training goes on: %s", it,
                  str(err).splitlines()[0] if str(err) else type(err).__name__)


def checkpoint_due(run: Run, signal_name: str | None) -> bool:
    """At `train.ckpt_every`, the end, a stop, a signal, and every validation when the best model is kept
    (it is exported from the checkpoint of its iteration)."""
    it, every = run.state.iteration, run.cfg.train.ckpt_every
    return bool((every and it % every == 0) or it == run.cfg.schedule.iters or it == run.stop_at or signal_name
                or (run.cfg.train.save_best != "none" and validation_due(run)))


def best_path(run_dir: Path, metric: str) -> Path:
    return Path(run_dir) / f"best_{metric}.safetensors"


def best_so_far(run_dir: Path, metric: str) -> tuple[float, int] | None:
    """(score, iteration) of the run's best model file, read from its metadata; None without one."""
    path = best_path(run_dir, metric)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return float(meta[metric]), int(meta["iteration"])
    except Exception as err:  # noqa: BLE001 - a damaged file: the next better validation writes a good one
        log.warning("%s cannot be read (%s: %s): taken as no best model yet", path, type(err).__name__,
                    (str(err).splitlines() or [""])[0])
        return None


def _keep_best(run: Run, metrics: dict) -> None:
    """Export the checkpoint of this iteration as best_<metric>.safetensors when its validation beats
    the best so far (read from that file, so a resumed run compares with what it already has)."""
    metric = run.cfg.train.save_best
    final = ckpt.checkpoint_dir(run.run_dir) / f"iter_{run.state.iteration:07d}"
    if metric == "none" or not run.accelerator.is_main_process or not final.is_dir():
        return
    best = best_so_far(run.run_dir, metric)
    if best is not None and not metrics[metric] > best[0]:
        return
    extra = {metric: repr(metrics[metric]), "iteration": str(run.state.iteration)}
    ckpt.export_fp32(final, best_path(run.run_dir, metric), overwrite=True, metadata=extra, verify=False)
    log.info("new best %s %.2f at iteration %d: %s", metric, metrics[metric], run.state.iteration,
             best_path(run.run_dir, metric).name)


def save(run: Run) -> None:
    """The checkpoint of this iteration, if the weights are usable on every process (finite, and not
    diverged: `checkpoint.weights_problem`); else the run stops without writing one."""
    accelerator, it = run.accelerator, run.state.iteration
    problem = ckpt.weights_problem(run.step.module)
    bad = torch.tensor([float(bool(problem))], device=accelerator.device)
    if accelerator.reduce(bad, reduction="sum").item() > 0:
        raise NonFiniteWeightsError(f"the weights {problem or 'of another process are not usable'} at iteration {it}: "
                                    f"no checkpoint written, nothing exported; {_advice(run)}")
    cfg = run.cfg
    data = stream_state(it, cfg.train.total_batch, cfg.train.seed, len(run.source))
    protect = (run.resumed_from,) if run.resumed_from is not None else ()
    ckpt.save_checkpoint(accelerator, run.run_dir, it, cfg, {"loss": run.last_loss, "data": data},
                         cfg.train.keep_last, protect=protect)


def _advice(run: Run) -> str:
    """What to do after the training diverged: a lower lr, from the start or from the newest checkpoint
    (every checkpoint holds usable weights: `save` refuses others)."""
    newest = ckpt.list_checkpoints(run.run_dir)
    lower = f"optim.lr={run.cfg.optim.lr / 10:g}"
    if not newest:
        return f"lower optim.lr (e.g. {lower}) and start again in a new train.out_dir"
    return (f"lower optim.lr and continue from the newest checkpoint: --resume {newest[-1]} --allow-change optim.lr "
            f"{lower} (or start again in a new train.out_dir)")


def close_run(run: Run, stopped_by: str | None) -> dict:
    """Export the final model when the schedule is done, report the memory peaks, end the trackers."""
    if run.state.iteration == run.cfg.schedule.iters and run.accelerator.is_main_process:
        final = ckpt.checkpoint_dir(run.run_dir) / f"iter_{run.state.iteration:07d}"  # written by the loop
        # this run's own file; the checkpoint was written moments ago from its manifest: not hashed again
        out = ckpt.export_fp32(final, run.run_dir / "model.safetensors", overwrite=True, verify=False)
        log.info("exported the fp32 model to %s", out)
    run.accelerator.wait_for_everyone()
    peaks = run.meter.peaks()
    log.info(fit_line(peaks, cuda=run.accelerator.device.type == "cuda"))
    run.accelerator.end_training()
    run.summary.update(iteration=run.state.iteration, skipped=run.state.skipped, peaks=peaks.as_dict(),
                       stopped_by=stopped_by, run_dir=str(run.run_dir), val_error=run.val_error,
                       main_process=run.accelerator.is_main_process)
    metric = run.cfg.train.save_best
    if run.accelerator.is_main_process:  # the run directory is the main process's
        best = best_so_far(run.run_dir, metric) if metric != "none" else None
        if best is not None:
            run.summary["best"] = {"metric": metric, "score": best[0], "iteration": best[1],
                                   "path": str(best_path(run.run_dir, metric))}
        run.summary["final_line"] = final_line(run.summary)
        if run.summary["final_line"]:
            _to_log_file(run.summary["final_line"])
    return run.summary


def final_line(summary: dict) -> str:
    """'final: iteration 600, mIoU 57.32, ...; best mIoU 57.32 at iteration 600 (...); model in ...': the
    run's last word, printed and written to train.log ('' when it did not validate at its end)."""
    val = summary.get("val")
    if val is None:
        return ""
    best = summary.get("best")
    kept = f"; best {best['metric']} {best['score']:.2f} at iteration {best['iteration']} ({best['path']})" if best else ""
    return (f"final: iteration {summary['iteration']}, mIoU {val['mIoU']:.2f}, aAcc {val['aAcc']:.2f}, "
            f"mAcc {val['mAcc']:.2f} on {val['images']} validation images{kept}; model in {summary['run_dir']}")


def _to_log_file(line: str) -> None:
    """`line` into train.log only (the console gets it from the command, on stdout)."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, (), None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _validate(run: Run) -> dict:
    accelerator, it = run.accelerator, run.state.iteration
    start = time.time()
    model = accelerator.unwrap_model(run.step.module).model
    metrics = evaluate(model, run.cfg, accelerator.device, source=run.val_source,
                       max_images=run.cfg.train.val_max_images,
                       rank=accelerator.process_index, world=accelerator.num_processes,
                       reduce=lambda t: accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t,
                       autocast=run.step.autocast, progress=accelerator.is_main_process)
    log.info("iter %d val mIoU %.2f aAcc %.2f mAcc %.2f (%d images, %.1f s)", it, metrics["mIoU"],
             metrics["aAcc"], metrics["mAcc"], metrics["images"], time.time() - start)
    scores = {k: metrics[k] for k in ("mIoU", "aAcc", "mAcc")}
    write_metrics(run, {"iteration": it, "val": {**scores, "images": metrics["images"]}})
    accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=it)
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


def _init_trackers(accelerator: Accelerator, cfg: Config) -> None:
    """Start the trackers of `train.log_with` under the run directory's name, each holding the run's
    config. TensorBoard gets it as text: its hyperparameter record (accelerate's default) writes two
    timestamped folders that TensorBoard lists as extra runs beside the real one."""
    accelerator.init_trackers(cfg.run_dir.name)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_text("config", "```yaml\n" + dump_config(cfg) + "```")
            tracker.writer.flush()
        else:
            tracker.store_init_configuration(_flat(config_to_dict(cfg)))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
