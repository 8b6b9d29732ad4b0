"""Each memory technique does what it claims: recomputation happens, memory shrinks,
accumulation equals the full batch, the schedule is mmseg's, the optimizer is the paper's."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from setr_lowmem.compat import TorchDispatchMode, mem_tracker, reset_accelerate_state, tree_leaves
from setr_lowmem.memory.checkpointing import WRAPPER
from setr_lowmem.model.loss import SegmentationLoss
from setr_lowmem.engine.schedule import build_scheduler, poly_lr
from setr_lowmem.memory.checkpointing import apply_activation_checkpointing
from setr_lowmem.memory.optim import build_optimizer, optimizer_state_bytes, param_groups
from setr_lowmem.memory.precision import apply_attention_kernel
from setr_lowmem.model import build_setr
from tests.conftest import tiny_config


def train_module(policy: str, decoder: str = "pup", seed: int = 0, **model) -> SegmentationLoss:
    torch.manual_seed(seed)
    cfg = tiny_config(decoder, model=dict(depth=4, out_indices=[0, 1, 2, 3], **model),
                      memory=dict(checkpointing=policy))
    module = SegmentationLoss(build_setr(cfg), cfg.loss)
    apply_activation_checkpointing(module, cfg.memory)
    return module


def batch(n: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n, size, size), generator=g)


def total_flops(module, images, labels) -> int:
    with FlopCounterMode(display=False) as counter:
        loss, _ = module(images, labels)
        loss.backward()
    return counter.get_total_flops()


def peak_activations(module, images, labels) -> int:
    """Peak bytes of activations over forward + backward, as PyTorch's MemTracker attributes them."""
    mt = mem_tracker()
    tracker = mt.MemTracker()
    tracker.track_external(module)
    with tracker:
        loss, _ = module(images, labels)
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")
    return sum(stats[mt.MemRefType.ACT] for stats in peak.values())


@pytest.mark.parametrize("decoder", ["pup", "mla"])
def test_checkpointing_recomputes_and_saves_memory(decoder):
    images, labels = batch()
    flops = {p: total_flops(train_module(p, decoder), images, labels) for p in ("none", "selective", "blocks", "full")}
    kept = {p: peak_activations(train_module(p, decoder), images, labels)
            for p in ("none", "selective", "blocks", "full")}
    # recomputation shows up as extra forward FLOPs in backward ...
    assert flops["blocks"] > flops["none"] and flops["full"] > flops["blocks"]
    # ... except under the selective policy, which keeps every matmul and attention output
    assert flops["selective"] == flops["none"]
    # and the activations alive at the peak shrink accordingly
    assert kept["none"] > kept["selective"] > kept["blocks"] > kept["full"], kept
    assert kept["full"] < 0.5 * kept["none"], kept


@pytest.mark.parametrize("policy", ["blocks", "selective", "full"])
def test_checkpointing_leaves_loss_and_gradients_unchanged(policy):
    images, labels = batch()
    ref, ckpt = train_module("none"), train_module(policy)
    losses = []
    for module in (ref, ckpt):
        loss, _ = module(images, labels)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads_ref = {n: p.grad for n, p in ref.model.named_parameters()}
    for n, p in ckpt.model.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[n.replace(WRAPPER, "")], msg=n)
    # the state dict is the model's own: checkpoints load either way; and recomputation did not
    # update BatchNorm's running statistics a second time
    ref_state, ckpt_state = ref.model.state_dict(), ckpt.model.state_dict()
    assert ckpt_state.keys() == ref_state.keys()
    for k in ref_state:
        torch.testing.assert_close(ckpt_state[k], ref_state[k], msg=k)


def test_every_k_blocks_wraps_one_in_k():
    cfg = tiny_config("pup", model=dict(depth=4, out_indices=[0, 1, 2, 3]), memory=dict(checkpointing="blocks", every_k=2))
    module = SegmentationLoss(build_setr(cfg), cfg.loss)
    assert apply_activation_checkpointing(module, cfg.memory)["blocks"] == 2
    kinds = [type(b).__name__ for b in module.model.encoder.blocks]
    assert kinds == ["Block", "CheckpointWrapper", "Block", "CheckpointWrapper"]


