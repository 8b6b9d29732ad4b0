"""The exact decoder rewrites: the classifier before the last upsample, and the upsample fused
into the loss, give the reference path's loss and gradients."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from setr_lowmem.memory.checkpointing import WRAPPER
from setr_lowmem.model.loss import SegmentationLoss
from setr_lowmem.memory.allocator import SETTING, configure_cuda_allocator
from setr_lowmem.memory.checkpointing import apply_activation_checkpointing
from setr_lowmem.memory.decoder import (apply_decoder_rewrites, bilinear_matrix, upsample_cross_entropy,
                                        upsample_matmul_backward)
from setr_lowmem.model import build_setr
from setr_lowmem.sizing.meters import breakdown_step
from tests.conftest import tiny_config


@pytest.mark.parametrize("sizes", [(16, 16, 32, 32), (16, 16, 64, 64), (8, 8, 128, 128), (7, 9, 50, 61), (16, 16, 16, 16)])
@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_fused_upsample_cross_entropy_equals_interpolate_then_cross_entropy(sizes, avg_non_ignore):
    h, w, H, W = sizes
    torch.manual_seed(0)
    low = torch.randn(2, 5, h, w, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, H, W))
    labels[0, : H // 3] = 255
    full = F.cross_entropy(F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False), labels,
                           ignore_index=255, reduction="sum")
    ref = full / ((labels != 255).sum() if avg_non_ignore else labels.numel())
    (g_ref,) = torch.autograd.grad(ref, low)
    ours = upsample_cross_entropy(low, labels, avg_non_ignore=avg_non_ignore, band_pixels=3 * W)  # many bands
    (g,) = torch.autograd.grad(ours, low)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g, g_ref)


def reference_loss(low: torch.Tensor, labels: torch.Tensor, avg_non_ignore: bool) -> torch.Tensor:
    full = F.interpolate(low, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(full, labels, ignore_index=255, reduction="sum")
    return total / ((labels != 255).sum() if avg_non_ignore else labels.numel())


# (low h, w, label H, W, classes): x4, odd ratios, equal sizes, more classes than one block of 32, x8
@pytest.mark.parametrize("sizes", [(8, 8, 32, 32, 5), (7, 9, 50, 61, 4), (16, 16, 16, 16, 3), (6, 6, 12, 12, 40),
                                   (4, 4, 32, 32, 3)])
@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_triton_kernels_equal_interpolate_then_cross_entropy(sizes, avg_non_ignore):
    """The fused kernels, run by Triton's interpreter on the CPU, against the float64 reference."""
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    h, w, H, W, C = sizes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    low = torch.randn(2, C, h, w, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.randint(0, C, (2, H, W), device=device)
    labels[0, : H // 3] = 255
    ref = reference_loss(low, labels, avg_non_ignore)
    (g_ref,) = torch.autograd.grad(ref, low)
    low32 = low.detach().float().requires_grad_()
    ours = upsample_cross_entropy(low32, labels, avg_non_ignore=avg_non_ignore, backend="triton")
    (g,) = torch.autograd.grad(ours, low32)
    assert ours.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-8)


def test_triton_kernels_read_strided_and_bf16_logits():
    """Channels-last logits are read through their strides; bf16 logits give a bf16 gradient, computed in fp32."""
    torch.manual_seed(0)
    low = torch.randn(2, 6, 8, 8)
    labels = torch.randint(0, 6, (2, 32, 32))
    ref = reference_loss(low.double().requires_grad_(), labels, False)
    for x, tol in ((low.to(memory_format=torch.channels_last), 1e-5), (low.bfloat16(), 1e-2)):
        x = x.detach().requires_grad_()
        ours = upsample_cross_entropy(x, labels, backend="triton")
        (g,) = torch.autograd.grad(ours, x)
        assert g.dtype == x.dtype
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        import unittest.mock

        with unittest.mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
            upsample_cross_entropy(low, labels, backend="triton")


def test_triton_kernels_compile_for_the_h100_without_spilling():
    """Triton's own compiler (no GPU needed) builds both kernels for sm_90, bf16 and fp32 logits, with
    the launch's tiles and warps; cuobjdump shows no register spills. In a process of its own: here
    the kernels are the interpreter's."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.triton_aot"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split("\n")
    assert sum(line.startswith(("_forward_kernel", "_backward_kernel")) for line in lines) == 4, proc.stdout
    assert "STACK:0 " in proc.stdout and all("spills" not in line for line in lines), proc.stdout


@pytest.mark.parametrize("sizes", [(8, 8, 16, 16), (16, 16, 64, 64), (7, 9, 50, 61), (5, 5, 5, 5)])
def test_matmul_upsample_backward_equals_the_stock_backward(sizes):
    h, w, H, W = sizes
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, H, W, dtype=torch.float64)
    ref = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    ours = upsample_matmul_backward(x, (H, W))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # the same forward kernel
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    (g,) = torch.autograd.grad(ours, x, grad)
    torch.testing.assert_close(g, g_ref)
    assert (bilinear_matrix(H, h, torch.device("cpu"), torch.float64).sum(1) - 1).abs().max() < 1e-12


def module(decoder: str, rewrites: bool, policy: str = "none", dtype=torch.float64, **memory) -> SegmentationLoss:
    torch.manual_seed(0)
    cfg = tiny_config(decoder, memory=dict(checkpointing=policy, classifier_first=rewrites, fused_upsample_loss=rewrites,
                                           **memory))
    train_module = SegmentationLoss(build_setr(cfg).to(dtype), cfg.loss)
    apply_decoder_rewrites(train_module, cfg.memory)
    apply_activation_checkpointing(train_module, cfg.memory)
    return train_module


@pytest.mark.parametrize("decoder", ["naive", "pup", "mla"])
@pytest.mark.parametrize("policy", ["none", "full"])
@pytest.mark.parametrize("band_rows", [None, 5])  # None: a 64-pixel label fits one band (the plain ops)
def test_rewrites_give_the_reference_loss_and_gradients(decoder, policy, band_rows, monkeypatch):
    import setr_lowmem.memory.decoder as decoder_module

    if band_rows:
        monkeypatch.setattr(decoder_module, "BAND_PIXELS", band_rows * 64)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 64, 64), generator=g)
    labels[1, 40:] = 255
    ref, new = module(decoder, False), module(decoder, True, policy)
    results = []
    for m in (ref, new):
        loss, parts = m(images, labels)
        loss.backward()
        results.append((loss.detach(), parts))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-8)
    grads = {n: p.grad for n, p in ref.model.named_parameters()}
    for n, p in new.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n.replace(WRAPPER, "")], rtol=1e-5,
                                   atol=1e-9, msg=n)
    # the evaluation path (model.predict) gets the same logits too
    with torch.no_grad():
        torch.testing.assert_close(new.model.eval().predict(images), ref.model.eval().predict(images))


@pytest.mark.parametrize("decoder,policy", [("naive", "none"), ("pup", "full")])
def test_triton_loss_and_matmul_upsample_backward_give_the_reference_gradients(decoder, policy):
    """The whole model with the Triton loss and the heads' matrix-product upsample backward, in float32.
    (MLA's aux heads upsample x16, slow in the interpreter; its head is checked with the torch path.)"""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    labels = torch.randint(0, 5, (2, 64, 64), generator=g)
    labels[1, 40:] = 255
    ref = module(decoder, False, dtype=torch.float32)
    new = module(decoder, True, policy, torch.float32, fused_upsample_backend="triton", upsample_backward="matmul")
    assert sum(getattr(m, "resize", None) is not None for m in new.model.modules()) >= 1
    losses = []
    for m in (ref, new):
        loss, _ = m(images, labels)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in ref.model.named_parameters()}
    for n, p in new.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n.replace(WRAPPER, "")], rtol=1e-3,
                                   atol=1e-6, msg=n)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_fused_loss_needs_less_memory(policy, monkeypatch):
    """Full-resolution logits (and their softmax and gradient) are never alive for the whole image."""
    import setr_lowmem.memory.decoder as decoder
    from setr_lowmem.compat import FakeTensorMode
    from setr_lowmem.sizing.forecast import _fake_module

    monkeypatch.setattr(decoder, "BAND_PIXELS", 16 * 128)  # 16 rows: what 64 rows are to a 512 crop
    peaks = {}
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(2, 3, 128, 128, generator=g), torch.randint(0, 64, (2, 128, 128), generator=g)
    for fused in ("", "torch", "triton") if policy == "none" else ("", "torch"):
        torch.manual_seed(0)
        # many classes for few channels, as SETR's 150 classes for 256 channels: the logits dominate
        cfg = tiny_config("pup", data=dict(crop=128, num_classes=64), eval=dict(crop=128),
                          memory=dict(classifier_first=True, fused_upsample_loss=bool(fused), checkpointing=policy,
                                      fused_upsample_backend=fused or "auto"))
        m = SegmentationLoss(build_setr(cfg), cfg.loss)
        apply_decoder_rewrites(m, cfg.memory)
        apply_activation_checkpointing(m, cfg.memory)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)

        def fwd_bwd():
            m(images, labels)[0].backward()

        if fused != "triton":
            peaks[fused] = breakdown_step(m, opt, fwd_bwd, opt.step).peak
            continue
        # Triton's CPU interpreter takes minutes at this size: the kernels' registered fake
        # implementations instead, which hold the same tensors (tests/test_forecast.py compares them)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        _fake_module(m, mode)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)  # over the fake parameters, as the forecast does
        with mode:
            images, labels = mode.from_tensor(images), mode.from_tensor(labels)
            peaks[fused] = breakdown_step(m, opt, fwd_bwd, opt.step).peak
    print({k or "plain": f"{v * 1024:.1f} MiB" for k, v in peaks.items()})
    assert peaks["torch"] < 0.8 * peaks[""], peaks
    if "triton" in peaks:
        assert peaks["triton"] < 0.8 * peaks[""], peaks


def test_the_toolkit_sets_expandable_segments_unless_the_user_did(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert configure_cuda_allocator() == SETTING == os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert configure_cuda_allocator() == "max_split_size_mb:128"


def test_bands_are_computed_without_tensors_as_the_source_rows_say():
    """`_bands` (plain arithmetic, so that it also runs under fake tensors) against the rows that
    `_source_rows` (PyTorch's bilinear indices) reads, for odd sizes and the paper's."""
    from setr_lowmem.memory.decoder import _bands, _source_rows

    for h_out, h_in, rows in [(o, i, r) for o in (1, 7, 50, 61, 512, 768) for i in (1, 3, 16, 128, 192) for r in (1, 5, 64)]:
        y0, y1, _ = _source_rows(h_out, h_in, "cpu")
        expected = [(slice(s, min(s + rows, h_out)), slice(int(y0[s:s + rows].min()), int(y1[s:s + rows].max()) + 1))
                    for s in range(0, h_out, rows)]
        assert _bands(h_out, h_in, rows) == expected, (h_out, h_in, rows)
