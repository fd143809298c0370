"""A shared-nothing cluster: a head and two worker nodes started with `ray start`, each with a cache of its
own (no folder the nodes share is used), the run's only shared state a bucket (moto's S3 on loopback,
reached through the environment as nodes with an instance role reach theirs).

`lmfleet submit` of data (gzip + zstd JSONL objects) -> pretrain (2 workers) -> sft -> reward -> ppo with
output_dir=s3://: a job on the cluster drives the chain, each stage a job of its own with the uploaded
working dir; a worker node is SIGKILLed during pretraining and the run finishes from the bucket's
checkpoint; every output is in the bucket and nothing is written under the submitting directory;
submitting again finds every stage up to date and starts no stage job."""

import gzip
import json
import signal
import subprocess
import threading
import time

import pyarrow as pa
from pyarrow import fs

from lmfleet.runlog import read_jsonl

from conftest import (
    lmfleet_cmd,
    ray_head,
    registered_steps,
    report_sections,
    screenshot,
    shared,
    write_config,
)

RUN = "s3://lmfleet/shared-nothing/run"
STEPS = 60
HF = {"batch": {"micro_batch": 4}, "log_every": 1, "checkpoint": {"every": 100}}


def _put(bucket, key: str, data: bytes) -> None:
    with bucket.open_output_stream(f"lmfleet/shared-nothing/{key}", compression=None) as f:
        f.write(data)


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as f:
        f.write(data)
    return sink.getvalue().to_pybytes()


