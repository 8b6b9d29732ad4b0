"""Checkpoints: atomic save, keep-last-K, resume, and a consolidated fp32 export.

A checkpoint is a directory `<run>/checkpoints/iter_0001000/` written by
`accelerator.save_state` (model, optimizer including 8-bit states or DeepSpeed's ZeRO
partitions, the lr schedule, the train state with the data position, and every RNG),
plus `config.yaml` and `meta.json`. It is first written under `.tmp-iter_...` and renamed
into place only when complete, so a crash or a kill during a save never damages the last
good checkpoint; `--resume auto` only ever sees complete ones.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from setr_lowmem.config import Config, config_to_dict, diff_configs, may_change_on_resume, save_config
from setr_lowmem.errors import SetrError
from setr_lowmem.memory.checkpointing import WRAPPER

log = logging.getLogger(__name__)

NAME = re.compile(r"^iter_(\d+)$")


class CheckpointError(SetrError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, or from an incompatible config)."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def save_checkpoint(accelerator, run_dir: Path, iteration: int, cfg: Config, meta: dict, keep_last: int) -> Path:
    """Write the checkpoint of `iteration` atomically (all processes call this)."""
    root = checkpoint_dir(run_dir)
    final = root / f"iter_{iteration:07d}"
    tmp = root / f".tmp-{final.name}"
    start = time.time()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, tmp / "config.yaml")
        (tmp / "meta.json").write_text(json.dumps({"iteration": iteration, "time": time.time(), **meta}, indent=1))
        if final.exists():  # the same iteration saved again (a resumed run stopped at once)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s in %.1f s", final, time.time() - start)
    accelerator.wait_for_everyone()
    return final


def clean_partial(run_dir: Path) -> None:
    """Remove half-written checkpoints left by a crash (main process, before training)."""
    root = checkpoint_dir(run_dir)
    for tmp in root.glob(".tmp-*") if root.is_dir() else []:
        log.warning("removing incomplete checkpoint %s (interrupted save)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """'auto' -> newest complete checkpoint of the run (or None); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"not a complete checkpoint directory: {path} (no meta.json)")
    return path


def check_compatible(path: Path, cfg: Config) -> None:
    """A resume whose config differs from the checkpoint's in what is trained is an error that lists
    the differences; the keys whose fields say `may_change_on_resume` may differ."""
    import yaml

    saved = yaml.safe_load((path / "config.yaml").read_text())
    diffs = [d for d in diff_configs(saved, config_to_dict(cfg)) if not may_change_on_resume(d.split(":", 1)[0])]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: the config differs in what is trained: " + "; ".join(diffs))


def strip_prefixes(sd: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k.replace(WRAPPER, "").removeprefix(prefix): v for k, v in sd.items()}


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from a checkpoint directory, including ZeRO ones."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        sd = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    elif (path / "pytorch_model").is_dir():  # DeepSpeed: accelerate saves the engine under this tag
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
    else:
        raise CheckpointError(f"no model weights in {path} (expected model.safetensors or a DeepSpeed checkpoint)")
    return {k: v.float() if v.is_floating_point() else v for k, v in strip_prefixes(sd).items()}


def export_fp32(path: Path, out: Path) -> Path:
    """Write the consolidated fp32 model of checkpoint `path` as one safetensors file."""
    sd = {k: v.contiguous() for k, v in consolidated_state_dict(path).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"source": str(path), "format": "setr_lowmem"})
    tmp.rename(out)
    return out


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load an exported .safetensors file or a checkpoint directory into `model` (strict)."""
    path = Path(path)
    if path.is_dir():
        sd = consolidated_state_dict(path)
    elif path.is_file():
        sd = strip_prefixes(load_file(str(path)))
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not match the model: {len(missing)} missing "
                              f"(e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected "
                              f"(e.g. {result.unexpected_keys[:2]}); check --cfg")
