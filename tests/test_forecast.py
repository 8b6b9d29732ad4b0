"""The memory forecast: training's step on fake tensors under the same tracker equals the real step."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

from setr_lowmem.commands.benchmark import row_overrides
from setr_lowmem.compat import TorchDispatchMode, tree_leaves
from setr_lowmem.config import load_config, with_overrides
from setr_lowmem.sizing.forecast import forecast
from setr_lowmem.sizing.measure import benchmark_overrides, build_step, measure


# rows of benchmarks/memory.py: checkpointing with recomputation; every CPU lever at once (the
# decoder rewrites: the matmul backward's matrices and the fused loss's bands under fake tensors)
# with the accounted 8-bit states
class LiveBytes(TorchDispatchMode):
    """The bytes of the tensor storages alive, counted directly and independently of MemTracker: the
    storages alive at the start, then each one an operator returns, each forgotten when it is freed
    (a weak reference to the storage, which lives as long as its memory); `peak`: the most alive
    after any operator."""

    def __init__(self, alive: list[torch.Tensor]):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = 0
        for t in alive:
            self._count(t)
        self.peak = self.now

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.nbytes() and id(storage) not in self.sizes:
            self.sizes[id(storage)] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self._freed, id(storage))

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        self.peak = max(self.peak, self.now)
        return out


def live_peak(cfg) -> float:
    """GiB: the peak of the tensors alive over training's second step (the first made the optimizer's
    states), counted by `LiveBytes`."""
    step = build_step(cfg, torch.device("cpu"))
    try:
        step()
        module, states = step.module, step.optimizer.state.values()
        alive = [*module.parameters(), *module.buffers(), *(p.grad for p in module.parameters() if p.grad is not None),
                 *(t for s in states for t in s.values() if isinstance(t, torch.Tensor))]
        with LiveBytes(alive) as live:
            step()
        return live.peak / 2**30
    finally:
        step.close()


@pytest.mark.parametrize("row", ["head+loss", "8-bit SGD"])
def test_the_forecast_equals_the_tracked_peak_of_the_real_step(row):
    cfg = load_config("pup_ade20k", benchmark_overrides([], False) + row_overrides(row, False)
                      + ["train.micro_batch=2", "train.total_batch=2"])
    predicted = forecast(cfg, cuda=False)
    measured = measure(cfg, label=row, steps=2, device=torch.device("cpu"))
    assert predicted.allocated == pytest.approx(measured.allocated, rel=0.02), (predicted, measured.allocated)
    # both sides above are MemTracker's; the tensors alive, counted directly, agree with it
    assert live_peak(cfg) == pytest.approx(measured.allocated, rel=1e-3)
    if row != "8-bit SGD":  # computed, not accounted: the same tracker sees the same tensors
        assert predicted.allocated == pytest.approx(measured.allocated, rel=1e-3)
    else:  # the accounted 8-bit states against bitsandbytes' real ones (0.425 vs 0.397 MiB on this tiny
        # model, where the code books and small tensors weigh most), not the fp32 momentum (4x more)
        assert predicted.categories["optimizer"] == pytest.approx(measured.categories["optimizer"], rel=0.1)


def test_accounted_techniques_move_the_forecast_the_documented_way():
    from setr_lowmem.memory.deepspeed import BUCKET

    base = load_config("pup_ade20k", benchmark_overrides([], False) + ["train.micro_batch=1", "train.total_batch=1"])
    plain = forecast(base, cuda=False)
    offload = forecast(with_overrides(base, ["memory.deepspeed.stage=2", "memory.deepspeed.offload_optimizer=true"]),
                       cuda=False)
    assert offload.categories["optimizer"] == 0.0
    # the states leave; the gradients become DeepSpeed's bucket and the offload buffer (the largest parameter)
    assert offload.categories["grads"] > BUCKET * 4 / 2**30 > plain.categories["grads"]
    assert offload.allocated - plain.allocated == pytest.approx(
        offload.categories["grads"] - plain.categories["grads"] - plain.categories["optimizer"], rel=1e-6)
    assert any("ZeRO-2" in n for n in offload.notes)


def test_the_zero2_buffers_accounted_are_the_ones_a_real_engine_holds():
    """A real DeepSpeed engine (CPU accelerator, `tests/zero2_buffers.py` in its own process) at the
    end of a backward, where it holds them all: its gradient bucket, and the offload buffer or the
    flat gradient partition and the fp32 master copy, are the bytes `deepspeed.zero2_buffers` gives."""
    import json
    import sys

    from setr_lowmem.memory.deepspeed import zero2_buffers
    from tests.helpers import run

    engines = json.loads(run([sys.executable, "tests/zero2_buffers.py"]).stdout.strip().splitlines()[-1])
    for mode, held in engines.items():
        assert held["buckets"] == 1 and held["gradients"] > 0, (mode, held)
        gib = {k: held[k] / 2**30 for k in ("bucket", "gradients", "masters")}
        assert zero2_buffers(held["sizes"], mode == "offload", 4) == pytest.approx(gib, rel=1e-6), mode


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_the_forecast_counts_the_zero2_buffers_alive_at_its_peak(offload):
    from setr_lowmem.engine.step import build_for_training
    from setr_lowmem.memory.deepspeed import zero2_buffers

    over = ["memory.deepspeed.stage=2"] + (["memory.deepspeed.offload_optimizer=true"] if offload else [])
    # a step that peaks in its backward (some gradients made, not all) holds the bucket there, not yet
    # a flat partition (made at the end of a backward for a model smaller than one bucket)
    base = load_config("pup_ade20k", benchmark_overrides([], False) + ["train.micro_batch=1", "train.total_batch=1"])
    with torch.device("meta"):
        module, _ = build_for_training(base)
    sizes = [p.numel() for p in module.parameters() if p.requires_grad]
    plain, predicted = forecast(base, cuda=False), forecast(with_overrides(base, over), cuda=False)
    assert 0 < plain.categories["grads"] < sum(sizes) * 4 / 2**30
    expected = zero2_buffers(sizes, offload, 4)
    assert predicted.categories["grads"] == pytest.approx(
        expected["bucket"] + (expected["gradients"] if offload else 0.0), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_loss_operators_fake_kernels_hold_what_the_real_kernels_hold(dtype):
    """The fused loss's Triton kernels (real, under Triton's CPU interpreter) and their operators'
    fake implementations: the same tensors, seen by the same tracker, forward and backward."""
    from setr_lowmem.compat import FakeTensorMode, mem_tracker
    from setr_lowmem.memory.decoder import upsample_cross_entropy

    def peak() -> tuple[dict, tuple]:
        low = torch.randn(2, 19, 12, 10, dtype=dtype).requires_grad_()
        labels = torch.randint(0, 19, (2, 48, 40))
        labels[:, :5] = 255
        tracker = mem_tracker().MemTracker()
        with tracker:
            loss = upsample_cross_entropy(low, labels, avg_non_ignore=True, backend="triton")
            loss.backward()
        (snap,) = tracker.get_tracker_snapshot("peak").values()
        return {getattr(k, "value", k): v for k, v in snap.items()}, (low.grad.shape, low.grad.dtype, loss.dtype)

    real = peak()
    with FakeTensorMode():
        fake = peak()
    assert fake == real and real[0]["Total"] > 2 * 48 * 40 * 4  # at least the log-sum-exp per output pixel


@contextlib.contextmanager
def _cuda_autocast_without_a_gpu():
    """CUDA's bf16 autocast switched on directly (`torch.autocast("cuda")` refuses without a GPU)."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])


