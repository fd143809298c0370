"""Elastic training on a real multi-node local Ray cluster: a run that starts on one node grows to
two workers when a second node joins, shrinks back to one when that node dies (SIGKILL of its raylet)
and finishes, keeping the global batch and the data order throughout."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from lmfleet.data.packing import PackedDataset
from lmfleet.train.data import BatchPlan

from conftest import lmfleet_cmd, ray_head, write_config

STEPS = 300


@pytest.fixture
def ray_cluster():
    """A head node with 1 CPU on loopback; yields (address, add_node). Its processes are killed at the end."""
    with ray_head(num_cpus=1) as (address, _, add_node, _temp):
        yield address, add_node


def _steps(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if isinstance(r.get("step"), int)]


def test_run_grows_then_shrinks_and_finishes(packed, tmp_path, ray_cluster):
    address, add_node = ray_cluster
    out = tmp_path / "run"
    cfg = {"name": "elastic", "output_dir": str(out), "stages": {"pretrain": {
        "data": str(packed),
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 32},
        "batch": {"global_batch": 8, "micro_batch": 2}, "steps": STEPS,
        "parallel": {"strategy": "ddp"}, "scaling": {"num_workers": [1, 2], "cpus_per_worker": 1},
        "checkpoint": {"every": 5}, "eval": {"every": 1000, "batches": 1}, "log_every": 1,
        "log_samples": True, "export": False,
    }}}
    # After the node dies the controller first asks for 2 workers again (the cluster still lists the dead
    # node's CPU) and falls back to 1 when that start times out: 60 s by default, 20 s here.
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    proc = subprocess.Popen([*lmfleet_cmd(), "run", str(write_config(tmp_path / "c.yaml", cfg)), "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        def wait_for(condition):
            deadline = time.time() + 300
            while time.time() < deadline and not condition(_steps(out / "metrics.jsonl")):
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(0.2)

        wait_for(lambda steps: any(s["step"] >= 10 for s in steps))
        raylet = add_node()
        # Lose the second node once the grown run has checkpointed at 2 workers.
        wait_for(lambda steps: sum(s["world_size"] == 2 for s in steps) >= 12)
        raylet.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]

    steps = _steps(out / "metrics.jsonl")
    sizes = [s["world_size"] for s in steps]
    grown = sizes.index(2)
    shrunk = grown + sizes[grown:].index(1)
    assert sizes[0] == 1 and set(sizes[shrunk:]) == {1}, sizes
    assert all(s["global_batch"] == 8 for s in steps)
    assert {s["accum"] for s in steps[:grown]} == {4} and {s["accum"] for s in steps[grown:shrunk]} == {2}
    assert {s["accum"] for s in steps[shrunk:]} == {4}
    # After the node died the run went on from its last checkpoint (every 5 steps), not from scratch.
    assert steps[shrunk]["step"] > 10 and (steps[shrunk]["step"] - 1) % 5 == 0, steps[shrunk]
    assert steps[-1]["step"] == STEPS and steps[-1]["loss"] < steps[0]["loss"]

    # The data order is that of the plan whatever the worker count: every step's sample ids match.
    plan = BatchPlan(PackedDataset(packed / "packed").source_ranges(), 8, 1, None)
    logged = {}
    for line in (out / "pretrain" / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        logged[rec["step"]] = rec
    for step in range(1, STEPS + 1):
        assert logged[step]["samples"] == plan.next_batch(step - 1).tolist(), step
    assert {r["world_size"] for r in logged.values()} == {1, 2}  # the last record of each step
    assert np.isfinite([s["loss"] for s in steps]).all()
