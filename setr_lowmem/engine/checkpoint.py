"""Checkpoints: atomic save, keep-last-K, resume, and a consolidated fp32 export.

A checkpoint is a directory `<run>/checkpoints/iter_0001000/` written by
`accelerator.save_state` (model, optimizer including 8-bit states or DeepSpeed's ZeRO
partitions, the lr schedule, the train state with the data position, and every RNG),
plus `config.yaml`, `meta.json` and, last, `manifest.json` (every file's size and SHA-256).
It is first written under `.tmp-iter_...` and renamed into place only when complete, so a
crash or a kill during a save never damages the last good checkpoint. Before a checkpoint is
used (resume, evaluation, export) its files are checked against the manifest: `--resume auto`
takes the newest intact one and says which it skipped and why. A checkpoint is never written
with non-finite weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from setr_lowmem.config import Config, config_from_dict, config_from_text, config_to_dict, diff_configs, save_config
from setr_lowmem.errors import SetrError
from setr_lowmem.memory.checkpointing import WRAPPER
from setr_lowmem.memory.registry import resumable_keys
from setr_lowmem.model.encoder import shape_mismatch

log = logging.getLogger(__name__)

NAME = re.compile(r"^iter_(\d+)$")


class CheckpointError(SetrError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, or from an incompatible config)."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


MANIFEST = "manifest.json"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first; not yet checked for damage."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(path: Path) -> None:
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(path: Path, quick: bool = False) -> str:
    """'' if checkpoint `path` is complete and intact, else what is wrong with it (one phrase).
    `quick`: compare the files' sizes with the manifest, not their checksums (for checkpoints
    already verified once in full, when they were written or resumed from)."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        entries = [(str(rel), int(info["size"]), str(info["sha256"])) for rel, info in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST} (not a checkpoint of this toolkit, or its save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    if not entries:
        return f"its {MANIFEST} lists no files"
    for rel, size, sha256 in entries:
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, not {size}"
        if not quick and _sha256(f) != sha256:
            return f"{rel} is corrupt (its checksum differs from the manifest's)"
    return ""


