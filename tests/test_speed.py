"""The speed forecast: operators counted on the forecast's fake step, the time model, the card table."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from setr_lowmem.config import load_config, without_initial_weights
from setr_lowmem.model import build_setr
from setr_lowmem.model.loss import SegmentationLoss
from setr_lowmem.sizing import speed
from setr_lowmem.sizing.cards import (CARDS, DRIVER_SHARE, Card, card_for_device, find_card, positive_size,
                                      usable_gib)
from setr_lowmem.sizing.forecast import forecast
from setr_lowmem.sizing.measure import benchmark_overrides

PLAIN = ["memory.classifier_first=false", "memory.fused_upsample_loss=false"]


def test_the_counter_records_flops_and_bytes_and_skips_views():
    from setr_lowmem.compat import FakeTensorMode

    counter = speed.OpCounter()
    with FakeTensorMode():
        x, w = torch.randn(4, 8), torch.randn(16, 8, dtype=torch.bfloat16)
        with counter:
            y = x.to(torch.bfloat16) @ w.t()  # a cast, a view (no kernel), a product
            y.relu_()
    ops = counter.counts["micro_batch"]
    assert ops.rows == {("none", 0, 4 * 8 * 4 + 4 * 8 * 2): 1,  # the cast reads float32, writes bf16
                        ("bf16", 2 * 4 * 8 * 16, (4 * 8 + 16 * 8 + 4 * 16) * 2): 1,
                        ("none", 0, 2 * 4 * 16 * 2): 1}  # relu_ reads and writes its tensor
    assert ops.kernels == 3 and ops.flops == 2 * 4 * 8 * 16


def test_a_plain_full_size_step_counts_the_analytic_flops_of_setr_pup():
    """2.95 TFLOP per 512x512 training image: three times the forward's products (the input
    gradient of the patch projection is not computed); the forward by hand from the spec."""
    cfg = load_config("pup_ade20k", ["model.pretrained=", "memory.checkpointing=none", *PLAIN,
                                     "train.micro_batch=1", "train.total_batch=1"])
    counted = forecast(cfg, plain_loop=True).counts.flops_per_image
    d, depth, tokens, patches = 1024, 24, 1025, 1024
    encoder = depth * (24 * tokens * d * d + 4 * tokens * tokens * d) + 2 * patches * 3 * 16 * 16 * d

    def conv(cin: int, cout: int, k: int, side: int) -> int:
        return 2 * k * k * cin * cout * side * side

    pup = conv(1024, 256, 3, 32) + sum(conv(256, 256, 3, s) for s in (64, 128, 256)) + conv(256, 150, 1, 512)
    aux = 3 * (conv(1024, 256, 3, 32) + conv(256, 256, 3, 128) + conv(256, 150, 1, 512))
    analytic = 3 * (encoder + pup + aux) - 2 * patches * 3 * 16 * 16 * d
    assert analytic / 1e12 == pytest.approx(2.95, abs=0.005)
    assert counted == pytest.approx(analytic, rel=0.02)


def test_checkpointing_adds_the_recomputed_forward():
    base = benchmark_overrides([], False) + [*PLAIN, "memory.precision=fp32", "train.micro_batch=2",
                                             "train.total_batch=2"]
    flops = {p: forecast(load_config("pup_ade20k", base + [f"memory.checkpointing={p}"])).counts.micro_batch.flops
             for p in ("none", "full")}
    cfg = load_config("pup_ade20k", base)
    with torch.device("meta"):
        module = SegmentationLoss(build_setr(without_initial_weights(cfg)), cfg.loss)
        images = torch.randn(2, 3, cfg.data.crop, cfg.data.crop)
        labels = torch.randint(0, cfg.data.num_classes, (2, cfg.data.crop, cfg.data.crop))
    with FlopCounterMode(display=False) as counter:
        module(images, labels)
    patch = 2 * 2 * (cfg.data.crop // 16) ** 2 * 3 * 16 * 16 * cfg.model.embed_dim  # outside every checkpoint
    assert flops["full"] - flops["none"] == pytest.approx(counter.get_total_flops() - patch, rel=0.02)


def test_what_the_fake_step_does_not_run_is_accounted():
    base = benchmark_overrides([], False) + ["train.micro_batch=2", "train.total_batch=4"]
    plain = forecast(load_config("pup_ade20k", base))
    eight = forecast(load_config("pup_ade20k", base + ["optim.bits=8"]))
    offload = forecast(load_config("pup_ade20k", base + ["memory.deepspeed.stage=2",
                                                        "memory.deepspeed.offload_optimizer=true"]))
    sizes = [n for (_, _, b), n in eight.counts.optimizer.rows.items() for _ in range(n)]
    assert eight.counts.micro_batch.rows == plain.counts.micro_batch.rows  # one fake step for both
    assert 0 < plain.counts.optimizer.kernels < 10  # a few multi-tensor kernels on CUDA
    assert eight.counts.python_steps == eight.counts.optimizer.kernels == len(sizes) > 10
    values = sum(p.numel() for p in build_setr(without_initial_weights(load_config("pup_ade20k", base)),
                                               ).parameters())
    assert offload.counts.optimizer.kernels == 0 and offload.counts.host_bytes == 20 * values
    assert offload.counts.link_bytes == 4 * values * (2 + 1)  # gradients after each of 2 micro-batches, weights back


CARD = Card("test", "a test card", 24, bf16_tflops=100, tf32_tflops=50, fp32_tflops=20, bandwidth_gbs=1000,
            host_link_gbs=32)


def test_the_time_model_is_a_roofline_with_fixed_costs():
    ops = speed.OpCounts()
    ops.add("bf16", 2e12, 1e9)  # arithmetic-bound: 2e12 / (100e12 * 0.5) = 40 ms, its bytes 2 ms
    ops.add("none", 0, 1e10, count=2)  # memory-bound: 1e10 / (1000e9 * 0.5) = 20 ms each
    counts = speed.StepCounts(ops, speed.OpCounts(), accumulation=2, images=8, host_bytes=2e9, python_steps=10)
    eff = speed.Efficiencies(compute=0.5, memory=0.5, kernel_us=100.0, host_gbs=10.0, param_us=1000.0)
    split = speed.time_split(counts, CARD, eff)
    assert split == pytest.approx({"arithmetic": 0.08, "memory": 0.08, "kernels": 6e-4, "host": 0.2,
                                   "python": 0.01})
    assert speed.images_per_second(counts, CARD, eff) == pytest.approx(8 / sum(split.values()))


def test_the_fit_recovers_the_efficiencies_that_made_the_data():
    truth = speed.Efficiencies(compute=0.6, memory=0.4, kernel_us=8.0, host_gbs=12.0, param_us=150.0)
    rows = []
    for i in range(8):  # rows in which each constant weighs: a few tens of ms each
        ops = speed.OpCounts()
        ops.add("bf16", (i + 1) * 3e12, 1e9)  # arithmetic-bound
        ops.add("none", 0, (8 - i) * 2e10)  # memory-bound
        ops.add("none", 0, 0, count=2000 * (i % 4 + 1))  # empty kernels: their fixed cost alone
        counts = speed.StepCounts(ops, speed.OpCounts(), 1, 4, host_bytes=5e8 * (i % 2), python_steps=200 * (i % 3))
        rows.append((counts, speed.images_per_second(counts, CARD, truth)))
    fitted = speed.fit(rows, CARD)
    for name in ("compute", "memory", "kernel_us", "host_gbs", "param_us"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.02), name


def test_the_stored_speed_model_meets_its_leave_one_out_targets():
    """benchmarks/speed_check.py fitted it on the 20 H100 rows: median error <= 15%, largest <= 30%."""
    model = speed.load_model()
    assert model is not None and len(model.errors) == 20
    assert statistics.median(map(abs, model.errors)) <= 0.15 and max(map(abs, model.errors)) <= 0.30
    low, high = model.range(40.0)
    assert low < 40.0 < high


def test_the_card_table_is_dense_sourced_and_complete():
    assert {"rtx3090", "rtx4090", "rtx5090", "rtxa6000", "l4", "l40s", "a100-40gb", "a100-80gb", "h100",
            "h200"} <= set(CARDS)
    for card in CARDS.values():
        assert card.source.startswith("https://"), card.key
        assert card.bf16_tflops > card.tf32_tflops > 0 and card.fp32_tflops > 0 and card.bandwidth_gbs > 0
        assert card.bf16_tflops < 1000  # no sparse figure: none of these reaches 1 PFLOP/s dense
    assert CARDS["h100"].bf16_tflops == 989.4 and CARDS["rtx4090"].bf16_tflops == 165.2
    assert find_card("RTX-4090") is CARDS["rtx4090"] and find_card("a100_80GB") is CARDS["a100-80gb"]
    assert find_card("h100") is CARDS["h100"] and find_card("nosuch") is None
    assert find_card("4090") is None and find_card("0") is None and find_card("-8") is None  # numbers are sizes
    # MFU's peak comes from the table by the device's name; other variants are not taken for the one listed
    assert card_for_device("NVIDIA H100 80GB HBM3") is CARDS["h100"]
    assert card_for_device("NVIDIA A100-SXM4-40GB") is CARDS["a100-40gb"]
    assert card_for_device("NVIDIA L4") is CARDS["l4"] and card_for_device("NVIDIA L40S") is CARDS["l40s"]
    assert card_for_device("NVIDIA H100 PCIe") is None and card_for_device("NVIDIA GeForce RTX 3090 Ti") is None
    assert usable_gib(24, 0.5) == pytest.approx(24 * DRIVER_SHARE - 0.5)
    assert [positive_size(t) for t in ("24", "0", "-8", "nan", "inf", "x")] == [24.0, None, None, None, None, None]
    assert math.isclose(DRIVER_SHARE, 139 / 141)


@pytest.mark.slow
def test_the_counts_still_give_the_speeds_the_stored_model_was_fitted_to():
    """A change to the operator counts or the time model moves a row's predicted speed away from the one
    in the committed fit (`benchmarks/speed_check.py`): then the fit is stale and must be run again."""
    import json
    from pathlib import Path

    from setr_lowmem.sizing import reference
    from setr_lowmem.sizing.forecast import forecast

    results = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "results").glob("speed_check_*.json"))
    stored = json.loads(results[-1].read_text())
    label, micro_batch = "head-and-loss checkpointing + classifier first", 16
    fitted = next(r["fitted_img_s"] for r in stored["rows"] if r["label"] == label and r["micro_batch"] == micro_batch)
    row = next(r for r in reference.ROWS if r.label == label and r.micro_batch == micro_batch)
    counts = forecast(row.configured(), plain_loop=True).counts
    model = speed.load_model()
    assert speed.images_per_second(counts, CARDS["h100"], model.efficiencies) == pytest.approx(fitted, rel=1e-3)
