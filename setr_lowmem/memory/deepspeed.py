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
