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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a rank measures: the driver reads reports without it
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
            import torch

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
            import torch

            return torch.cuda.max_memory_allocated(self.device)
        high = _status("VmHWM")
        return None if high is None else max(high - self.base, 0)


def gather_record(memory: PeakMemory) -> dict:
    """Every rank's peak and model-in-place mark (called by every rank: an all-gather), as the metrics
    record a stage report reads back (`report_section`)."""
    import torch.distributed as dist

    mine = (memory.peak(), memory.marks.get("init"))
    peaks = [mine]
    if dist.is_initialized():
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, mine)
    return {"memory_per_rank": [p for p, _ in peaks], "memory_init_per_rank": [i for _, i in peaks],
            "memory_measure": memory.measure}


def report_section(history: list[dict]) -> dict | None:
    """The report's `memory` from the stage's metrics records: the last run's (a resumed run measures from
    its restart); None when no record has it."""
    measured = [h for h in history if "memory_per_rank" in h]
    if not measured:
        return None
    last = measured[-1]
    return {"peak_bytes_per_rank": last["memory_per_rank"],
            # once the model is in place, before the first step (sharded init: its share)
            "init_bytes_per_rank": last.get("memory_init_per_rank"), "measure": last["memory_measure"]}


def summary_line(section: dict | None) -> list[str]:
    """The report summary's memory line (none when nothing was measured)."""
    peaks = [b for b in (section or {}).get("peak_bytes_per_rank", []) if b is not None]
    if not peaks:
        return []
    inits = [b for b in section["init_bytes_per_rank"] or [] if b is not None]
    return [f"memory: peak {max(peaks) / 2**20:.1f} MiB per rank (max over {len(peaks)}"
            + (f"; {max(inits) / 2**20:.1f} MiB with the model in place" if inits else "")
            + f"; {section['measure']})"]
