"""Inference protocol and metrics: hand-computed mIoU, sliding vs whole, flip averaging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from setr_lowmem.engine.evaluate import (confusion_matrix, evaluate, metrics_from_confusion, predict_probs,
                                         slide_logits, whole_logits)
from setr_lowmem.model import build_setr
from tests.conftest import fan_in_weights, tiny_config


def test_miou_on_a_hand_computed_case():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, label, 4)
    # gt 0: {0,1}; gt 1: {1,1}; gt 2: {2,0}; class 3 absent everywhere
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = metrics_from_confusion(cm)
    iou = [1 / 3, 2 / 3, 1 / 2]  # class 0: tp 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / 2
    assert m["IoU"][:3] == pytest.approx([100 * v for v in iou]) and math.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 6)
    assert m["mAcc"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)


class PixelModel(nn.Module):
    """A per-pixel classifier (1x1 conv): its output at a pixel does not depend on the window."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def predict(self, x):
        return self.conv(x)


def test_slide_equals_whole_for_a_per_pixel_model():
    torch.manual_seed(0)
    model = PixelModel()
    image = torch.randn(1, 3, 70, 101)
    whole = whole_logits(model.predict, image)
    for crop, stride in ((32, 20), (64, 64), (128, 50)):  # overlapping, tiling, window larger than image
        torch.testing.assert_close(slide_logits(model.predict, image, 4, crop, stride), whole)


def test_slide_equals_whole_when_the_window_covers_the_image():
    torch.manual_seed(0)
    cfg = tiny_config("pup")
    model = build_setr(cfg).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(model.predict, image, 5, 64, 48),
                                   whole_logits(model.predict, image))


class AsymmetricModel(nn.Module):
    """Logits that grow left to right, whatever the image: flipping changes them."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def predict(self, x):
        w = x.shape[-1]
        ramp = torch.linspace(-3, 3, w).view(1, 1, 1, w).expand(x.shape[0], 1, x.shape[-2], w)
        return torch.cat([ramp, -ramp, x[:, :1]], dim=1) + self.p


def test_flip_averages_the_probabilities_of_both_views():
    cfg = tiny_config("pup", eval=dict(mode="whole", flip=True), data=dict(base_scale=[32, 32], num_classes=3),
                      model=dict(patch_size=16))
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    probs = predict_probs(AsymmetricModel(), image, cfg, torch.device("cpu"))
    from setr_lowmem.data.transforms import test_transform
    x = test_transform(image, cfg.data)[None]
    model = AsymmetricModel()
    plain = model.predict(x).softmax(1)
    flipped = model.predict(x.flip(-1)).flip(-1).softmax(1)
    torch.testing.assert_close(probs, ((plain + flipped) / 2)[0])
    # the ramp cancels: classes 0 and 1 become symmetric
    torch.testing.assert_close(probs[0], probs[1])


def test_evaluate_aggregates_every_image_and_shards_across_processes():
    cfg = tiny_config("naive", eval=dict(scales=[0.5, 1.0], flip=True))
    model = build_setr(cfg).eval()
    metrics = evaluate(model, cfg, torch.device("cpu"))
    assert metrics["images"] == 4 and len(metrics["IoU"]) == 5
    # the same figures from the confusion matrix of each image's prediction, summed by hand
    from setr_lowmem.data.loader import EvalSet
    from setr_lowmem.data.sources import open_source

    images = EvalSet(open_source(cfg.data, "val"), cfg.data)
    cm = sum(confusion_matrix(predict_probs(model, img, cfg, torch.device("cpu")).argmax(0), torch.from_numpy(lbl), 5)
             for img, lbl, _ in (images[i] for i in range(len(images))))
    expected = metrics_from_confusion(cm)
    assert metrics["mIoU"] == pytest.approx(expected["mIoU"]) and metrics["aAcc"] == pytest.approx(expected["aAcc"])
    # two processes each take every other image; summing their matrices gives the same result
    shards = []
    evaluate(model, cfg, torch.device("cpu"), rank=0, world=2, reduce=lambda t: shards.append(t) or t)
    evaluate(model, cfg, torch.device("cpu"), rank=1, world=2, reduce=lambda t: shards.append(t) or t)
    assert torch.equal(shards[0] + shards[1], cm)


@pytest.mark.parametrize("flip,scales", [(False, [1.0]), (True, [0.75, 1.25])])
def test_the_class_map_in_bands_equals_the_argmax_of_whole_probabilities(flip, scales):
    """A photo too large for its probabilities at full size is predicted band by band (interpolation
    matrices): the same classes as `predict_probs(...).argmax` up to ties within rounding."""
    from setr_lowmem.engine.evaluate import predict_classes

    torch.manual_seed(0)
    cfg = tiny_config("pup", eval=dict(mode="slide", crop=64, stride=48, scales=scales, flip=flip))
    model = fan_in_weights(build_setr(cfg).eval())  # a prediction that varies from pixel to pixel
    image = np.random.default_rng(0).integers(0, 255, (150, 97, 3), dtype=np.uint8)  # not multiples of 16
    with torch.no_grad():
        probs = predict_probs(model, image, cfg, torch.device("cpu"))
    direct = probs.argmax(0)
    banded = predict_classes(model, image, cfg, torch.device("cpu"), budget=5 * 97 * 4 * 7)  # bands of 7 rows
    assert predict_classes(model, image, cfg, torch.device("cpu")).equal(direct)  # under budget: the direct path
    differ = banded != direct
    top2 = probs.topk(2, dim=0).values
    assert float((top2[0] - top2[1])[differ].sum()) <= 1e-5 * int(differ.sum())  # only near-ties may differ
    assert differ.float().mean() < 0.01 and len(direct.unique()) > 1
