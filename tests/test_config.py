"""The strict config: the nine paper configs load with the spec's values; bad input is one clear line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from setr_lowmem.config import CONFIG_DIR, ConfigError, dump_config, load_config, missing_keys, save_config

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
    ("model:\n  decoderr: pup\n", "unknown key model.decoderr (did you mean model.decoder?)"),
    ("optim:\n  learning_rate: 0.1\n", "unknown key optim.learning_rate"),
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


def complete(**replace: str) -> str:
    """pup_ade20k.yaml's text with `key: value` lines replaced (key: the line's text up to the colon)."""
    text = (CONFIG_DIR / "pup_ade20k.yaml").read_text()
    for key, line in replace.items():
        text, n = re.subn(rf"(?m)^(\s*){key}: .*$", lambda m: m.group(1) + line, text, count=1)
        assert n == 1, key
    return text


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, complete(lr="lr: 1e-3", min_lr="min_lr: 5E-5")))
    assert cfg.optim.lr == 1e-3 and cfg.schedule.min_lr == 5e-5


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_lists_every_key(name):
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    assert missing_keys(yaml.safe_load(text)) == []
    assert dump_config(load_config(name), "x").split("\n", 2)[2] in text  # the same values, comments and order


STRICT = [
    # (what, file bytes, the error's fragment)
    ("a file that is not UTF-8 text (Latin-1)", "name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 9)"),
    ("UTF-16", "name: x\n".encode("utf-16"), "not UTF-8 text"),
    ("random bytes", bytes(range(256)), "not UTF-8 text"),
    ("nesting 20,000 deep", ("[" * 20000 + "]" * 20000).encode(), "nested too deeply"),
    ("a !!binary value", complete(pretrained="pretrained: !!binary aGVsbG8=").encode(),
     "model.pretrained: a YAML bytes is not a config value"),
    ("a !!set value", complete(pretrained="pretrained: !!set {a, b}").encode(),
     "model.pretrained: a YAML set is not a config value"),
    ("a key given twice", complete(lr="lr: 0.001\n  lr: 0.5").encode(), "key 'lr' is given twice"),
    ("a file with only a name", b"name: mine\n", "key(s) missing (model.decoder, model.embed_dim, model.depth"),
    ("a negative MLP ratio", complete(mlp_ratio="mlp_ratio: -1").encode(), "mlp_ratio must be positive"),
    ("an ignore index other than 255", complete(ignore_index="ignore_index: -1").encode(),
     "ignore_index must be 255"),
    ("a negative aux weight", complete(aux_weight="aux_weight: -1").encode(), "a negative weight rewards"),
    ("min_lr above lr", complete(min_lr="min_lr: 0.5").encode(), "schedule.min_lr 0.5 is above optim.lr 0.001"),
    ("a test scale below one patch", complete(scales="scales: [0.001]").encode(), "below one patch (16)"),
    ("a name that leaves the runs folder", complete(name="name: ../../../x").encode(), "must be a plain name"),
]


@pytest.mark.parametrize("what,data,expected", STRICT, ids=[s[0] for s in STRICT])
def test_a_config_is_read_strictly(tmp_path, what, data, expected):
    path = tmp_path / "my.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert expected in str(err.value)


def test_an_unquoted_date_is_a_string():
    assert load_config("pup_ade20k", ["name=2026-12-01"]).name == "2026-12-01"


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config("mla_cityscapes", ["train.micro_batch=4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_code_changes_a_config_typed_as_the_command_line_would():
    """replace_keys gives the config that the same overrides give, without writing them out, and
    checks a section with all its changes at once (ZeRO off with its bf16 weights)."""
    from setr_lowmem.config import replace_keys, with_overrides

    cfg = load_config("pup_ade20k", ["memory.deepspeed.stage=2", "memory.precision=bf16_weights"])
    changes = {"memory.deepspeed.stage": 0, "memory.precision": "bf16", "train.micro_batch": 4, "optim.bits": 8}
    assert replace_keys(cfg, changes) == with_overrides(cfg, ["memory.deepspeed.stage=0", "memory.precision=bf16",
                                                              "train.micro_batch=4", "optim.bits=8"])
    assert replace_keys(cfg, {}) is cfg
    for bad, says in (({"train.micro_batch": 3}, "train: total_batch 16 is not a multiple of micro_batch 3"),
                      ({"memory.checkpointng": "full"}, "unknown key memory.checkpointng"),
                      ({"memory.checkpointing": "most"}, "memory.checkpointing: Input should be")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            replace_keys(cfg, bad)


def test_the_train_command_lists_prints_and_versions(tmp_path):
    """--list-configs names every shipped config; --print-config prints the resolved config, which loads
    back as the same config; --version names the toolkit and torch; none of them trains anything."""
    from setr_lowmem.config import config_from_text
    from tests.bad_inputs import run_launcher

    code, out, _ = run_launcher("train", ["--list-configs"])
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == sorted(
        p.stem for p in CONFIG_DIR.glob("*.yaml"))
    code, out, _ = run_launcher("train", ["--cfg", "test_tiny", "--print-config", "optim.lr=0.5"])
    assert code == 0 and config_from_text(out, "printed") == load_config("test_tiny", ["optim.lr=0.5"])
    (tmp_path / "printed.yaml").write_text(out)
    assert load_config(tmp_path / "printed.yaml").optim.lr == 0.5  # a complete file: a user's own config
    code, out, _ = run_launcher("train", ["--version"])
    assert code == 0 and out.startswith("setr-lowmem ") and "torch " in out
