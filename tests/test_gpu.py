"""The GPU paths, on CUDA: the compiled Triton kernels at the paper's shapes, the matmul upsample
backward, bitsandbytes' 8-bit SGD, DeepSpeed ZeRO-2 with optimizer offload through accelerate,
compiled conv units, and the tools that find what the memory forecast cannot see (`setr_lowmem.sizing.gpu_overheads`).
Deselected by default (`pyproject.toml`: -m "not gpu"); on a GPU machine `python -m pytest -m gpu`
runs them (`benchmarks/gpu_suite.py` does, as its first stage)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from setr_lowmem.config import with_overrides
from setr_lowmem.memory.decoder import upsample_cross_entropy, upsample_matmul_backward
from tests.conftest import tiny_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device: run them on the GPU machine (-m gpu)")


# (batch, classes, low-resolution side, label side): ADE20K's heads at 512, Cityscapes' at 768
SHAPES = {"ade20k": (16, 150, 128, 512), "cityscapes": (8, 19, 192, 768)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_triton_fused_loss_equals_interpolate_then_cross_entropy(shape, dtype):
    n, c, low_side, side = shape
    torch.manual_seed(0)
    low = (3 * torch.randn(n, c, low_side, low_side, device=CUDA)).to(dtype).requires_grad_()
    labels = torch.randint(0, c, (n, side, side), device=CUDA)
    labels[:, : side // 4] = 255  # ignored pixels
    labels[0] = 255  # and one image with none to learn from
    ref_in = low.detach().float().requires_grad_()  # the same values, computed in fp32 by PyTorch
    full = F.interpolate(ref_in, size=(side, side), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(full, labels, ignore_index=255, reduction="sum") / labels.numel()
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    del full
    ours = upsample_cross_entropy(low, labels, backend="triton")
    (g,) = torch.autograd.grad(ours, low)
    assert g.dtype == dtype and g[0].abs().max() == 0
    torch.testing.assert_close(ours.float(), ref, rtol=2e-5, atol=1e-6)
    scale = g_ref.abs().max()
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to bf16 at the end
    torch.testing.assert_close(g.float() / scale, g_ref / scale, rtol=tol, atol=tol)


def test_matmul_upsample_backward_equals_interpolate():
    torch.manual_seed(0)
    x = torch.randn(16, 256, 32, 32, device=CUDA, requires_grad=True)
    dy = torch.randn(16, 256, 128, 128, device=CUDA)
    y_ref = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)
    (g_ref,) = torch.autograd.grad(y_ref, x, dy)
    y = upsample_matmul_backward(x, (128, 128))
    (g,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_8bit_sgd_step_follows_torch_sgd():
    import bitsandbytes as bnb

    from setr_lowmem.memory.optim import build_optimizer

    cfg = tiny_config("pup", optim=dict(lr=0.01, bits=8, momentum=0.9, weight_decay=0.0))
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024, device=CUDA)
    twin = torch.nn.Linear(1024, 1024, device=CUDA)
    twin.load_state_dict(model.state_dict())
    ours, plain = build_optimizer(model, cfg.optim), torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    assert isinstance(ours, bnb.optim.SGD8bit)
    for step in range(3):
        x = torch.randn(64, 1024, device=CUDA)
        for m, opt in ((model, ours), (twin, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    state = ours.state[model.weight]
    assert any(v.dtype == torch.uint8 for v in state.values() if torch.is_tensor(v))
    moved = (twin.weight - model.weight).abs().max() / (twin.weight.abs().max())
    assert moved < 1e-3  # 8-bit momentum: close to torch's SGD, not equal


def _losses(cfg) -> list[float]:
    from setr_lowmem.sizing.measure import measure

    m = measure(cfg, label="gpu", steps=3, device=CUDA, breakdown=False)
    assert m.fits, m.note
    return m.losses


def test_zero2_offload_through_accelerate_equals_the_plain_step():
    base = tiny_config("pup", train=dict(total_batch=4, micro_batch=4, log_every=1, val_every=0, ckpt_every=0))
    plain = _losses(base)
    offload = _losses(with_overrides(base, ["memory.deepspeed.stage=2", "memory.deepspeed.offload_optimizer=true"]))
    assert plain[0] == pytest.approx(offload[0], rel=1e-5)
    assert offload == pytest.approx(plain, rel=1e-3)  # the same SGD, run by DeepSpeed on the host


def test_compiled_conv_units_equal_the_eager_step():
    base = tiny_config("mla", memory=dict(checkpointing="none", precision="bf16", attention="sdpa"))
    eager = _losses(base)
    compiled = _losses(with_overrides(base, ["memory.compile_convs=true"]))
    assert compiled == pytest.approx(eager, rel=2e-2)  # bf16: fused BatchNorm+ReLU rounds differently


def test_a_recorded_step_replays_to_the_allocators_peak():
    from setr_lowmem.sizing.gpu_overheads import MIB, live_at_peak, requested, trace_of

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 8, 1)).to(CUDA)
    x = torch.randn(8, 3, 128, 128, device=CUDA)

    def step():
        model(x).square().mean().backward()

    step()  # kernel choices and workspaces made once
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    found = live_at_peak(trace_of(CUDA, step), requested(CUDA))
    # the trace's sizes are the requested bytes (allocated ones are whole, rounded blocks)
    assert found["peak_mib"] == pytest.approx(requested(CUDA, "peak") / MIB, abs=0.1)
    # the live set is the replay up to the peak: the step's own blocks make up at least the rise above
    # where it began (more where it freed older blocks), each group's MiB rounded to 0.1
    live = sum(r["mib"] for r in found["live"]) + found["others_mib"]
    assert live >= found["peak_mib"] - found["before_mib"] - 0.05 * (len(found["live"]) + 2), found
    # named by the code that made them: the first conv's output (8 x 32 x 128 x 128 float32, 16 MiB),
    # which BatchNorm keeps for its backward, came from a Python frame in torch's conv module
    assert any("conv.py" in r["where"] and r["mib"] >= 16 for r in found["live"]), found


def test_operator_transients_see_an_operators_temporary_buffers():
    from setr_lowmem.sizing.gpu_overheads import OpTransients

    x = torch.randn(1 << 22, device=CUDA)
    with OpTransients(CUDA) as ops:
        x.sort()  # CUB's radix sort takes temporary storage from the caching allocator
        x.add(1)  # an element-wise kernel takes none
    found = {t.op.split("(")[0]: t for t in ops.found.values()}
    assert "aten.sort.default" in found and found["aten.sort.default"].mib > 0, ops.found
    assert not any(k.startswith("aten.add") for k in found), ops.found
