"""Generate SETR reference fixtures with REAL mmsegmentation 1.2.2 code.

This script is NOT run by CI (CI has no mmseg). It is kept so the fixtures in
this folder can be regenerated and audited.

Environment used (see README.md in this folder):
    python3 -m venv /tmp/mmseg-venv
    # reuse the project's torch/numpy/matplotlib instead of reinstalling them
    echo /work/main/.venv/lib/python3.11/site-packages \
        > /tmp/mmseg-venv/lib/python3.11/site-packages/zz_main_venv.pth
    /tmp/mmseg-venv/bin/pip install --no-deps mmsegmentation==1.2.2 \
        mmcv-lite==2.1.0 mmengine==0.10.7 addict yapf termcolor rich \
        prettytable ftfy regex pyyaml packaging markdown-it-py mdurl pygments \
        wcwidth platformdirs tomli opencv-python-headless scipy

Run (from the repository root):
    /tmp/mmseg-venv/bin/python tests/data/mmseg_ref/make_reference.py
    # optional: --skip-param-counts (skip the full-size ViT-L builds)

mmcv-lite has no compiled ``mmcv.ops``. ``import mmseg.models`` imports a few
unrelated names from it (point_sample, sigmoid_focal_loss, CrissCrossAttention,
PSAMask, multi_scale_deform_attn). We install an import hook that makes
``mmcv.ops`` (and ``mmcv.ops.*``) a stub module whose attributes are dummy
classes that raise if instantiated. Nothing on the SETR path uses mmcv.ops:
VisionTransformer, MLANeck, SETRUPHead, SETRMLAHead, FCNHead, EncoderDecoder
and SegDataPreProcessor are mmseg's own, unmodified code.

Outputs (written next to this file, about 2.4 MB in all):
    reference.pt          inputs + sampled reference outputs of the 6 cases,
                          with each case's weight shapes/seed/checksum (the
                          weights themselves are regenerated from the seed by
                          weights.py, not stored); format in README.md
    configs.json          exact tiny mmseg config dicts for the 6 cases (+ the
                          resolved full-size model dicts they mirror, + a
                          human-readable summary of reference.pt)
    param_counts.json     parameter counts of the full-size SETR configs
"""
import argparse
import copy
import importlib.abc
import importlib.util
import importlib.machinery
import json
import os
import sys
import types


# --------------------------------------------------------------------------
# mmcv.ops stub (compiled ops are absent in mmcv-lite)
# --------------------------------------------------------------------------
class _StubOpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

    def find_spec(self, name, path, target=None):
        if name == 'mmcv.ops' or name.startswith('mmcv.ops.'):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []

        def __getattr__(attr, _mod=mod):
            if attr.startswith('__'):
                raise AttributeError(attr)

            def _init(self, *a, **k):
                raise RuntimeError(f'stub {_mod.__name__}.{attr}: compiled '
                                   'mmcv.ops is not available')

            cls = type(attr, (object, ), {
                '__init__': _init,
                '__call__': _init,
                '__module__': _mod.__name__
            })
            setattr(_mod, attr, cls)
            return cls

        mod.__getattr__ = __getattr__
        return mod

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubOpsFinder())

import torch  # noqa: E402

import mmcv  # noqa: E402
import mmengine  # noqa: E402
import mmseg  # noqa: E402
import mmseg.models  # noqa: E402,F401
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

init_default_scope('mmseg')

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------
# tiny configs mirroring configs/setr/setr_vit-l_{naive,pup,mla}_*.py
# --------------------------------------------------------------------------
IMG = 64
EMBED = 64
CH = 32  # decoder channels (full-size: 256)
MLA_CH = 16  # mla_channels (full-size: 128)
NUM_CLASSES = dict(ade=7, cityscapes=5)
CROP = (64, 64)
STRIDE = (43, 43)

