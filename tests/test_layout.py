"""The package's shape: floors that import only downwards, no import loops, short functions, and the
technique lists derived from the techniques' registry entries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from setr_lowmem.config import Config, config_fields, load_config, with_overrides
from setr_lowmem.engine.checkpoint import may_change_on_resume
from setr_lowmem.memory.registry import benchmark_rows, perf_levers, techniques

PACKAGE = Path(__file__).resolve().parent.parent / "setr_lowmem"

# Lowest first: a module may import from its own floor or below, never from above.
FLOORS = [
    ("setr_lowmem.errors", "setr_lowmem.compat", "setr_lowmem.config", "setr_lowmem.sizing.meters",
     "setr_lowmem.sizing.reference", "setr_lowmem.sizing.cuda_rules"),
    ("setr_lowmem.model", "setr_lowmem.data"),
    ("setr_lowmem.memory",),
    ("setr_lowmem.engine",),
    ("setr_lowmem.sizing", "setr_lowmem.cli"),
    ("setr_lowmem.commands",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def floor(module: str) -> int:
    if module == "setr_lowmem":
        return 0
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def imports(module: str) -> set[str]:
    """Every package module `module` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in MODULES and n != module)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_imports_only_its_floor_or_below():
    upward = [f"{m} ({floor(m)}) imports {d} ({floor(d)})" for m, deps in GRAPH.items() for d in deps
              if floor(d) > floor(m)]
    assert not upward, upward


def test_no_module_imports_one_that_imports_it_back():
    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in GRAPH[node]:
                if dep == start:
                    return path + [start]
                if dep not in path:
                    stack.append((dep, path + [dep]))
        return None

    # a package's __init__ importing its own modules is how packages work, not a loop
    loops = [cycle for m in MODULES if (cycle := cycle_from(m))
             and not any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:]))]
    assert not loops, loops[0]


def test_the_layering_check_can_fail():
    assert floor("setr_lowmem.memory.decoder") > floor("setr_lowmem.model.loss")
    assert "setr_lowmem.model.loss" in GRAPH["setr_lowmem.memory.decoder"]
    assert floor("setr_lowmem.engine.train") > floor("setr_lowmem.memory.checkpointing")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_is_over_80_lines(module):
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(MODULES[module].read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


def gpu_only_rows(rows: list[tuple[str, list[str], bool]]) -> list[str]:
    """The benchmark rows that a technique's lever marks as needing a GPU (gpu_only), in order."""
    marked = {lv.row for t in techniques() for lv in t.levers if lv.gpu_only}
    return [name for name, _, _ in rows if name in marked]


def test_the_gpu_only_rows_are_the_ones_a_cpu_cannot_run(monkeypatch):
    """Each GPU-only row's step refuses a CPU outside Triton's interpreter, and the rows before it run
    there: the mark says what the code does."""
    from setr_lowmem.engine.step import build_for_training

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = benchmark_rows()
    assert gpu_only_rows(rows)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 9, (2, 64, 64))
    applied: list[str] = []
    for name, overrides, _ in rows:
        if name in gpu_only_rows(rows):
            build_for_training(load_config("test_tiny", applied))[0](images, labels)[0].backward()
            with pytest.raises(RuntimeError, match="not on a CUDA device"):
                build_for_training(load_config("test_tiny", applied + overrides))[0](images, labels)
        applied += overrides


def test_technique_lists_come_from_the_registry():
    keys = {k for k, _ in config_fields()}
    rows = benchmark_rows()
    assert rows[0][0] == "naive" and [r for r, _, gpu in rows if gpu] == gpu_only_rows(rows)
    for _, overrides, _ in rows:
        assert all(o.split("=")[0] in keys for o in overrides)
    # every row, added to the ones before it, is a valid configuration
    cfg, applied = load_config("pup_ade20k", ["model.pretrained="]), []
    for _, overrides, _ in rows:
        applied += overrides
        with_overrides(cfg, applied)
    assert perf_levers(True) != perf_levers(False)
    assert {o.split("=")[0] for o in perf_levers(True)} >= {o.split("=")[0] for o in perf_levers(False)}
    # what may change on resume: logging, paths, throughput-only settings; never what is trained
    for key in ("name", "train.micro_batch", "train.log_every", "memory.checkpointing", "eval.crop", "data.root"):
        assert may_change_on_resume(key), key
    for key in ("optim.lr", "train.total_batch", "memory.precision", "schedule.iters", "data.num_classes"):
        assert not may_change_on_resume(key), key
    assert isinstance(Config(), Config)


