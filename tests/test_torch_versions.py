"""What differs between the torches this project runs on (2.14 here and in CI, 2.11 on the GPU
machine): the private APIs, all reached through `setr_lowmem.compat`, and the extension-build lock
that made every DeepSpeed run after a killed one wait for ever under torch 2.11 (issue 30).
`tools/rehearse_gpu_image.sh` runs this file under torch 2.11 too."""

from __future__ import annotations

import ast
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from setr_lowmem import compat
from setr_lowmem.memory import deepspeed as ds
from tests.helpers import ROOT, run


@pytest.mark.parametrize("api", [a for a in compat.APIS.values() if a.required], ids=lambda a: a.path)
def test_every_private_api_used_is_in_this_torch(api):
    assert api.present(), compat.APIS[api.path].missing()


def _private_names() -> set[str]:
    """The underscore names compat wraps (`_BatchNorm`, `_reset_state`, `_tools`, ...)."""
    names = set()
    for api in compat.APIS.values():
        names.update(p for p in api.path.replace(":", ".").split(".") if p.startswith("_") and not p.startswith("__"))
    return names


def _reaches(tree: ast.AST, names: set[str]) -> list[str]:
    """Where a module reaches a private torch/accelerate name other than through compat."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            dotted = [module, *(f"{module}.{a.name}" for a in node.names)] if module else [a.name for a in node.names]
            for d in dotted:
                parts = d.split(".")
                if parts[0] in ("torch", "accelerate") and any(p.startswith("_") and not p.startswith("__")
                                                               for p in parts):
                    found.append(f"line {node.lineno}: import {d}")
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node
            while isinstance(root, ast.Attribute):
                root = root.value
            chain = ast.unparse(node)
            if isinstance(root, ast.Name) and root.id in ("torch", "nn") and ".ops." not in chain:
                found.append(f"line {node.lineno}: {chain}")
        elif isinstance(node, ast.Constant) and node.value in names:
            found.append(f"line {node.lineno}: '{node.value}'")
    return found


def test_no_file_reaches_a_private_api_but_compat():
    files = [p for d in ("setr_lowmem", "benchmarks", "tests", "launch") for p in (ROOT / d).rglob("*.py")
             if p.name != "compat.py" and "data" not in p.relative_to(ROOT).parts and p.name != Path(__file__).name]
    names = _private_names()
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := _reaches(ast.parse(p.read_text()), names))}
    assert not found, found


def test_the_door_check_can_fail():
    names = _private_names()
    assert _reaches(ast.parse("from torch.distributed._tools.mem_tracker import MemTracker"), names)
    assert _reaches(ast.parse("isinstance(m, nn.modules.batchnorm._BatchNorm)"), names)
    assert _reaches(ast.parse("AcceleratorState._reset_state(reset_partial_state=True)"), names)
    assert _reaches(ast.parse("torch._C._cuda_clearCublasWorkspaces()"), names)
    assert not _reaches(ast.parse("torch.ops.aten._scaled_dot_product_flash_attention.default"), names)


def test_a_missing_private_api_stops_with_one_line_that_names_it():
    api = compat.PrivateApi("torch.cuda.memory:_no_such_history", "torch 9.0", "the snapshot", "it stops")
    assert not api.present()
    message = str(api.missing())
    assert "\n" not in message and "torch.cuda.memory._no_such_history" in message and "torch 9.0" in message
    assert torch.__version__ in message and isinstance(api.missing(), compat.SetrError)
    compat.APIS[api.path] = api
    try:
        with pytest.raises(compat.PrivateApiMissing, match="_no_such_history"):
            compat._refusing(api.path)()
    finally:
        del compat.APIS[api.path]


def test_the_fallbacks_do_what_the_private_names_do():
    tree = {"a": [torch.ones(1), (2, torch.zeros(2))], "b": 3}
    assert compat._tree_leaves(tree)[0] is compat.tree_leaves(tree)[0] and len(compat._tree_leaves(tree)) == 4
    double = compat._tree_map(lambda x: x * 2, tree)
    assert double["b"] == 6 and torch.equal(double["a"][1][1], torch.zeros(2))
    stock = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    for module in (torch.nn.BatchNorm2d(3), torch.nn.SyncBatchNorm(3), torch.nn.LayerNorm(3)):
        assert isinstance(module, compat.BatchNormBase) == isinstance(module, stock)
    assert compat.timeline_category_names(8)[0] == "parameter" and compat.timeline_category_names(3) == [
        "category 0", "category 1", "category 2"]
    assert compat.raise_recompile_limit(1) >= 8  # never lowered


# ---- the extension-build lock (issue 30: "a hang that outlives the run") ----------------------

def _extensions(tmp_path: Path, monkeypatch, built: bool = True) -> Path:
    """A TORCH_EXTENSIONS_DIR holding DeepSpeed's op folder and a lock a killed build left."""
    root = tmp_path / "torch_extensions"
    folder = root / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    if built:
        (folder / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    (folder / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return folder / "lock"


@pytest.mark.parametrize("built", [True, False], ids=["built", "build-interrupted"])
def test_a_lock_no_process_holds_is_removed_with_a_log_line(tmp_path, monkeypatch, caplog, built):
    lock = _extensions(tmp_path, monkeypatch, built)
    assert ds.extension_build_root() == lock.parent.parent
    with caplog.at_level(logging.DEBUG, logger=ds.__name__):
        assert ds.clear_stale_build_locks() == [lock]
    assert not lock.exists() and str(lock) in caplog.text
    assert ("the library is built" if built else "it is built again") in caplog.text
    # what torch 2.11's loader does first: create the lock exclusively; had the file stayed, it would
    # have polled for it for ever (torch.utils.file_baton.FileBaton.wait)
    from torch.utils.file_baton import FileBaton

    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    baton.release()


# a build in progress, as torch 2.11 holds the lock (the exclusively created file kept open) and as
# torch 2.14 does (an OS lock on it); neither imports torch, to start in milliseconds
HOLD = {"torch 2.11": "fd = os.open(path, os.O_CREAT | os.O_EXCL)",
        "torch 2.14": "fd = os.open(path, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)"}


@pytest.mark.parametrize("how", list(HOLD))
def test_a_lock_a_live_build_holds_is_kept(tmp_path, monkeypatch, how):
    lock = _extensions(tmp_path, monkeypatch)
    if how == "torch 2.11":
        lock.unlink()  # the builder creates it
    code = f"import fcntl, os, sys, time\npath = sys.argv[1]\n{HOLD[how]}\nprint('held', flush=True)\ntime.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert ds._holders(lock) == [holder.pid]
        assert ds.clear_stale_build_locks() == [] and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert ds.clear_stale_build_locks() == [lock] and not lock.exists()  # its holder gone: a leftover


def test_without_proc_a_lock_stops_the_run_in_one_line_where_torch_would_wait(tmp_path, monkeypatch):
    lock = _extensions(tmp_path, monkeypatch)
    monkeypatch.setattr(ds, "_holders", lambda path: None)
    monkeypatch.setattr(ds, "extension_loader_waits_on_lock_files", lambda: True)
    with pytest.raises(ds.DeepSpeedSetupError, match="remove the file") as err:
        ds.clear_stale_build_locks()
    assert str(lock) in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(ds, "extension_loader_waits_on_lock_files", lambda: False)  # an OS lock: harmless
    assert ds.clear_stale_build_locks() == [] and lock.exists()


def test_the_loader_this_torch_has():
    """torch 2.11 polls for the file (FileBaton); 2.14 takes an OS lock (pytorch/pytorch#189245)."""
    expected = torch.__version__ < "2.14"
    assert compat.extension_loader_waits_on_lock_files() == expected, torch.__version__


def test_deepspeed_starts_past_a_leftover_lock(tmp_path):
    """The hang itself: DeepSpeed (ZeRO-2 through accelerate, as training starts it) with a lock left
    in its op's folder; under torch 2.11 this waited for ever. The op comes from the tests' shared
    build folder (conftest), copied, so that it is not built again."""
    shared = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    root = tmp_path / "torch_extensions"
    if shared.is_dir():
        shutil.copytree(shared, root / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    (root / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
    (root / "deepspeed_shm_comm" / "lock").touch()
    code = textwrap.dedent("""
        import logging
        logging.basicConfig(level=logging.INFO)
        from setr_lowmem.config import load_config
        from setr_lowmem.engine.step import make_accelerator
        accelerator = make_accelerator(load_config("test_tiny", ["memory.deepspeed.stage=2"]))
        print("DeepSpeed started:", accelerator.distributed_type)
    """)
    try:
        proc = run([sys.executable, "-c", code], timeout=300, env={"TORCH_EXTENSIONS_DIR": str(root)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"DeepSpeed waited on {root / 'deepspeed_shm_comm' / 'lock'} for 300 s")
    assert "DeepSpeed started: DistributedType.DEEPSPEED" in proc.stdout
    if compat.extension_loader_waits_on_lock_files():
        assert "removed " in proc.stderr and "deepspeed_shm_comm/lock" in proc.stderr


def test_the_locks_are_cleared_before_deepspeed_starts(monkeypatch):
    from setr_lowmem.config import load_config
    from setr_lowmem.engine import step

    class Cleared(Exception):
        pass

    def clear():
        raise Cleared

    monkeypatch.setattr(step, "clear_stale_build_locks", clear)
    monkeypatch.setattr(step, "DeepSpeedPlugin", lambda **kw: pytest.fail("DeepSpeed started first"))
    monkeypatch.setattr(os, "environ", os.environ.copy())  # the rendezvous variables stay here
    with pytest.raises(Cleared):
        step.make_accelerator(load_config("test_tiny", ["memory.deepspeed.stage=2"]))
