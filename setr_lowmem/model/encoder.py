"""The SETR encoder: timm's ViT-L/16 at the crop size, and its pretrained weights.

The encoder is timm's own `VisionTransformer` (its patch embedding, `Block`s and position
embedding), configured as mmsegmentation's SETR backbone: a patch projection without bias
(`patch_bias=False`), class token, learned position embedding for the crop's grid, no final
norm (each head normalises its input), dropout and drop-path 0. MLA runs its blocks without
the class token (mmseg's `with_cls_token=False`): the token and its position are added, then
dropped before the first block; the parameter stays and is counted.

At a size other than the crop (evaluation windows smaller than the crop, multi-scale tests,
whole images) it behaves as mmseg's ViT: the input is padded with zeros at the bottom/right
to a multiple of the patch size (mmseg's 'corner' padding) and the position grid is resized
bilinearly without antialiasing (timm's default would be bicubic with antialiasing).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from setr_lowmem.config import ModelConfig
from setr_lowmem.errors import SetrError

log = logging.getLogger(__name__)

# The weights the SETR paper starts from: ViT-L/16 pretrained on ImageNet-21k and
# fine-tuned at 384 (a 24x24 position grid).
DEFAULT_TIMM_WEIGHTS = "vit_large_patch16_384.augreg_in21k_ft_in1k"


class WeightsError(SetrError, ValueError):
    """A weights file that is missing, unreadable or of another model."""


class TappedViT(VisionTransformer):
    """timm's VisionTransformer whose forward returns the outputs of the tapped blocks.

    The outputs are NCHW maps of the patch tokens (class token dropped), taken after each
    block in `taps` without any norm. Being the module's `forward` matters beyond style:
    wrappers that act on module calls (DeepSpeed ZeRO-3 gathering the class token and
    position embedding, FSDP) see the encoder run.
    """

    def __init__(self, taps: list[int], with_cls_token: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.taps = sorted(set(taps))
        self.with_cls_token = with_cls_token

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC patch tokens -> NLC with the class token, plus the position embedding resized
        bilinearly (no antialias, align_corners False) to this input's grid, as mmseg's ViT."""
        b, h, w, c = x.shape
        pos = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                     num_prefix_tokens=self.num_prefix_tokens, interpolation="bilinear",
                                     antialias=False, align_corners=False)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        return self.pos_drop(x + pos)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, height, width = x.shape
        h, w = self.patch_embed.dynamic_feat_size((height, width))  # after the corner padding
        x = self._pos_embed(self.patch_embed(x))
        prefix = self.num_prefix_tokens
        if not self.with_cls_token:
            x, prefix = x[:, prefix:], 0
        x = self.norm_pre(x)
        outs = []
        for i, block in enumerate(self.blocks[:self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                outs.append(x[:, prefix:].reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return outs


def build_encoder(cfg: ModelConfig, img_size: int) -> TappedViT:
    encoder = TappedViT(
        taps=cfg.out_indices,
        with_cls_token=cfg.decoder != "mla",  # mmseg's setr_mla.py: with_cls_token=False
        img_size=img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        num_classes=0,
        global_pool="",
        final_norm=False,
        # Inputs of another size than the crop: NHWC patch tokens, the position grid resampled
        # (`_pos_embed`), and zero padding at the bottom/right to a multiple of the patch size.
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )
    # mmseg's ViT for SETR: patch_bias=False (timm always builds the bias)
    encoder.patch_embed.proj.register_parameter("bias", None)
    return encoder


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin or .safetensors file into a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = _torch_load(path)
    except WeightsError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is reported with the file
        raise WeightsError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from None
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "module"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return sd


def shape_mismatch(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> str:
    """'' if every key of `sd` that `target` has is of the same shape, else 'shape mismatch <first> (+n more)'."""
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
             for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if not wrong:
        return ""
    return f"shape mismatch {wrong[0]}" + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else "")


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # mmseg checkpoints carry a `meta` dict with objects the safe unpickler refuses.
        log.warning("%s holds more than tensors; loading it with the full unpickler (trusted files only)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def load_pretrained_encoder(encoder: VisionTransformer, source: str) -> dict[str, list[str]]:
    """Load ViT weights into `encoder`, resizing the position grid to the crop's.

    `source` is a local file or 'timm:<name>' (timm's usual pretrained download). The 24x24
    position grid is resized bilinearly (align_corners False), the class-token position
    kept, as mmseg's SETR does; the classifier and final norm are dropped. Returns and logs
    the missing and unexpected keys; a file of another model is an error.
    """
    if source.startswith("timm:"):
        import timm

        name = source.removeprefix("timm:") or DEFAULT_TIMM_WEIGHTS
        try:
            donor = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:  # noqa: BLE001 - hub, network and name errors all end the same way
            raise WeightsError(f"cannot get timm weights {name!r} ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else 'no detail'}); offline, set "
                               "model.pretrained to a local .pth/.npz/.safetensors file") from None
        sd = donor.state_dict()
        where = f"timm model {name}"
    elif source.endswith(".npz"):
        return _load_npz(encoder, source)
    else:
        sd = read_state_dict(source)
        where = str(source)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "norm.", "fc_norm."))}
    if sd.pop("patch_embed.proj.bias", None) is not None:
        log.info("dropped the patch projection's bias from %s: SETR's encoder has none (as mmseg's)", where)
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise WeightsError(f"{where} is not a timm ViT state dict (no pos_embed / patch_embed.proj.weight)")
    sd = checkpoint_filter_fn(sd, encoder, interpolation="bilinear", antialias=False, align_corners=False)
    target = encoder.state_dict()
    mismatch = shape_mismatch(sd, target)
    if mismatch:
        raise WeightsError(f"{where} is of another model: {mismatch}")
    result = encoder.load_state_dict(sd, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if len(report["missing"]) > len(target) // 2:
        raise WeightsError(f"{where} is of another model: {len(report['missing'])} of {len(target)} "
                           f"encoder keys missing, e.g. {report['missing'][0]}")
    log.info("loaded encoder weights from %s: %d missing, %d unexpected keys%s", where,
             len(report["missing"]), len(report["unexpected"]),
             f" (missing: {report['missing'][:4]})" if report["missing"] else "")
    return report


def _load_npz(encoder: VisionTransformer, path: str) -> dict[str, list[str]]:
    """Google's JAX/big_vision .npz: timm's own reader, which also resizes the position grid
    bilinearly (antialias off, align_corners False) and skips the final norm we do not have.
    The reader writes the patch bias unconditionally: it gets a bias to write and loses it after."""
    from timm.models.vision_transformer import _load_weights

    if not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path}")
    proj = encoder.patch_embed.proj
    proj.bias = torch.nn.Parameter(proj.weight.new_zeros(proj.out_channels))
    try:
        _load_weights(encoder, path)
    except (KeyError, RuntimeError, ValueError) as err:
        raise WeightsError(f"{path} is not ViT weights of this geometry: {type(err).__name__}: "
                           f"{str(err).splitlines()[0]}") from None
    finally:
        proj.register_parameter("bias", None)
    log.info("loaded encoder weights from %s (timm's npz reader: every encoder tensor found); dropped the "
             "patch projection's bias: SETR's encoder has none (as mmseg's)", path)
    return {"missing": [], "unexpected": []}
