"""`build_setr(cfg)`: the plain SETR model (encoder, optional MLA neck, decode head, aux heads).

The model holds no checkpointing, precision or optimizer logic: the memory techniques are
applied from outside by `setr_lowmem.memory`. The heads offer two hooks that the decoder
rewrites set, both off by default and both exact: `classify_before_last_upsample` (the 1x1
classifier before the last bilinear upsample) and each `Upsample`'s `resize` (its backward as
matrix products); and `forward_deferred`, the logits before the last upsample, which the loss
uses so that the fused loss can take over that upsample.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from setr_lowmem.config import Config
from setr_lowmem.model.encoder import build_encoder, load_pretrained_encoder
from setr_lowmem.model.heads import FCNAuxHead, MLAHead, MLANeck, UpHead

log = logging.getLogger(__name__)


class SETR(nn.Module):
    """ViT encoder whose tapped layers feed one main head and optional aux heads.

    `encode(images)` returns the decoder inputs (the tapped token maps as NCHW, or for MLA
    the neck's outputs); `heads` lists the main head first, then the aux heads; `forward`
    returns their logits in that order (at the heads' own resolution; the loss and the
    evaluator resize them to the label's size).
    """

    def __init__(self, encoder: nn.Module, decode_head: nn.Module, auxiliary_head: list[nn.Module],
                 out_indices: list[int], neck: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = nn.ModuleList(auxiliary_head)
        self.out_indices = list(out_indices)

    @property
    def heads(self) -> list[nn.Module]:
        return [self.decode_head, *self.auxiliary_head]

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        by_layer = dict(zip(self.encoder.taps, self.encoder(images)))
        inputs = [by_layer[i] for i in self.out_indices]
        return self.neck(inputs) if self.neck is not None else inputs

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every head's logits, cropped to the part that covers the image (`crop_to_input`)."""
        inputs = self.encode(images)
        return [self.crop_to_input(head(inputs), images.shape[-2:]) for head in self.heads]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Main-head logits only, uncropped: for an image whose sides are not multiples of the patch size
        they cover the encoder's zero padding too, and mmsegmentation's inference (`engine.evaluate`)
        resizes them to the image whole, padding included; `forward` crops instead."""
        return self.decode_head(self.encode(images))

    def crop_to_input(self, logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """`logits` of an image of `size` without the rows and columns that lie over the encoder's zero
        padding (it pads the bottom and right to a multiple of the patch size): PUP's main head
        then gives the image's own size, Naive's and MLA's a quarter of it, rounded up."""
        patch = self.encoder.patch_embed.patch_size[0]
        out = []
        for side, have in zip(size, logits.shape[-2:]):
            padded = -(-side // patch) * patch
            out.append(-(-side * have // padded))
        return logits[..., : out[0], : out[1]]


def build_setr(cfg: Config) -> SETR:
    """Build SETR from `cfg.model` at the crop size `cfg.data.crop`, loading weights if configured."""
    m, classes = cfg.model, cfg.data.num_classes
    encoder = build_encoder(m, cfg.data.crop)
    c, e = m.head_channels, m.embed_dim
    neck = None
    aux: list[nn.Module] = []
    if m.decoder == "naive":
        head = UpHead(e, c, classes, num_convs=1, up_scale=4, kernel_size=1, dropout=m.dropout, in_index=3)
        if m.aux_heads:
            aux = [UpHead(e, c, classes, num_convs=m.naive_aux_convs, up_scale=4, kernel_size=1,
                          dropout=m.dropout, in_index=i) for i in range(3)]
    elif m.decoder == "pup":
        head = UpHead(e, c, classes, num_convs=4, up_scale=2, kernel_size=3, dropout=m.dropout, in_index=3)
        if m.aux_heads:
            aux = [UpHead(e, c, classes, num_convs=2, up_scale=4, kernel_size=3, dropout=m.dropout, in_index=i)
                   for i in range(3)]
    else:
        neck = MLANeck(e, c)
        head = MLAHead(c, m.mla_channels, classes, dropout=m.dropout)
        if m.aux_heads:
            aux = [FCNAuxHead(c, classes, in_index=i, dropout=m.dropout) for i in range(4)]
    model = SETR(encoder, head, aux, m.out_indices, neck)
    if m.pretrained:
        load_pretrained_encoder(model.encoder, m.pretrained)
    if m.mmseg_checkpoint:
        from setr_lowmem.model.convert import load_mmseg_checkpoint

        load_mmseg_checkpoint(model, m.mmseg_checkpoint)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def is_head_parameter(name: str) -> bool:
    """Whether parameter `name` (of SETR) gets the head lr multiplier: mmseg matches 'head' in the
    name (decode and aux heads; the MLA neck keeps the base lr)."""
    return name.startswith(("decode_head.", "auxiliary_head."))
