"""An mmsegmentation SETR checkpoint, imported, gives mmsegmentation's own outputs.

`tests/data/mmseg_ref/reference.pt` holds what mmsegmentation 1.2.2 itself computed (its
VisionTransformer, MLANeck, SETRUPHead, SETRMLAHead, FCNHead and EncoderDecoder, unmodified;
see the README there) for six tiny SETR models (Naive, PUP, MLA x ADE20K-like and
Cityscapes-like heads) with fan-in scaled random weights, so that every parameter and token
moves the outputs: the backbone's maps, the heads' logits at the crop, whole-image inference
on sizes that are not multiples of 16, and sliding-window inference on images smaller than
the crop on one or both sides. The weights are regenerated here from their seed
(`tests/data/mmseg_ref/weights.py`), written in mmseg's key layout, and imported with
`model.mmseg_checkpoint`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from setr_lowmem.engine.evaluate import slide_logits, whole_logits
from setr_lowmem.model import build_setr
from tests.conftest import tiny_config

REF_DIR = Path(__file__).parent / "data" / "mmseg_ref"


def _weights_module():
    spec = importlib.util.spec_from_file_location("mmseg_ref_weights", REF_DIR / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = torch.load(REF_DIR / "reference.pt", weights_only=True)
CASES = sorted(REFERENCE["cases"])


def import_case(name: str, tmp_path: Path):
    """Our model built like the case's mmseg config, with the case's weights imported from an mmseg file."""
    case = REFERENCE["cases"][name]
    weights = _weights_module()
    sd = weights.mmseg_weights({k: tuple(v) for k, v in case["shapes"].items()}, case["seed"])
    assert weights.checksum(sd) == pytest.approx(case["checksum"], rel=1e-12), "the seeded weights drifted"
    path = tmp_path / f"{name}.pth"
    torch.save({"meta": {"mmseg_version": REFERENCE["versions"]["mmseg"]}, "state_dict": sd}, path)
    cfg = tiny_config(case["decoder"],
                      model=dict(embed_dim=64, depth=4, num_heads=4, out_indices=[0, 1, 2, 3], head_channels=32,
                                 mla_channels=16, naive_aux_convs=2 if case["geometry"] == "ade" else 1,
                                 mmseg_checkpoint=str(path)),
                      data=dict(num_classes=case["num_classes"]),
                      eval=dict(mode="slide", crop=64, stride=43))
    model = build_setr(cfg).eval()
    imported = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert len(imported) == sum(not k.endswith("num_batches_tracked") for k in sd)  # nothing left out, nothing extra
    return model, case


def assert_matches(ours: torch.Tensor, ref: dict, what: str) -> None:
    """Our full tensor against mmseg's sampled one: the shape, every sampled value to 1e-4, and the argmax map."""
    assert list(ours.shape) == list(ref["shape"]), what
    flat = ours.detach().reshape(-1)[ref["index"]]
    torch.testing.assert_close(flat, ref["values"], rtol=1e-4, atol=1e-4, msg=what)
    agree = (ours.argmax(1)[0].to(torch.uint8) == ref["argmax"]).float().mean().item()
    assert agree >= 0.999, f"{what}: argmax agrees on {100 * agree:.2f}% of pixels"


@pytest.mark.parametrize("name", CASES)
def test_imported_checkpoint_gives_mmseg_backbone_and_head_outputs(name, tmp_path):
    model, case = import_case(name, tmp_path)
    x = REFERENCE["inputs"]["crop"]
    with torch.no_grad():
        maps = model.encoder(x)
        for i, (ours, ref) in enumerate(zip(maps, case["backbone"])):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=f"backbone map {i}")
        if case["neck"]:
            for i, (ours, ref) in enumerate(zip(model.encode(x), case["neck"])):
                torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=f"neck output {i}")
        logits = model(x)
    assert len(logits) == 1 + len(case["aux"])
    assert_matches(logits[0], case["decode"], "main head")
    for k, (ours, ref) in enumerate(zip(logits[1:], case["aux"])):
        assert_matches(ours, ref, f"aux head {k}")


@pytest.mark.parametrize("name", CASES)
def test_whole_and_sliding_inference_give_mmseg_logits(name, tmp_path):
    """Sizes that are not multiples of 16 (the encoder pads at the corner, the position grid is resized
    bilinearly, the logits are resized to the image) and windows smaller than the crop."""
    model, case = import_case(name, tmp_path)
    keys = [k for k in REFERENCE["inputs"] if k.startswith(("whole/", "slide/"))]
    assert {"whole/50x70", "whole/37x29", "slide/50x150", "slide/40x30"} <= set(keys)
    with torch.no_grad():
        for key in keys:
            x = REFERENCE["inputs"][key]
            if key.startswith("whole/"):
                ours = whole_logits(model.predict, x)
            else:
                ours = slide_logits(model.predict, x, case["num_classes"], crop=64, stride=43)
            assert_matches(ours, case[key], key)