FULL_CONFIGS = {
    ('naive', 'ade'): 'setr/setr_vit-l_naive_8xb2-160k_ade20k-512x512.py',
    ('pup', 'ade'): 'setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py',
    ('mla', 'ade'): 'setr/setr_vit-l_mla_8xb2-160k_ade20k-512x512.py',
    ('naive', 'cityscapes'):
    'setr/setr_vit-l_naive_8xb1-80k_cityscapes-768x768.py',
    ('pup', 'cityscapes'): 'setr/setr_vit-l_pup_8xb1-80k_cityscapes-768x768.py',
    ('mla', 'cityscapes'): 'setr/setr_vit-l_mla_8xb1-80k_cityscapes-768x768.py',
}
CASES = [(d, g) for g in ('ade', 'cityscapes') for d in ('naive', 'pup', 'mla')]


def case_name(decoder, geometry):
    return f'setr_{decoder}_{geometry}'


def _ce(w):
    return dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=w)


def tiny_model_cfg(decoder, geometry):
    nc = NUM_CLASSES[geometry]
    norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN in the originals
    backbone = dict(
        type='VisionTransformer',
        img_size=(IMG, IMG),
        patch_size=16,
        in_channels=3,
        embed_dims=EMBED,
        num_layers=4,
        num_heads=4,
        mlp_ratio=4,  # default, not set in the originals
        out_indices=(0, 1, 2, 3),
        drop_rate=0.,
        norm_cfg=dict(type='LN', eps=1e-6, requires_grad=True),
        with_cls_token=(decoder != 'mla'),
        interpolate_mode='bilinear',
        patch_bias=False,  # default, not set in the originals
        final_norm=False,  # default, not set in the originals
    )
    model = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            pad_val=0,
            seg_pad_val=255,
            size=CROP),
        pretrained=None,
        backbone=backbone,
        train_cfg=dict(),
        test_cfg=dict(mode='slide', crop_size=CROP, stride=STRIDE))

    if decoder in ('naive', 'pup'):
        if decoder == 'naive':
            head_kw = dict(num_convs=1, up_scale=4, kernel_size=1)
            if geometry == 'ade':
                aux_kw = dict(act_cfg=dict(type='ReLU'), num_convs=2,
                              kernel_size=1)
            else:
                aux_kw = dict(num_convs=1, up_scale=4, kernel_size=1)
        else:
            head_kw = dict(num_convs=4, up_scale=2, kernel_size=3)
            if geometry == 'ade':
                aux_kw = dict(act_cfg=dict(type='ReLU'), num_convs=2,
                              kernel_size=3)
            else:
                aux_kw = dict(num_convs=2, up_scale=4, kernel_size=3)
        model['decode_head'] = dict(
            type='SETRUPHead',
            in_channels=EMBED,
            channels=CH,
            in_index=3,
            num_classes=nc,
            dropout_ratio=0,
            norm_cfg=norm_cfg,
            **head_kw,
            align_corners=False,
            loss_decode=_ce(1.0))
        model['auxiliary_head'] = [
            dict(
                type='SETRUPHead',
                in_channels=EMBED,
                channels=CH,
                in_index=i,
                num_classes=nc,
                dropout_ratio=0,
                norm_cfg=norm_cfg,
                **aux_kw,
                align_corners=False,
                loss_decode=_ce(0.4)) for i in range(3)
        ]
    else:
        model['neck'] = dict(
            type='MLANeck',
            in_channels=[EMBED] * 4,
            out_channels=CH,
            norm_cfg=norm_cfg,
            act_cfg=dict(type='ReLU'))
        model['decode_head'] = dict(
            type='SETRMLAHead',
            in_channels=(CH, ) * 4,
            channels=4 * MLA_CH,  # SETRMLAHead asserts channels == 4*mla_ch
            in_index=(0, 1, 2, 3),
            dropout_ratio=0,
            mla_channels=MLA_CH,
            num_classes=nc,
            norm_cfg=norm_cfg,
            align_corners=False,
            loss_decode=_ce(1.0))
        extra = (dict(norm_cfg=norm_cfg, act_cfg=dict(type='ReLU'))
                 if geometry == 'ade' else {})
        model['auxiliary_head'] = [
            dict(
                type='FCNHead',
                in_channels=CH,
                channels=CH,
                in_index=i,
                dropout_ratio=0,
                **extra,
                num_convs=0,
                kernel_size=1,
                concat_input=False,
                num_classes=nc,
                align_corners=False,
                loss_decode=_ce(0.4)) for i in range(4)
        ]
    return model


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def syncbn_to_bn(obj):
    if isinstance(obj, dict):
        out = {k: syncbn_to_bn(v) for k, v in obj.items()}
        if out.get('type') == 'SyncBN':
            out['type'] = 'BN'
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(syncbn_to_bn(v) for v in obj)
    return obj


