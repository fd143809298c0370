"""The run's append-only logs (metrics.jsonl, a stage's samples.jsonl, a Tune trial's metrics.jsonl).

The driver appends to them, and so do Train workers and Tune trials on any node. Those never open the
files themselves: on a cluster they share no disk with the driver, and an object store cannot append.
They send each line to the run's `_Appender`, an actor on the driver's node (no CPU), which appends it to
the driver's copy; the runner publishes the copies with each stage. A worker waits for each append (~1 ms
here): a line sent just before a worker exits is never lost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmfleet.outputs import is_file, read_text


class _Appender:
    def append(self, path: str, text: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


_ACTOR: dict = {}  # Ray job id -> this driver's appender


def _appender():
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    job = context.get_job_id()
    if job not in _ACTOR:
        _ACTOR.clear()  # an earlier Ray session's
        node = NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False)
        _ACTOR[job] = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_Appender).options(
            scheduling_strategy=node, name=f"lmfleet-appender-{job}").remote()
    return _ACTOR[job]


class LineLog:
    """Appends text lines to a file of the driver's node, from the driver or (`for_workers`) from anywhere."""

    def __init__(self, path: Path | str, actor=None):
        self.path = Path(path)
        self._actor = actor

    def for_workers(self) -> LineLog:
        """A copy to hand to Ray tasks and Train workers (it goes through the driver node's appender)."""
        return type(self)(self.path, _appender())

    def child(self, path: Path | str) -> LineLog:
        """Another file of the driver's node, through the same appender."""
        return type(self)(path, self._actor)

    def append(self, text: str) -> None:
        if self._actor is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
        else:
            import ray

            ray.get(self._actor.append.remote(str(self.path), text))


class MetricsLog(LineLog):
    """metrics.jsonl: one JSON object per line; every record carries stage and wall time."""

    def write(self, stage: str, **metrics) -> None:
        record = {"time": round(time.time(), 3), "stage": stage, **metrics}
        self.append(json.dumps(record, default=str) + "\n")


class JsonlTail:
    """The records appended to a local JSON-lines file since the last read (from its end at creation, or
    `from_start`): a line still being written waits for the next read; lines that are not objects are
    skipped. What the console's progress and the trackers read metrics.jsonl with, while a stage runs."""

    def __init__(self, path: Path, from_start: bool = False):
        self.path = path
        self.offset = 0 if from_start or not path.exists() else path.stat().st_size

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:  # not written yet
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out


def read_jsonl(path: Path | str) -> list[dict]:
    """The records of a JSON-lines file or object (metrics.jsonl, a stage's data files); [] if there is none."""
    if not is_file(path):
        return []
    return [json.loads(line) for line in read_text(path).splitlines() if line]