@pytest.mark.parametrize("levers", ["plain", "toolkit"])
def test_cuda_autocast_rules_on_the_cpu_cast_as_cuda_autocast_does(levers):
    """The forecast's fake step runs on the CPU under `cuda_rules()`: its forward makes the same
    operators in the same dtypes and shapes as CUDA's own autocast on fake CUDA tensors (which run
    a forward without a GPU, not a backward), and without the rules it does not."""
    from setr_lowmem.compat import FakeTensorMode, TorchDispatchMode
    from setr_lowmem.sizing.cuda_rules import cuda_rules
    from setr_lowmem.engine.step import build_for_training
    from setr_lowmem.sizing.forecast import _fake_module

    # eager attention: SDPA on fake CUDA tensors cannot ask the device for its fused kernels
    over = ["memory.attention=eager", "memory.precision=bf16", "memory.fused_upsample_backend=torch"]
    if levers == "plain":
        over += ["memory.classifier_first=false", "memory.fused_upsample_loss=false"]
    cfg = load_config("test_tiny", over)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func).replace("cudnn_batch_norm", "native_batch_norm")
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() > 1 and not (name == "aten.empty.memory_format"
                                                                          and t.dtype == torch.uint8):
                    self.seen.append((name, t.dtype, tuple(t.shape)))
                    break
            return out

    def forward(device: str, autocast) -> list:
        with torch.device("meta"):
            module, _ = build_for_training(cfg)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        _fake_module(module, mode, device)
        with mode:
            images, labels = torch.randn(2, 3, 64, 64, device=device), torch.randint(0, 9, (2, 64, 64), device=device)
            labels[:, :4] = 255
            ops = Ops()
            with ops, autocast():
                module(images, labels)
        return ops.seen

    @contextlib.contextmanager
    def cpu_with_rules():
        with cuda_rules(), torch.autocast("cpu", torch.bfloat16):
            yield

    cuda = forward("cuda", _cuda_autocast_without_a_gpu)
    emulated = forward("cpu", cpu_with_rules)
    plain_cpu = forward("cpu", lambda: torch.autocast("cpu", torch.bfloat16))
    assert any(dtype == torch.bfloat16 for _, dtype, _ in cuda) and len(cuda) > 100
    assert emulated == cuda
    assert plain_cpu != cuda  # what the rules change (bilinear upsampling, softmax, LayerNorm: float32)


