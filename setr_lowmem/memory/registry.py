"""One entry per memory technique, declared beside its code, read by everything that needs to know.

A technique is a `Technique`: its name, the config keys it owns, and what each part of the
toolkit needs from it:

- **training** (`engine.step.build_for_training`): its `apply(train_module, cfg, world, device)`,
  run in the techniques' `order` on the plain model; a technique without one takes effect
  elsewhere, which `takes_effect` names (the optimizer, accelerate's prepare);
- **the forecast** (`sizing.forecast`): by default its fake step computes the technique as
  training runs it; `simulate` says what the fake step runs instead (and the note the forecast
  prints about it), `accounting` the GiB it then adds for what was not run, `speed` what the
  speed model adds (`sizing.speed.configured_counts`);
- **the memory benchmark** (`setr-benchmark`): its value in the baseline row (`off`) and the rows
  that set it (`Lever`); **the performance targets** (`benchmarks/targets.py`): its values with
  the levers on and off (`perf`);
- **the planner** (`sizing.planner`): the values it may choose, fastest first (`PlanChoice`);
- **resume** (`engine.checkpoint.check_compatible`): the keys that may change when a run resumes.

The entries live in a module-level `TECHNIQUES` list of each module of `setr_lowmem.memory`;
`techniques()` finds them (no list of modules to edit, and no import of the techniques here:
the registry sits below them). Adding a technique is its config field (`config.py`, the schema)
and its module.

    python -m setr_lowmem.memory.registry       # the techniques in order, with their keys
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from setr_lowmem.config import Config, config_fields

if TYPE_CHECKING:
    import torch

    from setr_lowmem.model.loss import SegmentationLoss

# apply(train_module, cfg, world, device): change the model built plain, in place
Apply = Callable[["SegmentationLoss", Config, int, "torch.device | None"], None]


@dataclass(frozen=True)
class Lever:
    """A row of the memory benchmark that sets `values` (config keys of the technique declaring it).
    Rows run in `order`, each adding its values to those of every row before it. A row may set keys
    of several techniques (the ZeRO-2 row turns 8-bit states, channels-last and compiled convs off):
    each declares its part under the same `order` and `row`."""

    order: int
    row: str
    values: dict[str, Any]
    gpu_only: bool = False


@dataclass(frozen=True)
class Accounting:
    """GiB the forecast adds to its fake step's peak for what that step did not run.
    `gib(cfg, sizes, categories, computed)`: `sizes` are the trained parameters' element counts,
    `categories` the GiB per kind (params, grads, optimizer, ...) as the accountings before this one
    left them, updated in place, `computed` those the fake step measured. The forecast runs every
    technique's accountings in `order`: each reads what the ones before wrote."""

    order: int
    gib: Callable[[Config, list[int], dict[str, float], dict[str, float]], float]


@dataclass
class StepCost:
    """What a technique changes in the speed model's optimizer step (`sizing.speed.StepCounts`):
    the kernels of the step on the GPU, each (peak, flops, bytes), in place of the fake step's
    (None: the fake step's stay), and what it adds across PCIe, on the host, and in Python."""

    optimizer: list[tuple[str, float, float]] | None = None
    link_bytes: float = 0
    host_bytes: float = 0
    python_steps: int = 0


@dataclass(frozen=True)
class PlanChoice:
    """What the planner may choose for a technique. `options`: config values, fastest first (an
    empty one leaves the config as it is); `gpu_only`: the indices of options a CPU does not try
    unless asked for them; `allowed(chosen)`: whether a whole plan's values (every technique's
    choice merged) make sense with this technique's; `label(cfg)`: how the planned config reads in
    a plan's description ('' for nothing). The planner merges the choices in `order` (its overrides
    and description read in it) and varies the first fastest: a plan changes the cheapest
    technique first."""

    order: int
    options: tuple[dict[str, Any], ...]
    label: Callable[[Config], str]
    gpu_only: tuple[int, ...] = ()
    allowed: Callable[[dict[str, Any]], bool] = lambda chosen: True


@dataclass(frozen=True)
class Technique:
    """A memory technique: see the module's docstring for what each part feeds."""

    name: str
    keys: tuple[str, ...]  # the config keys it owns
    order: int  # its place: build_for_training applies in it; the forecast notes follow it
    apply: Apply | None = None
    takes_effect: str = ""  # where it takes effect when not by `apply` (the optimizer, accelerate's prepare)
    # the forecast: (config values the fake step runs instead, the note to print ('' none)); None: computed
    simulate: Callable[[Config, bool], tuple[dict[str, Any], str]] | None = None
    accounting: tuple[Accounting, ...] = ()
    # the speed model: (cfg, sizes, accumulation) -> its StepCost, or None when it changes nothing
    speed: Callable[[Config, list[int], int], StepCost | None] | None = None
    off: dict[str, Any] = field(default_factory=dict)  # its values in the benchmark's baseline row
    levers: tuple[Lever, ...] = ()
    perf: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (on, off); off None: as configured
    plan: PlanChoice | None = None
    resumable: tuple[str, ...] = ()  # its keys that may change when a run resumes


