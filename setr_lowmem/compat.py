"""Every private PyTorch and accelerate API this project uses, behind one door.

A private name (a leading underscore, or a module under a `_` folder) may change in any release
without notice, and this project runs on two torches: 2.14.1 on the CPU machines and CI, 2.11.0
on the GPU machine. So the package imports each one from here, and `APIS` says per use what it
needs, the first release that has it in the form used here, and what happens on a release
without it. Most have a fallback; the ones that have none raise `PrivateApiMissing` when they are
used (never when this module is imported), so a training run never stops on an API that only the
forecast or the profiler needs, and the one that does stops with one line naming the API.

    python -m setr_lowmem.compat        # the table for the installed torch and accelerate

`tests/test_torch_versions.py` checks that every entry resolves on the installed versions and that
no other file reaches a private API directly; `tools/rehearse_gpu_image.sh` runs the tests that use
them under the GPU machine's torch 2.11. Only 2.11.0 and 2.14.1 are tested; the "since" releases
are from PyTorch's history, for whoever moves to another.

Not wrapped, on purpose: `nn.Module._parameters` / `_buffers` (the forecast swaps parameters for
fake ones in place; `torch.nn.utils.parametrize` and `torch.func` do the same) and ATen operators
whose names start with `_` (`torch.ops.aten._scaled_dot_product_*`): they are the operator
registry's public names.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from setr_lowmem.errors import SetrError


class PrivateApiMissing(SetrError):
    """A private API that the installed torch or accelerate lacks, which this use cannot do without."""


@dataclass(frozen=True)
class PrivateApi:
    path: str  # "module:attribute", importable
    since: str  # the first release with it in the form used here
    need: str  # what this project uses it for
    without: str  # what happens on a release without it
    required: bool = True  # False: a probe of how this torch behaves, absent from some supported releases

    def resolve(self) -> Any:
        module, _, attrs = self.path.partition(":")
        obj = importlib.import_module(module)
        for name in filter(None, attrs.split(".")):
            obj = getattr(obj, name)
        return obj

    def present(self) -> bool:
        try:
            self.resolve()
        except (ImportError, AttributeError):
            return False
        return True

    def missing(self) -> PrivateApiMissing:
        have = f"torch {torch.__version__}"
        if self.path.startswith("accelerate"):
            have = f"accelerate {importlib.import_module('accelerate').__version__}"
        return PrivateApiMissing(f"{have} has no {self.path.replace(':', '.')} ({self.since} has it), "
                                 f"needed for {self.need}: {self.without}")


_MT = "torch.distributed._tools.mem_tracker"
_CW = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"
APIS: dict[str, PrivateApi] = {api.path: api for api in [
    PrivateApi("torch._subclasses.fake_tensor:FakeTensorMode", "torch 2.0",
               "the memory forecast: training's step run on fake tensors",
               "the forecast and the planner's --predict stop with this error; training is unaffected"),
    PrivateApi("torch._subclasses.fake_tensor:FakeTensor", "torch 2.0",
               "the fused loss knows a forecast's fake tensor (its fake kernels stand for Triton's)",
               "no tensor is taken for fake: the fused loss picks its backend as on real tensors"),
    PrivateApi("torch.utils._python_dispatch:TorchDispatchMode", "torch 1.13",
               "gpu_overheads.OpTransients: each operator's transient memory on a GPU",
               "the hidden stage's transients stop with this error; training is unaffected"),
    PrivateApi("torch.utils._pytree:tree_map", "torch 1.13",
               "cuda_rules: casting an operator's tensor arguments", "a small map over tuples, lists and dicts"),
    PrivateApi("torch.utils._pytree:tree_leaves", "torch 2.0",
               "gpu_overheads.OpTransients: an operator's tensor arguments",
               "a small walk over tuples, lists and dicts"),
    PrivateApi("torch.utils._pytree:tree_flatten", "torch 1.13",
               "sizing.speed: an operator's tensor arguments", "the same walk, with no tree spec (None)"),
    PrivateApi("torch._C:_ExcludeDispatchKeyGuard", "torch 2.0",
               "cuda_rules: an operator run under CUDA's autocast rules, with the CPU's switched off",
               "the forecast's CUDA rules stop with this error; training is unaffected"),
    PrivateApi("torch._C._nn:nll_loss_nd", "torch 1.10",
               "cuda_rules: the NLL half of CUDA's cross-entropy", "torch.ops.aten.nll_loss_nd, the same operator"),
    PrivateApi("torch.library:Library._destroy", "torch 2.0",
               "cuda_rules: removing the rules when their context ends",
               "the rules stay registered until the Library object is collected"),
    PrivateApi(f"{_CW}:checkpoint_wrapper", "torch 1.12",
               "activation checkpointing (its parameter names carry the wrapper's prefix)",
               "memory.checkpointing other than none stops with this error"),
    PrivateApi(f"{_CW}:CheckpointImpl", "torch 1.12",
               "choosing the non-reentrant checkpoint", "as checkpoint_wrapper"),
    PrivateApi("torch.nn.modules.batchnorm:_BatchNorm", "torch 1.0",
               "finding every BatchNorm (checkpoint recomputation, fp32 BatchNorm under bf16 weights)",
               "the stock BatchNorm1d/2d/3d and SyncBatchNorm classes"),
    PrivateApi("torch.nn.modules._functions:SyncBatchNorm", "torch 1.1",
               "fp32 SyncBatchNorm under bf16 weights on several GPUs",
               "that combination stops with this error"),
    PrivateApi("torch._dynamo.config:recompile_limit", "torch 2.7 (cache_size_limit before)",
               "compiled conv units: every shape they meet compiles instead of falling back to eager",
               "torch._dynamo.config.cache_size_limit, its name before 2.7"),
    PrivateApi("torch.nn:Module._compiled_call_impl", "torch 2.2",
               "tests: whether nn.Module.compile compiled a module in place", "those tests fail"),
    PrivateApi("torch._dynamo.utils:counters", "torch 2.0",
               "tests: counting compiled graphs and graph breaks", "those tests stop with this error"),
    PrivateApi(f"{_MT}:MemTracker", "torch 2.5",
               "the memory breakdown by category and phase (profiler, benchmark, forecast)",
               "the breakdown, the benchmark's categories and the forecast stop with this error"),
    PrivateApi(f"{_MT}:MemTracker._update_peak_stats", "torch 2.5",
               "a tracker that keeps only the root module's peaks (minutes to seconds on ViT-L)",
               "the stock MemTracker: the same figures, slower"),
    PrivateApi(f"{_MT}:_ModState", "torch 2.5", "the breakdown's forward and backward peaks", "as MemTracker"),
    PrivateApi(f"{_MT}:_TOTAL_KEY", "torch 2.5", "the root-only tracker's totals", "as MemTracker"),
    PrivateApi(f"{_MT}:_MemRefType", "torch 2.5", "tests: MemTracker's categories", "as MemTracker"),
    PrivateApi("torch.profiler._memory_profiler:_CATEGORY_TO_INDEX", "torch 2.1",
               "the memory timeline PNG's legend (which column is which category)",
               "the columns are labelled 'category 0', 'category 1', ..."),
    PrivateApi("torch.cuda.memory:_record_memory_history", "torch 2.1",
               "CUDA allocation history: the snapshot for memory_viz, the hidden stage's live set",
               "those two stop with this error"),
    PrivateApi("torch.cuda.memory:_snapshot", "torch 2.1", "the hidden stage's live set at the peak",
               "it stops with this error"),
    PrivateApi("torch.cuda.memory:_dump_snapshot", "torch 2.1", "the snapshot file for memory_viz",
               "it stops with this error"),
    PrivateApi("torch._C:_cuda_clearCublasWorkspaces", "torch 1.13",
               "measuring the cuBLAS workspaces a first matrix product makes",
               "nothing is cleared: workspaces made earlier read as 0 MiB"),
    PrivateApi("torch.utils.cpp_extension:FileBaton", "torch 1.0, gone in 2.14 (pytorch/pytorch#189245)",
               "whether a leftover extension-build lock file makes every later DeepSpeed run wait for ever",
               "the loader takes an OS lock that dies with its holder: a leftover file is harmless", required=False),
    PrivateApi("accelerate.state:AcceleratorState._reset_state", "accelerate 0.20",
               "forgetting accelerate's process-wide state between configurations in one process",
               "the planner's measurements and the tests that build several Accelerators stop with this error"),
]}


def _get(path: str) -> Any | None:
    api = APIS[path]
    try:
        return api.resolve()
    except (ImportError, AttributeError):
        return None


def _refusing(path: str) -> Any:
    """A stand-in that raises `PrivateApiMissing` for `path` when called or instantiated."""
    def refuse(*args, **kwargs):
        raise APIS[path].missing()
    return type(path.rsplit(":", 1)[-1], (), {"__init__": refuse})


# ---- fake tensors and dispatch (forecast, cuda_rules, gpu_overheads) ------------------------

FakeTensorMode = _get("torch._subclasses.fake_tensor:FakeTensorMode") or _refusing(
    "torch._subclasses.fake_tensor:FakeTensorMode")
FakeTensor = _get("torch._subclasses.fake_tensor:FakeTensor") or type("FakeTensor", (), {})  # matches nothing
TorchDispatchMode = _get("torch.utils._python_dispatch:TorchDispatchMode") or _refusing(
    "torch.utils._python_dispatch:TorchDispatchMode")


def _tree_map(fn, tree):
    if isinstance(tree, (tuple, list)):
        return type(tree)(_tree_map(fn, x) for x in tree)
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _tree_leaves(tree) -> list:
    if isinstance(tree, (tuple, list)):
        return [leaf for x in tree for leaf in _tree_leaves(x)]
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _tree_leaves(v)]
    return [tree]


tree_map = _get("torch.utils._pytree:tree_map") or _tree_map
tree_leaves = _get("torch.utils._pytree:tree_leaves") or _tree_leaves
tree_flatten = _get("torch.utils._pytree:tree_flatten") or (lambda tree: (_tree_leaves(tree), None))
nll_loss_nd = _get("torch._C._nn:nll_loss_nd") or torch.ops.aten.nll_loss_nd


_EXCLUDE = _get("torch._C:_ExcludeDispatchKeyGuard")
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def without_cpu_autocast():
    """A guard under which the CPU's autocast kernels are skipped (the operator below runs as called)."""
    if _EXCLUDE is None:
        raise APIS["torch._C:_ExcludeDispatchKeyGuard"].missing()
    return _EXCLUDE(_AUTOCAST_CPU)


