"""The resumable training stream and its DataLoader.

Training reads an endless stream of positions 0, 1, 2, ...; position p belongs to epoch
p // N and names the sample `perm(seed, epoch)[p % N]`, augmented with a generator seeded
from (seed, p). Iteration i consumes the positions [i * B, (i + 1) * B) of the total batch
B, split into micro-batches: micro-step k of process r takes block k * world + r. So

- the whole data position is the iteration number: saving (epoch, index, seed) and
  restarting the stream there reproduces every later sample exactly;
- one process with accumulation A sees the same micro-batches as A processes without
  accumulation, which is what makes the two comparable.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from setr_lowmem.config import Config, DataConfig
from setr_lowmem.data.base import Source, load_pair
from setr_lowmem.data.sources import open_source
from setr_lowmem.data.transforms import test_transform, train_transform


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5E7]).permutation(n)


class TrainStream(Dataset):
    """Stream position -> (augmented image, label), deterministic in (seed, position)."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed

    def __len__(self) -> int:
        return len(self.source)

    def sample_index(self, position: int) -> int:
        n = len(self.source)
        return int(epoch_permutation(self.seed, position // n, n)[position % n])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label, _ = load_pair(self.source.rows, self.sample_index(position), self.source.lut,
                                    self.cfg.num_classes)
        rng = np.random.default_rng([self.seed, position, 0xA06])
        return train_transform(image, label, self.cfg, rng)


class StreamSampler(Sampler[int]):
    """Yields this process's stream positions, iteration by iteration, from `start_iter` on: each
    iteration is `accumulation` micro-batches of `micro_batch` on each of `world` processes."""

    def __init__(self, micro_batch: int, accumulation: int, rank: int = 0, world: int = 1, start_iter: int = 0,
                 max_iters: int | None = None):
        self.micro, self.accum, self.rank, self.world = micro_batch, accumulation, rank, world
        self.total = micro_batch * accumulation * world
        self.start_iter, self.max_iters = start_iter, max_iters

    def __iter__(self) -> Iterator[int]:
        it = self.start_iter
        while self.max_iters is None or it < self.max_iters:
            base = it * self.total
            for k in range(self.accum):
                block = base + (k * self.world + self.rank) * self.micro
                yield from range(block, block + self.micro)
            it += 1

    def __len__(self) -> int:
        if self.max_iters is None:
            raise TypeError("the training stream is endless")
        return (self.max_iters - self.start_iter) * self.accum * self.micro


def stream_state(iteration: int, total_batch: int, seed: int, n: int) -> dict[str, int]:
    """The data position after `iteration` iterations, in the terms a user reads."""
    position = iteration * total_batch
    return {"epoch": position // n, "index": position % n, "seed": seed, "position": position}


def build_train_loader(cfg: Config, accumulation: int, start_iter: int = 0, rank: int = 0, world: int = 1,
                       source: Source | None = None) -> DataLoader:
    """The training stream from iteration `start_iter` for process `rank` of `world`, in micro-batches
    of `train.micro_batch`, `accumulation` of them per iteration (the accelerator's: it is derived
    once, in `engine.step.make_accelerator`)."""
    source = source or open_source(cfg.data, cfg.data.train_split)
    stream = TrainStream(source, cfg.data, cfg.train.seed)
    sampler = StreamSampler(cfg.train.micro_batch, accumulation, rank, world, start_iter, cfg.schedule.iters)
    return DataLoader(stream, batch_size=cfg.train.micro_batch, sampler=sampler,
                      num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=cfg.data.num_workers > 0, drop_last=False,
                      prefetch_factor=4 if cfg.data.num_workers > 0 else None, worker_init_fn=leave_process_group)


def leave_process_group(worker_id: int) -> None:
    """In a DataLoader worker: leave the launcher's process group, so that SIGTERM or SIGINT sent to
    the whole group (Slurm, Kubernetes, `timeout`, Ctrl-C) reaches only the main process, which saves
    a checkpoint and then ends its workers. Ignoring those signals instead would also ignore the
    SIGTERM with which PyTorch and multiprocessing end workers, and hang the interpreter's exit."""
    os.setpgid(0, 0)


class EvalSet(Dataset):
    """Index -> (original-size RGB uint8 image, original-size label, label name), undecorated."""

    def __init__(self, source: Source, cfg: DataConfig, limit: int = 0):
        self.source, self.cfg = source, cfg
        self.n = min(len(source), limit) if limit else len(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        image, label, where = load_pair(self.source.rows, index, self.source.lut, self.cfg.num_classes)
        return image, label, where


def eval_inputs(image: np.ndarray, cfg: DataConfig, scales: list[float], ratio_of: str = "base_scale"
                ) -> list[torch.Tensor]:
    return [test_transform(image, cfg, r, ratio_of) for r in scales]
