"""`lmfleet run` end to end in a subprocess, as a user (or a Ray job) runs it."""

import json
import os
import pty
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, assert_quiet, lmfleet_cmd, pretrain_stage, report_sections, shared, write_config


def test_cli_run_writes_run_dir_and_summary(tmp_path):
    cfg = {
        "name": "cli",
        "output_dir": str(tmp_path / "run"),
        "ray": {"num_cpus": 2},
        "stages": {"data": {
            "sources": [{"name": "c4", "format": "jsonl", "paths": [str(shared("c4_demo.jsonl"))]}],
            "tokenizer": {"vocab_size": 500},
            "pack": {"seq_len": 64},
        }},
    }
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.run(
        [*lmfleet_cmd(), "run", str(path), "--set", "stages.data.dedup.threshold=0.7", "--set", "seed=5"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run cli: succeeded" in proc.stdout and "documents read: 300 from 1 files" in proc.stdout
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["seed"] == 5 and resolved["stages"]["data"]["dedup"]["threshold"] == 0.7
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "succeeded" and report["stages"]["data"]["docs_in"] == 300
    assert set(report["stages"]["data"]["seconds"]) == {"read", "exact_dedup", "near_dedup", "tokenizer", "mix_and_pack"}
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in steps if "phase" in s][:2] == ["read", "exact_dedup"]
    assert "[data] near_dedup done" in (run / "logs" / "lmfleet.log").read_text()
    for out in ("kept", "rejects", "clusters.parquet", "pairs.parquet", "tokenizer", "packed/index.json", "report.json"):
        assert (run / "data" / out).exists(), out
    assert "\r" not in proc.stderr  # no progress bars redrawn in a non-TTY log
    # lmfleet's lines only; what Ray printed is in the stage's log, which the stage's first line names.
    assert_quiet(proc.stderr, 20)
    assert f"stage data (data) -> {run / 'data'} (Ray's and its workers' output: {run / 'logs' / 'data.log'})" in proc.stderr
    ray_log = (run / "logs" / "data.log").read_text()
    assert "Started a local Ray instance" in ray_log and "Execution plan of Dataset" in ray_log

    # Again: up to date, skipped without starting Ray.
    again = subprocess.run([*lmfleet_cmd(), "run", str(path), "--set", "stages.data.dedup.threshold=0.7", "--set",
                            "seed=5"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "up to date: not re-run" in again.stdout, again.stderr[-3000:]
    assert "INFO Ray 2." in proc.stderr and "INFO Ray 2." not in again.stderr
    # The run's page: the header and the data section, each with its plot; the rerun's shows the stage skipped.
    assert f"report: {run / 'report.html'}" in again.stdout
    html = (run / "report.html").read_text()
    assert report_sections(html) == {"run": 1, "stage-data": 1}
    assert "up to date: not re-run" in html and "the document funnel" in html
    text = subprocess.run([*lmfleet_cmd(), "report", str(run), "--text"], capture_output=True, text=True, cwd=tmp_path)
    assert text.returncode == 0 and text.stdout.startswith("run cli: succeeded") and "[data]" in text.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_shipped_configs_validate(config):
    # --config-only: the shipped configs read other runs' outputs, which do not exist here.
    proc = subprocess.run([*lmfleet_cmd(), "validate", "--config-only", str(REPO / "jobs" / config)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_crashed_stage_prints_one_error_block(tmp_path, packed):
    """Train workers that raise: one `error:` block naming the stage, the first failing rank, its exception
    and last lines, and where Ray's output and the full traceback are; `-v` shows the workers' lines too."""
    data = tmp_path / "data"
    shutil.copytree(packed, data)
    shard = sorted((data / "packed" / "train").glob("*.positions.npy"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # damaged after the data stage wrote it
    run = tmp_path / "run"
    cfg = {"name": "crash", "output_dir": str(run), "ray": {"num_cpus": 2},
           "stages": {"pretrain": pretrain_stage(data, steps=2, scaling__num_workers=2,
                                                 checkpoint__max_failures=0)}}  # no retries: fail at once
    proc = subprocess.run([*lmfleet_cmd(), "run", str(write_config(tmp_path / "c.yaml", cfg)), "-v"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    block = proc.stderr[proc.stderr.index("\nerror: ") + 1:].splitlines()
    # Both ranks read the damaged shard; whether the second one's failure is in when Ray Train stops the
    # group is timing (seen: rank 0 and 1 more; rank 1 alone).
    assert re.fullmatch(r"error: stage pretrain failed on worker rank (0 \(and 1 more\)|0|1): "
                        r"ValueError: mmap length is greater than file size", block[0]), block
    assert block[1] == "  its last lines:" and block[-3].endswith("ValueError: mmap length is greater than file size")
    assert block[-2:] == [f"  Ray's and its workers' output: {run / 'logs' / 'pretrain.log'}",
                          f"  the full traceback: {run / 'logs' / 'lmfleet.log'}"]
    assert "(RayTrainWorker pid=" in proc.stderr  # -v
    assert "pid=" in (run / "logs" / "pretrain.log").read_text()
    log = (run / "logs" / "lmfleet.log").read_text()
    assert "stage pretrain failed:\nTraceback (most recent call last)" in log and "WorkerGroupError" in log
    # The page of the failed run: its error, and the stage as far as it got.
    html = (run / "report.html").read_text()
    assert "stage-pretrain" in report_sections(html) and 'class="status-failed"' in html
    assert "mmap length is greater than file size" in html


def test_a_terminal_gets_a_live_status_line(tmp_path, packed):
    """On a terminal the running step and a training stage's bar are one line redrawn in place (carriage
    return, erase line) below lmfleet's lines; the run's log file keeps the lines a pipe would get."""
    run = tmp_path / "run"
    cfg = {"name": "tty", "output_dir": str(run), "ray": {"num_cpus": 2},
           "stages": {"pretrain": pretrain_stage(packed, steps=200)}}
    master, terminal = pty.openpty()
    proc = subprocess.Popen([*lmfleet_cmd(), "run", str(write_config(tmp_path / "c.yaml", cfg))], stdin=terminal,
                            stdout=terminal, stderr=terminal, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=600)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "\r\x1b[K[pretrain] train ..." in text and "[pretrain] train done in" in text
    bars = [int(s) for s in re.findall(r"\r\x1b\[K\[pretrain\] \[[#-]{24}\] step (\d+)/200 loss ", text)]
    assert len(bars) >= 2 and bars == sorted(bars), text[-3000:]
    assert "run tty: succeeded" in text and "Traceback" not in text
    assert "\r\n\r\n" not in text[: text.index("run tty:")]  # nobody else's (empty) lines in between
    log = (run / "logs" / "lmfleet.log").read_text()
    assert "[pretrain] train ..." in log and "[pretrain] step 200/200 loss" in log


def test_progress_lines():
    from lmfleet.console import progress_line

    row = {"stage": "pretrain", "step": 40, "loss": 3.41234, "lr": 1e-3, "tokens_per_s": 5210.4}
    assert progress_line(row, 120, 65.2) == "step 40/120 loss 3.412 tokens_per_s 5,210 eta 1m05s"
    assert progress_line({"iteration": 3, "score": 0.5, "kl": 0.012345, "reward/regex": 1.0}, None, None) == (
        "iteration 3 score 0.5 kl 0.01235")
    assert progress_line({"step": 50, "loss": 4.75, "eval_loss": 4.73, "train_loss": 4.8, "epoch": 0.5}, None,
                         None) == "step 50 loss 4.75 eval_loss 4.73 train_loss 4.8"  # three values at most
    assert progress_line({"step": 90, "eval_runtime": 1.8}, 90, 0.0) is None  # nothing a line shows
