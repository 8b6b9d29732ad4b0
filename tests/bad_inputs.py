"""Bad inputs and what the user reads for each: one line `error: ...`, never a traceback.

Each case runs a real launcher (`launch/*.py`) in this process, as `python launch/<x>.py ...`
would: `tests/test_bad_inputs.py` checks every case, and

    python tests/bad_inputs.py [--write]    # prints (or writes into docs/failures.md) the table

regenerates the table of docs/failures.md from what the launchers say.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = ["schedule.iters=2", "train.total_batch=2", "train.micro_batch=2", "data.synthetic.num_train=8",
        "data.synthetic.num_val=2"]


@dataclass
class Case:
    what: str  # the bad input, in the user's words (the first column of docs/failures.md)
    launcher: str  # train, evaluate, predict, export or plan
    args: list[str]  # `{tmp}` is a fresh directory, `{trained}` a finished tiny run
    expect: str  # a fragment of the one error line
    setup: Callable[[Path], None] | None = None
    env: dict = field(default_factory=dict)


def _write(rel: str, text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    return setup


def _ade(corrupt: str = "", unmatched: bool = False, label_value: int | None = None,
         every: bool = False) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        from tests.fixtures import make_ade

        root = make_ade(tmp, n=3)
        if corrupt:
            (root / corrupt).write_bytes(b"\xff\xd8 this is not a jpeg")
        if unmatched:
            (root / "annotations/training/ADE_train_00000001.png").unlink()
        if label_value is not None:
            import numpy as np
            from PIL import Image

            for label in sorted((root / "annotations/training").glob("*.png"))[: None if every else 1]:
                Image.fromarray(np.full((24, 40), label_value, np.uint8)).save(label)
    return setup


def _copy_trained(damage: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """A copy of the trained run under {tmp}/run, optionally damaged."""
    def setup(tmp: Path) -> None:
        shutil.copytree(TRAINED, tmp / "run")
        if damage:
            damage(tmp / "run")
    return setup


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("iter_*"))[-1]


def _truncate(rel: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        f = _newest(run) / rel
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return damage


def _without_checkpoints(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")


def _damage_all(run: Path) -> None:
    for ckpt in (run / "checkpoints").glob("iter_*"):
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 0xFF]))


def _loop(tmp: Path) -> None:
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")


def _images(*names: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import numpy as np
        from PIL import Image

        (tmp / "in").mkdir(exist_ok=True)
        for name in names:
            Image.fromarray(np.full((24, 40, 3), 90, np.uint8)).save(tmp / "in" / name)
    return setup


def _config_bytes(data: bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "my.yaml").write_bytes(data)
    return setup


def _tiny_text(**replace: str) -> str:
    """configs/test_tiny.yaml with whole lines replaced: {old line's text: new line's text}."""
    text = (ROOT / "configs" / "test_tiny.yaml").read_text()
    for old, new in replace.items():
        assert f"  {old}\n" in text, old
        text = text.replace(f"  {old}\n", f"  {new}\n", 1)
    return text


def _hold_lock(tmp: Path) -> None:
    from setr_lowmem.engine.rundir import RunLock

    (tmp / "busy").mkdir()
    HELD.append(RunLock(tmp / "busy").acquire())


HELD: list = []
TRAINED: Path = Path()  # set by `prepare_trained`

CASES = [
    # ---- the config file and overrides
    Case("misspelled key", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.decoderr=pup"], "unknown key model.decoderr"),
    Case("string where a number belongs", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "optim.lr=fast"],
         "optim.lr: Input should be a valid number, got 'fast'"),
    Case("unknown decoder", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.decoder=pupp"],
         "model.decoder: Input should be 'naive', 'pup' or 'mla', got 'pupp'"),
    Case("crop not divisible by 16", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "data.crop=500"],
         "data.crop 500 is not divisible by model.patch_size 16"),
    Case("zero classes", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "data.num_classes=0"], "num_classes must be positive"),
    Case("batch not a multiple of the micro-batch", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "train.micro_batch=3"],
         "is not a multiple of micro_batch 3"),
    Case("NaN learning rate", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "optim.lr=.nan"], "optim.lr: Input should be a finite number"),
    Case("infinite learning rate", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "optim.lr=.inf"], "Input should be a finite number"),
    Case("learning rate that overflows float32 with the head's x10", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "optim.lr=1e38"],
         "overflows float32"),
    Case("negative learning rate", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "optim.lr=-0.1"], "lr must be positive"),
    Case("zero std (division by zero)", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "data.std=[0,0,0]"],
         "std [0.0, 0.0, 0.0] must be positive"),
    Case("encoder tap outside the encoder", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.out_indices=[0,1,2,30]"],
         "out_indices [2, 30] outside the encoder's blocks 0..1"),
    Case("4-bit optimizer states", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "optim.bits=4"], "optim.bits: Input should be 32 or 8"),
    Case("parameter offload without ZeRO-3", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "memory.deepspeed.stage=2", "memory.deepspeed.offload_params=true"],
         "offload_params needs ZeRO stage 3"),
    Case("channels-last with DeepSpeed", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "memory.channels_last=true", "memory.deepspeed.stage=2"],
         "channels_last cannot be used with DeepSpeed"),
    Case("bf16 weights without DeepSpeed", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "memory.precision=bf16_weights"],
         "bf16_weights needs DeepSpeed"),
    Case("override without '='", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "optim.lr"], "is not of the form key.sub=value"),
    Case("config file not found", "train", ["--cfg", "nosuch.yaml"], "config file not found: nosuch.yaml"),
    Case("empty config file", "train", ["--cfg", "{tmp}/empty.yaml"], "the file is empty", _write("empty.yaml", "")),
    Case("config file that is not YAML", "train", ["--cfg", "{tmp}/bad.yaml"], "not valid YAML",
         _write("bad.yaml", "model: [1, 2\n")),
    Case("config file that is a list", "train", ["--cfg", "{tmp}/list.yaml"], "expected a mapping of sections",
         _write("list.yaml", "- 1\n- 2\n")),
    # ---- the launcher's own options
    Case("--stop-after 0", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "--stop-after", "0"],
         "argument --stop-after: '0' is not a whole number above 0"),
    Case("--stop-after -3", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "--stop-after", "-3"],
         "'-3' is not a whole number above 0"),
    Case("--cap-gib without a GPU", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "--cap-gib", "24"], "--cap-gib needs a GPU"),
    Case("--resume with a directory that is not a checkpoint", "train",
         ["--cfg", "test_tiny", "--resume", "{tmp}", "train.out_dir={tmp}/run", *TINY],
         "cannot be used: no manifest.json"),
    # ---- the run directory
    Case("train.out_dir is a file", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/file", *TINY],
         "train.out_dir {tmp}/file is a file, not a directory", _write("file", "x")),
    Case("train.out_dir cannot be created", "train", ["--cfg", "test_tiny", "train.out_dir=/proc/setr-run", *TINY],
         "cannot write to train.out_dir /proc/setr-run"),
    Case("a second run into a directory in use", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/busy", *TINY],
         "is in use by another run (pid", _hold_lock),
    Case("a fresh run into a directory with checkpoints", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", *TINY], "already holds the results of an earlier run",
         _copy_trained()),
    Case("resume with a config that changes what is trained", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "--resume", "auto", *TINY, "optim.lr=0.02"],
         "the config differs in what is trained: optim.lr: 0.01 -> 0.02", _copy_trained()),
    # ---- data
    Case("dataset root missing", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "data.dataset=ade20k", "data.root={tmp}/nowhere"],
         "nowhere"),
    Case("images without labels", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "data.dataset=ade20k", "data.root={tmp}/ADEChallengeData2016", "data.num_classes=150",
          *TINY], "ADE_train_00000001", _ade(unmatched=True)),
    Case("validation split missing", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "data.val_split=holdout", *TINY],
         "not 'holdout'"),
    Case("corrupt training image, read by a DataLoader worker", "train",
         ["--cfg", "test_tiny", "data.dataset=ade20k", "data.root={tmp}/ADEChallengeData2016", "data.num_classes=150",
          "data.num_workers=2", "train.out_dir={tmp}/run", *TINY],
         "cannot read image", _ade(corrupt="images/training/ADE_train_00000000.jpg")),
    Case("label value beyond the classes", "train",
         ["--cfg", "test_tiny", "data.dataset=ade20k", "data.root={tmp}/ADEChallengeData2016", "data.num_classes=5",
          "train.out_dir={tmp}/run", *TINY], "outside 0..4", _ade()),
    # ---- weights
    Case("pretrained weights file missing", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.pretrained={tmp}/vit.pth", *TINY],
         "weights file not found"),
    Case("pretrained weights file that is not a checkpoint", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.pretrained={tmp}/vit.pth", *TINY], "cannot read weights file",
         _write("vit.pth", "not a checkpoint")),
    Case("timm weights that cannot be downloaded", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.pretrained=timm:no_such_vit", *TINY], "cannot get timm weights 'no_such_vit'"),
    # ---- evaluate, predict, export
    Case("evaluate: checkpoint not found", "evaluate", ["--cfg", "test_tiny", "--checkpoint", "{tmp}/none.safetensors"],
         "checkpoint not found"),
    Case("evaluate: a config of another shape", "evaluate",
         ["--cfg", "test_tiny", "--checkpoint", "{trained}/model.safetensors", "data.num_classes=5"],
         "does not fit this model: shape mismatch"),
    Case("evaluate: a file that is not a model", "evaluate",
         ["--cfg", "test_tiny", "--checkpoint", "{tmp}/junk.safetensors"], "cannot read",
         _write("junk.safetensors", "junk")),
    Case("evaluate: a checkpoint with a truncated weights file", "evaluate",
         ["--cfg", "test_tiny", "--checkpoint", "{tmp}/run/checkpoints/iter_0000002"],
         "model.safetensors has", _copy_trained(_truncate("model.safetensors"))),
    Case("evaluate: --out is a directory", "evaluate",
         ["--cfg", "test_tiny", "--checkpoint", "{trained}/model.safetensors", "--out", "{tmp}"], "is a directory"),
    Case("predict: input missing", "predict",
         ["--cfg", "test_tiny", "--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/none", "--out",
          "{tmp}/out"], "input not found"),
    Case("predict: no images in the folder", "predict",
         ["--cfg", "test_tiny", "--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}", "--out",
          "{tmp}/out"], "no images"),
    Case("predict: a corrupt image", "predict",
         ["--cfg", "test_tiny", "--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/in", "--out",
          "{tmp}/out"], "cannot read image", _write("in/a.png", "not a png")),
    Case("export: a checkpoint whose config file was deleted", "export",
         ["{tmp}/run/checkpoints/iter_0000002", "{tmp}/m.safetensors"], "config.yaml is missing",
         _copy_trained(lambda run: (_newest(run) / "config.yaml").unlink())),
    Case("export: a checkpoint directory that does not exist", "export", ["{tmp}/none", "{tmp}/m.safetensors"],
         "checkpoint directory not found"),
    # ---- nothing a user runs writes over what it should keep (issue 30)
    Case("export: into the checkpoint it exports", "export",
         ["{tmp}/run/checkpoints/iter_0000002", "{tmp}/run/checkpoints/iter_0000002/model.safetensors"],
         "a checkpoint is never written into", _copy_trained()),
    Case("export: over an existing file", "export",
         ["{tmp}/run/checkpoints/iter_0000002", "{tmp}/run/model.safetensors"],
         "already exists: not written over (pass --overwrite", _copy_trained()),
    Case("export: into a symlink loop", "export", ["{trained}/checkpoints/iter_0000002", "{tmp}/a"],
         "cannot write {tmp}/a", _loop),
    Case("export: into /proc", "export", ["{trained}/checkpoints/iter_0000002", "/proc/setr/m.safetensors"],
         "cannot write to the directory of the output /proc/setr"),
    Case("export: --hub into a checkpoint", "export",
         ["{tmp}/run/checkpoints/iter_0000002", "{tmp}/run/checkpoints/iter_0000002", "--hub"],
         "a checkpoint is never written into", _copy_trained()),
    Case("predict: --out is the input folder", "predict",
         ["--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/in", "--out", "{tmp}/in"],
         "holds input images", _images("a.png")),
    Case("predict: a file that is not an image", "predict",
         ["--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/notes.txt", "--out", "{tmp}/out"],
         "is not an image file", _write("notes.txt", "x")),
    Case("predict: a glob that matches no image", "predict",
         ["--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/*.jpg", "--out", "{tmp}/out"],
         "no images (.bmp, .jpeg, .jpg, .png, .webp) match"),
    Case("a fresh run into a directory with an exported model", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", *TINY],
         "already holds the results of an earlier run (model.safetensors", _copy_trained(_without_checkpoints)),
    Case("--resume auto with every checkpoint damaged", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "--resume", "auto", *TINY],
         "is damaged", _copy_trained(_damage_all)),
    Case("--allow-change without --resume", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "--allow-change", "optim.lr"],
         "--allow-change needs --resume"),
    Case("--allow-change of a key that cannot change", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "--resume", "auto", "--allow-change", "model.depth", *TINY],
         "only these keys may change on resume", _copy_trained()),
    Case("evaluate: a checkpoint whose stored config was damaged", "evaluate",
         ["--checkpoint", "{tmp}/run/checkpoints/iter_0000002"], "config.yaml has",
         _copy_trained(lambda run: (_newest(run) / "config.yaml").write_text("model: [\n"))),
    Case("evaluate: --max-images -1", "evaluate", ["--checkpoint", "{trained}/model.safetensors", "--max-images", "-1"],
         "--max-images must be 0 (every image) or a positive number"),
    # ---- config files and values that used to give a traceback or be taken silently
    Case("a config file in Latin-1", "train", ["--cfg", "{tmp}/my.yaml"], "not UTF-8 text",
         _config_bytes("name: caf\xe9\n".encode("latin-1"))),
    Case("a config file in UTF-16", "evaluate", ["--cfg", "{tmp}/my.yaml", "--checkpoint", "{trained}/model.safetensors"],
         "not UTF-8 text", _config_bytes("name: x\n".encode("utf-16"))),
    Case("a config file of random bytes", "predict",
         ["--cfg", "{tmp}/my.yaml", "--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/in", "--out",
          "{tmp}/out"], "not UTF-8 text", lambda tmp: (_config_bytes(bytes(range(256)))(tmp), _images("a.png")(tmp))),
    Case("a config nested 20,000 deep", "train", ["--cfg", "{tmp}/my.yaml"], "nested too deeply",
         _config_bytes(b"[" * 20000 + b"]" * 20000)),
    Case("a key given twice", "train", ["--cfg", "{tmp}/my.yaml"], "key 'lr' is given twice",
         _config_bytes(_tiny_text(**{"lr: 0.01": "lr: 0.01\n  lr: 0.5"}).encode())),
    Case("a !!binary value", "train", ["--cfg", "{tmp}/my.yaml"], "a YAML bytes is not a config value",
         _config_bytes(_tiny_text(**{"pretrained: ''": "pretrained: !!binary aGVsbG8="}).encode())),
    Case("a !!set value", "train", ["--cfg", "{tmp}/my.yaml"], "a YAML set is not a config value",
         _config_bytes(_tiny_text(**{"pretrained: ''": "pretrained: !!set {a, b}"}).encode())),
    Case("a config with only a name", "train", ["--cfg", "{tmp}/my.yaml"], "key(s) missing (model.decoder",
         _write("my.yaml", "name: mine\n")),
    Case("a negative MLP ratio", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.mlp_ratio=-1"], "mlp_ratio must be positive"),
    Case("an ignore index other than 255", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "loss.ignore_index=-1"],
         "ignore_index must be 255"),
    Case("a negative aux weight", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "loss.aux_weight=-1"], "a negative weight rewards"),
    Case("min_lr above lr", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "schedule.min_lr=1.0"], "would raise the learning rate"),
    Case("a test scale below one patch", "evaluate",
         ["--checkpoint", "{trained}/model.safetensors", "eval.scales=[0.001]"], "below one patch"),
    Case("a run name that leaves the runs folder", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "name=../../../x"],
         "must be a plain name"),
    Case("an unknown key is named with the file", "predict",
         ["--cfg", "test_tiny", "--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/in", "--out",
          "{tmp}/out", "eval.scale=[1.0]"], "unknown key eval.scale", _images("a.png")),
    # ---- weights and data that used to be taken silently
    Case("pretrained .npz that is not a zip", "train", ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.pretrained={tmp}/vit.npz", *TINY],
         "vit.npz", _write("vit.npz", "not a zip")),
    Case("a model of this toolkit given as an mmseg checkpoint", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "model.mmseg_checkpoint={trained}/model.safetensors", *TINY],
         "is a model of this toolkit, not an mmsegmentation checkpoint"),
    # ---- found by the second adversarial sweep
    Case("evaluate: --out over an exported model", "evaluate",
         ["--checkpoint", "{tmp}/run/model.safetensors", "--out", "{tmp}/run/model.safetensors"],
         "is not an earlier evaluation's JSON: not written over", _copy_trained()),
    Case("evaluate: --out a symlink loop", "evaluate", ["--checkpoint", "{trained}/model.safetensors", "--out", "{tmp}/a"],
         "cannot write {tmp}/a", _loop),
    Case("predict: --out a symlink loop", "predict",
         ["--checkpoint", "{trained}/model.safetensors", "--input", "{tmp}/in", "--out", "{tmp}/a"],
         "cannot use {tmp}/a", lambda tmp: (_loop(tmp), _images("x.png")(tmp))),
    Case("a manifest whose files are not a mapping", "evaluate", ["--checkpoint", "{tmp}/run/checkpoints/iter_0000002"],
         "its manifest.json is unreadable",
         _copy_trained(lambda run: (_newest(run) / "manifest.json").write_text('{"files": 5}'))),
    Case("a manifest that lists no files", "evaluate", ["--checkpoint", "{tmp}/run/checkpoints/iter_0000002"],
         "its manifest.json lists no files",
         _copy_trained(lambda run: (_newest(run) / "manifest.json").write_text('{"files": {}}'))),
    Case("one column for images and labels", "train",
         ["--cfg", "test_tiny", "data.dataset=hf", "data.root={tmp}", "data.image_column=seg", "data.label_column=seg"],
         "image_column and label_column are both 'seg'"),
    Case("a momentum of 2", "train", ["--cfg", "test_tiny", "optim.momentum=2"], "must be in [0, 1)"),
    Case("a sliding stride larger than its window", "evaluate",
         ["--checkpoint", "{trained}/model.safetensors", "eval.stride=100"], "stride 100 is larger than crop 64"),
    Case("an option value of the wrong type", "train", ["--cfg", "test_tiny", "--stop-after", "abc"],
         "argument --stop-after: 'abc' is not a whole number above 0"),
    Case("an unknown option", "evaluate", ["--checkpoint", "{trained}/model.safetensors", "--foo"],
         "unrecognized arguments: --foo"),
    Case("benchmark: --out that cannot be written", "benchmark", ["--out", "/proc/setr", "--rows", "naive"],
         "cannot write to --out /proc/setr"),
    Case("benchmark: --cap-gib without a GPU", "benchmark", ["--cap-gib", "24", "--rows", "naive"],
         "--cap-gib needs a GPU"),
    Case("benchmark: an unknown row", "benchmark", ["--rows", "naive", "bf16", "full"], "unknown row 'full'"),
    Case("every label ignored", "train",
         ["--cfg", "test_tiny", "train.out_dir={tmp}/run", "data.dataset=ade20k", "data.root={tmp}/ADEChallengeData2016", "data.num_classes=150",
          *TINY], "every pixel of 3 label maps spread over the split is ignored", _ade(label_value=0, every=True)),
]


def prepare_trained(where: Path) -> Path:
    """A finished 2-iteration tiny run (its checkpoints and `model.safetensors`), for the cases that need one."""
    global TRAINED
    run = where / "trained"
    if not (run / "model.safetensors").is_file():
        code, _, err = run_launcher("train", ["--cfg", "test_tiny", f"train.out_dir={run}", *TINY])
        assert code == 0, err
    TRAINED = run
    return run


SCRIPTS = {"benchmark": ROOT / "benchmarks" / "memory.py"}  # launchers that live outside launch/


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", SCRIPTS.get(name, ROOT / "launch" / f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_launcher(name: str, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python launch/<name>.py <args>`, run in this process."""
    from setr_lowmem.cli import run_main
    from setr_lowmem.engine.step import reset_accelerate

    module = _load(name)
    reset_accelerate()
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, [f"launch/{name}.py", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(module.main)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        reset_accelerate()
    return code, out.getvalue(), err.getvalue()


def run_case(case: Case, tmp: Path) -> tuple[int, str]:
    """(exit code, the error line) of `case`, run in a fresh directory `tmp`."""
    if case.setup:
        case.setup(tmp)
    fresh = not (tmp / "run").exists()
    args = [a.replace("{tmp}", str(tmp)).replace("{trained}", str(TRAINED)) for a in case.args]
    old = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)
    try:
        code, _, err = run_launcher(case.launcher, args)
    finally:
        while HELD:
            HELD.pop().release()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    if fresh:  # a run that fails its start-up checks leaves no run directory behind
        assert not (tmp / "run").exists(), sorted(p.name for p in (tmp / "run").iterdir())
    return code, errors[0].replace(str(tmp), "{tmp}").replace(str(TRAINED), "{trained}")


def markdown(rows: list[tuple[Case, str]]) -> str:
    lines = ["| bad input | command | what the user reads |", "|---|---|---|"]
    for case, line in rows:
        shown = [a for a in case.args if a not in TINY] + (["..."] if set(TINY) & set(case.args) else [])
        cmd = f"`{case.launcher} " + " ".join(shown) + "`"
        line = line.replace(f"{ROOT}/", "")
        lines.append(f"| {case.what} | {cmd} | `{line.replace('|', '/')}` |")
    return "\n".join(lines)


DOC = ROOT / "docs" / "failures.md"
BEGIN, END = "<!-- bad-inputs: generated by tests/bad_inputs.py -->", "<!-- /bad-inputs -->"


def write_table(table: str) -> None:
    """Put `table` between the markers of docs/failures.md."""
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    base = Path(tempfile.mkdtemp())
    prepare_trained(base)
    rows = []
    for i, case in enumerate(CASES):
        tmp = base / f"case{i}"
        tmp.mkdir()
        rows.append((case, run_case(case, tmp)[1]))
    if "--write" in sys.argv:
        write_table(markdown(rows))
        print(f"wrote {len(rows)} rows into {DOC}")
    else:
        print(markdown(rows))
