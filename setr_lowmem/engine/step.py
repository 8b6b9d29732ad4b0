"""One training step, the same for training, the planner and the benchmarks.

    make_accelerator(cfg) -> prepare_step(cfg, accelerator) -> TrainingStep
    step.run(micro_batches): for each micro-batch, forward + loss + backward under
    accelerate's accumulation; then one optimizer step (or the skip of a non-finite one)
    and one lr step.

`build_for_training` is where the memory techniques meet the plain model, each applied by its
entry in `memory.registry`, in their order; `prepare_step` hands the result to accelerate (and DeepSpeed, when a ZeRO
stage is configured) exactly as training does, so that what the planner measures is what
training will run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, ProjectConfiguration,
                               set_seed)

from setr_lowmem.compat import BatchNormBase, reset_accelerate_state
from setr_lowmem.config import Config, ConfigError
from setr_lowmem.engine.schedule import build_scheduler
from setr_lowmem.memory.deepspeed import (check_deepspeed, clear_stale_build_locks, deepspeed_config,
                                          prepare_single_process_env)
from setr_lowmem.memory.optim import build_optimizer, expected_optimizer_class
from setr_lowmem.memory.precision import autocast_factory, input_dtype
from setr_lowmem.memory.registry import techniques
from setr_lowmem.model import build_setr
from setr_lowmem.model.loss import SegmentationLoss

log = logging.getLogger("setr_lowmem")


def make_accelerator(cfg: Config, run_dir: Path | None = None, trackers: bool = False) -> Accelerator:
    """The Accelerator for `cfg`: a DeepSpeed plugin when a ZeRO stage is set, the accumulation of
    `cfg.train`, the trackers of `train.log_with` when `trackers`.

    The one place the accumulation is derived: DeepSpeed's config and accelerate both need it before
    the accelerator exists, so it is computed from the launcher's `WORLD_SIZE` and checked against
    the processes accelerate then counts. Everything after reads `gradient_accumulation_steps`
    (`TrainingStep.accumulation`, the data stream, the log lines)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        accumulation = cfg.train.accumulation(world)
    except ValueError as err:
        raise ConfigError(f"train.{err}") from None
    plugin, handlers = None, []
    if cfg.memory.deepspeed.stage > 0:
        prepare_single_process_env()
        clear_stale_build_locks()  # a killed build's lock would make torch < 2.14 wait for ever
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, accumulation))
        if not torch.cuda.is_available():
            # accelerate finds no backend for DeepSpeed on the CPU and would count one process
            # per rank; naming gloo gives it the real world size.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # trackers log under <run_dir>.parent / <run_dir>.name: TensorBoard's events in the run directory
    project = None if run_dir is None else ProjectConfiguration(project_dir=str(run_dir),
                                                                 logging_dir=str(Path(run_dir).parent))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        # Without a GPU, several processes need accelerate's MULTI_CPU (gloo) mode, which it
        # only picks with cpu=True; DeepSpeed on the CPU must not get it (it would drop the plugin).
        cpu=not torch.cuda.is_available() and plugin is None,
        mixed_precision="bf16" if cfg.memory.precision == "bf16_weights" else "no",
        gradient_accumulation_steps=accumulation,
        deepspeed_plugin=plugin,
        log_with=tracker(cfg) if trackers else None,
        project_config=project,
    )
    if accelerator.num_processes != world:
        raise ConfigError(f"accelerate runs {accelerator.num_processes} process(es) but WORLD_SIZE is {world}: "
                          f"the accumulation ({accumulation}) would not keep train.total_batch; start the run with "
                          "`accelerate launch` or `torchrun`, which set WORLD_SIZE")
    return accelerator


def warn_single_process_launch() -> None:
    """`accelerate launch --cpu --num_processes 2` starts one process (its simple launcher, which
    only sets MASTER_ADDR for the count it ignores): say so, and how to get real processes."""
    env = os.environ
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env \
            and not any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        log.warning("accelerate launch --cpu --num_processes N runs ONE process (accelerate's behaviour): "
                    "this run is single-process; for N processes on a CPU use "
                    "`accelerate launch --multi_gpu --num_processes N` (without --cpu)")


