"""Loading a trained model for evaluation and prediction, and drawing predictions."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from setr_lowmem.config import (
    Config,
    ConfigError,
    load_config,
    with_overrides,
    without_initial_weights,
)
from setr_lowmem.engine.checkpoint import (
    CheckpointError,
    load_model_weights,
    stored_config,
)
from setr_lowmem.memory.precision import apply_attention_kernel, autocast_factory
from setr_lowmem.model import SETR, build_setr


def model_config(checkpoint: str | Path, cfg_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config to rebuild a trained model with: `--cfg` when given, else the one the checkpoint
    or exported file carries; `key=value` overrides apply to either."""
    if cfg_path:
        return load_config(cfg_path, overrides)
    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    stored = stored_config(checkpoint)
    if stored is None:
        raise ConfigError(f"{checkpoint} carries no config (imported, or exported by an older version): give --cfg")
    return with_overrides(stored, overrides) if overrides else stored


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


def overlay(image: np.ndarray, pred: np.ndarray, palette: np.ndarray, names: list[str],
            alpha: float = 0.5, legend_rows: int = 24) -> Image.Image:
    """The prediction blended over the image, with a legend of the classes present (the largest
    first, at most `legend_rows`) in a strip on the right."""
    blended = image.astype(np.float32) * (1 - alpha) + palette[pred].astype(np.float32) * alpha
    canvas = Image.fromarray(blended.round().astype(np.uint8))
    counts = np.bincount(pred.ravel(), minlength=len(names))
    present = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k]][:legend_rows]
    font = ImageFont.load_default()
    row = 16
    width = 28 + max(int(ImageDraw.Draw(canvas).textlength(names[k], font=font)) for k in present) + 8
    out = Image.new("RGB", (canvas.width + width, max(canvas.height, row * len(present) + 8)), (255, 255, 255))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, k in enumerate(present):
        x, y = canvas.width + 6, 4 + i * row
        # the swatch is blended as its regions are: the colour over the mean of the image it covers
        under = image[pred == k].reshape(-1, image.shape[-1]).astype(np.float32).mean(0)
        swatch = (under * (1 - alpha) + palette[k].astype(np.float32) * alpha).round().astype(int)
        draw.rectangle((x, y + 1, x + 16, y + row - 3), fill=tuple(int(c) for c in swatch), outline=(0, 0, 0))
        draw.text((x + 22, y + 1), names[k], fill=(0, 0, 0), font=font)
    return out


def label_png(pred: np.ndarray, palette: np.ndarray) -> Image.Image:
    """The class map as a palette PNG: pixel values are the class indices (what a reader of label
    maps expects), shown in the dataset's colours by any image viewer."""
    image = Image.fromarray(pred.astype(np.uint8))  # "L"; putpalette makes it "P", values unchanged
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[: len(palette)] = palette[:256]
    image.putpalette(colours.ravel().tolist())
    return image
