"""Import a SETR checkpoint trained with mmsegmentation into this toolkit's model.

mmseg stores the encoder under `backbone.` with its own ViT naming (fused q,k,v in
`attn.attn.in_proj_weight`, as nn.MultiheadAttention); the heads and neck already use the
names this toolkit's modules have (`decode_head.`, `auxiliary_head.{k}.`, `neck.`). Only
the encoder keys are renamed; q,k,v are stacked in the same (q, k, v) x heads x head_dim
order in both, so the fused tensors carry over unchanged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from setr_lowmem.model.encoder import WeightsError, read_state_dict, shape_mismatch

log = logging.getLogger(__name__)

_BACKBONE_RULES = [
    (r"^backbone\.patch_embed\.projection\.", "encoder.patch_embed.proj."),
    (r"^backbone\.cls_token$", "encoder.cls_token"),
    (r"^backbone\.pos_embed$", "encoder.pos_embed"),
    (r"^backbone\.layers\.(\d+)\.ln1\.", r"encoder.blocks.\1.norm1."),
    (r"^backbone\.layers\.(\d+)\.ln2\.", r"encoder.blocks.\1.norm2."),
    (r"^backbone\.layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r"encoder.blocks.\1.attn.qkv.\2"),
    (r"^backbone\.layers\.(\d+)\.attn\.attn\.out_proj\.", r"encoder.blocks.\1.attn.proj."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"encoder.blocks.\1.mlp.fc1."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"encoder.blocks.\1.mlp.fc2."),
]


def mmseg_to_setr_lowmem(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an mmseg SETR state dict. Returns (renamed, keys that have no counterpart)."""
    out, unknown = {}, []
    for key, value in sd.items():
        if key.startswith(("decode_head.", "auxiliary_head.", "neck.")):
            out[key] = value
            continue
        for pattern, repl in _BACKBONE_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def load_mmseg_checkpoint(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load an mmseg SETR checkpoint (`state_dict` next to `meta`) into `model`.

    The position embedding is resized to the model's grid when the checkpoint was trained
    at another crop. A checkpoint of another model (a shape mismatch, a key missing or left
    over, a file of this toolkit) is an error: a partly imported model would train as if whole.
    """
    raw = read_state_dict(path)
    if any(k.startswith("encoder.") for k in raw):
        raise WeightsError(f"{path} is a model of this toolkit, not an mmsegmentation checkpoint: give it to "
                           "evaluate/predict with --checkpoint, or continue its run with --resume")
    sd, unknown = mmseg_to_setr_lowmem(raw)
    target = model.state_dict()
    if not any(k.startswith("auxiliary_head.") for k in target):  # the inference graph: the aux heads are not used
        sd = {k: v for k, v in sd.items() if not k.startswith("auxiliary_head.")}
    pos = sd.get("encoder.pos_embed")
    if pos is not None and pos.shape != target["encoder.pos_embed"].shape:
        sd["encoder.pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.encoder.patch_embed.grid_size), num_prefix_tokens=1,
            interpolation="bilinear", antialias=False, align_corners=False)
    mismatch = shape_mismatch(sd, target)
    if mismatch:
        raise WeightsError(f"{path} does not fit this model: {mismatch} (check model.decoder and data.num_classes)")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys) + unknown
    if missing or unexpected:  # half a model imported would train as if it were whole
        raise WeightsError(f"{path} is not an mmseg SETR checkpoint of this model: {len(missing)} of {len(target)} "
                           f"keys missing{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(unexpected)} "
                           f"unexpected{' (e.g. ' + unexpected[0] + ')' if unexpected else ''}")
    log.info("imported mmseg checkpoint %s: every key of the model (%d tensors)", path, len(sd))
    return {"missing": missing, "unexpected": unexpected}
