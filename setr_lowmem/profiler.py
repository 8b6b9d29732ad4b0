"""Peak memory: what the caching allocator handed out, what it reserved, what the card holds
(CUDA context included), and the host's resident memory (where offloading moves things).

`MemoryMeter` is cheap enough to sample every iteration; the detailed breakdown by
category and phase is in `setr_lowmem.memory_breakdown`.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

import psutil
import torch

GIB = 2**30


@dataclass
class Peaks:
    allocated: float = 0.0  # GiB, torch.cuda.max_memory_allocated
    reserved: float = 0.0  # GiB, torch.cuda.max_memory_reserved
    device: float = 0.0  # GiB used on the card, sampled (NVML-level: includes the CUDA context)
    host_rss: float = 0.0  # GiB, the process's peak resident set

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class MemoryMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.device_peak = 0.0
        self.baseline_device = 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.device_peak = 0.0

    def sample(self) -> None:
        """Record the card's current use (call at the points of highest use, e.g. after backward)."""
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            self.device_peak = max(self.device_peak, (total - free) / GIB)

    def peaks(self) -> Peaks:
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
        host = max(host, psutil.Process().memory_info().rss / GIB)
        if not self.cuda:
            return Peaks(host_rss=host)
        self.sample()
        return Peaks(allocated=torch.cuda.max_memory_allocated(self.device) / GIB,
                     reserved=torch.cuda.max_memory_reserved(self.device) / GIB,
                     device=self.device_peak, host_rss=host)

    def short(self) -> str:
        p = self.peaks()
        if self.cuda:
            return f"{p.reserved:.1f}G"
        return f"rss {p.host_rss:.1f}G"


def fit_line(p: Peaks, card_gib: float = 24.0, cuda: bool = True) -> str:
    """'peak 15.8 GiB reserved, 16.4 GiB on the device: fits a 24 GB card with 7.6 GiB to spare'."""
    if not cuda:
        return f"peak host memory {p.host_rss:.2f} GiB (no GPU: device figures not measured)"
    need = max(p.device, p.reserved)
    verdict = (f"fits a {card_gib:g} GB card with {card_gib - need:.1f} GiB to spare" if need <= card_gib
               else f"needs {need - card_gib:.1f} GiB more than a {card_gib:g} GB card")
    return (f"peak {p.reserved:.1f} GiB reserved ({p.allocated:.1f} allocated), {p.device:.1f} GiB on the device, "
            f"host {p.host_rss:.1f} GiB: {verdict}")