def iteration_of(path: Path) -> int:
    """The iteration of checkpoint directory `path`: from its name (`iter_0001000` -> 1000), or, for a
    checkpoint copied under another name, from the `meta.json` its save wrote."""
    path = Path(path)
    named = NAME.match(path.name)
    if named:
        return int(named.group(1))
    try:
        return int(json.loads((path / "meta.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path}: its iteration is neither in its name (iter_NNNNNNN) nor in a "
                              "readable meta.json") from None


def intact(path: Path, quick: bool = False) -> Path:
    """`path` if it is an intact checkpoint, else a one-line CheckpointError saying what is wrong
    (`quick`: by the files' sizes only, see `damage`)."""
    problem = damage(path, quick)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    return Path(path)


# A weight larger than this cannot take part in a float32 product with activations of order one without
# overflowing two layers on (its square overflows float32): the training has diverged, whatever isfinite says.
DIVERGED = math.sqrt(torch.finfo(torch.float32).max)


def weights_problem(module: torch.nn.Module) -> str:
    """'' if every parameter (under ZeRO-3, this process's partition of it) and every floating buffer
    (BatchNorm's running statistics) is finite and below `DIVERGED` in magnitude, else what is wrong."""
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    largest = max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)
    if not math.isfinite(largest):
        return "are not finite"
    if largest > DIVERGED:
        return f"have diverged (the largest is {largest:.2g} in magnitude)"
    return ""


def save_checkpoint(accelerator, run_dir: Path, iteration: int, cfg: Config, meta: dict, keep_last: int,
                    protect: tuple[Path, ...] = ()) -> Path:
    """Write the checkpoint of `iteration` atomically (all processes call this), with its manifest, then
    prune (`prune`; `protect`: checkpoints never deleted, e.g. the one resumed from). A write that fails
    on any process (a full or read-only disk, whatever the writer raises) removes the partial files and
    leaves every earlier checkpoint as it was; every process then raises the same one-line error."""
    root = checkpoint_dir(run_dir)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f".tmp-{final.name}"
    start = time.time()
    main = accelerator.is_main_process

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def finish() -> None:
        save_config(cfg, tmp / "config.yaml")
        for f in tmp.rglob("*.safetensors"):
            usual_permissions(f)
        (tmp / "meta.json").write_text(json.dumps({"iteration": iteration, "time": time.time(), **meta}, indent=1))
        write_manifest(tmp)  # read from the files as written: what pruning and every reader check
        if final.exists():  # a resume sets newer checkpoints aside and saves only later iterations
            raise OSError(f"{final.name} exists already")
        tmp.rename(final)

    # three phases, each ending in the same collective on every process, whichever of them failed
    failure = on_every_process(accelerator, prepare if main else None)
    if not failure:
        failure = on_every_process(accelerator, lambda: accelerator.save_state(str(tmp)))
    if not failure:
        failure = on_every_process(accelerator, finish if main else None)
    if failure:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        raise CheckpointError(f"cannot write checkpoint {final}: {failure}; "
                              + (f"the newest complete one is {previous[-1].name}" if previous
                                 else "no checkpoint was written yet"))
    if main:
        removed = prune(run_dir, keep_last, protect=(final, *protect))
        log.info("saved checkpoint %s in %.1f s%s", final, time.time() - start,
                 f"; removed {', '.join(p.name for p in removed)} (train.keep_last={keep_last})" if removed else "")
    accelerator.wait_for_everyone()
    return final


def on_every_process(accelerator, work) -> str:
    """Run `work` (None: nothing, on this process), then agree with every process on whether all of
    them succeeded: '' when they did, else why this one failed ('on another process' when it did not)."""
    reason = ""
    if work is not None:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - OSError, safetensors' and torch's writer errors alike
            reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    failed = torch.tensor([float(bool(reason))], device=accelerator.device)
    if accelerator.num_processes > 1 and accelerator.reduce(failed, reduction="sum").item() > 0:
        return reason or "it failed on another process"
    return reason


def prune(run_dir: Path, keep_last: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete the checkpoints older than the newest `keep_last` intact ones. A damaged checkpoint never
    counts as one of those (it is deleted only when older than them); the checkpoints in `protect`
    are never deleted. Intact here means complete by the manifest's sizes: each was verified in
    full when it was written. Returns what was deleted."""
    found = list_checkpoints(run_dir)
    intact_ones = [p for p in found if not damage(p, quick=True)]
    kept = intact_ones[-keep_last:]
    if not kept:
        return []
    oldest_kept = iteration_of(kept[0])
    keep = {p.resolve() for p in (*kept, *protect)}
    removed = [p for p in found if iteration_of(p) < oldest_kept and p.resolve() not in keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


SET_ASIDE = "set_aside"


def set_aside_newer(run_dir: Path, start: Path) -> Path | None:
    """Move the checkpoints of `run_dir` newer than `start` (the one a run resumes from) to
    `checkpoints/set_aside/<time>-resumed-from-<start>/`: the resumed run will write checkpoints of
    the same iterations, and must neither overwrite nor prune another history. Nothing is deleted;
    returns where they went (None when there were none)."""
    newer = [p for p in list_checkpoints(run_dir) if iteration_of(p) > iteration_of(start)]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    where = checkpoint_dir(run_dir) / SET_ASIDE / f"{stamp}-resumed-from-{Path(start).name}"
    where.mkdir(parents=True, exist_ok=True)
    for p in newer:
        p.rename(where / p.name)
    log.warning("resuming from %s: set aside the %d newer checkpoint(s) (%s) in %s; they are kept, never pruned "
                "or resumed by --resume auto: delete them yourself when no longer needed", start, len(newer),
                ", ".join(p.name for p in newer), where)
    return where


def clean_partial(run_dir: Path) -> None:
    """Remove half-written checkpoints left by a crash (main process, before training)."""
    root = checkpoint_dir(run_dir)
    for tmp in root.glob(".tmp-*") if root.is_dir() else []:
        log.warning("removing incomplete checkpoint %s (interrupted save)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """'auto' -> the newest intact checkpoint of the run (damaged ones are skipped, saying why), or
    None when the run has none at all; a path -> that checkpoint, which must be intact. A run whose
    every checkpoint is damaged is an error: starting over is the user's decision, not a default."""
    if not resume:
        return None
    if resume != "auto":
        return intact(Path(resume))
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = damage(path)
        if not problem:
            return path
        log.warning("--resume auto: skipping checkpoint %s: %s", path, problem)
        skipped.append(f"{path.name}: {problem}")
    if skipped:
        raise CheckpointError(f"--resume auto: every checkpoint in {checkpoint_dir(run_dir)} is damaged "
                              f"({'; '.join(skipped)}); nothing was changed. To start again from iteration 0, "
                              "set train.out_dir to a new directory")
    log.warning("--resume auto: no checkpoint in %s yet: starting from iteration 0", checkpoint_dir(run_dir))
    return None


# What a user may change deliberately when resuming (`--allow-change KEY`): values the optimizer and
# the schedule read at every step, re-applied after the checkpoint's state is loaded
# (`schedule.reapply_hyperparameters`). Everything else that is trained (the model, the data, the
# precision, the optimizer's kind and state width) would not load, or would silently not take effect.
CHANGEABLE = ("optim.lr", "optim.head_lr_mult", "optim.momentum", "optim.weight_decay", "optim.betas",
              "schedule.iters", "schedule.min_lr", "schedule.power", "loss.main_weight", "loss.aux_weight")


# What may differ on resume without a word: names, paths, logging and checkpoint cadence, data
# loading, the micro-batch (accumulation keeps the effective batch) and the whole evaluation
# protocol (a section: all its keys); besides these, the memory techniques' keys that change
# throughput only (`memory.registry.resumable_keys`: checkpointing, the attention kernel).
RESUMABLE = ("name", "data.root", "data.num_workers", "train.micro_batch", "train.out_dir", "train.log_every",
             "train.log_with", "train.val_every", "train.ckpt_every", "train.keep_last", "train.save_best",
             "train.max_bad_steps", "train.val_max_images", "eval")


def may_change_on_resume(key: str) -> bool:
    """Whether a run may resume with another value of `key` (or of the section it is in)."""
    parts = key.split(".")
    keys = set(RESUMABLE) | resumable_keys()
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


def check_compatible(path: Path, cfg: Config, allow: tuple[str, ...] = ()) -> list[str]:
    """A resume whose config differs from the checkpoint's in what is trained is an error that lists
    the differences; the keys `may_change_on_resume` accepts may differ, and the keys of
    `allow` (from `CHANGEABLE`) are deliberate changes, returned as 'key: old -> new' lines."""
    bad = [k for k in allow if k not in CHANGEABLE]
    if bad:
        raise CheckpointError(f"--allow-change {bad[0]}: only these keys may change on resume: {', '.join(CHANGEABLE)}")
    saved = yaml.safe_load((path / "config.yaml").read_text())
    diffs = [d for d in diff_configs(saved, config_to_dict(cfg)) if not may_change_on_resume(d.split(":", 1)[0])]
    refused = [d for d in diffs if d.split(":", 1)[0] not in allow]
    if refused:
        hint = [d.split(":", 1)[0] for d in refused if d.split(":", 1)[0] in CHANGEABLE]
        raise CheckpointError(f"cannot resume from {path}: the config differs in what is trained: " + "; ".join(refused)
                              + (f" (to change it deliberately: --allow-change {' '.join(hint)})" if hint else ""))
    return diffs


def strip_prefixes(sd: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k.replace(WRAPPER, "").removeprefix(prefix): v for k, v in sd.items()}


def consolidated_state_dict(path: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from an intact checkpoint directory, including ZeRO ones (`verify`:
    check every file's checksum first; False for a checkpoint this process has just written, whose
    manifest was made from its files moments ago: the sizes are still checked)."""
    path = intact(path, quick=not verify)
    try:
        if (path / "model.safetensors").is_file():
            sd = load_file(str(path / "model.safetensors"))
        elif (path / "pytorch_model.bin").is_file():
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        elif (path / "pytorch_model").is_dir():  # DeepSpeed: accelerate saves the engine under this tag
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # its progress prints (shards, stages, element counts) would end up between our own lines
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
            log.info("consolidated the ZeRO partitions of %s (%d tensors)", path, len(sd))
        else:
            raise CheckpointError(f"no model weights in {path} (expected model.safetensors or a DeepSpeed checkpoint)")
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is one line naming the checkpoint
        raise CheckpointError(f"cannot read the weights of {path}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in strip_prefixes(sd).items()}


def _non_finite(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def export_fp32(path: Path, out: Path, overwrite: bool = False, metadata: dict[str, str] | None = None,
                verify: bool = True) -> Path:
    """Write the consolidated fp32 model of checkpoint `path` as one safetensors file (never one with
    non-finite weights, never into a checkpoint, never over an existing file unless `overwrite`);
    `metadata` is added to the file's own (its source and config); `verify`: see `consolidated_state_dict`."""
    out = writable_target(Path(out), overwrite)
    sd = {k: v.contiguous() for k, v in consolidated_state_dict(path, verify).items()}
    bad = _non_finite(sd)
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]} and {len(bad) - 1} more): not exported")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    metadata = {"source": str(path), "format": "setr_lowmem", **(metadata or {})}
    if (path / "config.yaml").is_file():  # the file rebuilds its model without a --cfg
        metadata["config"] = (path / "config.yaml").read_text()
    try:
        save_file(sd, str(tmp), metadata=metadata)
        usual_permissions(tmp)
        tmp.replace(out)
    except Exception as err:  # noqa: BLE001 - a full disk or a foreign writer error: nothing half-written stays
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {out}: {getattr(err, 'strerror', None) or err}") from None
    return out


