"""A trained SETR in the Hugging Face Hub's format: `save_pretrained(dir)`, `from_pretrained(dir or
repo id)` and `push_to_hub(repo id)` from `huggingface_hub`'s PyTorch mixin. The directory holds
`model.safetensors`, `config.json` (this toolkit's whole config, so the model rebuilds itself) and a
model card (README.md) that says what the model is, how it was trained and how well it did.

    model = PretrainedSETR.from_checkpoint("runs/pup_ade20k/checkpoints/iter_0160000")
    model.save_pretrained("setr-pup-ade20k")             # or model.push_to_hub("me/setr-pup-ade20k")
    model = PretrainedSETR.from_pretrained("setr-pup-ade20k")
    classes = model.predict(image)                       # uint8 H x W x 3 (or a PIL image) -> H x W classes
    logits = model(images)                               # normalised N x 3 x H x W -> main-head logits
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from setr_lowmem.config import Config, config_from_dict, config_to_dict, dump_config, without_initial_weights
from setr_lowmem.data.classes import class_names
from setr_lowmem.engine.checkpoint import CheckpointError, load_model_weights, usual_permissions
from setr_lowmem.engine.evaluate import predict_classes
from setr_lowmem.engine.inference import model_config
from setr_lowmem.model import build_setr


class PretrainedSETR(nn.Module, PyTorchModelHubMixin, library_name="setr-lowmem",
                     tags=["image-segmentation", "semantic-segmentation", "setr", "vision-transformer"],
                     pipeline_tag="image-segmentation"):
    """SETR whose Hub config is the toolkit's config as a plain dict."""

    def __init__(self, config: dict):
        super().__init__()
        self.cfg: Config = config_from_dict(config, "the model's config.json")
        self.setr = build_setr(without_initial_weights(self.cfg))
        self.trained: dict = {}  # what the model card says of its training (from_checkpoint fills it)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The main head's logits for normalised images (N x 3 x H x W, the config's mean and std), cropped
        to the image: PUP gives H x W, Naive and MLA a quarter of each side (rounded up). `predict`
        runs the whole test protocol (resize, sliding window, full size) on a raw image instead."""
        return self.setr.crop_to_input(self.setr.predict(images), images.shape[-2:])

    @torch.no_grad()
    def predict(self, image) -> np.ndarray:
        """The class of every pixel of `image` (uint8 H x W x 3 RGB, or a PIL image), as the toolkit's
        evaluation predicts it: normalised with the model's own mean and std, resized to the config's
        test scale, whole-image or sliding-window inference, back to the image's size."""
        image = np.array(image.convert("RGB") if hasattr(image, "convert") else image)  # a writable copy
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"predict takes a uint8 H x W x 3 RGB image or a PIL image, got {image.dtype} "
                             f"{list(image.shape)}")
        self.eval()
        device = next(self.parameters()).device
        return predict_classes(self.setr, image, self.cfg, device).numpy().astype(np.uint8)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.cfg.data.dataset, self.cfg.data.num_classes)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, cfg_path: str | None = None) -> PretrainedSETR:
        """From a checkpoint directory or an exported `.safetensors` file (and its stored config)."""
        cfg = model_config(checkpoint, cfg_path)
        model = cls(config_to_dict(cfg))
        load_model_weights(model.setr, checkpoint)
        model.trained = training_record(Path(checkpoint))
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> PretrainedSETR:
        """`PyTorchModelHubMixin.from_pretrained`, with one line naming the folder or repository when
        neither holds a model (a missing local folder is not sent to the Hub as a repository id)."""
        where = str(pretrained_model_name_or_path)
        local = os.path.isabs(where) or where.startswith((".", "~")) or where.count("/") > 1 or os.path.exists(where)
        if local and not Path(where).expanduser().is_dir():
            raise CheckpointError(f"model folder not found: {where}")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - hub, network and file errors all end the same way
            raise CheckpointError(f"cannot load a model from {where}: {type(err).__name__}: "
                                  f"{(str(err).splitlines() or [''])[0]}") from None

    def save_pretrained(self, save_directory: str | Path, *, repo_id: str | None = None, **kwargs):
        """The mixin's, with the model card naming the repository (or the folder) it loads from."""
        self._card_name = repo_id or Path(save_directory).name
        return super().save_pretrained(save_directory, repo_id=repo_id, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        for f in Path(save_directory).glob("*.safetensors"):
            usual_permissions(f)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """What the model is, how it was trained and how well it did, and how to load and run it."""
        return ModelCard(model_card(self.cfg, self.trained, getattr(self, "_card_name", self.cfg.name)))


def training_record(checkpoint: Path) -> dict:
    """The iteration a checkpoint (or an exported model) was saved at and its run's last validation up to
    then, from the run directory's `metrics.jsonl` (empty where there is none: an imported file)."""
    checkpoint = checkpoint.resolve()  # a relative `iter_0000002` has no parents to walk up to
    run_dir = checkpoint.parents[1] if checkpoint.is_dir() else checkpoint.parent
    meta = checkpoint / "meta.json" if checkpoint.is_dir() else None
    iteration = json.loads(meta.read_text())["iteration"] if meta and meta.is_file() else None
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return {"iteration": iteration} if iteration is not None else {}
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a killed run's half-written last line
            continue
    vals = [r for r in records if "val" in r and (iteration is None or r["iteration"] <= iteration)]
    out = {"iteration": iteration if iteration is not None else max((r["iteration"] for r in records), default=None)}
    if vals:
        out["val"] = {**vals[-1]["val"], "iteration": vals[-1]["iteration"]}
    return out


def model_card(cfg: Config, trained: dict, name: str) -> str:
    """The README of a Hub directory: the model, its data and classes, its training, its validation
    figures, its config and how to load and run it. Nothing is said that is not known."""
    names = class_names(cfg.data.dataset, cfg.data.num_classes)
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    iteration = trained.get("iteration")
    trained_for = (f"{iteration} of {cfg.schedule.iters} iterations" if iteration is not None
                   else f"a schedule of {cfg.schedule.iters} iterations")
    val = trained.get("val")
    e = cfg.eval
    protocol = (("single scale" if e.scales == [1.0] else f"scales {e.scales}") + (" with flip" if e.flip else "")
                + f", {e.mode} inference")
    figures = (f"mIoU **{val['mIoU']:.2f}**, aAcc {val['aAcc']:.2f}, mAcc {val['mAcc']:.2f} on {val['images']} "
               f"images of the `{cfg.data.val_split}` split at iteration {val['iteration']} ({protocol})" if val
               else "no validation was recorded for this model")
    head = ("at the input size" if cfg.model.decoder == "pup" else "at a quarter of the input size")
    return f"""---
library_name: setr-lowmem
pipeline_tag: image-segmentation
tags: [image-segmentation, semantic-segmentation, setr, vision-transformer]
---

# SETR-{cfg.model.decoder.upper() if cfg.model.decoder != "naive" else "Naive"} on {cfg.data.dataset}

SETR (Zheng et al., CVPR 2021: a {cfg.model.depth}-layer ViT encoder, {cfg.model.embed_dim} wide, patch
{cfg.model.patch_size}, with the {cfg.model.decoder} decoder), trained with the setr-lowmem toolkit on
`{cfg.data.dataset}` at {cfg.data.crop} x {cfg.data.crop} crops.

- Classes ({cfg.data.num_classes}; label 255 is ignored): {shown}
- Training: {trained_for}, total batch {cfg.train.total_batch}, {cfg.optim.name} at lr {cfg.optim.lr:g} (heads
  x{cfg.optim.head_lr_mult:g}), poly decay to {cfg.schedule.min_lr:g}; {cfg.memory.precision},
  checkpointing {cfg.memory.checkpointing}
- Validation: {figures}

## Use

```python
from setr_lowmem.engine.hub import PretrainedSETR

model = PretrainedSETR.from_pretrained("{name}")
classes = model.predict(image)        # uint8 H x W x 3 RGB or a PIL image -> H x W class indices
names = model.class_names             # class index -> name
logits = model(images)                # normalised N x 3 x H x W -> main-head logits {head}
```

Or from the command line, in a local copy of this folder: `setr-predict --checkpoint {name} --input photos/ --out preds/`.

## Config

The whole training config (also in `config.json`):

```yaml
{dump_config(cfg).rstrip()}
```
"""