def tracker(cfg: Config) -> str | None:
    """`train.log_with` for accelerate; a tracker that is not installed is an error here, where
    accelerate would drop it without a word."""
    name = cfg.train.log_with
    if name == "none":
        return None
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    if name in available and not available[name]():
        raise ConfigError(f"train.log_with is {name} but {name} is not installed: pip install {name} "
                          "(or set train.log_with=none)")
    return name


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next Accelerator takes its own settings
    (the planner measures several configurations in one process, then training starts)."""
    reset_accelerate_state()


def build_for_training(cfg: Config, world: int = 1, device: torch.device | None = None):
    """(SETR with its loss, optimizer): the model built plain, then each technique's `apply` in the
    registry's order (`python -m setr_lowmem.memory.registry` lists it; each entry says why it sits
    where it does):

    - the decoder's rewrites first: they choose which ops exist (classifier order, fused loss);
    - the attention kernel before checkpointing, so recomputation replays the same kernel;
    - activation checkpointing before SyncBN and the BatchNorm precision: both replace modules
      or their forward, and must act on the modules inside the checkpoint wrappers;
    - channels-last and compiled conv units last: they act on the final modules' weights and code.

    8-bit optimizer states take effect in `build_optimizer`, DeepSpeed in `prepare_step`.
    """
    train_module = SegmentationLoss(build_setr(cfg), cfg.loss)
    for technique in techniques():
        if technique.apply is not None:
            technique.apply(train_module, cfg, world, device)
    return train_module, build_optimizer(train_module.model, cfg.optim)


@dataclass
class Outcome:
    """What one step did: the mean loss over its micro-batches (a device tensor) and each head's part
    of it (main head first, then the aux heads: weighted as in the total), or a skip."""

    loss: torch.Tensor
    skipped: bool
    parts: torch.Tensor | None = None


def _zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """A loss of exactly zero that reaches every parameter (keeps DeepSpeed's bookkeeping in step)."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


@dataclass
class TrainingStep:
    """A model with its techniques, prepared by accelerate, and the step that trains it."""

    accelerator: Accelerator
    module: torch.nn.Module  # the prepared SegmentationLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accumulation: int
    autocast: Callable
    dtype: torch.dtype
    statistics: list[torch.Tensor] = field(default_factory=list)  # BatchNorm's running statistics (`run`)

    def __post_init__(self) -> None:
        self.statistics = _batchnorm_statistics(self.module)  # found once: a skipped step puts them back

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, skipping: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forward, loss and backward of one micro-batch under accelerate's accumulation. Returns the
        detached loss and its per-head parts, or None when it is not finite on some process (every
        process agrees, so their collective ops stay matched). `skipping`: the step is already lost,
        the micro-batch only keeps the data position (and DeepSpeed's micro-step count) in step."""
        images = images.to(self.device, self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.accelerator.accumulate(self.module):
            if skipping and not self.deepspeed:
                return None  # nothing computed
            with self.autocast():
                loss, parts = self.module(images, labels)
            finite = torch.isfinite(loss.detach()).float().reshape(1)
            if self.accelerator.reduce(finite, reduction="sum").item() < self.accelerator.num_processes:
                if self.deepspeed:  # DeepSpeed counts micro-steps: give it a zero gradient
                    self.accelerator.backward(_zero_loss(self.module))
                return None
            self.accelerator.backward(loss)
            return loss.detach(), parts.float()

    def forward_backward(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         after_backward: Callable[[], None] | None = None) -> Outcome:
        """Every micro-batch of one iteration through `micro_step`; after a non-finite loss the rest
        only keep the data position. `after_backward` runs after each (the meters' sampling point)."""
        total, parts = torch.zeros((), device=self.device), None
        skipped = False
        for images, labels in micro_batches:
            done = self.micro_step(images, labels, skipping=skipped)
            if done is None:
                skipped = True
            else:
                total += done[0] / self.accumulation
                parts = done[1] / self.accumulation + (0 if parts is None else parts)
            if after_backward is not None:
                after_backward()
        return Outcome(total, skipped, parts)

    def gradients_finite(self) -> bool:
        """Whether every gradient is finite on every process (a finite loss can still overflow in backward)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        # one fused norm over every gradient: finite exactly when all of them are (one device sync)
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        flag = torch.isfinite(norm).float().reshape(1).to(self.device)
        return self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes

    def finish(self, skipped: bool) -> bool:
        """The optimizer step (DeepSpeed steps inside its backward), or dropping the gradients of a
        skipped step or of one whose gradients are not finite; then the lr step, which advances
        either way. Returns whether the step was skipped."""
        if not self.deepspeed and not skipped:
            skipped = not self.gradients_finite()
            if not skipped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return skipped

    def run(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            after_backward: Callable[[], None] | None = None) -> Outcome:
        """One iteration: `forward_backward` over `accumulation` micro-batches, then `finish`. A skipped
        iteration leaves the model as it found it: BatchNorm's running statistics, which its forward
        passes moved, are put back too."""
        saved = [b.clone() for b in self.statistics]
        outcome = self.forward_backward(micro_batches, after_backward)
        outcome.skipped = self.finish(outcome.skipped)
        if outcome.skipped:
            with torch.no_grad():
                for b, old in zip(self.statistics, saved, strict=True):
                    b.copy_(old)
        return outcome


def _batchnorm_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running statistics (mean, variance, batch count) of every BatchNorm in `module`."""
    return [b for m in module.modules() if isinstance(m, BatchNormBase)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def prepare_step(cfg: Config, accelerator: Accelerator) -> TrainingStep:
    """Build the model with `cfg`'s techniques (seeded by `train.seed`), its optimizer and lr
    schedule, and hand them to accelerate (and DeepSpeed); checks that DeepSpeed is in effect and
    steps the configured optimizer."""
    set_seed(cfg.train.seed)
    module, optimizer = build_for_training(cfg, accelerator.num_processes, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    module, optimizer = accelerator.prepare(module, optimizer)
    check_deepspeed(accelerator, optimizer, expected_optimizer_class(cfg.optim), cfg)
    return TrainingStep(accelerator, module, optimizer, scheduler, accelerator.gradient_accumulation_steps,
                        autocast_factory(cfg.memory.precision, accelerator.device),
                        input_dtype(cfg.memory.precision))