def _sources(bucket) -> None:
    lines = shared("c4_demo.jsonl").read_bytes().splitlines(keepends=True)
    _put(bucket, "src/web/a.jsonl.gz", gzip.compress(b"".join(lines[: len(lines) // 2])))
    _put(bucket, "src/web/b.jsonl.zst", _zstd(b"".join(lines[len(lines) // 2:])))
    _put(bucket, "src/alpaca.json", shared("alpaca_5000.json").read_bytes())
    _put(bucket, "src/hh.jsonl.gz", shared("hh_rlhf_harmless_base_test.jsonl.gz").read_bytes())


def _pipeline() -> dict:
    src = "s3://lmfleet/shared-nothing/src"
    alpaca = {"paths": [f"{src}/alpaca.json"], "max_records": 48, "val_fraction": 0.1}
    hh = {"paths": [f"{src}/hh.jsonl.gz"], "max_records": 64, "val_fraction": 0.1}
    return {"name": "sn", "output_dir": RUN, "stages": {
        "data": {"sources": [{"name": "web", "format": "jsonl", "paths": [f"{src}/web/*"]}],
                 "tokenizer": {"vocab_size": 512}, "pack": {"seq_len": 64, "val_fraction": 0.05}},
        "pretrain": {"data": "data", "steps": STEPS, "log_every": 1, "log_samples": True,
                     "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128},
                     "batch": {"global_batch": 16, "micro_batch": 2}, "scaling": {"num_workers": 2},
                     "checkpoint": {"every": 10}, "eval": {"every": STEPS, "batches": 1}},
        "sft": {"model": "pretrain", "dataset": alpaca, "training": {"max_steps": 3, "max_length": 128}, **HF,
                "eval": {"samples": 2}},
        "reward": {"model": "sft", "dataset": hh, "training": {"max_steps": 3, "max_length": 256}, **HF},
        "ppo": {"model": "sft", "reward_model": "reward", "dataset": alpaca, "iterations": 2,
                "ppo": {"rollout_batch": 4, "mini_batch": 2}, "generation": {"max_new_tokens": 8},
                "training": {"max_length": 128}, "eval": {"samples": 2}},
    }}


def _kill_a_training_node(bucket, nodes: dict, seen: dict) -> None:
    """Once pretraining registered a checkpoint in the bucket: SIGKILL a worker node (its raylet and its
    processes) that runs a Train worker, as a machine lost."""
    deadline = time.time() + 600
    while time.time() < deadline and not seen:
        if registered_steps(None, bucket, "lmfleet/shared-nothing/run/pretrain/ray"):
            for name, raylet in nodes.items():
                procs = raylet.children(recursive=True)
                if any((p.cmdline() or [""])[0].startswith("ray::RayTrainWorker") for p in procs):
                    for p in [raylet, *procs]:
                        p.send_signal(signal.SIGKILL)
                    seen["node"] = name
                    return
        time.sleep(0.05)


def test_a_pipeline_runs_on_nodes_that_share_nothing_but_a_bucket(tmp_path, s3, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    from lmfleet.jobs import use_token_if_present

    env, bucket = s3
    for key, value in env.items():  # for this process's own reads of the bucket
        monkeypatch.setenv(key, value)
    _sources(bucket)
    caches = {name: tmp_path / f"cache-{name}" for name in ("head", "a", "b")}
    with ray_head(num_cpus=1, dashboard=True, env={**env, "LMFLEET_CACHE": str(caches["head"])}) as (_, url, add, _):
        nodes = {n: add({"LMFLEET_CACHE": str(caches[n])}) for n in ("a", "b")}
        project = tmp_path / "project"
        project.mkdir()
        write_config(project / "pipeline.yaml", _pipeline())
        seen: dict = {}
        killer = threading.Thread(target=_kill_a_training_node, args=(bucket, nodes, seen), daemon=True)
        killer.start()
        first = subprocess.run([*lmfleet_cmd(), "submit", "pipeline.yaml", "--address", url], capture_output=True,
                               text=True, timeout=1200, cwd=project)
        killer.join(timeout=1)
        assert first.returncode == 0, first.stderr[-4000:]
        report = json.loads(bucket.open_input_stream("lmfleet/shared-nothing/run/report.json").read())
        again = subprocess.run([*lmfleet_cmd(), "submit", "pipeline.yaml", "--address", url], capture_output=True,
                               text=True, timeout=600, cwd=project)
        assert again.returncode == 0, again.stderr[-3000:]
        use_token_if_present()
        client = JobSubmissionClient(url)
        jobs = client.list_jobs()
    stage_jobs = [j for j in jobs if "lmfleet_stage" in (j.metadata or {})]
    chains = [j for j in jobs if (j.metadata or {}).get("lmfleet_stages") == "data,pretrain,sft,reward,ppo"]
    chain = min(chains, key=lambda j: j.start_time)  # the first submit's; the second's found nothing to run

    assert seen, "pretraining finished before a checkpoint was seen in the bucket"
    stages = ["data", "pretrain", "sft", "reward", "ppo"]
    assert report["status"] == "succeeded" and list(report["stages"]) == stages
    assert [j["stage"] for j in report["jobs"]] == stages and all(j["status"] == "SUCCEEDED" for j in report["jobs"])
    assert report["seconds"] > sum(sum(s["seconds"].values()) for s in report["stages"].values())  # the whole chain
    # A job on the cluster drove the chain; each stage's job ran with the chain's one upload of the project.
    assert chain.status == "SUCCEEDED" and "--chain" in chain.entrypoint and "[ppo]" in first.stderr
    assert chain.runtime_env["working_dir"].startswith("gcs://")
    assert all(j.runtime_env["working_dir"] == chain.runtime_env["working_dir"] for j in stage_jobs)
    # Every stage's outputs are in the bucket, named there by the report.
    listed = {f.path.removeprefix("lmfleet/shared-nothing/run/") for f in bucket.get_file_info(
        fs.FileSelector("lmfleet/shared-nothing/run", recursive=True)) if f.type == fs.FileType.File}
    for want in ["config.yaml", "metrics.jsonl", "logs/lmfleet.log", "data/packed/index.json",
                 "data/tokenizer/tokenizer.json", "pretrain/model/model.safetensors", "pretrain/samples.jsonl",
                 "sft/model/model.safetensors", "sft/data/train.jsonl", "sft/eval.json",
                 "reward/model/model.safetensors", "ppo/model/model.safetensors", "ppo/eval.json",
                 *[f"{s}/stage.json" for s in stages], *[f"{s}/report.json" for s in stages]]:
        assert want in listed, want
    assert any(p.startswith("data/kept/") and p.endswith(".parquet") for p in listed)
    assert any(p.startswith("data/packed/train/") for p in listed)
    assert report["stages"]["ppo"]["model"] == f"{RUN}/ppo/model"
    # The lost node's Train worker: the run went on from the last checkpoint registered in the bucket
    # (steps after it ran twice), with every step's batch logged once at least.
    logged = [r["step"] for r in read_jsonl(f"{RUN}/pretrain/samples.jsonl")]
    assert len(logged) > STEPS and sorted(set(logged)) == list(range(1, STEPS + 1)), logged
    rerun = logged[[i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]][0]]
    assert (rerun - 1) % 10 == 0 and rerun > 1, rerun
    # Nothing was written under the submitting directory; the driver (on the head) and the lost node's
    # worker read what they needed from the bucket through copies in their own node's cache.
    assert sorted(p.name for p in project.iterdir()) == ["pipeline.yaml"]
    copies = {node: [json.loads(p.read_text()) for p in caches[node].glob("*.manifest.json")] for node in caches}
    assert any("tokenizer.json" in c for c in copies["head"])  # the driver's tokenizer checks
    assert any("index.json" in c for c in copies[seen["node"]])  # the packed data its Train worker read
    # The run's page, written by the chain into the bucket and rebuilt from the URI by `lmfleet report`: a
    # section per stage with its plots, the lost node's restart marked; Chromium renders it.
    assert "report.html" in listed
    page = subprocess.run([*lmfleet_cmd(), "report", RUN], capture_output=True, text=True, timeout=300, cwd=project)
    assert page.returncode == 0 and page.stdout == f"report: {RUN}/report.html\n", page.stderr[-3000:]
    html = bucket.open_input_stream("lmfleet/shared-nothing/run/report.html").read().decode()
    (tmp_path / "report.html").write_text(html)
    sections = report_sections(html)
    assert list(sections) == ["run", *(f"stage-{s}" for s in stages)] and all(sections.values()), sections
    assert "dashed red: restarts of the workers" in html, tmp_path / "report.html"
    pixels = screenshot(tmp_path / "report.html", tmp_path / "report.png")
    assert pixels.shape == (2400, 1280, 3)
    colored = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 80  # plot lines, bars, status
    dark = pixels.max(axis=2) < 90  # text
    assert colored.mean() > 0.005 and dark.mean() > 0.005, (colored.mean(), dark.mean())
    # Submitting again: every stage up to date, no stage job started.
    assert again.stderr.count("up to date (same config, seed, code and inputs): no job") == len(stages)
    assert len(stage_jobs) == len(stages)
