"""Channels-last and compiled conv units change how the decoder runs, not what it computes."""

from __future__ import annotations

import pytest
import torch

from setr_lowmem.memory.checkpointing import WRAPPER
from setr_lowmem.engine.step import build_for_training
from tests.conftest import tiny_config


def step(decoder: str, images, labels, **memory):
    """One SGD step of a tiny SETR built with `memory`; returns (module, loss, gradients by name)."""
    torch.manual_seed(0)
    cfg = tiny_config(decoder, memory=memory)
    module, optimizer = build_for_training(cfg)
    loss, _ = module(images, labels)
    loss.backward()
    grads = {n.replace(WRAPPER, ""): p.grad.clone() for n, p in module.model.named_parameters()}
    optimizer.step()
    return module, loss.detach(), grads


def batch():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (2, 64, 64), generator=g)
    labels[1, 40:] = 255
    return torch.randn(2, 3, 64, 64, generator=g), labels


def assert_same_step(a, b, rtol=1e-4, atol=1e-6):
    (ma, la, ga), (mb, lb, gb) = a, b
    torch.testing.assert_close(lb, la, rtol=rtol, atol=atol)
    for name, g in ga.items():
        torch.testing.assert_close(gb[name], g, rtol=rtol, atol=atol, msg=name)
    # the step itself: weights and BatchNorm running statistics agree afterwards
    sa, sb = ma.model.state_dict(), mb.model.state_dict()
    assert sa.keys() == sb.keys()
    for name, t in sa.items():
        torch.testing.assert_close(sb[name].float(), t.float(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("decoder", ["pup", "mla"])
def test_channels_last_decoder_gives_the_same_step(decoder):
    images, labels = batch()
    ref = step(decoder, images, labels)
    new = step(decoder, images, labels, channels_last=True)
    convs = [m for h in new[0].model.heads for m in h.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert_same_step(ref, new)
    seen = []
    hook = convs[0].register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    new[0](images, labels)
    hook.remove()
    assert seen == [True]  # the convolution ran in NHWC


def test_compiled_conv_units_give_the_same_step_with_head_checkpointing():
    """torch.compile'd conv+BN+ReLU units, recomputed inside checkpointed head+loss units:
    the same loss, gradients, weights and BatchNorm statistics (updated once) as eager."""
    from setr_lowmem.compat import compiled_in_place, dynamo_counters

    counters = dynamo_counters()
    images, labels = batch()
    ref = step("naive", images, labels, checkpointing="full")
    # an earlier test's compiled conv units (the forecast's 8-bit row) can serve these from Dynamo's
    # cache without a new graph (seen under torch 2.11): compile afresh
    torch.compiler.reset()
    counters.clear()
    new = step("naive", images, labels, checkpointing="full", compile_convs=True)
    compiled = [m for m in new[0].model.modules() if compiled_in_place(m)]
    assert compiled, "no module was compiled"
    assert counters["stats"]["unique_graphs"] >= 1, "the compiled units never ran as graphs"
    assert_same_step(ref, new)


@pytest.mark.parametrize("bits", [32, 8])
def test_no_parameter_changes_layout_at_the_optimizer_step(bits):
    """A resumed run builds its model afresh: a weight whose layout the first step changed would
    convolve differently after a resume than in a run that never stopped. bitsandbytes' 8-bit
    optimizers make parameters contiguous, so channels-last weights are not applied with them."""
    images, labels = batch()
    torch.manual_seed(0)
    cfg = tiny_config("pup", memory=dict(channels_last=True), optim=dict(bits=bits))
    module, optimizer = build_for_training(cfg)
    before = {n: p.stride() for n, p in module.named_parameters()}
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in module.parameters()) == (bits == 32)
    for _ in range(2):
        module(images, labels)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {n: p.stride() for n, p in module.named_parameters()} == before
