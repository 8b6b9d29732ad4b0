"""How long a training step takes, without the card: the forecast's fake step counted operator by
operator, and a time model fitted to measured steps.

**Counting.** The memory forecast already runs every operator of the configured step on fake
tensors, recomputation included (`sizing.forecast`). `OpCounter`, a `TorchDispatchMode` inside
that step, records for each operator that launches a kernel its floating-point operations
(PyTorch's own formulas, `torch.utils.flop_counter.flop_registry`, which work on fake tensors'
shapes) and the bytes it reads and writes (its tensor inputs' and outputs' sizes and dtypes).
What the fake step does not run is accounted by `configured_counts` from each technique's `speed`
(`memory.registry`): bitsandbytes' 8-bit optimizer step (one kernel per parameter over its
bytes, `memory.optim`), and under ZeRO offload the gradients' and weights' trips across PCIe and
the host's optimizer step (`memory.deepspeed`).

**Timing.** Each operator takes the longer of its arithmetic at the card's dense peak for its
dtype and its traffic at the card's memory bandwidth, each scaled by an efficiency, plus a fixed
cost per kernel (the roofline model, with launch and tail costs):

    t_op = max(flops / (peak * compute), bytes / (bandwidth * memory)) + kernel_us

and the host's optimizer step takes its bytes at `host_gbs`. One more cost is not a kernel's:
bitsandbytes steps its 8-bit states one parameter at a time from Python (`param_us` each; the
measured 8-bit rows are slower than the 32-bit ones by far more than their kernels' bytes). The
five `Efficiencies` are fitted
to the measured H100 rows (`docs/reference/h100_plain_pytorch.csv`) by `fit`;
`benchmarks/speed_check.py` reports the leave-one-out error and stores the fit in
`data/speed_model.json`, which the planner reads (`load_model`). The efficiencies are assumed to
carry over to other cards: see `docs/speed-forecast.md` for what that misses.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from setr_lowmem.compat import TorchDispatchMode, tree_flatten
from setr_lowmem.config import Config
from setr_lowmem.memory.registry import techniques
from setr_lowmem.sizing.cards import Card

aten = torch.ops.aten
MODEL_JSON = Path(__file__).resolve().parent / "data" / "speed_model.json"
PEAKS = ("bf16", "tf32", "fp32", "none")  # which of a card's peaks an operator's arithmetic runs at

# operators that launch no kernel (allocation, metadata, aliasing); views are found by `is_view`, and
# the `prim` (device queries) and `profiler` (record_function markers) namespaces launch none either
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
             aten._local_scalar_dense.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
             aten.is_same_size.default, aten.set_.source_Storage_storage_offset}

# PyTorch's formulas do not cover the CPU's flash attention, which the fake step dispatches to
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default:
        lambda q, k, v, *a, **kw: sdpa_flop_count(q.shape, k.shape, v.shape),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape),
}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _flops(func, args, kwargs, out) -> int:
    """The operator's floating-point operations by PyTorch's own formula (0: none known)."""
    if func in _CPU_ATTENTION:
        return int(_CPU_ATTENTION[func](*args, **kwargs))
    formula = flop_registry.get(func.overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def _peak(func, flops: int, inputs: list[torch.Tensor]) -> str:
    """Which peak the arithmetic runs at on a GPU: bf16/fp16 tensor cores; float32 convolutions on
    TF32 tensor cores (cuDNN's default, `torch.backends.cudnn.allow_tf32`); other float32 products
    in full float32 (`torch.backends.cuda.matmul.allow_tf32` is off by default)."""
    if flops == 0:
        return "none"
    floats = [t.dtype for t in inputs if t.is_floating_point()]
    if floats and floats[0] in (torch.bfloat16, torch.float16):
        return "bf16"
    return "tf32" if "conv" in func.overloadpacket.__name__ else "fp32"


@dataclass
class OpCounts:
    """Operators grouped by (peak, flops, bytes): identical ones (24 encoder blocks) share a row."""

    rows: Counter = field(default_factory=Counter)
    _arrays: tuple | None = field(default=None, repr=False, compare=False)

    def add(self, peak: str, flops: float, nbytes: float, count: int = 1) -> None:
        self.rows[(peak, int(flops), int(nbytes))] += count
        self._arrays = None

    @property
    def flops(self) -> float:
        return float(sum(f * c for (_, f, _), c in self.rows.items()))

    @property
    def bytes(self) -> float:
        return float(sum(b * c for (_, _, b), c in self.rows.items()))

    @property
    def kernels(self) -> int:
        return sum(self.rows.values())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(peak index into PEAKS, flops, bytes, count) per row, for the vectorised time model."""
        if self._arrays is None:
            self._arrays = self._build_arrays()
        return self._arrays

    def _build_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        keys = list(self.rows)
        return (np.array([PEAKS.index(p) for p, _, _ in keys], dtype=np.int64),
                np.array([f for _, f, _ in keys], dtype=np.float64),
                np.array([b for _, _, b in keys], dtype=np.float64),
                np.array([self.rows[k] for k in keys], dtype=np.float64))


class OpCounter(TorchDispatchMode):
    """Counts every kernel-launching operator run under it into `counts[phase]` (set `phase` to
    separate the micro-batch's forward and backward from the optimizer step)."""

    def __init__(self):
        super().__init__()
        self.phase = "micro_batch"
        self.counts: dict[str, OpCounts] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in NO_KERNEL or getattr(func, "is_view", False) or func.namespace in ("prim", "profiler"):
            return out
        inputs = _tensors((args, kwargs))
        nbytes = sum(t.numel() * t.element_size() for t in inputs + _tensors(out))
        flops = _flops(func, args, kwargs, out)
        self.counts.setdefault(self.phase, OpCounts()).add(_peak(func, flops, inputs), flops, nbytes)
        return out


@dataclass
class StepCounts:
    """What one optimizer step runs: `accumulation` micro-batches of `micro_batch` ops, then the
    `optimizer` ops on the GPU, and (ZeRO offload) `link_bytes` across PCIe and `host_bytes` read
    and written by the host's optimizer step."""

    micro_batch: OpCounts
    optimizer: OpCounts
    accumulation: int
    images: int
    link_bytes: float = 0.0
    host_bytes: float = 0.0
    python_steps: int = 0  # parameters the optimizer steps one by one from Python (bitsandbytes)

    @property
    def flops_per_image(self) -> float:
        return self.micro_batch.flops * self.accumulation / self.images


def configured_counts(cfg: Config, micro_batch: OpCounts, optimizer: OpCounts, sizes: list[int]) -> StepCounts:
    """The step of `cfg` from the fake step's counts (`sizes`: the trained parameters' values),
    with what the fake step did not run added by each technique's `speed` (8-bit states: one
    kernel per parameter, stepped from Python; ZeRO's offloaded optimizer: PCIe and the host).
    The step runs `train.accumulation()` micro-batches: the sizing room predicts one process."""
    acc = cfg.train.accumulation()
    out = StepCounts(micro_batch, optimizer, acc, cfg.train.micro_batch * acc)
    for technique in techniques():
        cost = technique.speed(cfg, sizes, acc) if technique.speed is not None else None
        if cost is None:
            continue
        if cost.optimizer is not None:
            out.optimizer = OpCounts()
            for peak, flops, nbytes in cost.optimizer:
                out.optimizer.add(peak, flops, nbytes)
        out.link_bytes += cost.link_bytes
        out.host_bytes += cost.host_bytes
        out.python_steps += cost.python_steps
    return out


@dataclass(frozen=True)
class Efficiencies:
    """The fitted constants of the time model (see the module's docstring)."""

    compute: float  # fraction of the card's dense peak that operators with arithmetic reach
    memory: float  # fraction of its bandwidth that their traffic reaches
    kernel_us: float  # fixed cost per kernel, microseconds
    host_gbs: float  # the host's optimizer step: GB/s of values read and written
    param_us: float  # an optimizer that steps each parameter from Python: microseconds per parameter

    def as_array(self) -> np.ndarray:
        return np.log([self.compute, self.memory, self.kernel_us, self.host_gbs, self.param_us])

    @staticmethod
    def from_array(x: np.ndarray) -> Efficiencies:
        return Efficiencies(*(float(v) for v in np.exp(x)))


def _ops_split(ops: OpCounts, card: Card, eff: Efficiencies, times: float) -> np.ndarray:
    """Seconds of `ops` run `times` times: [arithmetic-bound operators, memory-bound operators,
    the kernels' fixed costs]."""
    peak, flops, nbytes, count = ops.arrays()
    if not len(count):
        return np.zeros(3)
    rate = np.array([card.bf16_tflops, card.tf32_tflops, card.fp32_tflops, math.inf]) * 1e12 * eff.compute
    arithmetic, traffic = flops / rate[peak], nbytes / (card.bandwidth_gbs * 1e9 * eff.memory)
    bound = arithmetic > traffic
    return times * np.array([(arithmetic * count)[bound].sum(), (traffic * count)[~bound].sum(),
                             eff.kernel_us * 1e-6 * count.sum()])


def time_split(counts: StepCounts, card: Card, eff: Efficiencies) -> dict[str, float]:
    """Predicted seconds of one optimizer step of `counts` on `card`, by where they go."""
    gpu = _ops_split(counts.micro_batch, card, eff, counts.accumulation) + _ops_split(counts.optimizer, card, eff, 1)
    return {"arithmetic": float(gpu[0]), "memory": float(gpu[1]), "kernels": float(gpu[2]),
            "host": counts.host_bytes / (eff.host_gbs * 1e9) + counts.link_bytes / (card.host_link_gbs * 1e9),
            "python": counts.python_steps * eff.param_us * 1e-6}


def step_seconds(counts: StepCounts, card: Card, eff: Efficiencies) -> float:
    """Predicted seconds of one optimizer step of `counts` on `card`."""
    return sum(time_split(counts, card, eff).values())


def images_per_second(counts: StepCounts, card: Card, eff: Efficiencies) -> float:
    return counts.images / step_seconds(counts, card, eff)


def _loss(x: np.ndarray, rows: list[tuple[StepCounts, float]], card: Card) -> float:
    eff = Efficiencies.from_array(x)
    if eff.compute > 1 or eff.memory > 1:
        return 1e9  # no operator beats the card's peak
    return float(sum(math.log(images_per_second(c, card, eff) / measured) ** 2 for c, measured in rows))


def nelder_mead(f, x0: np.ndarray, step: float = 0.5, iters: int = 600, tol: float = 1e-10) -> np.ndarray:
    """Minimise `f` from `x0` by the Nelder-Mead simplex (reflect, expand, contract, shrink)."""
    simplex = [x0] + [x0 + step * np.eye(len(x0))[i] for i in range(len(x0))]
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tol:
            break
        centre = np.mean(simplex[:-1], axis=0)
        reflected = centre + (centre - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centre + 2 * (centre - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centre + 0.5 * (simplex[-1] - centre)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex]
                values = [f(x) for x in simplex]
    return simplex[int(np.argmin(values))]


START = Efficiencies(compute=0.5, memory=0.5, kernel_us=5.0, host_gbs=10.0, param_us=50.0)


def fit(rows: list[tuple[StepCounts, float]], card: Card, start: Efficiencies = START) -> Efficiencies:
    """The efficiencies that best predict the measured images/s of `rows` (least squares of the
    log ratio, so that 10% too fast and 10% too slow weigh alike); the simplex restarts from its
    best point until a restart no longer improves it."""
    x, best = start.as_array(), math.inf
    for _ in range(8):
        x = nelder_mead(lambda v: _loss(v, rows, card), x, iters=2000)
        if _loss(x, rows, card) > best - 1e-9:
            break
        best = _loss(x, rows, card)
    return Efficiencies.from_array(x)


@dataclass
class SpeedModel:
    """A fit and its leave-one-out errors (predicted / measured - 1 on each row left out)."""

    efficiencies: Efficiencies
    errors: list[float]
    fitted_on: str

    def range(self, img_s: float) -> tuple[float, float]:
        """What `img_s` predicted means as a range: the value the model's worst under- and
        over-predictions left out of its fit would have been measured as."""
        return img_s / (1 + max(self.errors)), img_s / (1 + min(self.errors))

    def save(self, path: Path = MODEL_JSON) -> None:
        path.write_text(json.dumps({"efficiencies": asdict(self.efficiencies), "errors": self.errors,
                                    "fitted_on": self.fitted_on}, indent=1) + "\n")


def load_model(path: Path = MODEL_JSON) -> SpeedModel | None:
    """The fit `benchmarks/speed_check.py` stored (None: never fitted)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return SpeedModel(Efficiencies(**data["efficiencies"]), data["errors"], data["fitted_on"])
