import json
import os
import sys
from pathlib import Path

import pytest
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
def ray_local():
    """One embedded local Ray for the session's in-process stage runs (what `lmfleet run` starts)."""
    import ray

    from lmfleet.runner import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def packed(tmp_path_factory, ray_local):
    """A small data stage output (C4 docs) shared by the pretraining tests."""
    out = tmp_path_factory.mktemp("data")
    cfg = {"name": "d", "output_dir": str(out), "stages": {"data": {
        "sources": [{"name": "c4", "format": "jsonl", "paths": [str(shared("c4_demo.jsonl"))]},
                    {"name": "plays", "format": "text", "text_unit": "block",
                     "paths": [str(shared("tinyshakespeare.txt"))]}],
        "tokenizer": {"vocab_size": 512},
        "pack": {"seq_len": 32, "val_fraction": 0.05},
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


def pretrain(tmp_path, packed, name="p", steps=10, **over):
    """Run a tiny pretraining stage on `packed`; returns (per-step metrics, stage report)."""
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
    set_nested(stage, over)
    out = tmp_path / name
    cfg = {"name": name, "output_dir": str(out), "stages": {"pretrain": stage}}
    report = run(load_run(write_config(tmp_path / f"{name}.yaml", cfg)))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("stage") == "pretrain" and "loss" in x]
    return steps, report["stages"]["pretrain"]


def lmfleet_cmd() -> list[str]:
    """The installed console script of this interpreter's environment."""
    return [str(Path(sys.executable).parent / "lmfleet")]


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
