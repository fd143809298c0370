import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from lmfleet.runner import load_run, run

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} not found: tests on real text need ../shared/data beside the repo"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has it: a skip there would hide every real-data test
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ray_local(s3, tmp_path_factory):
    """One embedded local Ray for the session's in-process stage runs (what `lmfleet run` starts). Its
    workers see the loopback S3 API (as a cluster's nodes see their cloud's through instance roles) and
    keep their copies of objects in a cache of the session's."""
    import ray

    from lmfleet.runner import init_ray

    os.environ.update(s3[0])
    os.environ["LMFLEET_CACHE"] = str(tmp_path_factory.mktemp("lmfleet-cache"))
    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def packed(tmp_path_factory, ray_local):
    """A small data stage output (C4 docs, Shakespeare) shared by the pretraining tests. The C4 records carry a
    numeric field `quality` (their type-token ratio; missing on every 10th), packed as a column."""
    out = tmp_path_factory.mktemp("data")
    c4 = tmp_path_factory.mktemp("c4") / "c4_demo.jsonl"  # the shared file's name: the same document ids
    with c4.open("w", encoding="utf-8") as f:
        for i, line in enumerate(shared("c4_demo.jsonl").read_text(encoding="utf-8").splitlines()):
            record = json.loads(line)
            words = record["text"].split()
            f.write(json.dumps(record if i % 10 == 0 else {**record, "quality": len(set(words)) / len(words)}) + "\n")
    cfg = {"name": "d", "output_dir": str(out), "stages": {"data": {
        "sources": [{"name": "c4", "format": "jsonl", "paths": [str(c4)]},
                    {"name": "plays", "format": "text", "text_unit": "block",
                     "paths": [str(shared("tinyshakespeare.txt"))]}],
        "tokenizer": {"vocab_size": 512},
        "pack": {"seq_len": 32, "val_fraction": 0.05, "columns": ["quality"]},
    }}}
    run(load_run(write_config(out / "c.yaml", cfg)))
    return out / "data"


def set_nested(config: dict, overrides: dict) -> dict:
    """Apply overrides written as a__b__c=value (keyword-argument friendly dotted paths)."""
    for key, value in overrides.items():
        node = config
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config


def pretrain_stage(packed, steps=10, **over) -> dict:
    """The config of a tiny pretraining stage on `packed` (overrides as a__b=value)."""
    stage = {
        "data": str(packed),
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32},
        "optimizer": {"lr": 3e-3, "grad_clip": 0.5},
        "lr_schedule": {"warmup_steps": 2},
        "batch": {"global_batch": 8, "micro_batch": 2},
        "steps": steps,
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "checkpoint": {"every": 100},
        "eval": {"every": 100, "batches": 1},
        "log_every": 1,
        "export": False,
    }
    return set_nested(stage, over)


def pretrain(tmp_path, packed, name="p", steps=10, run_keys: dict | None = None, **over):
    """Run a tiny pretraining stage on `packed` (`run_keys`: the run's, e.g. tracking); returns (per-step
    metrics, stage report)."""
    out = tmp_path / name
    cfg = {"name": name, "output_dir": str(out), **(run_keys or {}),
           "stages": {"pretrain": pretrain_stage(packed, steps, **over)}}
    report = run(load_run(write_config(tmp_path / f"{name}.yaml", cfg)))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("stage") == "pretrain" and "loss" in x]
    return steps, report["stages"]["pretrain"]


