"""Shared fixtures: tiny SETR configs that build and run on the CPU in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

# DeepSpeed picks its accelerator at import; on machines without a GPU it must be told.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
# DeepSpeed JIT-builds its CPU communication op on first use (about 30 s); keep the build for
# every test process of this checkout instead of repeating it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache",
                                                           "torch_extensions"))

# Under pytest-xdist (`-n N`, one worker per core) each worker and the runs it launches compute on
# one thread: N workers of N threads each oversubscribe the cores (the five loss-decrease runs of
# tests/test_train.py took 78.6 s on two threads each, 49.4 s on one, two workers on 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The Triton kernels run on CPU tensors under Triton's interpreter; it must be chosen before the
# kernels are first imported. On a machine with a GPU they are tested as compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from setr_lowmem.config import Config, config_from_dict  # noqa: E402

TINY_MODEL = dict(embed_dim=32, depth=2, num_heads=2, head_channels=16, mla_channels=8,
                  out_indices=[0, 0, 1, 1], pretrained="", mmseg_checkpoint="")


def tiny_config(decoder: str = "pup", **sections) -> Config:
    """A 2-block, 32-wide SETR on 64x64 crops of the built-in dataset; `sections` override per section."""
    data = dict(dataset="synthetic", num_classes=5, crop=64, base_scale=[128, 64], num_workers=0,
                synthetic=dict(num_train=16, num_val=4, size=64, seed=0))
    raw = dict(
        name=f"tiny_{decoder}",
        model=dict(TINY_MODEL, decoder=decoder),
        data=data,
        optim=dict(lr=0.01),
        schedule=dict(iters=4),
        memory=dict(checkpointing="none", precision="fp32", attention="sdpa"),
        train=dict(total_batch=2, micro_batch=2, log_every=1, val_every=0, ckpt_every=0),
        eval=dict(mode="slide", crop=64, stride=48),
    )
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return config_from_dict(raw, "tiny_config")


@pytest.fixture
def tiny():
    return tiny_config


def fan_in_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Weights of fan-in scale and zero biases (norms left at one): activations of order one at every
    layer, so that outputs differ from pixel to pixel and a wrong bias or a dropped token shows
    (timm's N(0, 0.02) initialisation gives nearly constant outputs that hide both)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(std=p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.zero_()
    return model
