"""Re-running a config: stages that already succeeded with the same config and seed, after their
inputs, are skipped; a changed config, a newer upstream stage or --force runs them again."""

import json

import pytest

from lmfleet.runner import load_run, run

from conftest import pretrain_stage, shared, write_config

pytestmark = pytest.mark.slow


def test_up_to_date_stages_are_skipped(tmp_path, ray_local):
    text = tmp_path / "plays.txt"
    text.write_text(shared("tinyshakespeare.txt").read_text()[:60000])
    data = {"sources": [{"name": "plays", "format": "text", "text_unit": "block", "paths": [str(text)]}],
            "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32, "val_fraction": 0.05}}
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", {"name": "r", "output_dir": str(out), "stages": {
        "data": data, "pretrain": pretrain_stage("data", steps=2)}})

    def go(*overrides, only=None, force=False):
        report = run(load_run(config, list(overrides)), only=only, force=force)
        return {name: bool(stage.get("skipped")) for name, stage in report["stages"].items()}, report

    assert go()[0] == {"data": False, "pretrain": False}
    packed = out / "data" / "packed" / "index.json"
    written = packed.stat().st_mtime_ns
    skipped, report = go()
    assert skipped == {"data": True, "pretrain": True}
    assert packed.stat().st_mtime_ns == written  # outputs untouched
    assert report["stages"]["pretrain"]["summary"][0].startswith("up to date")
    assert report["stages"]["pretrain"]["final_loss"] is not None  # the finished run's report is kept
    assert go("stages.pretrain.steps=3")[0] == {"data": True, "pretrain": False}  # its config changed
    assert go("stages.pretrain.steps=3", "seed=2")[0] == {"data": False, "pretrain": False}  # the seed changed
    # A newer upstream (data re-run on its own) makes the downstream stage run again.
    assert go("stages.pretrain.steps=3", "seed=2", only=["data"], force=True)[0]["data"] is False
    assert go("stages.pretrain.steps=3", "seed=2")[0] == {"data": True, "pretrain": False}
    assert json.loads((out / "pretrain" / "stage.json").read_text())["status"] == "succeeded"
