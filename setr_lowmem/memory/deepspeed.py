"""DeepSpeed ZeRO through accelerate's plugin, configured from `memory.deepspeed`.

ZeRO partitions optimizer states (stage 1), gradients (2) and parameters (3) across
processes, and can keep the optimizer states and step (and in stage 3 the parameters) in
CPU memory: on one GPU, offloading the optimizer frees its states and fp32 master weights
from the card.

Two of accelerate's defaults would silently change the run, so the config here turns them
off and `check_deepspeed` verifies the result after `prepare`:
- with optimizer offload, accelerate replaces the client optimizer (torch SGD, 8-bit
  bitsandbytes) by DeepSpeedCPUAdam, copying only lr and weight decay, unless
  `zero_force_ds_cpu_optimizer` is false; a non-DeepSpeed optimizer also needs
  `zero_allow_untested_optimizer`;
- `accelerate launch --cpu` drops a DeepSpeed plugin without a word.
A third one is DeepSpeed's own: its config defaults `gradient_clipping` to 1.0 (found here:
a ZeRO-2 step came out 5x smaller than the plain one), so it is set to 0 (no clipping, as in
the paper).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import torch

from setr_lowmem.compat import extension_loader_waits_on_lock_files
from setr_lowmem.config import Config
from setr_lowmem.errors import SetrError
from setr_lowmem.memory.optim import STEP_BYTES
from setr_lowmem.memory.registry import Accounting, Lever, PlanChoice, StepCost, Technique
from setr_lowmem.sizing.meters import GIB

log = logging.getLogger(__name__)

# "auto" bucket sizes need `model.config.hidden_size`, which a plain nn.Module lacks.
BUCKET = 50_000_000


class DeepSpeedSetupError(SetrError, RuntimeError):
    """DeepSpeed asked for but not in effect, or not with the configured optimizer."""


def deepspeed_config(cfg: Config, accumulation: int) -> dict:
    ds = cfg.memory.deepspeed
    pin = torch.cuda.is_available()
    zero: dict = {"stage": ds.stage, "contiguous_gradients": True, "overlap_comm": False,
                  "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.stage == 3:
        zero.update({"stage3_prefetch_bucket_size": BUCKET, "stage3_param_persistence_threshold": 100_000,
                     "stage3_gather_16bit_weights_on_model_save": False})
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.train.total_batch,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.memory.precision == "bf16_weights"},
        "fp16": {"enabled": False},
        # DeepSpeed >= 0.18 clips gradients to norm 1.0 unless told otherwise; the paper does not clip.
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def prepare_single_process_env() -> None:
    """DeepSpeed without a launcher needs the rendezvous variables, and on a CPU-only machine
    its CPU accelerator (else it looks for mpi4py)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                           ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)


def extension_build_root() -> Path:
    """The folder under which PyTorch JIT-builds C++ extensions such as DeepSpeed's ops, computed as
    `torch.utils.cpp_extension` does: `TORCH_EXTENSIONS_DIR`, else the cache's `torch_extensions/
    py<version>_<cu<version> | rocm<version> | cpu>` (the same in torch 2.11 and 2.14)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def _holders(path: Path) -> list[int] | None:
    """The processes (other than this one) that hold `path` open, from /proc; None without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target, pids = os.path.realpath(path), []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:  # the process ended, or is another user's
            continue
    return pids


def clear_stale_build_locks(root: Path | None = None) -> list[Path]:
    """Remove the extension-build lock files that no live process holds; returns those removed.

    PyTorch's JIT build of an extension (DeepSpeed's shared-memory communication op, about 30 s on a
    first run) holds `<build root>/<extension>/lock` while it builds. Before torch 2.14 any process
    that finds the file waits until it disappears (`torch.utils.file_baton`), so a build killed
    midway leaves a file that makes every later run wait for ever without a word; torch 2.14 takes
    an OS lock on the file instead and leaves it behind after every build (pytorch/pytorch#189245),
    which a torch 2.11 run sharing the folder then waits on. A lock that no process holds open is
    such a leftover: removing it lets the next build (or load of the built library) go on. Without
    /proc (not Linux) a holder cannot be told from a leftover: on a torch that waits on the file,
    stop with one line naming it."""
    root = extension_build_root() if root is None else root
    removed = []
    for lock in sorted(root.glob("*/lock")):
        holders = _holders(lock)
        if holders:
            log.info("%s: a build by process %s is in progress; DeepSpeed waits for it", lock,
                     ", ".join(map(str, holders)))
            continue
        if holders is None:
            if extension_loader_waits_on_lock_files():
                raise DeepSpeedSetupError(f"{lock} exists and this system cannot tell whether a build holds "
                                          "it: remove the file if no other run is building DeepSpeed's ops")
            continue
        built = any(lock.parent.glob("*.so"))
        try:
            lock.unlink()
        except FileNotFoundError:  # the build that held it ended meanwhile
            continue
        removed.append(lock)
        level = logging.WARNING if extension_loader_waits_on_lock_files() else logging.DEBUG
        log.log(level, "removed %s, left by an extension build that was killed (%s); torch before 2.14 "
                "would wait for it for ever", lock, "the library is built" if built else "it is built again")
    return removed


