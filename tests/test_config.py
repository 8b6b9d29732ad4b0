"""The strict config: the nine paper configs load with the spec's values; bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from setr_lowmem.config import CONFIG_DIR, ConfigError, load_config, save_config

PAPER = [f"{d}_{s}" for d in ("naive", "pup", "mla") for s in ("ade20k", "cityscapes", "pascal_context")]

# (crop, classes, total batch, iterations, lr per decoder, eval crop, eval stride, base scale)
SPEC = {
    "ade20k": (512, 150, 16, 160000, dict(naive=0.01, pup=0.001, mla=0.001), 512, 341, (2048, 512)),
    "cityscapes": (768, 19, 8, 80000, dict(naive=0.01, pup=0.01, mla=0.002), 768, 512, (2049, 1025)),
    "pascal_context": (480, 60, 16, 80000, dict(naive=0.01, pup=0.001, mla=0.001), 480, 320, (520, 520)),
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_match_the_spec(name):
    decoder, dataset = name.split("_", 1)
    cfg = load_config(f"{name}.yaml")  # a bare file name resolves against configs/
    crop, classes, batch, iters, lrs, ecrop, estride, base = SPEC[dataset]
    assert (cfg.model.decoder, cfg.data.crop, cfg.data.num_classes) == (decoder, crop, classes)
    assert (cfg.train.total_batch, cfg.schedule.iters, cfg.optim.lr) == (batch, iters, lrs[decoder])
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.head_lr_mult) == ("sgd", 0.9, 0.0, 10.0)
    assert (cfg.schedule.power, cfg.schedule.min_lr, cfg.schedule.warmup_iters) == (0.9, 1e-4, 0)
    assert (cfg.loss.main_weight, cfg.loss.aux_weight, cfg.loss.ignore_index, cfg.loss.avg_non_ignore) == (1.0, 0.4, 255, False)
    assert (cfg.eval.crop, cfg.eval.stride, cfg.data.base_scale, cfg.data.ratio_range) == (ecrop, estride, base, (0.5, 2.0))
    assert cfg.data.cat_max_ratio == 0.75 and cfg.data.flip_prob == 0.5
    assert cfg.model.out_indices == ([5, 11, 17, 23] if decoder == "mla" else [9, 14, 19, 23])
    assert cfg.model.naive_aux_convs == (1 if dataset == "cityscapes" else 2)
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    assert "_base_" not in text


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


BAD = [
    ("model:\n  decoderr: pup\n", "unknown key model.decoderr"),
    ("optim:\n  lr: fast\n", "optim.lr: Input should be a valid number, got 'fast'"),
    ("data:\n  crop: 500\n", "data.crop 500 is not divisible by model.patch_size 16"),
    ("model:\n  decoder: pupp\n", "model.decoder: Input should be 'naive', 'pup' or 'mla', got 'pupp'"),
    ("data:\n  num_classes: 0\n", "data: num_classes must be positive, got 0"),
    ("train:\n  total_batch: 16\n  micro_batch: 3\n", "total_batch 16 is not a multiple of micro_batch 3"),
    ("memory:\n  deepspeed:\n    stage: 2\n    offload_params: true\n", "offload_params needs ZeRO stage 3"),
    ("memory:\n  channels_last: true\n  deepspeed:\n    stage: 2\n", "channels_last cannot be used with DeepSpeed"),
    ("memory:\n  fused_upsample_backend: cuda\n",
     "memory.fused_upsample_backend: Input should be 'auto', 'triton' or 'torch', got 'cuda'"),
    ("model:\n  out_indices: [1, 2, 3, 30]\n", "out_indices [30] outside the encoder's blocks 0..23"),
    ("model: [1, 2]\n", "model: Input should be an object"),
    ("optim:\n  lr: 1e-3\n  bits: 4\n", "optim.bits: Input should be 32 or 8, got 4"),
]


@pytest.mark.parametrize("text,expected", BAD)
def test_bad_config_is_one_line_naming_key_and_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert expected in msg


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: nosuch.yaml"):
        load_config("nosuch.yaml")


def test_overrides_are_typed_like_the_file(tmp_path):
    cfg = load_config("pup_ade20k", ["optim.lr=1e-2", "memory.deepspeed.stage=2", "data.ratio_range=[1, 1.5]"])
    assert cfg.optim.lr == 0.01 and cfg.memory.deepspeed.stage == 2 and cfg.data.ratio_range == (1.0, 1.5)
    with pytest.raises(ConfigError, match=r"optim\.lr: Input should be a valid number, got 'abc'") as err:
        load_config("pup_ade20k", ["optim.lr=abc"])
    assert "overrides optim.lr=abc" in str(err.value)
    with pytest.raises(ConfigError, match="unknown key optim.lrr"):
        load_config("pup_ade20k", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config("pup_ade20k", ["optim.lr"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-3\nschedule:\n  min_lr: 5E-5\n"))
    assert cfg.optim.lr == 1e-3 and cfg.schedule.min_lr == 5e-5


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config("mla_cityscapes", ["train.micro_batch=4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
