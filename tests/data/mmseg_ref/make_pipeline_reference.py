"""Reference outputs of mmsegmentation 1.2.2's PhotoMetricDistortion and mmengine's PolyLR.

Not run by CI (CI has no mmseg). Run in the mmseg environment described in README.md:
    /tmp/mmseg-venv/bin/python tests/data/mmseg_ref/make_pipeline_reference.py
It writes `pipeline.pt` next to itself:
- `photometric`: for each seed, a random uint8 RGB image, and mmseg's PhotoMetricDistortion
  output for it with `np.random.seed(seed)` (mmseg draws from numpy's global RandomState);
  mmseg works on BGR, so it is given the image reversed and its output is reversed back;
- `poly`: the learning rates mmengine's PolyLR (power 0.9, eta_min 1e-4, end=T, by iteration)
  gives two parameter groups (0.01 and 0.1) over T iterations, T in (1000, 7).
"""
import importlib.abc
import importlib.machinery
import os
import sys
import types

import numpy as np


class _StubOps(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """mmcv-lite has no compiled mmcv.ops; nothing used here needs them."""

    def find_spec(self, name, path, target=None):
        if name == "mmcv.ops" or name.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = lambda attr: (_ for _ in ()).throw(AttributeError(attr)) if attr.startswith("__") \
            else type(attr, (), {})
        return mod

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubOps())

import torch  # noqa: E402
from mmengine.optim.scheduler import PolyLR  # noqa: E402
from mmseg.datasets.transforms import PhotoMetricDistortion  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def photometric(seeds=range(40)):
    out = []
    t = PhotoMetricDistortion()
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        np.random.seed(seed)
        got = t.transform({"img": np.ascontiguousarray(rgb[..., ::-1])})["img"][..., ::-1]
        out.append({"seed": seed, "image": torch.from_numpy(rgb.copy()),
                    "expected": torch.from_numpy(np.ascontiguousarray(got))})
    return out


def poly(iters):
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.1}], lr=0.01)
    sched = PolyLR(opt, power=0.9, eta_min=1e-4, begin=0, end=iters, by_epoch=False)
    lrs = []
    for _ in range(iters):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return torch.tensor(lrs, dtype=torch.float64)


if __name__ == "__main__":
    import mmengine
    import mmseg

    torch.save({"versions": {"mmseg": mmseg.__version__, "mmengine": mmengine.__version__,
                             "numpy": np.__version__, "cv2": __import__("cv2").__version__},
                "photometric": photometric(), "poly": {1000: poly(1000), 7: poly(7)}},
               os.path.join(HERE, "pipeline.pt"))
    print("wrote", os.path.join(HERE, "pipeline.pt"))