def base_optimizer(prepared) -> torch.optim.Optimizer:
    """Unwrap accelerate's and DeepSpeed's optimizer wrappers down to the one that steps."""
    opt = prepared
    for _ in range(4):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    return opt


def check_deepspeed(accelerator, prepared_optimizer, expected: type, cfg: Config) -> str:
    """Fail loudly if DeepSpeed was asked for and is not active, or steps another optimizer."""
    from accelerate.utils import DistributedType

    wanted = cfg.memory.deepspeed.stage > 0
    active = accelerator.distributed_type == DistributedType.DEEPSPEED
    if wanted and not active:
        raise DeepSpeedSetupError(
            f"memory.deepspeed.stage is {cfg.memory.deepspeed.stage} but DeepSpeed is not active "
            f"(accelerate chose {accelerator.distributed_type}); `accelerate launch --cpu` drops the DeepSpeed "
            "plugin: launch without --cpu, or with plain `python launch/train.py`")
    if active and not wanted:
        raise DeepSpeedSetupError("DeepSpeed is active (an accelerate config or --use_deepspeed) but "
                                  "memory.deepspeed.stage is 0; set the stage in the config instead")
    used = base_optimizer(prepared_optimizer)
    if not isinstance(used, expected):
        raise DeepSpeedSetupError(f"the optimizer in use is {type(used).__name__}, not the configured "
                                  f"{expected.__name__} (optim.name={cfg.optim.name}, optim.bits={cfg.optim.bits})")
    if active:
        ds = cfg.memory.deepspeed
        where = "CPU (offloaded)" if ds.offload_optimizer else str(accelerator.device)
        msg = (f"DeepSpeed ZeRO-{ds.stage} active: optimizer {type(used).__name__} states on the {where}"
               + (", parameters offloaded to the CPU" if ds.offload_params else "")
               + (", bf16 weights with fp32 master copies" if cfg.memory.precision == "bf16_weights" else ""))
    else:
        msg = f"optimizer {type(used).__name__} in use (no DeepSpeed)"
    log.info(msg)
    return msg


# ---- the registry's entry: what the forecast accounts, what the planner may choose ------------

def zero2_buffers(sizes: list[int], offload: bool, width: int) -> dict[str, float]:
    """GiB that ZeRO-2 with contiguous gradients keeps on one GPU for parameters of `sizes` values
    in `width`-byte weights: a reduction bucket of `BUCKET` values ('bucket'), then either a buffer
    the size of the largest parameter on the way to the host (optimizer offload) or a flat partition
    of every gradient ('gradients'), and without offload a float32 master copy of fp32 weights
    ('masters'; bf16 weights count theirs already). Not counted: the flat gradient copy that the
    step makes without offload. Checked against a real engine by `tests/zero2_buffers.py`."""
    return {"bucket": BUCKET * width / GIB,
            "gradients": (max(sizes) if offload else sum(sizes)) * width / GIB,
            "masters": 0.0 if offload or width == 2 else sum(sizes) * 4 / GIB}


def _simulate(cfg: Config, cuda: bool) -> tuple[dict, str]:
    """The fake step runs without DeepSpeed; what ZeRO moves or adds is accounted."""
    ds = cfg.memory.deepspeed
    buckets = {0: "", 1: "; its gradient bucket and flat partitions not accounted (predicted low)",
               2: "; its gradient bucket and buffers from DeepSpeed's sizes",
               3: "; its prefetch and gradient buckets not accounted (predicted low)"}[ds.stage]
    host = " (optimizer states on the host)" if ds.offload_optimizer else ""
    note = f"ZeRO-{ds.stage}: accounted{host}{buckets}" if ds.stage else ""
    return {"memory.deepspeed.stage": 0, "memory.deepspeed.offload_optimizer": False,
            "memory.deepspeed.offload_params": False}, note