def run_stages(tmp_path, stages: dict, name: str = "r") -> tuple[dict, Path]:
    """Run a config of `stages` (each with its kind unless its name is one); returns (run report, run dir)."""
    out = tmp_path / name
    cfg = {"name": name, "output_dir": str(out), "stages": stages}
    return run(load_run(write_config(tmp_path / f"{name}.yaml", cfg))), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(num_cpus: int, dashboard: bool = False, worker_types: dict | None = None, idle_timeout_minutes: float = 5,
             env: dict | None = None):
    """A Ray head on loopback started with `ray start` (a separate cluster, like a user's); yields
    (GCS address, job API URL or None, add_node, temp dir). Its processes are killed at the end.
    env: added to the environment of the head (and of the nodes; add_node(env) adds a node's own).
    worker_types: run Ray's own autoscaler with these node types ({name: {resources, max_workers}}),
    launching nodes as local processes (its fake multi-node provider; see ../shared/STACK.md), and
    terminating them after `idle_timeout_minutes` idle."""
    ray = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="lmf", dir="/tmp")  # short: Ray's socket paths live under it
    port, dash = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # jobs run this env's lmfleet
    # A SIGKILLed node is declared dead after 3 failed GCS health checks a second apart (Ray's defaults:
    # 5 x 3 s); a live raylet still has the default 10 s to answer each.
    env.setdefault("RAY_health_check_period_ms", "1000")
    env.setdefault("RAY_health_check_failure_threshold", "3")
    common = [f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    head = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={free_port()}"] if dashboard else ["--include-dashboard=false"]
    if worker_types is not None:
        none: dict = {}
        config = {
            "cluster_name": "fake", "max_workers": sum(t["max_workers"] for t in worker_types.values()),
            # use_node_id_as_ip: the monitor matches its launched nodes to raylets by node id (they all share
            # this machine's IP); without it they stay "uninitialized" and are never found idle.
            "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "disable_node_updaters": True,
                         "disable_launch_config_check": True, "use_node_id_as_ip": True},
            "available_node_types": {"ray.head.default": {"resources": {"CPU": num_cpus}, "node_config": none,
                                                          "max_workers": 0},
                                     **{name: {"node_config": none, "min_workers": 0, **t}
                                        for name, t in worker_types.items()}},
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "file_mounts": none, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "auth": none, "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        (Path(temp) / "autoscaling.json").write_text(json.dumps(config))
        head.append(f"--autoscaling-config={temp}/autoscaling.json")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    subprocess.run([ray, "start", "--head", f"--port={port}", *head, *common], check=True, env=env,
                   capture_output=True)
    address = f"127.0.0.1:{port}"

    def raylets() -> set:
        return {p for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "raylet" and any(temp in c for c in p.info["cmdline"] or [])}

    def add_node(node_env: dict | None = None) -> psutil.Process:
        """Start a worker node (`node_env` added to its environment); returns its raylet (SIGKILL it to lose
        the node)."""
        before = raylets()
        # A head with a dashboard turns on token auth (the token in ~/.ray/auth_token): nodes must send it.
        auth = {"RAY_AUTH_MODE": "token"} if dashboard else {}
        subprocess.run([ray, "start", f"--address={address}", *common], check=True,
                       env={**env, **auth, **(node_env or {})}, capture_output=True)
        (raylet,) = raylets() - before
        return raylet

    try:
        yield address, f"http://127.0.0.1:{dash}" if dashboard else None, add_node, Path(temp)
    finally:
        # The cluster's processes name its temp dir; their children (dashboard modules) may not.
        procs = [p for p in psutil.process_iter(["cmdline"]) if any(temp in c for c in p.info["cmdline"] or [])]
        for proc in procs + [c for p in procs for c in _children(p)]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def job_api():
    """A Ray head with its job API for the tests of one module: (job API URL, the head's temp dir)."""
    with ray_head(num_cpus=2, dashboard=True) as (_, url, _add, temp):
        yield url, temp


def _children(p: psutil.Process) -> list:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def registered_steps(run: Path, filesystem=None, storage: str | None = None, prefix: str = "step_") -> list[int]:
    """Steps of the checkpoints Ray Train has registered (what a restart loads; dirs named `prefix`STEP): of the
    run dir's pretraining, or in `storage` (a stage's storage root) of a pyarrow `filesystem` (default local)."""
    from pyarrow import fs

    filesystem = filesystem or fs.LocalFileSystem()
    storage = storage or str(run / "pretrain" / "ray")
    snapshot = f"{storage}/train/checkpoint_manager_snapshot.json"
    if filesystem.get_file_info(snapshot).type == fs.FileType.NotFound:
        return []
    with filesystem.open_input_stream(snapshot) as f:
        text = f.read()
    try:
        results = json.loads(text)["checkpoint_results"]
    except json.JSONDecodeError:  # read while Ray Train rewrites it (seen once in a full run): none known yet
        return []
    return [int(r["checkpoint_dir_name"].removeprefix(prefix)) for r in results]


@pytest.fixture(scope="session")
def s3():
    """An S3 API on loopback (moto's server: no cloud account here) with a bucket `lmfleet` (tests use
    prefixes of their own); yields (the env a job needs to reach it, a pyarrow S3FileSystem for the test's
    own reads and writes)."""
    import logging

    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.get_host_and_port()[1]}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    filesystem = fs.S3FileSystem(access_key="test", secret_key="test", region="us-east-1", scheme="http",
                                 endpoint_override=env["AWS_ENDPOINT_URL"].removeprefix("http://"),
                                 allow_bucket_creation=True)
    filesystem.create_dir("lmfleet")
    yield env, filesystem
    server.stop()


