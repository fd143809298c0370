"""Re-running a config: stages that already succeeded with the same fingerprint (config, seed, lmfleet's
code, input files, earlier stages' outputs) are skipped; a change to any, or --force, runs them again."""

import json

import pytest

from lmfleet.runner import load_run, run, up_to_date

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

    def fresh(path, *overrides) -> dict:
        """Which stages of the config at `path` are up to date now (what a run would skip), without running."""
        loaded = load_run(path, list(overrides))
        return {s.name: up_to_date(loaded, s, loaded.config.run_dir.resolve()) is not None for s in loaded.stages}

    assert go()[0] == {"data": False, "pretrain": False}
    packed = out / "data" / "packed" / "index.json"
    written = packed.stat().st_mtime_ns
    skipped, report = go()
    assert skipped == {"data": True, "pretrain": True}
    assert packed.stat().st_mtime_ns == written  # outputs untouched
    assert report["stages"]["pretrain"]["summary"][0].startswith("up to date")
    assert report["stages"]["pretrain"]["final_loss"] is not None  # the finished run's report is kept
    assert fresh(config, "stages.pretrain.steps=3") == {"data": True, "pretrain": False}  # its config changed
    assert fresh(config, "seed=2") == {"data": False, "pretrain": False}  # the seed changed

    # The input file grew: the data stage and every stage after it run again.
    with text.open("a") as f:
        f.write("\n\nFIRST CITIZEN:\nA new block of text that was not there before.\n")
    assert fresh(config)["data"] is False
    assert go()[0] == {"data": False, "pretrain": False}
    assert json.loads((out / "pretrain" / "stage.json").read_text())["status"] == "succeeded"

    # A run that reads this run's data dir by path (as jobs/pretrain_tiny.yaml does): up to date until that
    # data stage runs again, even with the same config (its outputs were regenerated).
    reader = write_config(tmp_path / "reader.yaml", {"name": "reader", "output_dir": str(tmp_path / "reader"),
                                                     "stages": {"pretrain": pretrain_stage(str(out / "data"), steps=2)}})
    assert not run(load_run(reader))["stages"]["pretrain"].get("skipped")
    assert fresh(reader) == {"pretrain": True}
    assert go(only=["data"], force=True)[0]["data"] is False
    assert fresh(reader) == {"pretrain": False}
    assert fresh(config) == {"data": True, "pretrain": False}  # a newer upstream: pretrain runs again