def _account_offloaded_states(cfg: Config, sizes: list[int], categories: dict[str, float],
                              computed: dict[str, float]) -> float:
    """Optimizer offload: the states (and the step) live on the host."""
    ds = cfg.memory.deepspeed
    if not (ds.stage and ds.offload_optimizer):
        return 0.0
    delta = -categories.get("optimizer", 0.0)
    categories["optimizer"] = 0.0
    return delta


def _account_offloaded_params(cfg: Config, sizes: list[int], categories: dict[str, float],
                              computed: dict[str, float]) -> float:
    """ZeRO-3 parameter offload: the GPU holds only the layers in use (prefetch buckets: not counted)."""
    ds = cfg.memory.deepspeed
    if not (ds.stage == 3 and ds.offload_params):
        return 0.0
    delta = -(categories.get("params", 0.0) + categories.get("grads", 0.0))
    categories["params"] = categories["grads"] = 0.0
    return delta


def _account_zero2_buffers(cfg: Config, sizes: list[int], categories: dict[str, float],
                           computed: dict[str, float]) -> float:
    """DeepSpeed's stage-2 optimizer (zero/stage_1_and_2.py) as `deepspeed_config` configures it: the
    bucket lives from a backward's first gradient to its end; the flat partition from the first
    full bucket (or the end of a backward, for a model smaller than one) to the step."""
    ds = cfg.memory.deepspeed
    if ds.stage != 2:
        return 0.0
    buffers = zero2_buffers(sizes, ds.offload_optimizer, 2 if cfg.memory.precision == "bf16_weights" else 4)
    computed_values = computed.get("grads", 0.0) * GIB / 4  # gradient values at the fake step's peak (float32)
    grads = (buffers["bucket"] if computed_values > 0 else 0.0) + (
        buffers["gradients"] if ds.offload_optimizer or computed_values >= min(BUCKET, sum(sizes)) else 0.0)
    delta = grads - categories.get("grads", 0.0) + buffers["masters"]
    categories["grads"] = grads
    categories["optimizer"] = categories.get("optimizer", 0.0) + buffers["masters"]
    return delta


def _speed(cfg: Config, sizes: list[int], accumulation: int) -> StepCost | None:
    """Optimizer offload: gradients cross PCIe after every micro-batch and the weights come back after
    the step, which the host runs over float32 masters; the GPU runs no optimizer kernel."""
    ds = cfg.memory.deepspeed
    if not (ds.stage and ds.offload_optimizer):
        return None
    width = 2 if cfg.memory.precision == "bf16_weights" else 4
    return StepCost(optimizer=[], link_bytes=sum(sizes) * width * (accumulation + 1),
                    host_bytes=sum(sizes) * STEP_BYTES[(cfg.optim.name, 32)])


def _without_8bit(chosen: dict) -> bool:
    """Offloaded states live on the host: 8-bit states buy no GPU memory there."""
    return not (chosen.get("memory.deepspeed.offload_optimizer") and chosen.get("optim.bits") == 8)


# DeepSpeed takes effect in accelerate's prepare (the plugin from `engine.step.make_accelerator`).
# The forecast's accountings run around the bf16 weights' (order 30): the offloads before it (where
# the masters live), ZeRO-2's buffers after (as wide as the weights).
TECHNIQUES = [Technique(
    "DeepSpeed ZeRO", keys=("memory.deepspeed.stage", "memory.deepspeed.offload_optimizer",
                            "memory.deepspeed.offload_params"),
    order=56, takes_effect="accelerate's prepare (make_accelerator)", simulate=_simulate,
    accounting=(Accounting(20, _account_offloaded_states), Accounting(25, _account_offloaded_params),
                Accounting(40, _account_zero2_buffers)),
    speed=_speed,
    levers=(Lever(12, "ZeRO-2 offload", {"memory.deepspeed.stage": 2, "memory.deepspeed.offload_optimizer": True}),
            Lever(13, "ZeRO-3 offload", {"memory.deepspeed.stage": 3, "memory.deepspeed.offload_params": True})),
    plan=PlanChoice(3, ({}, {"memory.deepspeed.stage": 2, "memory.deepspeed.offload_optimizer": True}),
                    label=lambda cfg: "ZeRO-2 offload" if cfg.memory.deepspeed.stage and
                    cfg.memory.deepspeed.offload_optimizer else "", gpu_only=(1,), allowed=_without_8bit),
)]
