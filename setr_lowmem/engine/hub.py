"""A trained SETR in the Hugging Face Hub's format: `save_pretrained(dir)`, `from_pretrained(dir or
repo id)` and `push_to_hub(repo id)` from `huggingface_hub`'s PyTorch mixin. The directory holds
`model.safetensors` and `config.json` (this toolkit's whole config, so the model rebuilds itself).

    model = PretrainedSETR.from_checkpoint("runs/pup_ade20k/checkpoints/iter_0160000")
    model.save_pretrained("setr-pup-ade20k")             # or model.push_to_hub("me/setr-pup-ade20k")
    model = PretrainedSETR.from_pretrained("setr-pup-ade20k")
    logits = model(images)                               # (N, classes, H/4, W/4), the main head
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from setr_lowmem.config import Config, config_from_dict, config_to_dict, without_initial_weights
from setr_lowmem.engine.checkpoint import load_model_weights
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The main head's logits at a quarter of the input size (see `setr_lowmem.engine.evaluate`
        for whole-image and sliding-window inference at full resolution)."""
        return self.setr.predict(images)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, cfg_path: str | None = None) -> PretrainedSETR:
        """From a checkpoint directory or an exported `.safetensors` file (and its stored config)."""
        cfg = model_config(checkpoint, cfg_path)
        model = cls(config_to_dict(cfg))
        load_model_weights(model.setr, checkpoint)
        return model.eval()
