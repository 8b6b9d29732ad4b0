"""SETR model: spec parameter counts, tiny forward/backward, pretrained and mmseg weight import."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from setr_lowmem.config import load_config
from setr_lowmem.model.loss import SegmentationLoss, resize_to
from setr_lowmem.model import build_setr, count_parameters
from setr_lowmem.model.encoder import WeightsError
from tests.conftest import tiny_config

# docs/setr-spec.md, "Parameter counts": (config, aux heads) -> millions
SPEC_COUNTS = {
    ("naive_ade20k", True): 305.56, ("pup_ade20k", True): 317.29, ("mla_ade20k", True): 309.57,
    ("naive_cityscapes", True): 306.54, ("pup_cityscapes", True): 318.47, ("mla_cityscapes", True): 310.68,
    ("naive_ade20k", False): 304.45, ("pup_ade20k", False): 308.32, ("mla_ade20k", False): 309.42,
}


@pytest.mark.parametrize("name,aux", list(SPEC_COUNTS))
def test_parameter_counts_match_the_spec(name, aux):
    cfg = load_config(name, ["model.pretrained=", f"model.aux_heads={str(aux).lower()}"])
    with torch.device("meta"):
        model = build_setr(cfg)
    assert round(count_parameters(model) / 1e6, 2) == SPEC_COUNTS[(name, aux)]


# mmsegmentation 1.2.2's own count of its SETR configs (docs/setr-spec.md; tests/data/mmseg_ref/param_counts.json)
MMSEG_EXACT = {"naive_ade20k": 305_557_592, "pup_ade20k": 317_290_072, "mla_ade20k": 309_569_262,
               "naive_cityscapes": 306_535_500, "pup_cityscapes": 318_466_124, "mla_cityscapes": 310_678_111}


@pytest.mark.parametrize("name", list(MMSEG_EXACT))
def test_parameter_counts_equal_mmsegmentation_exactly(name):
    with torch.device("meta"):
        model = build_setr(load_config(name, ["model.pretrained="]))
    assert count_parameters(model) == MMSEG_EXACT[name]


@pytest.mark.parametrize("crop,expected", [(512, 304.15), (768, 305.46), (480, 304.02)])
def test_encoder_alone_matches_the_spec(crop, expected):
    cfg = load_config("pup_ade20k", ["model.pretrained=", f"data.crop={crop}"])
    with torch.device("meta"):
        model = build_setr(cfg)
    assert round(count_parameters(model.encoder) / 1e6, 2) == expected


@pytest.mark.parametrize("decoder", ["naive", "pup", "mla"])
def test_tiny_forward_backward(decoder):
    torch.manual_seed(0)
    cfg = tiny_config(decoder)
    model = build_setr(cfg)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    logits = model(images)
    assert len(logits) == (5 if decoder == "mla" else 4)  # main + aux
    for x in logits:
        assert x.shape[:2] == (2, 5)
        assert resize_to(x, labels.shape[-2:]).shape == (2, 5, 64, 64)
    if decoder == "pup":  # PUP's four x2 stages end at the input resolution
        assert logits[0].shape[-2:] == (64, 64)
    loss, parts = SegmentationLoss(model, cfg.loss)(images, labels)
    loss.backward()
    assert torch.isfinite(loss) and parts.shape == (len(logits),)
    grads = {n: p.grad for n, p in model.named_parameters()}
    if decoder == "mla":  # the class token is dropped before the first block: in the graph, gradient zero
        assert torch.count_nonzero(grads.pop("encoder.cls_token")) == 0
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_patch_projection_has_no_bias():
    model = build_setr(tiny_config("pup"))
    assert model.encoder.patch_embed.proj.bias is None
    assert not any("patch_embed.proj.bias" in k for k in model.state_dict())


@pytest.mark.parametrize("decoder", ["naive", "pup", "mla"])
def test_only_mla_runs_without_the_class_token(decoder):
    """mmseg's MLA config sets with_cls_token=False: the class token (and its position) cannot move
    MLA's outputs, while Naive and PUP attend to it in every block."""
    torch.manual_seed(0)
    model = build_setr(tiny_config(decoder)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.encoder.cls_token.add_(3.0)
        model.encoder.pos_embed[:, 0].add_(3.0)
        after = model(x)
    same = all(torch.equal(a, b) for a, b in zip(before, after))
    assert same == (decoder == "mla")


def test_encoder_pads_at_the_corner_and_resizes_positions_bilinearly():
    """A size that is not a multiple of 16 is zero-padded at the bottom/right (mmseg's 'corner'
    padding); the position grid is resized bilinearly without antialiasing (not timm's bicubic)."""
    torch.manual_seed(0)
    encoder = build_setr(tiny_config("pup")).encoder.eval()
    with torch.no_grad():
        encoder.pos_embed.normal_()
        x = torch.randn(1, 3, 50, 70)
        padded = F.pad(x, [0, 10, 0, 14])  # 64 x 80
        for a, b in zip(encoder(x), encoder(padded)):
            assert a.shape[-2:] == (4, 5)
            torch.testing.assert_close(a, b)
        tokens = encoder._pos_embed(torch.zeros(1, 3, 5, 32))  # a 3x5 grid from the 4x4 one
    grid = encoder.pos_embed[:, 1:].detach().reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    bilinear = F.interpolate(grid, size=(3, 5), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(tokens[:, 1:], bilinear.permute(0, 2, 3, 1).reshape(1, 15, -1))
    torch.testing.assert_close(tokens[:, 0], (encoder.cls_token + encoder.pos_embed[:, :1]).detach()[:, 0])
    bicubic = F.interpolate(grid, size=(3, 5), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(bilinear, bicubic, atol=1e-3)


@pytest.mark.parametrize("crop", [48, 80, 96])
def test_any_crop_divisible_by_16_works(crop):
    cfg = tiny_config("pup", data=dict(crop=crop), eval=dict(crop=crop))
    out = build_setr(cfg)(torch.randn(1, 3, crop, crop))
    assert out[0].shape[-2:] == (crop, crop)


def test_mmseg_loss_reduction_averages_over_all_pixels():
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    labels[0, :2] = 255  # half the pixels ignored
    from setr_lowmem.model.loss import seg_cross_entropy
    ours = seg_cross_entropy(logits, labels)
    torch_default = F.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(ours, torch_default / 2)
    torch.testing.assert_close(seg_cross_entropy(logits, labels, avg_non_ignore=True), torch_default)


# ---- pretrained ViT weights ------------------------------------------------------------

def donor_vit() -> VisionTransformer:
    """A tiny timm ViT with a 24x24 position grid, like the 384-pixel ImageNet-21k checkpoint."""
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=384, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_()
    return vit


def expected_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    cls, rest = pos[:, :1], pos[:, 1:]
    rest = rest.reshape(1, 24, 24, -1).permute(0, 3, 1, 2)
    rest = F.interpolate(rest, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)
    return torch.cat([cls, rest.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def check_loaded(model, donor):
    sd, dsd = model.encoder.state_dict(), donor.state_dict()
    for k in ("blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "patch_embed.proj.weight", "cls_token"):
        torch.testing.assert_close(sd[k], dsd[k])
    # timm's weights carry a patch bias; SETR's encoder has none (dropped, as mmseg does)
    assert dsd["patch_embed.proj.bias"].abs().sum() > 0 and model.encoder.patch_embed.proj.bias is None
    torch.testing.assert_close(sd["pos_embed"], expected_pos_embed(dsd["pos_embed"], 4))


def save_npz(vit: VisionTransformer, path):
    """Write `vit` in Google's original ViT .npz naming (the inverse of timm's reader)."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d, h = 32, 2
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(2):
        p, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = sd[p + "norm1.weight"], sd[p + "norm1.bias"]
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = sd[p + "norm2.weight"], sd[p + "norm2.bias"]
        for n, w, bias in zip(("query", "key", "value"), np.split(sd[p + "attn.qkv.weight"], 3),
                              np.split(sd[p + "attn.qkv.bias"], 3)):
            out[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = w.T.reshape(d, h, d // h)
            out[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = bias.reshape(h, d // h)
        out[b + "MultiHeadDotProductAttention_1/out/kernel"] = sd[p + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        out[b + "MultiHeadDotProductAttention_1/out/bias"] = sd[p + "attn.proj.bias"]
        for r in range(2):
            out[b + f"MlpBlock_3/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            out[b + f"MlpBlock_3/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz"])
def test_pretrained_vit_weights_load_with_resized_position_grid(tmp_path, fmt, caplog):
    donor = donor_vit()
    path = tmp_path / f"vit.{fmt}"
    if fmt == "pth":
        torch.save({"model": donor.state_dict()}, path)
    elif fmt == "safetensors":
        save_file(donor.state_dict(), str(path))
    else:
        save_npz(donor, path)
    with caplog.at_level("INFO", logger="setr_lowmem.model.encoder"):
        model = build_setr(tiny_config("pup", model=dict(pretrained=str(path))))
    check_loaded(model, donor)
    assert "dropped the patch projection's bias" in caplog.text


def test_weights_of_another_model_are_a_clear_error(tmp_path):
    wide = VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match=r"wide.pth is of another model: shape mismatch"):
        build_setr(tiny_config("pup", model=dict(pretrained=str(tmp_path / "wide.pth"))))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match="resnet.pth is not a timm ViT state dict"):
        build_setr(tiny_config("pup", model=dict(pretrained=str(tmp_path / "resnet.pth"))))
    with pytest.raises(WeightsError, match="weights file not found: .*nosuch.pth"):
        build_setr(tiny_config("pup", model=dict(pretrained=str(tmp_path / "nosuch.pth"))))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.pth"):
        build_setr(tiny_config("pup", model=dict(pretrained=str(tmp_path / "junk.pth"))))


# ---- mmsegmentation SETR checkpoints ---------------------------------------------------

TO_MMSEG = [
    (r"^encoder\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^encoder\.(cls_token|pos_embed)$", r"backbone.\1"),
    (r"^encoder\.blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
    (r"^encoder\.blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
    (r"^encoder\.blocks\.(\d+)\.attn\.qkv\.", r"backbone.layers.\1.attn.attn.in_proj_"),
    (r"^encoder\.blocks\.(\d+)\.attn\.proj\.", r"backbone.layers.\1.attn.attn.out_proj."),
    (r"^encoder\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
    (r"^encoder\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
]


def as_mmseg(sd):
    out = {}
    for k, v in sd.items():
        for pattern, repl in TO_MMSEG:
            k2, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k2] = v.clone()
    return out


@pytest.mark.parametrize("decoder", ["naive", "pup", "mla"])
def test_mmseg_checkpoint_round_trip(tmp_path, decoder):
    torch.manual_seed(2)
    source = build_setr(tiny_config(decoder)).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(std=0.2)
    mm = as_mmseg(source.state_dict())
    assert "backbone.layers.1.attn.attn.in_proj_weight" in mm and "decode_head.conv_seg.weight" in mm
    torch.save({"meta": {"mmseg_version": "1.2.2", "CLASSES": ("a", "b")}, "state_dict": mm}, tmp_path / "setr.pth")
    loaded = build_setr(tiny_config(decoder, model=dict(mmseg_checkpoint=str(tmp_path / "setr.pth")))).eval()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x)[0], source(x)[0])
    # the same checkpoint at another crop: the position grid is resized
    bigger = build_setr(tiny_config(decoder, data=dict(crop=96), eval=dict(crop=96),
                                    model=dict(mmseg_checkpoint=str(tmp_path / "setr.pth"))))
    pos = source.state_dict()["encoder.pos_embed"]
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    torch.testing.assert_close(bigger.encoder.pos_embed.detach(), torch.cat([pos[:, :1], grid], 1))


def test_mmseg_checkpoint_of_another_model_is_an_error(tmp_path):
    source = build_setr(tiny_config("pup"))
    torch.save({"state_dict": as_mmseg(source.state_dict())}, tmp_path / "pup.pth")
    with pytest.raises(WeightsError, match="does not fit this model: shape mismatch.*check model.decoder"):
        build_setr(tiny_config("pup", data=dict(num_classes=7), model=dict(mmseg_checkpoint=str(tmp_path / "pup.pth"))))
    with pytest.raises(WeightsError, match="does not fit this model"):
        build_setr(tiny_config("mla", model=dict(mmseg_checkpoint=str(tmp_path / "pup.pth"))))
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(2)}}, tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match="resnet.pth is not an mmseg SETR checkpoint"):
        build_setr(tiny_config("pup", model=dict(mmseg_checkpoint=str(tmp_path / "resnet.pth"))))
    # one head tensor short: half a model must not train as if it were whole
    partial = {k: v for k, v in as_mmseg(source.state_dict()).items() if k != "decode_head.conv_seg.bias"}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="1 of .* keys missing .e.g. decode_head.conv_seg.bias"):
        build_setr(tiny_config("pup", model=dict(mmseg_checkpoint=str(tmp_path / "partial.pth"))))
    # a file of this toolkit (an export) given as an mmseg checkpoint
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "ours.safetensors"))
    with pytest.raises(WeightsError, match="is a model of this toolkit, not an mmsegmentation checkpoint"):
        build_setr(tiny_config("pup", model=dict(mmseg_checkpoint=str(tmp_path / "ours.safetensors"))))


def test_timm_weights_that_cannot_be_fetched_are_a_clear_error():
    with pytest.raises(WeightsError, match=r"cannot get timm weights 'no_such_vit_xyz' .*set model.pretrained to a local"):
        build_setr(tiny_config("pup", model=dict(pretrained="timm:no_such_vit_xyz")))