def usual_permissions(path: Path) -> None:
    """Give a file the permissions the user's other files get (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def writable_target(out: Path, overwrite: bool = False) -> Path:
    """`out` if a trained model may be written there: not inside a checkpoint (which its manifest
    would then no longer match), not over an existing file unless `overwrite`, not a directory."""
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise CheckpointError(f"cannot write {out}: {getattr(err, 'strerror', None) or err}") from None
    inside = next((d for d in resolved.parents if (d / MANIFEST).is_file()), None)
    if inside is not None:
        raise CheckpointError(f"{out} is inside checkpoint {inside}: a checkpoint is never written into "
                              "(its manifest would no longer match); write the export elsewhere")
    if resolved.is_dir():
        raise CheckpointError(f"{out} is a directory; give the .safetensors file to write")
    if resolved.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists: not written over (pass --overwrite to replace it)")
    return out


def is_hub_dir(path: Path) -> bool:
    """Whether `path` is a Hugging Face Hub directory written by `PretrainedSETR.save_pretrained`
    (model.safetensors and config.json, no manifest: not a checkpoint)."""
    path = Path(path)
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and not (path / MANIFEST).exists()


def stored_config(path: str | Path) -> Config | None:
    """The config a trained model was made with: an intact checkpoint directory's `config.yaml`, or the
    `config` metadata of an exported file. None where there is none (an imported or older file)."""
    path = Path(path)
    if is_hub_dir(path):
        try:
            return config_from_dict(json.loads((path / "config.json").read_text()), f"{path}/config.json")
        except ValueError as err:
            raise CheckpointError(f"cannot read {path}/config.json: {err}") from None
    if path.is_dir():
        intact(path, quick=True)  # a damaged checkpoint is refused before its config is read (the
        # checksums are compared when its weights are read)
        text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None
    else:
        try:
            with safe_open(str(path), "pt") as f:
                text = (f.metadata() or {}).get("config")
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file is one line
            raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    return None if text is None else config_from_text(text, f"the config stored in {path}")


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load an exported .safetensors file or a checkpoint directory into `model` (strict, shapes checked)."""
    path = Path(path)
    if is_hub_dir(path):
        sd = strip_prefixes(load_file(str(path / "model.safetensors")), prefix="setr.")
    elif path.is_dir():
        sd = consolidated_state_dict(path)
    elif path.is_file():
        try:
            sd = strip_prefixes(load_file(str(path)))
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file is one line
            raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    mismatch = shape_mismatch(sd, model.state_dict())
    if mismatch:
        raise CheckpointError(f"{path} does not fit this model: {mismatch} (check --cfg: model.decoder, "
                              "data.num_classes, data.crop)")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not match the model: {len(missing)} missing "
                              f"(e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected "
                              f"(e.g. {result.unexpected_keys[:2]}); check --cfg")