class AttentionOps(TorchDispatchMode):
    """The operators that output an attention matrix of `shape` (batch, heads, tokens, tokens), and
    the fused attention kernels run."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape, self.matrices, self.fused = shape, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape for t in tree_leaves(out)):
            self.matrices.append(str(func))
        self.fused += "scaled_dot_product" in str(func)
        return out


def test_eager_and_sdpa_attention_agree():
    """The same loss, by different kernels: eager builds each block's attention matrix and its
    softmax, SDPA's fused kernel never materialises it."""
    images, labels = batch()
    a, b = train_module("none"), train_module("none")
    apply_attention_kernel(a.model, "eager")
    assert apply_attention_kernel(b.model, "sdpa") == 4
    attn = a.model.encoder.blocks[0].attn
    tokens = (images.shape[-1] // 16) ** 2 + 1  # the patches and the class token
    eager, sdpa = AttentionOps((2, attn.num_heads, tokens, tokens)), AttentionOps((2, attn.num_heads, tokens, tokens))
    with eager:
        loss_a = a(images, labels)[0]
    with sdpa:
        loss_b = b(images, labels)[0]
    torch.testing.assert_close(loss_a, loss_b)
    assert eager.matrices.count("aten._softmax.default") == 4 and eager.fused == 0, eager.matrices
    assert sdpa.matrices == [] and sdpa.fused == 4


@pytest.fixture
def fresh_accelerate():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def test_accumulation_equals_the_full_batch(fresh_accelerate):
    """4 micro-batches of 2 through accelerate's accumulation == one batch of 8 (BatchNorm in eval mode)."""
    images, labels = batch(8)
    full = train_module("none").eval()
    accum = copy.deepcopy(full)
    loss, _ = full(images, labels)
    loss.backward()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    prepared = accelerator.prepare(accum)
    for k in range(4):
        with accelerator.accumulate(prepared):
            micro_loss, _ = prepared(images[2 * k:2 * k + 2], labels[2 * k:2 * k + 2])
            accelerator.backward(micro_loss)
    for (n, p), q in zip(full.named_parameters(), accum.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_the_accumulation_is_derived_once_and_checked_against_the_processes(fresh_accelerate, monkeypatch):
    """make_accelerator derives the accumulation from the launcher's WORLD_SIZE, the one place it is
    computed; an accelerator that counts other processes is refused in one line."""
    from setr_lowmem.config import ConfigError
    from setr_lowmem.engine import step

    cfg = tiny_config("pup", train=dict(total_batch=8, micro_batch=2))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert step.make_accelerator(cfg).gradient_accumulation_steps == 4
    reset_accelerate_state()
    # a launcher said 2 processes and accelerate counted 1 (a real one would wait for the second here)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(step, "Accelerator", lambda **kw: SimpleNamespace(num_processes=1, **kw))
    with pytest.raises(ConfigError, match="accelerate runs 1 process.* but WORLD_SIZE is 2: the accumulation "
                                          r"\(2\) would not keep train.total_batch"):
        step.make_accelerator(cfg)


def test_poly_schedule_matches_mmseg_at_several_iterations():
    cfg = tiny_config("pup", schedule=dict(iters=1000, power=0.9, min_lr=1e-4), optim=dict(lr=0.01, head_lr_mult=10.0))
    model = build_setr(cfg)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.schedule)
    # mmengine's PolyLR (begin 0, end T) spans total_iters = T - 1 steps and updates recursively:
    # lr_t = (lr_{t-1} - eta_min) * (1 - 1 / (total_iters - t + 1))^p + eta_min, for t = 1 .. T - 1
    recursive = {g["name"]: g["lr"] for g in opt.param_groups}
    for t in range(1, 1000):
        opt.step()
        sched.step()
        for g in opt.param_groups:
            prev = recursive[g["name"]]
            recursive[g["name"]] = (prev - 1e-4) * (1 - 1 / (999 - t + 1)) ** 0.9 + 1e-4
            if t in (1, 10, 250, 500, 998, 999):
                base = 0.1 if g["name"].startswith("head") else 0.01
                closed = (base - 1e-4) * (1 - t / 999) ** 0.9 + 1e-4
                assert g["lr"] == pytest.approx(closed, rel=1e-12)
                assert g["lr"] == pytest.approx(recursive[g["name"]], rel=1e-9)
                assert poly_lr(t, base, cfg.schedule) == pytest.approx(closed, rel=1e-12)
    # the last of the 1000 iterations (t = 999) runs exactly at the floor
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-4, rel=1e-12)] * len(opt.param_groups)
    assert poly_lr(998, 0.01, cfg.schedule) > 1e-4 + 1e-6
    one = tiny_config("pup", schedule=dict(iters=1))
    assert poly_lr(0, 0.01, one.schedule) == 0.01  # a one-iteration schedule keeps the base lr, as mmengine