def test_every_memory_key_belongs_to_a_technique():
    """A memory field that no registry entry owns would be applied by nothing (and a typo in an
    entry's keys is refused when the registry is read)."""
    from setr_lowmem.memory.registry import Technique, check

    owned = {k for t in techniques() for k in t.keys}
    keys = [k for k, _ in config_fields()]
    leaves = [k for k in keys if k.startswith("memory.") and not any(o.startswith(k + ".") for o in keys)]
    assert set(leaves) <= owned, sorted(set(leaves) - owned)
    with pytest.raises(ValueError, match="memory.checkpointin is not a config key"):
        check([Technique("typo", keys=("memory.checkpointin",), order=1, takes_effect="nowhere")])
    with pytest.raises(ValueError, match="has no apply"):
        check([Technique("idle", keys=("model.dropout",), order=1)])
    with pytest.raises(ValueError, match="owned by both"):
        check([*techniques(), Technique("again", keys=("memory.attention",), order=1, takes_effect="nowhere")])


FAKE_TECHNIQUE = '''
"""A technique that exists only in a test: a module of its own, declaring one entry."""
from setr_lowmem.memory.registry import Accounting, Lever, PlanChoice, StepCost, Technique


def _apply(train_module, cfg, world, device):
    train_module.model.fake_technique_applied = cfg.model.dropout


def _simulate(cfg, cuda):
    return {}, "fake technique: accounted as one GiB"


def _account(cfg, sizes, categories, computed):
    categories["fake"] = 1.0
    return 1.0


def _speed(cfg, sizes, accumulation):
    return StepCost(host_bytes=1e9 * accumulation)


TECHNIQUES = [Technique(
    "fake technique", keys=("model.dropout",), order=99, apply=_apply, simulate=_simulate,
    accounting=(Accounting(99, _account),), speed=_speed,
    levers=(Lever(99, "fake row", {"model.dropout": 0.1}),), perf={"model.dropout": (0.1, 0.0)},
    plan=PlanChoice(9, ({}, {"model.dropout": 0.2}), label=lambda cfg: f"dropout {cfg.model.dropout:g}"),
    resumable=("model.dropout",),
)]
'''


@pytest.fixture
def fake_technique(tmp_path, monkeypatch):
    """A technique module that no file of the package names, in a folder added to `setr_lowmem.memory`."""
    import importlib
    import sys

    import setr_lowmem.memory
    from setr_lowmem.memory import registry

    (tmp_path / "fake_technique.py").write_text(FAKE_TECHNIQUE)
    importlib.invalidate_caches()
    monkeypatch.setattr(setr_lowmem.memory, "__path__", [*setr_lowmem.memory.__path__, str(tmp_path)])
    registry.techniques.cache_clear()
    yield
    sys.modules.pop("setr_lowmem.memory.fake_technique", None)
    monkeypatch.undo()
    registry.techniques.cache_clear()


def test_a_new_technique_is_one_module(fake_technique):
    """A technique declared in its own module, and nowhere else, reaches training, the benchmark
    rows, the performance levers, the planner, the memory and speed forecasts and the resume rules."""
    from setr_lowmem.engine.step import build_for_training
    from setr_lowmem.sizing.forecast import forecast
    from setr_lowmem.sizing.planner import Plan, technique_sets

    assert "fake technique" in [t.name for t in techniques()]
    assert benchmark_rows()[-1] == ("fake row", ["model.dropout=0.1"], False)
    assert "model.dropout=0.1" in perf_levers(True) and "model.dropout=0.0" in perf_levers(False)
    cfg = load_config("test_tiny", ["model.dropout=0.05"])
    module, _ = build_for_training(cfg)
    assert module.model.fake_technique_applied == 0.05
    sets = technique_sets(cfg, cuda=False)
    assert [dict(s).get("model.dropout") for s in sets].count(0.2) == len(sets) // 2
    planned = Plan(2, sets[-1])
    assert planned.describe(cfg).endswith(", dropout 0.2") and "model.dropout=0.2" in planned.overrides()
    predicted = forecast(cfg, cuda=False)
    assert predicted.categories["fake"] == 1.0 and "fake technique: accounted as one GiB" in predicted.notes
    assert predicted.counts.host_bytes == 1e9 * cfg.train.accumulation()
    assert may_change_on_resume("model.dropout")


def test_without_the_fake_module_nothing_of_it_remains():
    """The fixture above leaves the registry as the package declares it."""
    assert "fake technique" not in [t.name for t in techniques()]
    assert not may_change_on_resume("model.dropout")
