"""Dataset readers (official layouts, HF formats, synthetic), the mmseg pipeline, the resumable stream."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from setr_lowmem.config import DataConfig, SyntheticConfig, TrainConfig
from setr_lowmem.data.loader import StreamSampler, TrainStream, stream_state
from setr_lowmem.data.base import DataError, load_pair
from setr_lowmem.data.sources import open_source
from setr_lowmem.data.synthetic import make_scene
from setr_lowmem.data.transforms import photometric_distortion, random_crop, rescale_size, train_transform
from tests.fixtures import make_ade, make_cityscapes, make_imagefolder, make_pascal_context, scene


def labels_of(source) -> list[np.ndarray]:
    return [load_pair(source.rows, i, source.lut, 150)[1] for i in range(len(source))]


def test_ade20k_layout_reduces_zero_label(tmp_path):
    root = make_ade(tmp_path)
    src = open_source(DataConfig(dataset="ade20k", root=str(root)), "train")
    assert len(src) == 3 and src.name == "ade20k/training"
    image, label, where = load_pair(src.rows, 1, src.lut, 150)
    assert image.shape == (24, 40, 3) and where.endswith("ADE_train_00000001.png")
    assert sorted(np.unique(label)) == [0, 1, 149, 255]  # 1->0, 2->1, 150->149, 0->255
    _, raw = scene(24, 40, 1, [0, 1, 2, 150])
    assert (label[raw == 0] == 255).all() and (label[raw == 150] == 149).all()
    assert len(open_source(DataConfig(dataset="ade20k", root=str(root)), "val")) == 3


def test_cityscapes_converts_label_ids_once(tmp_path):
    root = make_cityscapes(tmp_path)
    cfg = DataConfig(dataset="cityscapes", root=str(root), num_classes=19)
    src = open_source(cfg, "train")
    assert len(src) == 4
    converted = sorted(root.glob("gtFine/train/*/*_gtFine_labelTrainIds.png"))
    assert len(converted) == 4
    assert sorted(np.unique(np.asarray(Image.open(converted[0])))) == [0, 1, 13, 255]
    stamp = [p.stat().st_mtime_ns for p in converted]
    src2 = open_source(cfg, "train")  # second open reads the cached files, converts nothing
    assert [p.stat().st_mtime_ns for p in converted] == stamp
    _, label, _ = load_pair(src2.rows, 0, src2.lut, 19)
    assert sorted(np.unique(label)) == [0, 1, 13, 255]


def test_cityscapes_read_only_dataset_converts_into_the_cache(tmp_path, monkeypatch):
    root = make_cityscapes(tmp_path / "ro")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for d in root.glob("gtFine/val/*"):
        os.chmod(d, 0o555)
    try:
        src = open_source(DataConfig(dataset="cityscapes", root=str(root), num_classes=19), "val")
        cached = list((tmp_path / "cache").rglob("*_gtFine_labelTrainIds.png"))
        if os.geteuid() != 0:  # root can write anywhere; the fallback is only taken when it cannot
            assert len(cached) == 2
        assert sorted(np.unique(load_pair(src.rows, 0, src.lut, 19)[1])) == [0, 1, 13, 255]
    finally:
        for d in root.glob("gtFine/val/*"):
            os.chmod(d, 0o755)


@pytest.mark.parametrize("variant,expected", [("pascal_context", [0, 1, 59]), ("pascal_context59", [0, 58, 255])])
def test_pascal_context_60_and_59(tmp_path, variant, expected):
    root = make_pascal_context(tmp_path)
    src = open_source(DataConfig(dataset=variant, root=str(root), num_classes=60 if variant == "pascal_context" else 59), "train")
    assert len(src) == 2
    assert sorted(np.unique(load_pair(src.rows, 0, src.lut, 60)[1])) == expected


def test_hf_formats_saved_parquet_and_imagefolder(tmp_path):
    image, label = scene(16, 16, 0, [0, 1, 2])
    feats = datasets.Features({"img": datasets.Image(), "seg": datasets.Image()})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(image)] * 2, "seg": [Image.fromarray(label)] * 2},
                                    features=feats)
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "saved")
    (tmp_path / "pq").mkdir()
    ds.to_parquet(tmp_path / "pq" / "train-00000.parquet")
    folder = make_imagefolder(tmp_path)
    for root, img_col, lbl_col in ((tmp_path / "saved", "img", "seg"), (tmp_path / "pq", "img", "seg"),
                                   (folder, "image", "seg")):
        cfg = DataConfig(dataset="hf", root=str(root), num_classes=3, image_column=img_col, label_column=lbl_col)
        src = open_source(cfg, "train")
        img, lbl, _ = load_pair(src.rows, 0, src.lut, 3)
        assert img.shape == (16, 16, 3) and (lbl == label).all(), root
    with pytest.raises(DataError, match="no column 'mask'"):
        open_source(DataConfig(dataset="hf", root=str(tmp_path / "saved"), label_column="mask", image_column="img"), "train")
    # a Hub dataset's own split names: the toolkit's `val` finds `validation`, `train` finds `training`
    datasets.DatasetDict({"training": ds, "validation": ds}).save_to_disk(tmp_path / "named")
    cfg = DataConfig(dataset="hf", root=str(tmp_path / "named"), num_classes=3, image_column="img", label_column="seg")
    assert len(open_source(cfg, "val")) == 2 and len(open_source(cfg, "train")) == 2
    with pytest.raises(DataError, match=r"no split 'test' \(has \['training', 'validation'\]\); set data.train_split"):
        open_source(cfg, "test")


# ---- bad input -------------------------------------------------------------------------

def test_missing_root_names_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"dataset directory not found: .*nowhere/images/training \(expected the ADE20K layout"):
        open_source(DataConfig(dataset="ade20k", root=str(tmp_path / "nowhere")), "train")
    with pytest.raises(DataError, match="expected the Cityscapes layout"):
        open_source(DataConfig(dataset="cityscapes", root=str(tmp_path)), "train")
    with pytest.raises(DataError, match="expected the Pascal Context layout"):
        open_source(DataConfig(dataset="pascal_context", root=str(tmp_path)), "train")


def test_unmatched_files_are_listed(tmp_path):
    root = make_ade(tmp_path)
    (root / "annotations/training/ADE_train_00000001.png").unlink()
    (root / "annotations/validation/ADE_valid_00000002.png").rename(root / "annotations/validation/extra.png")
    with pytest.raises(DataError, match=r"1 image\(s\) without a label, e.g. .*ADE_train_00000001.jpg"):
        open_source(DataConfig(dataset="ade20k", root=str(root)), "train")
    with pytest.raises(DataError, match=r"without a label, e.g. .*ADE_valid_00000002.jpg"):
        open_source(DataConfig(dataset="ade20k", root=str(root)), "val")


def test_empty_split_is_an_error(tmp_path):
    root = make_ade(tmp_path)
    for p in list((root / "images/validation").iterdir()) + list((root / "annotations/validation").iterdir()):
        p.unlink()
    with pytest.raises(DataError, match="split validation: the split is empty"):
        open_source(DataConfig(dataset="ade20k", root=str(root)), "val")


def test_corrupt_file_is_named(tmp_path):
    root = make_ade(tmp_path)
    (root / "images/training/ADE_train_00000002.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    src = open_source(DataConfig(dataset="ade20k", root=str(root)), "train")
    with pytest.raises(DataError, match=r"cannot read image .*ADE_train_00000002.jpg"):
        load_pair(src.rows, 2, src.lut, 150)


def test_label_out_of_range_is_an_error_not_clipped(tmp_path):
    root = make_ade(tmp_path)
    with pytest.raises(DataError, match=r"has value 149 outside 0..99 .*check data.num_classes"):
        src = open_source(DataConfig(dataset="ade20k", root=str(root), num_classes=100), "train")
        load_pair(src.rows, 0, src.lut, 100)


def test_grayscale_and_rgba_images_are_converted(tmp_path):
    root = make_ade(tmp_path)
    p = root / "images/training/ADE_train_00000000.jpg"
    Image.open(p).convert("L").save(p)
    q = root / "images/training/ADE_train_00000001.jpg"
    Image.open(q).convert("RGBA").save(q.with_suffix(".png"))
    os.replace(q.with_suffix(".png"), q)  # a PNG with RGBA, stored under the .jpg name
    src = open_source(DataConfig(dataset="ade20k", root=str(root)), "train")
    for i in (0, 1):
        assert load_pair(src.rows, i, src.lut, 150)[0].shape == (24, 40, 3)


# ---- the training pipeline --------------------------------------------------------------

def test_rescale_size_is_mmcvs_keep_ratio():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 400, (2048, 512)) == (512, 683)  # short side limits
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side limits
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)


def coloured_scene(h=90, w=130):
    """Blocks of 6 colours in an asymmetric layout; the label is the block's colour index."""
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    label = ((yy // 23) * 3 + (xx * xx // 1500)) % 6
    return palette[label], label.astype(np.uint8), palette


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_image_and_label_aligned(seed):
    image, label, palette = coloured_scene()
    cfg = DataConfig(crop=64, base_scale=(200, 100), num_classes=6, photometric=False, cat_max_ratio=0.75)
    img, lbl = train_transform(image, label, cfg, np.random.default_rng(seed))
    assert img.shape == (3, 64, 64) and lbl.shape == (64, 64) and lbl.dtype == torch.int64
    raw = img * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
    nearest = ((raw.permute(1, 2, 0)[:, :, None, :] - torch.tensor(palette).float()) ** 2).sum(-1).argmin(-1)
    valid = lbl != 255
    agree = (nearest[valid] == lbl[valid]).float().mean()
    # only pixels on block edges may differ (bilinear blending; cv2-style nearest for labels)
    assert agree > 0.93, f"image and label disagree on {1 - agree:.1%} of pixels"
    shifted = (nearest[:, 8:][valid[:, 8:]] == lbl[:, :-8][valid[:, 8:]]).float().mean()
    flipped = (nearest.flip(-1)[valid.flip(-1)] == lbl[valid]).float().mean() if valid.all() else 0.0
    assert shifted < agree - 0.1 and flipped < agree - 0.1  # a misalignment would show
    # padding: ignored label where the image is 0
    assert torch.all(img[:, ~valid] == 0)


def test_flip_and_resize_are_exact():
    image, label, _ = coloured_scene(64, 64)
    cfg = DataConfig(crop=64, base_scale=(64, 64), ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False,
                     cat_max_ratio=1.0, num_classes=6, mean=(0, 0, 0), std=(1, 1, 1))
    img, lbl = train_transform(image, label, cfg, np.random.default_rng(0))
    assert torch.equal(lbl, torch.from_numpy(label[:, ::-1].copy()).long())
    assert torch.equal(img, torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1).float())


def test_small_image_is_padded_to_the_crop():
    image, label, _ = coloured_scene(20, 30)
    cfg = DataConfig(crop=64, base_scale=(30, 20), ratio_range=(1.0, 1.0), num_classes=6, photometric=False)
    img, lbl = train_transform(image, label, cfg, np.random.default_rng(0))
    assert img.shape == (3, 64, 64) and (lbl[20:] == 255).all() and (lbl[:, 30:] == 255).all()
    assert (lbl[:20, :30] != 255).all() and (img[:, 20:] == 0).all()


def test_crop_retry_avoids_single_class_crops():
    label = torch.zeros(100, 100, dtype=torch.uint8)
    label[60:, 60:] = 1  # a second class in a corner
    image = torch.zeros(3, 100, 100)
    def fraction_ok(ratio):
        ok = 0
        for s in range(200):
            _, crop = random_crop(image, label, 32, ratio, np.random.default_rng(s))
            counts = torch.bincount(crop.flatten().long(), minlength=2)
            ok += int(counts.max() / counts.sum() < 0.75)
            assert crop.shape == (32, 32)
        return ok / 200
    without, with_retry = fraction_ok(1.0), fraction_ok(0.75)
    # one draw succeeds with p ~ 0.16; eleven draws with 1 - (1 - p)^11 ~ 0.85
    assert without < 0.3 and with_retry > 0.7, (without, with_retry)
    # all-one-class labels: retries fail and a crop is still returned
    _, crop = random_crop(image, torch.zeros(100, 100, dtype=torch.uint8), 32, 0.75, np.random.default_rng(0))
    assert crop.shape == (32, 32)


class LegacyDraws:
    """numpy's global RandomState behind the Generator methods the pipeline calls: mmseg draws
    `np.random.randint(n)` / `np.random.uniform(a, b)`, so with the same seed and the same order
    of draws our step must give mmseg's image exactly."""

    def __init__(self, seed: int):
        self.state = np.random.RandomState(seed)

    def integers(self, low, high=None):
        return self.state.randint(low, high)

    def uniform(self, low, high):
        return self.state.uniform(low, high)


MMSEG_PIPELINE = Path(__file__).parent / "data" / "mmseg_ref" / "pipeline.pt"


def test_photometric_distortion_equals_mmseg_draw_for_draw():
    """mmseg 1.2.2's PhotoMetricDistortion outputs (tests/data/mmseg_ref): uint8 steps, contrast first
    or last, saturation and hue through OpenCV's uint8 HSV, hue delta an integer in -18..17."""
    cases = torch.load(MMSEG_PIPELINE, weights_only=False)["photometric"]
    changed = 0
    for case in cases:
        image = case["image"].numpy()
        ours = photometric_distortion(image.copy(), LegacyDraws(case["seed"]))
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        np.testing.assert_array_equal(ours, case["expected"].numpy(), err_msg=f"seed {case['seed']}")
        changed += not np.array_equal(ours, image)
    assert changed >= len(cases) // 2


def test_photometric_hue_delta_is_drawn_below_18():
    draws = []

    class Recording(LegacyDraws):
        def integers(self, low, high=None):
            draws.append((low, high))
            return super().integers(low, high)

    for seed in range(30):
        photometric_distortion(np.full((4, 4, 3), 100, np.uint8), Recording(seed))
    assert (-18, 18) in draws  # numpy's exclusive high: -18..17, as mmseg's np.random.randint(-18, 18)


def test_training_transform_applies_the_photometric_step_on_uint8():
    cfg = DataConfig(crop=32, base_scale=(32, 32), ratio_range=(1.0, 1.0), flip_prob=0.0, num_classes=6,
                     cat_max_ratio=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image, label, _ = coloured_scene()
    outs = [train_transform(image, label, cfg, np.random.default_rng(s))[0] for s in range(8)]
    assert all(torch.equal(o, o.round()) and o.min() >= 0 and o.max() <= 255 for o in outs)
    plain = train_transform(image, label, dataclasses.replace(cfg, photometric=False), np.random.default_rng(0))[0]
    assert sum(not torch.equal(o, plain) for o in outs) >= 4


# ---- the resumable stream ----------------------------------------------------------------

def synthetic(n=12):
    cfg = DataConfig(crop=32, base_scale=(64, 32), num_classes=5, synthetic=SyntheticConfig(num_train=n, num_val=2, size=48))
    return cfg, open_source(cfg, "train")


def test_stream_is_deterministic_in_seed_and_position():
    cfg, src = synthetic()
    a, b = TrainStream(src, cfg, seed=0), TrainStream(src, cfg, seed=0)
    for pos in (0, 5, 13, 40):
        x1, y1 = a[pos]
        x2, y2 = b[pos]
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(a[0][0], TrainStream(src, cfg, seed=1)[0][0])
    # one epoch visits every sample once, the next one in another order
    first = [a.sample_index(p) for p in range(12)]
    second = [a.sample_index(p) for p in range(12, 24)]
    assert sorted(first) == list(range(12)) == sorted(second) and first != second


def test_sampler_resumes_and_matches_across_process_layouts():
    train = TrainConfig(total_batch=8, micro_batch=2)
    full = list(StreamSampler(2, train.accumulation(), max_iters=6))
    resumed = list(StreamSampler(2, train.accumulation(), start_iter=3, max_iters=6))
    assert resumed == full[3 * 8:]
    one_proc = list(StreamSampler(2, train.accumulation(1), rank=0, world=1, max_iters=2))  # accumulation 4
    ranks = [list(StreamSampler(2, train.accumulation(2), rank=r, world=2, max_iters=2)) for r in range(2)]  # 2
    # micro-step k of rank r equals micro-step (k * world + r) of the single process
    for it in range(2):
        for k in range(2):
            for r in range(2):
                mine = ranks[r][(it * 2 + k) * 2:(it * 2 + k + 1) * 2]
                single = one_proc[(it * 4 + k * 2 + r) * 2:(it * 4 + k * 2 + r + 1) * 2]
                assert mine == single
    assert stream_state(5, 8, 0, 12) == {"epoch": 3, "index": 4, "seed": 0, "position": 40}
    with pytest.raises(ValueError, match="total_batch 8 is not a multiple of micro_batch 2 x 3 processes"):
        train.accumulation(3)


def test_synthetic_scenes_are_deterministic_and_varied():
    a = make_scene(64, 6, np.random.default_rng([0, 0, 3]))
    b = make_scene(64, 6, np.random.default_rng([0, 0, 3]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    labels = np.concatenate([make_scene(64, 6, np.random.default_rng([0, 0, i]))[1].ravel() for i in range(30)])
    assert set(np.unique(labels)) == set(range(6))
    for size in (40, 200):
        img, lbl = make_scene(size, 9, np.random.default_rng(1))
        assert img.shape == (size, size, 3) and lbl.shape == (size, size)
    # a paper head (150 classes): the eight object kinds spread over its label range
    labels = np.concatenate([make_scene(48, 150, np.random.default_rng([0, 0, i]))[1].ravel() for i in range(40)])
    assert set(np.unique(labels).tolist()) == {0, 19, 37, 56, 74, 93, 112, 130, 149}
    from setr_lowmem.data.synthetic import generate

    with pytest.raises(ValueError, match="synthetic dataset has 2..255 classes"):
        generate(1, 32, 300, 0, "train")  # label maps are 8-bit


def test_test_ratios_scale_the_base_scale_or_the_image():
    """The paper's multi-scale test resizes to base_scale x ratio; mmseg 1.x's TestTimeAug resizes the
    original image by the ratio (eval.ratio_of: image)."""
    from setr_lowmem.data.transforms import test_transform

    image = np.zeros((90, 130, 3), np.uint8)
    cfg = DataConfig(base_scale=(128, 64), num_classes=6)
    assert test_transform(image, cfg, 0.5).shape[-2:] == rescale_size(90, 130, (64, 32)) == (32, 46)
    assert test_transform(image, cfg, 0.75, ratio_of="image").shape[-2:] == (68, 98)  # int(90 * .75 + .5), ...
    assert test_transform(image, cfg, 1.0, ratio_of="image").shape[-2:] == (90, 130)
