"""Seeded weights for the tiny mmseg SETR reference models (torch only, no mmseg).

`make_reference.py` (run with real mmsegmentation 1.2.2) takes the key order and shapes
from the mmseg model's own ``state_dict()``, builds the weights with ``mmseg_weights`` and
loads them with ``load_state_dict(strict=True)``. ``reference.pt`` stores, per case, those
``shapes`` (in order), the ``seed`` and the ``checksum``, so a reader regenerates the
identical weights instead of storing them.

Rules, by key, drawn in the given order from ONE ``torch.Generator().manual_seed(seed)`` (CPU,
float32):

- ``...num_batches_tracked``: ``zeros((), int64)`` (no draw)
- ``...running_mean``: 0.1 * randn;  ``...running_var``: 0.5 + rand  (U(0.5, 1.5))
- ``...cls_token`` / ``...pos_embed``: randn  (N(0, 1))
- ``...weight`` (``.weight``, or ``_weight`` as in ``in_proj_weight``), >= 2 dims:
  randn * (1 / fan_in) ** 0.5 with fan_in = prod(shape[1:])
- ``...weight``, 1 dim (LayerNorm / BatchNorm): 1 + 0.1 * randn
- ``...bias`` (``.bias`` or ``_bias``, as in ``in_proj_bias``): 0.1 * randn
- anything else: ``ValueError``
"""

from __future__ import annotations

import math

import torch


def _draw(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32)

    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.long)
    if key.endswith("running_mean"):
        return 0.1 * randn()
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    if key.endswith("cls_token") or key.endswith("pos_embed"):
        return randn()
    if key.endswith(".weight") or key.endswith("_weight"):
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            return randn() * (1.0 / fan_in) ** 0.5
        if len(shape) == 1:
            return 1.0 + 0.1 * randn()
    if key.endswith(".bias") or key.endswith("_bias"):
        return 0.1 * randn()
    raise ValueError(f"mmseg_weights: no rule for key {key!r} (shape {tuple(shape)})")


def mmseg_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """The state dict for ``shapes`` (mmseg key -> shape, in state-dict order) from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return {key: _draw(key, tuple(int(s) for s in shape), g) for key, shape in shapes.items()}


def checksum(sd: dict[str, torch.Tensor]) -> float:
    """Float64 sum over all floating tensors of ``|t|.sum()``."""
    total = 0.0
    for t in sd.values():
        if torch.is_floating_point(t):
            total += float(t.double().abs().sum())
    return total