PACKAGE = "setr_lowmem.memory"


def _declares(module: str) -> bool:
    """Whether `module`'s source assigns `TECHNIQUES` at its top level (read, not imported: a module
    such as `fused_ce_triton` imports Triton, which only its kernels need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    targets = [t for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    return any(isinstance(t, ast.Name) and t.id == "TECHNIQUES" for t in targets)


@functools.cache
def techniques() -> tuple[Technique, ...]:
    """Every technique declared in a module of `setr_lowmem.memory`, in `order`; checked once
    (`check`). Cached: a test that adds a module clears it with `techniques.cache_clear()`."""
    package = importlib.import_module(PACKAGE)
    found: list[Technique] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        name = f"{PACKAGE}.{info.name}"
        if name != __name__ and _declares(name):
            found += importlib.import_module(name).TECHNIQUES
    check(found)
    return tuple(sorted(found, key=lambda t: t.order))


def check(found: list[Technique]) -> None:
    """Each technique has its own name and place, owns config keys no other owns, sets only those,
    and takes effect somewhere."""
    known = {k for k, _ in config_fields()}
    owner: dict[str, str] = {}
    for t in found:
        for key in t.keys:
            if key not in known:
                raise ValueError(f"technique {t.name!r}: {key} is not a config key")
            if key in owner:
                raise ValueError(f"{key} is owned by both {owner[key]!r} and {t.name!r}")
            owner[key] = t.name
        sets = [*t.off, *t.perf, *t.resumable, *(k for lv in t.levers for k in lv.values),
                *(k for option in (t.plan.options if t.plan else ()) for k in option)]
        stray = sorted(set(sets) - set(t.keys))
        if stray:
            raise ValueError(f"technique {t.name!r} sets {', '.join(stray)}, keys it does not own")
        if t.apply is None and not t.takes_effect:
            raise ValueError(f"technique {t.name!r} has no apply: say where it takes effect (takes_effect)")
    for what, values in (("name", [t.name for t in found]), ("order", [t.order for t in found])):
        if len(set(values)) != len(values):
            raise ValueError(f"two techniques share a {what}: {sorted(values)}")


def override(key: str, value: Any) -> str:
    """`key=value` as a command line writes it (booleans in YAML's lower case)."""
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def _field_order() -> dict[str, int]:
    return {k: i for i, (k, _) in enumerate(config_fields())}


BASELINE_ROW = "naive"


def benchmark_rows() -> list[tuple[str, list[str], bool]]:
    """(row, the overrides it adds to the rows before it, GPU only) of the memory benchmark: the
    baseline row (each technique's `off` values), then the levers' rows in their order; within a
    row, the keys in the config's order."""
    where = _field_order()
    off = sorted((where[k], k, v) for t in techniques() for k, v in t.off.items())
    rows = [(BASELINE_ROW, [override(k, v) for _, k, v in off], False)]
    steps = sorted((lv.order, where[k], k, v, lv) for t in techniques() for lv in t.levers
                   for k, v in lv.values.items())
    for order in dict.fromkeys(o for o, *_ in steps):
        here = [(k, v, lv) for o, _, k, v, lv in steps if o == order]
        names = {lv.row for _, _, lv in here}
        if len(names) != 1:
            raise ValueError(f"benchmark row {order} is named {sorted(names)}")
        rows.append((names.pop(), [override(k, v) for k, v, _ in here], any(lv.gpu_only for *_, lv in here)))
    return rows


def perf_levers(on: bool) -> list[str]:
    """The overrides of the performance targets' levers, all on or all off, in the config's order."""
    where = _field_order()
    values = sorted((where[k], k, pair[0 if on else 1]) for t in techniques() for k, pair in t.perf.items())
    return [override(k, v) for _, k, v in values if v is not None]


def resumable_keys() -> set[str]:
    """The technique keys that may change when a run resumes (throughput, not what is trained)."""
    return {k for t in techniques() for k in t.resumable}


def plan_choices() -> list[PlanChoice]:
    """The planner's choices, in their `order`."""
    return sorted((t.plan for t in techniques() if t.plan is not None), key=lambda c: c.order)


def main() -> None:
    """Print the techniques in order: where each takes effect, how the forecast treats it, its keys."""
    print(f"{'order':>5}  {'technique':<36} {'takes effect':<42} {'forecast':<22} keys")
    for t in techniques():
        where = "build_for_training (apply)" if t.apply else t.takes_effect
        forecast = " + ".join(["simulated"] * bool(t.simulate) + ["accounted"] * bool(t.accounting)) or "computed"
        print(f"{t.order:>5}  {t.name:<36} {where:<42} {forecast:<22} {', '.join(t.keys)}")


if __name__ == "__main__":
    main()
