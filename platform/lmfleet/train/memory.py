"""A training rank's peak memory, reported by every pretraining run (`memory` in its report).

On GPU: `torch.cuda.max_memory_allocated` since `start` (bytes the caching allocator handed to tensors;
not the CUDA context or the allocator's cache). On CPU: the process's peak resident set (VmHWM) above its
resident set at `start`, which resets the peak (writing 5 to /proc/self/clear_refs; Linux). So it counts
what the rank allocated from building its model on (weights, gradients, optimizer states, activations,
communication buffers, allocator slack), not the Python, torch and Ray it had loaded before; on CPU it also
counts the pages of the memory-mapped packed shards the rank read since (file-backed, reclaimable).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

MEASURES = {"cuda": "torch.cuda.max_memory_allocated", "cpu": "peak RSS (VmHWM) above the RSS before the model"}


def _status(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None
        self.marks: dict[str, int | None] = {}

    @property
    def measure(self) -> str:
        return MEASURES["cuda" if self.device.type == "cuda" else "cpu"]

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = 0
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the peak RSS restarts from the current RSS
        except OSError:
            return  # no peak to measure from here (not Linux)
        self.base = _status("VmRSS")

    def mark(self, name: str) -> None:
        """Remember the peak so far under `name` (e.g. "init": once the model is in place)."""
        self.marks[name] = self.peak()

    def peak(self) -> int | None:
        """Bytes at the peak since `start` (None where it cannot be measured)."""
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        high = _status("VmHWM")
        return None if high is None else max(high - self.base, 0)
