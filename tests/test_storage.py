"""Checkpoint storage on an object store (`storage_path: s3://...`), against an S3 API on loopback."""

import json
from pathlib import Path

import pytest

from lmfleet import outputs, storage
from lmfleet.errors import ConfigError, InputError
from lmfleet.runner import load_run, run

from conftest import shared, write_config


def _put(bucket, key: str) -> None:
    with bucket.open_output_stream(key) as f:
        f.write(b"x")


def _exists(bucket, key: str) -> bool:
    from pyarrow import fs

    return bucket.get_file_info(key).type != fs.FileType.NotFound


def test_delete_removes_one_tree_of_a_bucket(s3, monkeypatch):
    env, bucket = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("lmfleet/a/run/sft/train/step_1/w", "lmfleet/a/run/sft-2/w", "lmfleet/a/run/other"):
        _put(bucket, key)
    root = storage.stage_storage("s3://lmfleet/a/", "run", Path("/x/run/sft"))
    assert root == "s3://lmfleet/a/run/sft"
    outputs.remove(root)
    assert not _exists(bucket, "lmfleet/a/run/sft/train/step_1/w")
    assert _exists(bucket, "lmfleet/a/run/sft-2/w") and _exists(bucket, "lmfleet/a/run/other")  # a prefix, not a tree
    outputs.remove(root)  # nothing there: no error


def test_a_fresh_stage_run_clears_only_its_own_old_checkpoints_in_the_bucket(tmp_path, s3, monkeypatch, ray_local):
    env, bucket = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    old = "lmfleet/runs/fresh/data/train/step_00000005/__0_0.distcp"  # an earlier run's checkpoint
    _put(bucket, old)
    with bucket.open_output_stream(f"lmfleet/runs/fresh/data/{storage.MARKER}") as f:  # which lmfleet marked
        f.write(json.dumps({"run": "fresh", "stage": "data"}).encode())
    _put(bucket, "lmfleet/runs/other/data/keep")
    data = {"sources": [{"name": "plays", "format": "text", "text_unit": "block",
                         "paths": [str(shared("tinyshakespeare.txt"))]}],
            "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32}}
    config = write_config(tmp_path / "c.yaml", {"name": "fresh", "output_dir": str(tmp_path / "out"),
                                                "storage_path": "s3://lmfleet/runs", "stages": {"data": data}})
    assert run(load_run(config))["status"] == "succeeded"
    assert not _exists(bucket, old) and _exists(bucket, f"lmfleet/runs/fresh/data/{storage.MARKER}")
    assert _exists(bucket, "lmfleet/runs/other/data/keep")

    # A prefix holding objects lmfleet did not write (no marker) is never deleted: a clear error instead.
    _put(bucket, "lmfleet/users/fresh/data/results.csv")
    with pytest.raises(InputError, match=r"storage s3://lmfleet/users/fresh/data: holds files lmfleet did not write"):
        run(load_run(config, ["storage_path=s3://lmfleet/users"]), force=True)
    assert _exists(bucket, "lmfleet/users/fresh/data/results.csv")


@pytest.mark.parametrize("value, message", [
    ("ftp://host/ckpt", "unknown scheme 'ftp'"),
    ("s3://b/ckpt?endpoint_override=localhost:9000", "no query string"),
])
def test_bad_storage_path_is_a_config_error(tmp_path, value, message):
    config = write_config(tmp_path / "c.yaml", {"name": "r", "storage_path": value, "stages": {"data": {
        "sources": [{"name": "a", "format": "text", "paths": ["x.txt"]}]}}})
    with pytest.raises(ConfigError, match=message) as err:
        load_run(config)
    assert "storage_path" in str(err.value)