def destroy_library(lib: torch.library.Library) -> None:
    """Remove the kernels `lib` registered, now rather than when the object is collected."""
    if _get("torch.library:Library._destroy") is not None:
        lib._destroy()


# ---- modules: checkpointing, BatchNorm, compile ---------------------------------------------

checkpoint_wrapper = _get(f"{_CW}:checkpoint_wrapper") or _refusing(f"{_CW}:checkpoint_wrapper")
CheckpointImpl = _get(f"{_CW}:CheckpointImpl") or SimpleNamespace(NO_REENTRANT=None, REENTRANT=None)

# every BatchNorm class, for isinstance (the tuple when the private base is gone)
BatchNormBase = _get("torch.nn.modules.batchnorm:_BatchNorm") or (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
SyncBatchNormFunction = _get("torch.nn.modules._functions:SyncBatchNorm") or _refusing(
    "torch.nn.modules._functions:SyncBatchNorm")


def raise_recompile_limit(at_least: int) -> int:
    """Dynamo's per-code-object recompile limit raised to `at_least` (never lowered); returns it.
    Past the limit Dynamo silently runs the rest eagerly (renamed from cache_size_limit in 2.7:
    pytorch/pytorch#143709)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(config, name), at_least)
    setattr(config, name, limit)
    return limit


def compiled_in_place(module: nn.Module) -> bool:
    """Whether `module.compile()` compiled it (it keeps the compiled callable in a private attribute)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def dynamo_counters() -> Any:
    """Dynamo's event counters (`counters["stats"]["unique_graphs"]`, `counters["graph_break"]`)."""
    counters = _get("torch._dynamo.utils:counters")
    if counters is None:
        raise APIS["torch._dynamo.utils:counters"].missing()
    return counters


# ---- MemTracker (sizing.meters, tests) ------------------------------------------------------

def mem_tracker() -> SimpleNamespace:
    """MemTracker and the private names read with it (imported on first use: about 5 s here)."""
    if _get(f"{_MT}:MemTracker") is None:
        raise APIS[f"{_MT}:MemTracker"].missing()
    module = importlib.import_module(_MT)
    return SimpleNamespace(MemTracker=module.MemTracker, ModState=module._ModState, TOTAL_KEY=module._TOTAL_KEY,
                           MemRefType=module._MemRefType)


def root_mem_tracker(root: nn.Module):
    """A MemTracker that keeps the per-phase peaks of `root` only. The stock tracker updates every
    submodule's peaks on every operator: a ViT-L's ~1,100 modules made one tracked full-size step
    take minutes, this one takes seconds; the totals and `root`'s own states are the same
    (tests/test_profiler.py compares them). It overrides `_update_peak_stats` and reads the
    tracker's private state (`_curr_mem_snap`, `_peak_mem`, `_peak_mem_snap`, `_mod_tracker`):
    on a torch without that method, the stock tracker."""
    from copy import deepcopy

    mt = mem_tracker()
    if _get(f"{_MT}:MemTracker._update_peak_stats") is None:
        return mt.MemTracker()

    class RootMemTracker(mt.MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            curr = self._curr_mem_snap
            stats = self.memory_tracking.get(root)
            if stats is not None and peak_state in stats.snapshots and stats.mod_fqn in self._mod_tracker.parents:
                for dev, snap in curr.items():
                    if stats.local_peak.get(dev, 0) < snap[mt.TOTAL_KEY]:
                        stats.local_peak[dev] = snap[mt.TOTAL_KEY]
                        stats.snapshots[peak_state][-1][dev] = deepcopy(snap)
            for dev, snap in curr.items():
                if self._peak_mem.get(dev, 0) < snap[mt.TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mt.TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(snap)

    return RootMemTracker()


def timeline_category_names(columns: int) -> list[str]:
    """The names of the profiler memory timeline's category columns (after its first), in order."""
    index = _get("torch.profiler._memory_profiler:_CATEGORY_TO_INDEX")
    if index is None or len(index) != columns:
        return [f"category {i}" for i in range(columns)]
    return ["unknown" if c is None else c.name.lower() for c, _ in sorted(index.items(), key=lambda kv: kv[1])]


# ---- CUDA allocator history and workspaces (sizing.meters, sizing.gpu_overheads) ------------

def record_memory_history(**kwargs) -> None:
    """Start (or with `enabled=None` stop) recording the CUDA allocator's history."""
    fn = _get("torch.cuda.memory:_record_memory_history")
    if fn is None:
        raise APIS["torch.cuda.memory:_record_memory_history"].missing()
    fn(**kwargs)


def memory_snapshot() -> dict:
    """The CUDA allocator's segments and, while recording, its history ("device_traces")."""
    fn = _get("torch.cuda.memory:_snapshot")
    if fn is None:
        raise APIS["torch.cuda.memory:_snapshot"].missing()
    return fn()


def dump_memory_snapshot(path: str) -> None:
    """The snapshot as a pickle for https://pytorch.org/memory_viz."""
    fn = _get("torch.cuda.memory:_dump_snapshot")
    if fn is None:
        raise APIS["torch.cuda.memory:_dump_snapshot"].missing()
    fn(path)


def clear_cublas_workspaces() -> bool:
    """Free cuBLAS's and cuBLASLt's persistent workspaces; False where torch cannot."""
    fn = _get("torch._C:_cuda_clearCublasWorkspaces")
    if fn is None:
        return False
    fn()
    return True


def extension_loader_waits_on_lock_files() -> bool:
    """Whether this torch's C++ extension loader waits for a build's lock file to disappear (torch
    before 2.14: `FileBaton`, polled for ever) rather than taking an OS lock that dies with its holder."""
    return _get("torch.utils.cpp_extension:FileBaton") is not None


# ---- accelerate -----------------------------------------------------------------------------

def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (AcceleratorState and PartialState are singletons),
    so that the next Accelerator takes its own settings."""
    reset = _get("accelerate.state:AcceleratorState._reset_state")
    if reset is None:
        raise APIS["accelerate.state:AcceleratorState._reset_state"].missing()
    reset(reset_partial_state=True)


@contextlib.contextmanager
def fresh_accelerate() -> Iterator[None]:
    """accelerate's state reset before and after (tests that build their own Accelerator)."""
    reset_accelerate_state()
    try:
        yield
    finally:
        reset_accelerate_state()


def report() -> list[str]:
    """One line per private API: present or missing on the installed versions, and the fallback."""
    def state(api: PrivateApi) -> str:
        return "ok     " if api.present() else "MISSING" if api.required else "absent "

    return [f"{state(api)} {api.path}  (since {api.since}; without: {api.without})" for api in APIS.values()]


if __name__ == "__main__":
    print(f"torch {torch.__version__}")
    print("\n".join(report()))