# --------------------------------------------------------------------------
# seeded weights (weights.py: torch only, shared with the project's tests)
# --------------------------------------------------------------------------
def _load_weights_module():
    spec = importlib.util.spec_from_file_location(
        'mmseg_ref_weights', os.path.join(HERE, 'weights.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_weights_module()


# --------------------------------------------------------------------------
# reference computation
# --------------------------------------------------------------------------
WHOLE_SHAPES = [(50, 70), (37, 29), (100, 90)]
SLIDE_SHAPES = [(50, 150), (40, 30), (100, 90), (64, 64)]
CASE_SEEDS = {case_name(d, g): 1000 + i for i, (d, g) in enumerate(CASES)}
MAX_SAMPLES = 2048


def hw_key(hw):
    return f'{hw[0]}x{hw[1]}'


def input_seed(kind, hw):
    # one fixed seed per (kind, shape); identical across the 6 cases
    base = dict(crop=11, whole=22, slide=33)[kind]
    return base * 1000003 + hw[0] * 1009 + hw[1]


def rand_input(kind, hw, batch=1):
    g = torch.Generator().manual_seed(input_seed(kind, hw))
    return torch.randn((batch, 3) + tuple(hw), generator=g)


def make_inputs():
    inputs = {'crop': rand_input('crop', (IMG, IMG))}
    for hw in WHOLE_SHAPES:
        inputs['whole/' + hw_key(hw)] = rand_input('whole', hw)
    for hw in SLIDE_SHAPES:
        inputs['slide/' + hw_key(hw)] = rand_input('slide', hw)
    return inputs


# Sampled tensors: the index draw is seeded by a running number of the slot
# (fixed case order x fixed slot order; no hashing), so a subset run
# (--cases) draws the same indices as a full run.
SLOTS = (['decode'] + [f'aux{k}' for k in range(4)] +
         ['whole/' + hw_key(hw) for hw in WHOLE_SHAPES] +
         ['slide/' + hw_key(hw) for hw in SLIDE_SHAPES])


def sample_seed(name, slot):
    case_order = [case_name(d, g) for d, g in CASES]
    return 7919 + 100 * case_order.index(name) + SLOTS.index(slot)


def sampled(t, seed):
    """S: shape, sorted unique flat indices, float32 values there, argmax."""
    assert t.dim() == 4 and t.shape[0] == 1 and t.shape[1] <= 255, t.shape
    t = t.detach().float().contiguous()
    n = t.numel()
    if n <= MAX_SAMPLES:
        index = torch.arange(n, dtype=torch.int64)
    else:
        g = torch.Generator().manual_seed(seed)
        index = torch.randperm(n, generator=g)[:MAX_SAMPLES].sort().values
    return dict(
        shape=list(t.shape),
        index=index.to(torch.int64).contiguous(),
        values=t.reshape(-1)[index].clone(),
        argmax=t.argmax(1)[0].to(torch.uint8).contiguous())


def metas_for(hw):
    # what the test pipeline (LoadImageFromFile, Resize, PackSegInputs) +
    # SegDataPreProcessor (no test_cfg -> no padding) leave in the metainfo:
    # img_shape/ori_shape tuples, no pad_shape.
    return [dict(ori_shape=tuple(hw), img_shape=tuple(hw))]


def build_case_model(decoder, geometry, seed):
    """The tiny mmseg model with the seeded weights.py weights, in eval()."""
    cfg = tiny_model_cfg(decoder, geometry)
    torch.manual_seed(0)
    # ConfigDict, as the runner passes it (test_cfg.mode etc. need attrs)
    model = MODELS.build(ConfigDict(copy.deepcopy(cfg)))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = W.mmseg_weights(shapes, seed)
    for k, v in model.state_dict().items():
        assert sd[k].dtype == v.dtype, (k, sd[k].dtype, v.dtype)
    model.load_state_dict(sd, strict=True)
    model.eval()
    return cfg, model, shapes, sd


@torch.no_grad()
def run_case(decoder, geometry, inputs):
    name = case_name(decoder, geometry)
    seed = CASE_SEEDS[name]
    cfg, model, shapes, sd = build_case_model(decoder, geometry, seed)

    def S(slot, t):
        return sampled(t, sample_seed(name, slot))

    out = dict(
        decoder=decoder,
        geometry=geometry,
        num_classes=NUM_CLASSES[geometry],
        seed=seed,
        shapes={k: list(s) for k, s in shapes.items()},
        checksum=W.checksum(sd))

    # 1. crop-size input: backbone / neck / heads (forward, no resize)
    x = inputs['crop']
    bb = model.backbone(x)
    out['backbone'] = [t.clone().contiguous() for t in bb]
    feats = model.extract_feat(x)
    if model.with_neck:
        out['neck'] = [t.clone().contiguous() for t in feats]
    else:
        assert all(torch.equal(a, b) for a, b in zip(bb, feats))
        out['neck'] = []
    out['decode'] = S('decode', model.decode_head.forward(feats))
    out['aux'] = [S(f'aux{k}', h.forward(feats))
                  for k, h in enumerate(model.auxiliary_head)]

    # 2. whole inference (logits at the input size)
    for hw in WHOLE_SHAPES:
        key = 'whole/' + hw_key(hw)
        xi = inputs[key]
        metas = metas_for(hw)
        logits = model.whole_inference(xi, copy.deepcopy(metas))
        enc = model.encode_decode(xi, copy.deepcopy(metas))
        assert torch.equal(logits, enc)
        # full predict() path (postprocess_result) in whole mode
        model.test_cfg['mode'] = 'whole'
        ds = SegDataSample(metainfo=metas[0])
        pred = model.predict(xi, [ds])[0]
        model.test_cfg['mode'] = 'slide'
        assert torch.equal(pred.seg_logits.data, logits[0])
        s = S(key, logits)
        assert torch.equal(pred.pred_sem_seg.data[0].to(torch.uint8),
                           s['argmax'])
        out[key] = s

    # 3. slide inference, crop 64 stride 43
    for hw in SLIDE_SHAPES:
        key = 'slide/' + hw_key(hw)
        xi = inputs[key]
        metas = metas_for(hw)
        logits = model.slide_inference(xi, copy.deepcopy(metas))
        inf = model.inference(xi, copy.deepcopy(metas))
        assert torch.equal(logits, inf)
        out[key] = S(key, logits)

    n_params = sum(p.numel() for p in model.parameters())
    print(f'{name}: params={n_params} checksum={out["checksum"]:.6f} '
          f'decode={out["decode"]["shape"]} '
          f'aux={[a["shape"] for a in out["aux"]]}')
    return cfg, out, n_params


def summarize_case(case, n_params):
    """Human-readable per-case summary for configs.json."""

    def shp(s):
        return s['shape']

    res = dict(seed=case['seed'], checksum=case['checksum'],
               n_state_dict_keys=len(case['shapes']), n_params=n_params,
               backbone=[list(t.shape) for t in case['backbone']],
               neck=[list(t.shape) for t in case['neck']],
               decode=shp(case['decode']), aux=[shp(a) for a in case['aux']])
    for k, v in case.items():
        if k.startswith(('whole/', 'slide/')):
            res[k] = shp(v)
    return res


def count(m):
    return sum(p.numel() for p in m.parameters()) if m is not None else 0


def resolved_full_configs():
    """The 6 unmodified full-size model dicts (SyncBN -> BN)."""
    cfg_root = os.path.join(os.path.dirname(mmseg.__file__), '.mim',
                            'configs')
    out = {}
    for (d, g) in CASES:
        rel = FULL_CONFIGS[(d, g)]
        cfg = Config.fromfile(os.path.join(cfg_root, rel))
        out[case_name(d, g)] = dict(
            config=rel, model=syncbn_to_bn(cfg.model.to_dict()))
    return out


def param_counts(resolved):
    res = {}
    for name, r in resolved.items():
        # built on CPU one at a time (meta device fails: VisionTransformer
        # calls .item() on torch.linspace for the drop-path rates)
        model = MODELS.build(ConfigDict(copy.deepcopy(r['model'])))
        total = count(model)
        aux = count(getattr(model, 'auxiliary_head', None))
        res[name] = dict(
            config=r['config'],
            total=total,
            without_aux=total - aux,
            backbone=count(model.backbone),
            neck=count(getattr(model, 'neck', None)),
            decode_head=count(model.decode_head),
            auxiliary_heads=aux)
        print(name, res[name])
        del model
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out-dir', default=HERE)
    ap.add_argument('--skip-param-counts', action='store_true')
    ap.add_argument('--cases', default='all',
                    help='comma list of case names (default: all 6)')
    args = ap.parse_args()
    cases = CASES if args.cases == 'all' else [
        (d, g) for d, g in CASES if case_name(d, g) in args.cases.split(',')]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # deterministic CPU math
    torch.use_deterministic_algorithms(True)

    versions = dict(mmseg=mmseg.__version__, mmcv=mmcv.__version__,
                    mmengine=mmengine.__version__, torch=str(torch.__version__))
    inputs = make_inputs()
    configs, ref_cases, summary = {}, {}, {}
    for d, g in cases:
        name = case_name(d, g)
        cfg, case, n_params = run_case(d, g, inputs)
        configs[name] = to_jsonable(cfg)
        ref_cases[name] = case
        summary[name] = summarize_case(case, n_params)
    reference = dict(versions=versions, inputs=inputs, cases=ref_cases)
    path = os.path.join(args.out_dir, 'reference.pt')
    torch.save(reference, path)
    print(f'wrote {path}: {os.path.getsize(path)} bytes')
    resolved = resolved_full_configs()

    doc = dict(
        versions=versions,
        notes=('Tiny mirrors of mmseg 1.2.2 configs/setr/*. SyncBN -> BN. '
               'patch_bias/final_norm/mlp_ratio are the VisionTransformer '
               'defaults (not set in the originals). MLA: neck out_channels '
               'and FCNHead channels 256->32, SETRMLAHead channels '
               '512->64 (=4*mla_channels, asserted by SETRMLAHead).'),
        case_seeds=CASE_SEEDS,
        input_seeds=dict(
            crop={hw_key((IMG, IMG)): input_seed('crop', (IMG, IMG))},
            whole={hw_key(hw): input_seed('whole', hw) for hw in WHOLE_SHAPES},
            slide={hw_key(hw): input_seed('slide', hw)
                   for hw in SLIDE_SHAPES}),
        reference_pt=dict(
            weights='weights.py mmseg_weights(shapes, seed); checksum = '
                    'sum |w| (float64)',
            sampled=f'S = dict(shape, index (sorted unique flat indices, '
                    f'all if numel <= {MAX_SAMPLES} else {MAX_SAMPLES} '
                    f'drawn by randperm), values (float32), argmax (uint8 '
                    f'HxW over the class dim))',
            slide=dict(crop=list(CROP), stride=list(STRIDE)),
            cases=summary),
        cases=configs,
        full_size_resolved_models=to_jsonable(resolved))

    if not args.skip_param_counts:
        counts = param_counts(resolved)
        with open(os.path.join(args.out_dir, 'param_counts.json'), 'w') as f:
            json.dump(dict(versions=versions, norm='SyncBN replaced by BN',
                           counts=counts), f, indent=2)
            f.write('\n')
    with open(os.path.join(args.out_dir, 'configs.json'), 'w') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')


if __name__ == '__main__':
    main()