def kill_a_train_worker() -> int:
    """SIGKILL one Ray Train worker process of this machine; returns its pid."""
    workers = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker")]
    os.kill(workers[-1].pid, signal.SIGKILL)
    return workers[-1].pid


LMFLEET_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")
# What Ray, its workers and the libraries they run print: in a run's logs/<stage>.log, not on its console.
RAY_NOISE = ("(RayTrainWorker", "(TrainController", "pid=", "Checkpoint successfully created", "Reporting training "
             "result", "Execution plan", "Full logs are in", "Started a local Ray instance", "Progress bars disabled",
             "PreemptionWatcher", "Token authentication")


def assert_quiet(stderr: str, max_lines: int) -> None:
    """A run's console (stderr) holds only lmfleet's log lines (`lmfleet run` without -v), at most max_lines."""
    lines = stderr.splitlines()
    assert len(lines) <= max_lines, f"{len(lines)} lines:\n" + "\n".join(lines[:40])
    strays = [line for line in lines if not LMFLEET_LINE.match(line)]
    assert not strays, "not lmfleet's:\n" + "\n".join(strays[:20])
    assert not [n for n in RAY_NOISE if n in stderr], stderr[-3000:]


class _Page(HTMLParser):
    """A report page's sections (id -> images), every src / href, and the tags it uses."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, int] = {}
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._section = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = 0
        if tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,") and self._section:
            self.sections[self._section] += 1
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]


def report_sections(html: str) -> dict[str, int]:
    """The sections of a report page (lmfleet.report) with their embedded plots; asserts it is
    self-contained: nothing it would load or link to leaves the page (no script, stylesheet, URL)."""
    page = _Page()
    page.feed(html)
    page.close()
    assert html.startswith("<!DOCTYPE html>") and "</html>" in html
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}, page.tags
    outside = [x for x in page.links if not x.startswith(("#", "data:image/png;base64,"))]
    assert not outside, outside
    assert not re.search(r"https?://", re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)), "a URL outside the config"
    return page.sections


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400) -> np.ndarray:
    """The page rendered by headless Chromium (Debian's `chromium`; .ci/run installs it) as an RGB array."""
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed (Debian: apt-get install chromium; .ci/run installs it)"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB"))


def lmfleet_cmd() -> list[str]:
    """The installed console script of this interpreter's environment."""
    return [str(Path(sys.executable).parent / "lmfleet")]


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s, and a report (every checkpoint) waits for a poll:
# 0.5 s keeps the many short test runs short. Ray passes it on to controllers, workers and job drivers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def base_lm(tmp_path_factory):
    """A tiny HF Llama dir (random weights, as the pretraining stage exports it) with a BPE tokenizer
    trained on the instruction and preference data: the input of the post-training tests."""
    import gzip

    from lmfleet.data.config import TokenizerConfig
    from lmfleet.data.tokenizer import tokenizer_info, train_tokenizer
    from lmfleet.model.config import ModelConfig
    from lmfleet.model.export import export_model
    from lmfleet.model.transformer import Transformer

    out = tmp_path_factory.mktemp("base_lm")
    alpaca = json.loads(shared("alpaca_5000.json").read_text())
    with gzip.open(shared("hh_rlhf_harmless_base_test.jsonl.gz"), "rt") as f:
        hh = [json.loads(line)["chosen"] for line in f]
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in alpaca] + hh
    tok_cfg = TokenizerConfig(vocab_size=1024)
    train_tokenizer(texts, tok_cfg, out / "tokenizer")
    info = tokenizer_info(out / "tokenizer", tok_cfg)
    cfg = ModelConfig(vocab_size=info["vocab_size"], n_layers=2, d_model=128, n_heads=4, n_kv_heads=2,
                      max_seq_len=256)
    torch.manual_seed(0)
    export_model(Transformer(cfg).state_dict(), cfg, out / "model", out / "tokenizer",
                 eos_id=info["eos_id"], pad_id=info["pad_id"])
    return out / "model"


def posttrain(tmp_path, kind: str, name: str | None = None, **over) -> tuple[dict, Path]:
    """Run one post-training stage of `kind` from a config dict (a__b=v overrides); returns (report, stage dir)."""
    name = name or kind
    stage = set_nested({"kind": kind}, over)
    out = tmp_path / name
    cfg = {"name": name, "output_dir": str(out), "stages": {kind: stage}}
    report = run(load_run(write_config(tmp_path / f"{name}.yaml", cfg)))
    return report["stages"][kind], out / kind
