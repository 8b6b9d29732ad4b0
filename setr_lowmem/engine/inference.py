"""Loading a trained model for evaluation and prediction, and drawing predictions."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from setr_lowmem.config import Config, without_initial_weights
from setr_lowmem.engine.checkpoint import load_model_weights
from setr_lowmem.memory.precision import apply_attention_kernel, autocast_factory
from setr_lowmem.model import SETR, build_setr


def load_trained(cfg: Config, checkpoint: str | Path, device: torch.device | None = None):
    """(model in eval mode on `device`, autocast factory) from an exported file or a checkpoint dir."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the trained weights replace everything: do not fetch or import the initial ones
    model: SETR = build_setr(without_initial_weights(cfg))
    load_model_weights(model, checkpoint)
    apply_attention_kernel(model, "sdpa")
    model.to(device).eval()
    precision = cfg.memory.precision if device.type == "cuda" else "fp32"
    autocast = autocast_factory("bf16", device) if precision != "fp32" else contextlib.nullcontext
    return model, autocast


def palette(num_classes: int) -> np.ndarray:
    """Distinct colours per class (a fixed random palette; class 0 first)."""
    rng = np.random.default_rng(3)
    return rng.integers(40, 256, (max(num_classes, 1), 3)).astype(np.uint8)


def overlay(image: np.ndarray, pred: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    colours = palette(num_classes)[pred]
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
