"""One strict, typed configuration tree for a SETR training run.

Every run is described by a `Config`: nested dataclasses, each field with a one-line
docstring. `load_config(path, overrides)` reads a flat YAML file and validates it
strictly (pydantic in JSON-strict mode): an unknown key, a value of the wrong type or an
impossible value is a `ConfigError` whose one-line message names the key and the file.
Command-line overrides (`optim.lr=0.01`) are parsed as YAML scalars and validated the
same way; code changes a config with `replace_keys`, typed.

This module is the schema. What each memory technique's keys mean to the rest of the toolkit
(how training applies them, how the forecast and the planner treat them, their benchmark rows,
whether they may change on resume) is declared with the technique (`memory.registry`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from setr_lowmem.errors import SetrError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the wheel; configs/ at the top links here
# the paper's nine: every decoder on every dataset
PAPER_CONFIGS = [f"{d}_{s}" for s in ("ade20k", "cityscapes", "pascal_context") for d in ("naive", "pup", "mla")]

# allow_inf_nan=False: every float of a config is finite (a NaN learning rate trains NaN weights)
_STRICT = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, allow_inf_nan=False)

FLOAT32_MAX = 3.4028234663852886e38
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")

Decoder = Literal["naive", "pup", "mla"]
DatasetName = Literal["synthetic", "ade20k", "cityscapes", "pascal_context", "pascal_context59", "hf"]


class ConfigError(SetrError, ValueError):
    """A configuration problem, reported in one line that names the key and the file."""


@dataclass(config=_STRICT)
class ModelConfig:
    decoder: Decoder = "pup"
    """SETR decoder: naive, pup or mla."""
    embed_dim: int = 1024
    """Width of the ViT encoder (1024 for ViT-L)."""
    depth: int = 24
    """Number of transformer blocks (24 for ViT-L)."""
    num_heads: int = 16
    """Attention heads per block."""
    patch_size: int = 16
    """Patch size of the encoder; the crop must be divisible by it."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP relative to embed_dim."""
    out_indices: list[int] = field(default_factory=lambda: [9, 14, 19, 23])
    """Encoder blocks (0-based) tapped: Naive/PUP main head on the last, aux heads on the others; MLA uses all."""
    head_channels: int = 256
    """Channels of the decoder convolutions (256 in SETR)."""
    mla_channels: int = 128
    """Channels of each MLA head branch (128 in SETR)."""
    aux_heads: bool = True
    """Build the auxiliary heads (training graph); false gives the inference graph."""
    naive_aux_convs: int = 2
    """1x1 conv stages per Naive aux head (2 for ADE20K and Pascal Context, 1 for Cityscapes)."""
    dropout: float = 0.0
    """Dropout before each classifier (0 in every SETR config)."""
    pretrained: str = ""
    """ViT-L/16 weights: a local .pth/.npz/.safetensors file, 'timm:<model name>' (online), or '' for random init."""
    mmseg_checkpoint: str = ""
    """A SETR checkpoint trained with mmsegmentation to import (whole model); '' for none."""

    def __post_init__(self) -> None:
        _positive(self, "embed_dim", "depth", "num_heads", "patch_size", "head_channels", "mla_channels",
                  "mlp_ratio")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if len(self.out_indices) != 4:
            raise ValueError(f"out_indices needs 4 encoder layers, got {self.out_indices}")
        bad = [i for i in self.out_indices if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"out_indices {bad} outside the encoder's blocks 0..{self.depth - 1}")
        if self.naive_aux_convs not in (1, 2):
            raise ValueError(f"naive_aux_convs must be 1 or 2, got {self.naive_aux_convs}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(config=_STRICT)
class SyntheticConfig:
    num_train: int = 320
    """Training scenes generated."""
    num_val: int = 48
    """Validation scenes generated."""
    size: int = 128
    """Side of each generated scene in pixels."""
    seed: int = 0
    """Seed that fixes every scene."""


@dataclass(config=_STRICT)
class DataConfig:
    dataset: DatasetName = "synthetic"
    """synthetic (built in), ade20k, cityscapes, pascal_context(59) in their official layouts, or hf."""
    root: str = ""
    """Dataset root (official layouts) or, for hf, a saved dataset dir, data dir, or hub name."""
    num_classes: int = 150
    """Number of classes (labels 0..num_classes-1; 255 is ignored)."""
    crop: int = 512
    """Training crop side in pixels (divisible by the patch size)."""
    base_scale: tuple[int, int] = (2048, 512)
    """Resize target (long side, short side) kept in ratio, for training and test."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    """Random ratio applied to base_scale during training."""
    cat_max_ratio: float = 0.75
    """Random crop is retried (up to 10 times) while one class covers more than this."""
    flip_prob: float = 0.5
    """Horizontal flip probability."""
    photometric: bool = True
    """mmseg's photometric distortion (brightness, contrast, saturation, hue)."""
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    """Per-channel mean on 0..255 RGB."""
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    """Per-channel std on 0..255 RGB."""
    train_split: str = "train"
    """Split used for training (train/val map to each layout's own names)."""
    val_split: str = "val"
    """Split used for validation and evaluation."""
    image_column: str = "image"
    """hf datasets: the image column."""
    label_column: str = "label"
    """hf datasets: the label-map column."""
    reduce_zero_label: bool = False
    """hf datasets: map stored label 0 to 255 (ignored) and k to k-1; the official layouts set this themselves."""
    num_workers: int = 2
    """DataLoader worker processes."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The built-in procedurally generated dataset."""

    def __post_init__(self) -> None:
        _positive(self, "num_classes", "crop")
        if self.num_classes > 255:
            raise ValueError(f"num_classes {self.num_classes} must be below 255 (the ignore index)")
        if min(self.base_scale) <= 0:
            raise ValueError(f"base_scale {self.base_scale} must be positive")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range {self.ratio_range} must satisfy 0 < low <= high")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if min(self.std) <= 0:
            raise ValueError(f"std {list(self.std)} must be positive in every channel (images are divided by it)")
        if self.image_column == self.label_column:
            raise ValueError(f"image_column and label_column are both {self.image_column!r}")
        if self.dataset not in ("synthetic",) and not self.root:
            raise ValueError(f"root is required for dataset {self.dataset!r}")


@dataclass(config=_STRICT)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer: the paper's SGD, or AdamW."""
    lr: float = 0.001
    """Base learning rate (encoder); heads get lr * head_lr_mult."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay (0 in the paper)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    head_lr_mult: float = 10.0
    """lr multiplier for decode and aux head parameters (mmseg's custom_keys 'head')."""
    bits: Literal[32, 8] = 32
    """Optimizer state precision: 32 (torch) or 8 (bitsandbytes)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr * max(self.head_lr_mult, 1.0) > FLOAT32_MAX:
            raise ValueError(f"lr {self.lr} x head_lr_mult {self.head_lr_mult} overflows float32")
        if self.weight_decay < 0 or self.head_lr_mult <= 0:
            raise ValueError("weight_decay must be >= 0 and head_lr_mult > 0")
        if not 0 <= self.momentum < 1 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"momentum {self.momentum} and betas {list(self.betas)} must be in [0, 1): a momentum "
                             "of 1 or more makes every past gradient count for ever")


@dataclass(config=_STRICT)
class ScheduleConfig:
    iters: int = 160000
    """Training iterations (optimizer steps of the effective batch)."""
    power: float = 0.9
    """Poly decay power."""
    min_lr: float = 1e-4
    """Poly decay floor (mmseg's eta_min), the same for every parameter group."""
    warmup_iters: int = 0
    """Linear warmup iterations (0 in the paper)."""
    warmup_ratio: float = 1e-6
    """lr factor at the first warmup iteration."""

    def __post_init__(self) -> None:
        _positive(self, "iters")
        if self.warmup_iters < 0 or self.warmup_iters >= self.iters:
            raise ValueError(f"warmup_iters must be in [0, iters), got {self.warmup_iters}")
        if self.min_lr < 0 or self.power <= 0:
            raise ValueError("min_lr must be >= 0 and power > 0")


@dataclass(config=_STRICT)
class LossConfig:
    main_weight: float = 1.0
    """Weight of the main head's cross-entropy."""
    aux_weight: float = 0.4
    """Weight of each aux head's cross-entropy."""
    ignore_index: int = 255
    """Label value that carries no loss."""
    avg_non_ignore: bool = False
    """False (mmseg's default, the paper's): average over all pixels; True: over labelled pixels only."""

    def __post_init__(self) -> None:
        if self.ignore_index != 255:
            raise ValueError(f"ignore_index must be 255, the label value the data pipeline gives ignored and padded "
                             f"pixels, got {self.ignore_index}")
        if self.main_weight <= 0 or self.aux_weight < 0:
            raise ValueError(f"main_weight must be positive and aux_weight >= 0, got {self.main_weight} and "
                             f"{self.aux_weight} (a negative weight rewards a wrong prediction)")


@dataclass(config=_STRICT)
class DeepSpeedConfig:
    stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage; 0 means DeepSpeed is not used."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on the CPU."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (stage 3 only)."""


@dataclass(config=_STRICT)
class MemoryConfig:
    checkpointing: Literal["none", "blocks", "selective", "full"] = "none"
    """Activation checkpointing: none; every k-th block; selective (keep matmul/attention outputs); full (blocks + each head with its loss)."""
    every_k: int = 1
    """With 'blocks': checkpoint every k-th encoder block."""
    precision: Literal["fp32", "bf16", "bf16_weights"] = "fp32"
    """fp32; bf16 autocast over fp32 weights; bf16 weights with fp32 master copies (DeepSpeed)."""
    attention: Literal["eager", "sdpa"] = "sdpa"
    """Attention kernel: eager (materialises the attention matrix, as mmseg did) or PyTorch SDPA."""
    classifier_first: bool = True
    """Apply each head's 1x1 classifier before its last bilinear upsample (exact: both are linear)."""
    fused_upsample_loss: bool = True
    """Interpolate logits to the label's size inside the loss (exact; no full-size logits)."""
    fused_upsample_backend: Literal["auto", "triton", "torch"] = "auto"
    """The fused loss's implementation: Triton kernels, PyTorch bands, or auto (Triton on CUDA if installed)."""
    upsample_backward: Literal["stock", "matmul"] = "stock"
    """Backward of the heads' bilinear upsamples: PyTorch's (atomics) or two deterministic matrix products."""
    channels_last: bool = False
    """Decoder convolution weights in channels-last (NHWC) layout, the layout of the encoder's maps. Not
    applied with 8-bit optimizer states (bitsandbytes makes parameters contiguous at its first step)."""
    compile_convs: bool = False
    """torch.compile each decoder conv + BatchNorm + ReLU unit (fuses BatchNorm and ReLU). The ZeRO rows
    of the benchmark leave it off: DeepSpeed's parameter hooks make Dynamo recompile the units."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO through accelerate's plugin."""

    def __post_init__(self) -> None:
        _positive(self, "every_k")
        ds = self.deepspeed
        if ds.offload_params and ds.stage != 3:
            raise ValueError(f"deepspeed.offload_params needs ZeRO stage 3, got stage {ds.stage}")
        if ds.offload_optimizer and ds.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs a ZeRO stage (deepspeed.stage 1, 2 or 3)")
        if self.channels_last and ds.stage > 0:
            raise ValueError("memory.channels_last cannot be used with DeepSpeed (deepspeed.stage > 0): "
                             "DeepSpeed views every weight as contiguous bytes")
        if self.precision == "bf16_weights" and ds.stage == 0:
            raise ValueError("precision bf16_weights needs DeepSpeed (deepspeed.stage 1, 2 or 3)")


@dataclass(config=_STRICT)
class TrainConfig:
    total_batch: int = 16
    """Effective batch per optimizer step (the paper's 16 or 8) = micro_batch x accumulation x processes."""
    micro_batch: int = 16
    """Images per forward/backward on each process."""
    seed: int = 0
    """Seed for initialisation, data order and augmentation."""
    out_dir: str = ""
    """Run directory; '' means runs/<config name>."""
    log_every: int = 50
    """Log loss, lr and memory every N iterations."""
    log_with: Literal["tensorboard", "wandb", "mlflow", "all", "none"] = "tensorboard"
    """Experiment tracker, through accelerate ('all': every one installed). TensorBoard's events go
    into the run directory (`tensorboard --logdir runs`); wandb's project is the run directory's name."""
    val_every: int = 16000
    """Validate every N iterations (0: only at the end)."""
    ckpt_every: int = 16000
    """Save a checkpoint every N iterations (0: only at the end and on a signal)."""
    keep_last: int = 3
    """Intact checkpoints kept (besides the one a session resumed from); older ones are deleted."""
    save_best: Literal["mIoU", "aAcc", "mAcc", "none"] = "mIoU"
    """Keep the model of the best validation by this metric as best_<metric>.safetensors (mmseg's save_best)."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses that stop the run."""
    sync_bn: bool = True
    """Use SyncBatchNorm across processes (statistics over the whole batch, as the paper)."""
    val_max_images: int = 0
    """Cap on validation images during training (0: the whole split)."""

    def __post_init__(self) -> None:
        _positive(self, "total_batch", "micro_batch", "log_every", "keep_last", "max_bad_steps")
        self.accumulation()
        if self.val_every < 0 or self.ckpt_every < 0 or self.val_max_images < 0:
            raise ValueError("val_every, ckpt_every and val_max_images must be >= 0")

    def accumulation(self, processes: int = 1) -> int:
        """Micro-batches per optimizer step on each process: total_batch / (micro_batch x processes)."""
        per_step = self.micro_batch * processes
        if self.total_batch % per_step:
            raise ValueError(f"total_batch {self.total_batch} is not a multiple of micro_batch {self.micro_batch}"
                             + (f" x {processes} processes" if processes > 1 else ""))
        return self.total_batch // per_step


@dataclass(config=_STRICT)
class EvalConfig:
    mode: Literal["whole", "slide"] = "slide"
    """Whole-image or sliding-window inference."""
    crop: int = 512
    """Sliding window side."""
    stride: int = 341
    """Sliding window stride."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """Ratios of base_scale to test at (the paper's multi-scale: 0.5 0.75 1.0 1.25 1.5 1.75)."""
    flip: bool = False
    """Also test the horizontally flipped image and average the probabilities."""
    ratio_of: Literal["base_scale", "image"] = "base_scale"
    """What the test ratios scale: base_scale (the paper's and mmseg 0.x's multi-scale test) or the
    original image (mmseg 1.x's TestTimeAug, which skips the base-scale resize)."""

    def __post_init__(self) -> None:
        _positive(self, "crop", "stride")
        if self.mode == "slide" and self.stride > self.crop:
            raise ValueError(f"stride {self.stride} is larger than crop {self.crop}: the sliding windows would leave "
                             "pixels between them unpredicted")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive ratios, got {self.scales}")


@dataclass(config=_STRICT)
class Config:
    name: str = "run"
    """Name of the run (default run directory runs/<name>)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The SETR model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and training pipeline."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and parameter groups."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Iterations and learning-rate schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights and reduction."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Memory techniques, each applied from outside the model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching, logging and checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Test-time inference protocol."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be a plain name (letters, digits, '.', '_', '-'; not starting "
                             "with '.'): it names the run directory runs/<name>")
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(f"schedule.min_lr {self.schedule.min_lr:g} is above optim.lr {self.optim.lr:g}: the poly "
                             "decay would raise the learning rate")
        smallest = min(self.data.base_scale) * min(self.eval.scales)
        if smallest < self.model.patch_size:
            raise ValueError(f"eval.scales {self.eval.scales} x data.base_scale {list(self.data.base_scale)} gives a "
                             f"test image side of {smallest:g} pixels, below one patch ({self.model.patch_size})")
        if self.data.crop % self.model.patch_size:
            raise ValueError(
                f"data.crop {self.data.crop} is not divisible by model.patch_size {self.model.patch_size}")
        if self.eval.mode == "slide" and self.eval.crop % self.model.patch_size:
            raise ValueError(
                f"eval.crop {self.eval.crop} is not divisible by model.patch_size {self.model.patch_size}")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir or f"runs/{self.name}")


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key given twice in one mapping is an error (PyYAML keeps the
    last one silently), and an unquoted date stays a string (a config holds no dates)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


# the date resolver goes; the rest of YAML 1.1's implicit types stay
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string. Users write learning rates
# that way, so floats in exponent form are resolved as floats too.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str, source: str) -> Any:
    """YAML text as plain values (dicts, lists, strings, numbers, booleans, None); one line if not."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    problem = _not_plain(data)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return data


def _not_plain(value: Any, key: str = "") -> str:
    """'' if `value` holds only what a config can (JSON's types), else what and where it is not."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"key {k!r}{' in ' + key if key else ''} is not a name"
            problem = _not_plain(v, f"{key}.{k}" if key else k)
            if problem:
                return problem
        return ""
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _not_plain(v, f"{key}[{i}]"))), "")
    if value is None or isinstance(value, (str, bool, int, float)):
        return ""
    return f"{key or 'the file'}: a YAML {type(value).__name__} is not a config value"


_ADAPTER = TypeAdapter(Config)


def shipped_configs() -> list[tuple[str, str]]:
    """(name, the first line of its header comment) of every config shipped in `configs/`."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        out.append((path.stem, first.removeprefix("#").strip() if first.startswith("#") else ""))
    return out


def resolve_config_path(path: str | Path) -> Path:
    """`pup_ade20k.yaml` or `pup_ade20k` finds configs/pup_ade20k.yaml; other paths are taken as given."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if p.parent == Path(".") and candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path} (also looked in {CONFIG_DIR})")


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """['optim.lr=0.01', 'memory.checkpointing=full'] -> nested dict with YAML-typed values."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = _yaml(raw, f"override {item!r}") if raw else ""
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain dict strictly; errors name the key and `source`."""
    try:
        return _ADAPTER.validate_json(json.dumps(data), strict=True)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None


def _describe(err: ValidationError, prefix: str = "") -> str:
    """The first error of `err` in one line naming its key (`prefix`: the dotted section it is in)."""
    first = err.errors()[0]
    loc = prefix + ".".join(str(p) for p in first["loc"]) or "(top level)"
    loc = loc.removesuffix(".")
    if first["type"] == "unexpected_keyword_argument":
        section, _, last = loc.rpartition(".")
        siblings = [k.rpartition(".")[2] for k, _ in config_fields() if k.rpartition(".")[0] == section]
        near = difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)
        return f"unknown key {loc}" + (f" (did you mean {section + '.' if section else ''}{near[0]}?)" if near else "")
    if first["type"] == "missing_argument":
        return f"missing required key {loc}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return f"{loc}: {msg}"
    return f"{loc}: {msg}, got {first.get('input')!r}"


def config_from_text(text: str, source: str) -> Config:
    """A config from YAML text (a file's, or one stored in a checkpoint), validated strictly."""
    return _config_from_data(_yaml(text, source), source)


def _config_from_data(data: Any, source: str) -> Config:
    if data is None:
        raise ConfigError(f"{source}: the file is empty (a config lists its sections; see configs/pup_ade20k.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    return config_from_dict(data, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (bare names resolve against configs/) and apply `key=value` overrides. A file
    lists every key (`missing_keys`): what a run uses is read in one place, never a silent default."""
    path = resolve_config_path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): a config is a UTF-8 YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    # Validate the file alone first so that an error in it is blamed on it, not on the overrides.
    data = _yaml(text, str(path))
    cfg = _config_from_data(data, str(path))
    missing = missing_keys(data)
    if missing:
        raise ConfigError(f"{path}: {len(missing)} key(s) missing ({', '.join(missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}): a config lists every key; start from a "
                          "complete one, e.g. `setr-train --cfg pup_ade20k --print-config > my.yaml`")
    extra = parse_overrides(overrides)
    if not extra:
        return cfg
    return config_from_dict(_merge(config_to_dict(cfg), extra), f"{path} with overrides {' '.join(overrides or [])}")


def missing_keys(data: dict[str, Any]) -> list[str]:
    """The dotted keys of the config tree (its leaves, not its sections) that `data`, a config file's
    mapping, does not give."""
    keys = [k for k, _ in config_fields()]
    out = []
    for key in keys:
        if any(other.startswith(key + ".") for other in keys):
            continue  # a section: its keys are checked one by one
        node: Any = data
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            out.append(key)
    return out


_ABSENT = object()


def without_initial_weights(cfg: Config) -> Config:
    """`cfg` with no pretrained or imported weights: for models whose weights come from elsewhere
    (a trained checkpoint, a measurement on random data, a FLOP count on the meta device)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="", mmseg_checkpoint=""))


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with `key.sub=value` overrides applied, validated as strictly as a file: for strings
    that come from a command line. Code that changes a config uses `replace_keys`."""
    return config_from_dict(_merge(config_to_dict(cfg), parse_overrides(overrides)),
                            f"{cfg.name} with overrides {' '.join(overrides)}")


def replace_keys(cfg: Config, changes: dict[str, Any]) -> Config:
    """`cfg` with the values of dotted keys replaced: `replace_keys(cfg, {"memory.checkpointing":
    "full", "train.micro_batch": 4})`. The typed counterpart of a command line's overrides, for
    code inside the package: values keep their Python types (a tuple stays a tuple), nothing is
    written out and parsed again. Each section is rebuilt once with all of its changes
    (`dataclasses.replace`), innermost first, so its checks and those of the sections around it
    see every change together; a value they refuse is a `ConfigError` naming the key."""
    tree: dict[str, Any] = {}
    for key, value in changes.items():
        *sections, last = key.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    if not tree:
        return cfg
    try:
        return _replaced(cfg, tree, "")
    except ConfigError as err:
        given = " ".join(f"{k}={v!r}" for k, v in changes.items())
        raise ConfigError(f"{cfg.name} with {given}: {err}") from None


def _replaced(section: Any, tree: dict[str, Any], prefix: str) -> Any:
    """`section` (a config dataclass at dotted `prefix`) with `tree`'s nested changes applied."""
    names = {f.name for f in dataclasses.fields(section)}
    updates = {}
    for name, value in tree.items():
        if name not in names:
            raise ConfigError(f"unknown key {prefix}{name}")
        inner = getattr(section, name)
        updates[name] = _replaced(inner, value, f"{prefix}{name}.") if dataclasses.is_dataclass(inner) else value
    try:
        return dataclasses.replace(section, **updates)
    except ValidationError as err:
        raise ConfigError(_describe(err, prefix)) from None


def config_fields(section: Any = None, prefix: str = ""):
    """(dotted key, dataclass field) of every field of the config tree, sections before their keys."""
    section = Config() if section is None else section
    for f in dataclasses.fields(section):
        yield prefix + f.name, f
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_fields(value, f"{prefix}{f.name}.")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML and for comparing runs."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_config(cfg: Config, header: str = "") -> str:
    """`cfg` as a complete, flat YAML file: every key, each under a comment with its field's docstring
    (what `configs/*.yaml`, every run's `config.yaml` and `setr-train --print-config` hold)."""
    lines = [f"# {line}" if line else "#" for line in header.strip().splitlines()]
    lines += [""] if lines else []
    _dump_section(cfg, lines, "")
    return "\n".join(lines) + "\n"


def _dump_section(section: Any, lines: list[str], indent: str) -> None:
    docs = type(section).__pydantic_fields__
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        lines.append(f"{indent}# {' '.join(docs[f.name].description.split())}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            _dump_section(value, lines, indent + "  ")
        else:
            plain = json.loads(json.dumps(value))  # tuples as lists
            text = yaml.safe_dump(plain, default_flow_style=True, width=1000).strip()
            lines.append(f"{indent}{f.name}: {text.removesuffix('...').strip()}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg, "The resolved config of this run: every value it uses."))


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ, as 'key: old -> new' lines."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