def test_a_plain_loop_holds_each_heads_full_size_output_through_the_backward():
    """forecast(plain_loop=True), the step of `out = model(x); loss = criterion(out, y)`, holds every
    head's upsampled output where the toolkit's loss frees it: more memory by those outputs (here the
    peak is at the backward's start), unless each head is checkpointed with its loss (then the same)."""
    over = ["memory.classifier_first=false", "memory.fused_upsample_loss=false", "data.num_classes=64"]
    cfg = load_config("test_tiny", [*over, "memory.checkpointing=none"])
    toolkit, plain = forecast(cfg, cuda=False), forecast(cfg, cuda=False, plain_loop=True)
    heads = 4  # test_tiny's PUP: the main head and three aux heads, each output 2 x 64 x 64 x 64 float32
    outputs = heads * 2 * 64 * 64 * 64 * 4 / 2**30
    assert plain.allocated - toolkit.allocated == pytest.approx(outputs, rel=1e-3), (plain, toolkit, outputs)
    full = load_config("test_tiny", [*over, "memory.checkpointing=full"])
    assert forecast(full, cuda=False, plain_loop=True).allocated == forecast(full, cuda=False).allocated


def test_a_memory_trace_replays_to_its_peak_and_what_was_alive_there():
    """`hidden.live_at_peak` on an allocator trace of known shape: blocks from before the recording
    freed during it lower the running total, and the peak's live set is the trace's own blocks."""
    from setr_lowmem.sizing.gpu_overheads import MIB, PACKAGE, live_at_peak

    ours = [{"filename": "/x/site-packages/torch/nn/modules/conv.py", "line": 5, "name": "_conv_forward"},
            {"filename": PACKAGE + "model/heads.py", "line": 40, "name": "forward"}]
    torch_only = [{"filename": "/x/site-packages/torch/functional.py", "line": 9, "name": "einsum"}]

    def alloc(addr, mib, frames):
        return {"action": "alloc", "addr": addr, "size": mib * MIB, "frames": frames}

    def free(addr, mib):
        return {"action": "free_requested", "addr": addr, "size": mib * MIB}

    trace = [alloc(1, 10, ours), alloc(2, 30, torch_only), free(1, 10), free(99, 50),  # 99: an older block
             alloc(3, 40, []), alloc(4, 25, ours), {"action": "free_completed", "addr": 1, "size": 10 * MIB},
             free(3, 40), alloc(5, 5, ours)]
    found = live_at_peak(trace, before=100 * MIB)
    # 100 -> 110 -> 140 -> 130 -> 80 -> 120 -> 145 -> 105 -> 110: the peak is 145, with blocks 2, 3, 4
    assert found["peak_mib"] == 145 and found["before_mib"] == 100
    assert found["live"] == [{"where": "no Python frame (a backward kernel on the autograd engine's thread)",
                              "mib": 40, "blocks": 1},
                             {"where": "torch/functional.py:9 einsum", "mib": 30, "blocks": 1},
                             {"where": "model/heads.py:40 forward <- torch/nn/modules/conv.py:5 _conv_forward",
                              "mib": 25, "blocks": 1}]
