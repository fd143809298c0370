"""Elastic growth by Ray's own autoscaler, not by hand-started nodes: a pretraining run that starts on a
1-CPU head asks Ray Train for [1, 3] workers, the autoscaler (its fake multi-node provider: nodes are
local processes) launches worker nodes shaped like cluster/aws.yaml's (1 CPU, min 0, max 2), Ray Train
grows onto them, the run finishes with the same global batch and sample order, its output dir (records,
samples, checkpoints) in a bucket (moto's S3 on loopback), and the idle nodes are terminated by the
autoscaler afterwards."""

import os
import subprocess
import time

import psutil

from lmfleet.data.packing import PackedDataset
from lmfleet.runlog import read_jsonl
from lmfleet.train.data import BatchPlan

from conftest import lmfleet_cmd, pretrain_stage, ray_head, write_config

STEPS = 240


def _raylets(temp) -> int:
    return sum(1 for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet" and any(str(temp) in c for c in p.info["cmdline"] or []))


def test_the_autoscaler_grows_a_run_and_retires_idle_nodes(packed, tmp_path, s3, monkeypatch):
    env, bucket = s3
    for key, value in env.items():  # the cluster's processes reach the bucket as nodes with a role would
        monkeypatch.setenv(key, value)
    types = {"cpu1": {"resources": {"CPU": 1}, "max_workers": 2}}
    with ray_head(num_cpus=1, worker_types=types, idle_timeout_minutes=0.25) as (address, _, _, temp):
        out = "s3://lmfleet/autoscale/run"
        stage = pretrain_stage(packed, steps=STEPS, scaling__num_workers=[1, 3], scaling__cpus_per_worker=1,
                               batch__global_batch=12, checkpoint__every=5, log_samples=True)
        config = write_config(tmp_path / "c.yaml", {"name": "autoscaled", "output_dir": out,
                                                    "ray": {"address": address}, "stages": {"pretrain": stage}})
        done = subprocess.run([*lmfleet_cmd(), "run", str(config)], capture_output=True, text=True,
                              env={**os.environ, "RAY_AUTH_MODE": "token"}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        grown = _raylets(temp)

        # Idle for 15 s, the autoscaler's worker nodes are terminated: the head alone is left.
        deadline = time.time() + 120
        while _raylets(temp) > 1 and time.time() < deadline:
            time.sleep(1)
        assert _raylets(temp) == 1, f"{_raylets(temp)} raylets left of {grown}"

    steps = [r for r in read_jsonl(f"{out}/metrics.jsonl") if isinstance(r.get("step"), int)]
    sizes = [s["world_size"] for s in steps]
    # The autoscaler launched both nodes for the run's demand; Ray Train starts on what is up when its
    # first worker group forms: usually the head alone (then grows), in one local CI run already all
    # three. Either way the run reaches 3 workers on nodes the autoscaler made.
    assert 1 <= sizes[0] <= 3 and max(sizes) == 3 and grown == 3, (sizes, grown)
    assert all(s["global_batch"] == 12 for s in steps)
    assert {s["accum"] for s in steps if s["world_size"] == 3} == {2}
    assert steps[-1]["step"] == STEPS
    # The data order is that of the plan whatever the worker count.
    plan = BatchPlan(PackedDataset(packed / "packed").source_ranges(), 12, 1, None)
    logged = {}
    for rec in read_jsonl(f"{out}/pretrain/samples.jsonl"):
        logged[rec["step"]] = rec
    assert all(logged[step]["samples"] == plan.next_batch(step - 1).tolist() for step in range(1, STEPS + 1))
    # The checkpoints the grown run resumed from are in the bucket.
    from pyarrow import fs

    found = bucket.get_file_info(fs.FileSelector("lmfleet/autoscale/run/pretrain/ray", recursive=True))
    assert any("step_" in f.path for f in found)