@pytest.mark.parametrize("iters", [1000, 7])
def test_poly_schedule_equals_mmengine_polylr(iters):
    """The lrs mmengine 0.10.7's PolyLR gave two groups (0.01, 0.1) at every iteration (tests/data/mmseg_ref)."""
    ref = torch.load(Path(__file__).parent / "data" / "mmseg_ref" / "pipeline.pt", weights_only=False)["poly"][iters]
    cfg = tiny_config("pup", schedule=dict(iters=iters, power=0.9, min_lr=1e-4))
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (0.01, 0.1)])
    sched = build_scheduler(opt, cfg.schedule)
    ours = []
    for _ in range(iters):
        ours.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), ref, rtol=1e-9, atol=1e-12)


def test_warmup_rises_linearly_then_follows_poly():
    cfg = tiny_config("pup", schedule=dict(iters=100, warmup_iters=10, warmup_ratio=0.1))
    assert poly_lr(0, 1.0, cfg.schedule) == pytest.approx(0.1)
    assert poly_lr(5, 1.0, cfg.schedule) == pytest.approx(((1 - 1e-4) * (1 - 5 / 99) ** 0.9 + 1e-4) * 0.55)
    assert poly_lr(10, 1.0, cfg.schedule) == pytest.approx((1 - 1e-4) * (1 - 10 / 99) ** 0.9 + 1e-4)


def test_head_parameters_get_ten_times_the_lr():
    cfg = tiny_config("mla", optim=dict(lr=0.002))
    model = build_setr(cfg)
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    assert set(groups) == {"encoder", "head"} and groups["head"]["lr"] == pytest.approx(0.02)
    head_ids = {id(p) for p in groups["head"]["params"]}
    for name, p in model.named_parameters():
        # mmseg's custom_keys match 'head' in the name: decode and aux heads; the MLA neck is not one
        assert (id(p) in head_ids) == name.startswith(("decode_head.", "auxiliary_head.")), name
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_eight_bit_states_are_a_quarter_of_thirty_two_bit(name):
    """bitsandbytes keeps one byte per value (plus small block scales); small tensors stay 32-bit."""
    sizes = {}
    for bits in (32, 8):
        cfg = tiny_config("pup", model=dict(embed_dim=128, num_heads=4, head_channels=64),
                          optim=dict(name=name, bits=bits, lr=1e-3))
        module = train_module("none")
        module = SegmentationLoss(build_setr(cfg), cfg.loss)
        opt = build_optimizer(module.model, cfg.optim)
        loss, _ = module(*batch())
        loss.backward()
        opt.step()
        sizes[bits] = optimizer_state_bytes(opt)
    total32 = sum(sizes[32].values())
    total8 = sum(sizes[8].values())
    assert sizes[8]["8bit"] > 0 and sizes[32]["8bit"] == 0
    assert 0.2 < total8 / total32 < 0.35, (total8, total32)
