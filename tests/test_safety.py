"""lmfleet as a new user meets it: it never deletes or overwrites what it did not write, a bad record or a
damaged file never kills a stage, impossible resource requests fail fast, and the local Ray it starts
listens on loopback only."""

import gzip
import json
import os
import subprocess

import psutil
import pytest

from lmfleet.data.config import SourceConfig
from lmfleet.data.read import expand_paths
from lmfleet.errors import InputError, UserError
from lmfleet.posttrain.config import DatasetConfig
from lmfleet.posttrain.records import read_sft
from lmfleet.runner import load_run, run

from conftest import lmfleet_cmd, pretrain_stage, ray_head, write_config

DATA = {"tokenizer": {"vocab_size": 300}}


def _data_stage(*paths) -> dict:
    return {**DATA, "sources": [{"name": "web", "format": "jsonl", "paths": [str(p) for p in paths]}]}


def _docs(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({"text": f"Document number {i} talks about ships and the sea."}).encode() + b"\n"
                    for i in range(start, start + n))


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_dir_holding_the_inputs_is_refused_and_nothing_is_touched(tmp_path):
    """The reported case: `output_dir: .` with a stage named `data` and input ./data/web.jsonl, and the user's
    own ./config.yaml: a clear error (exit 2) before any work, every file as it was."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "web.jsonl").write_bytes(_docs(5))
    config = write_config(project / "config.yaml", {"name": "mine", "output_dir": ".", "stages": {
        "data": _data_stage("data/web.jsonl")}})
    before = _snapshot(project)
    for command in ("run", "validate"):
        proc = subprocess.run([*lmfleet_cmd(), command, "config.yaml"], capture_output=True, text=True, cwd=project,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "stages.data.sources.web: input data/web.jsonl is inside the run's output_dir" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert _snapshot(project) == before

    # The same output dir without the overlap: the user's config.yaml is still not overwritten.
    elsewhere = tmp_path / "web.jsonl"
    elsewhere.write_bytes(_docs(5))
    with pytest.raises(InputError, match=r"project: holds config.yaml, which lmfleet did not write"):
        run(load_run(config, [f"stages.data.sources.0.paths=[{elsewhere}]", f"output_dir={project}"]))
    assert _snapshot(project) == before


def test_foreign_stage_dirs_and_input_folders_around_the_run_are_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(_docs(5))
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("the user's own notes\n")
    config = write_config(tmp_path / "c.yaml", {"name": "r", "output_dir": str(out), "stages": {
        "data": _data_stage(corpus)}})
    with pytest.raises(InputError, match=r"stages.data: .*/out/data holds files lmfleet did not write"):
        run(load_run(config))
    assert (out / "data" / "notes.txt").read_text() == "the user's own notes\n"
    # An output dir inside an input folder: the run would read its own outputs back.
    with pytest.raises(InputError, match=r"output_dir .*/corpus/run is inside the input folder"):
        run(load_run(config, [f"output_dir={corpus / 'run'}"]))
    assert not (corpus / "run").exists()
    # Another run's dir is not this run's to rewrite.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lmfleet-run.json").write_text(json.dumps({"name": "other"}))
    with pytest.raises(InputError, match=r"holds run 'other', not 'r'"):
        run(load_run(config, [f"output_dir={tmp_path / 'other'}"]))


def test_an_output_dir_in_a_bucket_is_owned_as_a_folder_is(tmp_path, s3, monkeypatch):
    """output_dir=s3://...: objects lmfleet did not write, another run's prefix, inputs inside the run's
    prefix and a missing bucket are refused before any work; no object is deleted or overwritten."""
    env, bucket = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def put(key: str, data: bytes) -> None:
        with bucket.open_output_stream(f"lmfleet/owned/{key}", compression=None) as f:
            f.write(data)

    def read(key: str) -> bytes:
        with bucket.open_input_stream(f"lmfleet/owned/{key}", compression=None) as f:
            return f.read()

    put("corpus/a.jsonl", _docs(5))
    put("theirs/report.json", b"{}")
    put("mixed/.lmfleet-run.json", json.dumps({"name": "r"}).encode())
    put("mixed/data/notes.txt", b"the user's own notes\n")
    put("other/.lmfleet-run.json", json.dumps({"name": "other"}).encode())
    config = write_config(tmp_path / "c.yaml", {"name": "r", "stages": {
        "data": _data_stage("s3://lmfleet/owned/corpus/a.jsonl")}})
    cases = {
        "s3://lmfleet/owned/theirs": r"holds report.json, which lmfleet did not write",
        "s3://lmfleet/owned/mixed": r"stages.data: s3://lmfleet/owned/mixed/data holds files lmfleet did not write",
        "s3://lmfleet/owned/other": r"holds run 'other', not 'r'",
        "s3://lmfleet/owned": r"input s3://lmfleet/owned/corpus/a.jsonl is inside the run's output_dir",
        "s3://no-such-bucket/run": r"output_dir: s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist",
    }
    for out, message in cases.items():
        with pytest.raises(InputError, match=message):
            run(load_run(config, [f"output_dir={out}"]))
    assert read("theirs/report.json") == b"{}" and read("mixed/data/notes.txt") == b"the user's own notes\n"
    assert read("corpus/a.jsonl") == _docs(5)


def test_bad_output_dirs_and_missing_inputs_are_error_lines(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_docs(3))
    (tmp_path / "file").write_text("not a folder\n")
    cases = {
        "output_dir=file": "output_dir {}/file: exists and is not a folder",
        "output_dir=file/run": "output_dir {}/file/run: cannot create or write it",
        "stages.data.sources.0.paths=[missing.jsonl]": "input path 'missing.jsonl' does not exist",
        "stages.pretrain.data=/nowhere": "pretrain.data '/nowhere': no packed data at /nowhere/packed",
    }
    write_config(tmp_path / "c.yaml", {"name": "r", "stages": {"data": _data_stage("a.jsonl")}})
    for override, message in cases.items():
        extra = ["--set", "stages.pretrain=" + json.dumps(pretrain_stage("/nowhere"))] if "pretrain" in override \
            else []
        for command in ("validate", "run"):  # validate: the same checks, offline, without starting Ray
            proc = subprocess.run([*lmfleet_cmd(), command, "c.yaml", *extra, "--set", override],
                                  capture_output=True, text=True, cwd=tmp_path, timeout=120)
            assert proc.returncode == 2 and message.format(tmp_path) in proc.stderr, (override, proc.stderr)
            assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr


def test_links_that_lead_nowhere_are_named(tmp_path):
    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")
    with pytest.raises(InputError, match=r"loop.jsonl is a symbolic link loop"):
        expand_paths(SourceConfig(name="a", format="jsonl", paths=[str(tmp_path / "loop.jsonl")]))
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "ok.jsonl").write_bytes(_docs(1))
    (folder / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    with pytest.raises(InputError, match=r"d/gone.jsonl is a symbolic link to .*deleted.jsonl', which does not exist"):
        expand_paths(SourceConfig(name="a", format="jsonl", paths=[str(folder)]))
    (folder / "gone.jsonl").unlink()
    (folder / "loop.jsonl").symlink_to("loop.jsonl")
    with pytest.raises(InputError, match=r"d/loop.jsonl is a symbolic link loop"):
        expand_paths(SourceConfig(name="a", format="jsonl", paths=[str(folder)]))


def messy_folder(folder):
    """Good records beside one with a lone surrogate, three damaged gzip files and an empty file."""
    folder.mkdir()
    (folder / "good.jsonl").write_bytes(_docs(4) + b'{"text": "A lone surrogate \\ud800 in a document."}\n')
    whole = gzip.compress(_docs(40, start=100))
    (folder / "truncated.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    bad_crc = bytearray(gzip.compress(_docs(3, start=200)))
    bad_crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    (folder / "crc.jsonl.gz").write_bytes(bytes(bad_crc))
    (folder / "plain.jsonl.gz").write_bytes(_docs(2, start=300))  # not gzip at all
    (folder / "empty.jsonl").write_bytes(b"")
    return folder


def test_bad_records_and_damaged_files_are_quarantined_not_fatal(tmp_path, ray_local):
    folder = messy_folder(tmp_path / "in")
    config = write_config(tmp_path / "c.yaml", {"name": "messy", "output_dir": str(tmp_path / "run"), "stages": {
        "data": {**_data_stage(folder), "dedup": {"near": False}}}})
    report = run(load_run(config))["stages"]["data"]
    assert report["rejects"] == {"damaged_file": 3, "invalid_unicode": 1}
    assert report["files"] == 5 and report["empty_files"] == 1
    # Kept: the 4 good ones, the truncated file's records before the damage, and the bad-CRC file's (all
    # decompressed before the trailer); its trailer and the not-gzip file are the damaged_file rejects.
    truncated = report["valid_docs"] - 4 - 3
    assert 0 < truncated < 40
    rejects = {r["location"]: r for r in _rows(tmp_path / "run" / "data" / "rejects")}
    assert {os.path.basename(k) for k, r in rejects.items() if r["reject_reason"] == "damaged_file"} == {
        "truncated.jsonl.gz", "crc.jsonl.gz", "plain.jsonl.gz"}
    surrogate = next(r for r in rejects.values() if r["reject_reason"] == "invalid_unicode")
    assert surrogate["location"].endswith("good.jsonl:5") and "\\ud800" in surrogate["raw"]
    assert "documents read: " in report["summary"][0] and "(1 empty)" in report["summary"][0]


def _rows(parquet_dir) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(parquet_dir).to_pylist()


def test_sft_records_quarantine_bad_unicode_and_damaged_files(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    record = {"instruction": "Name a colour.", "output": "Blue."}
    lines = [json.dumps(record), json.dumps({**record, "output": "Bl\ud800ue."})]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    many = [json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))}) for i in range(1, 201)]
    whole = gzip.compress(("\n".join(many) + "\n").encode())
    (folder / "b.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    records = read_sft(DatasetConfig(paths=[str(folder)], format="alpaca", val_fraction=0.0), seed=1)
    counts = records.counts()
    assert counts["rejected_by_reason"] == {"damaged_file": 1, "invalid_unicode": 1}
    assert counts["read"] == counts["kept"] + 2 and 1 + 1 < counts["kept"] < 1 + 200  # the gzip's records before the cut
    records.write(tmp_path / "out")  # the quarantine file holds the bad record, escaped
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert "\\ud800" in next(r["raw"] for r in rejects if r["reason"] == "invalid_unicode")


def test_impossible_resource_requests_fail_before_the_stage(tmp_path, ray_local, packed):
    """The session's local Ray has 2 CPUs and no GPU: 4 workers x 1 CPU, or a GPU, can never be placed."""
    cases = {"scaling__num_workers": 4, "scaling__use_gpu": True}
    for key, value in cases.items():
        stage = pretrain_stage(packed, **{"scaling__cpus_per_worker": 1, key: value})
        config = write_config(tmp_path / "c.yaml", {"name": "big", "output_dir": str(tmp_path / "run"),
                                                    "stages": {"pretrain": stage}})
        with pytest.raises(UserError, match=r"stages.pretrain.scaling: .*cannot be placed on this Ray cluster "
                                            r"\(nodes: \{CPU: 2\}\); lower stages.pretrain.scaling.num_workers") as err:
            run(load_run(config))
        if key == "scaling__use_gpu":
            assert "use_gpu is True but no node has a GPU" in str(err.value)
        assert not (tmp_path / "run" / "pretrain").exists()  # checked before the stage started


def test_an_autoscaling_cluster_is_waited_for_within_a_bound(tmp_path, packed):
    """Ray's own autoscaler, 1-CPU head, one more 1-CPU node type: 2 workers x 1 CPU wait (logging what is
    pending) until it launched the node, then train; 4 workers never come, and fail when the wait runs out."""
    with ray_head(num_cpus=1, worker_types={"cpu1": {"resources": {"CPU": 1}, "max_workers": 1}}) as (address, *_):
        stage = pretrain_stage(packed, steps=2, scaling__num_workers=2, scaling__cpus_per_worker=1)
        config = write_config(tmp_path / "c.yaml", {"name": "grow", "output_dir": str(tmp_path / "run"),
                                                    "ray": {"address": address, "resource_wait_s": 120},
                                                    "stages": {"pretrain": stage}})
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        grown = subprocess.run([*lmfleet_cmd(), "run", str(config)], capture_output=True, text=True, env=env,
                               timeout=600)
        assert grown.returncode == 0, grown.stderr[-3000:]
        assert ("stages.pretrain: waiting for the autoscaler: 2 worker(s) x {CPU: 1} pending; nodes now: {CPU: 1}"
                in grown.stderr)
        assert "trained 2 steps (ddp, tp 1, pp 1, workers [2])" in grown.stdout

        too_big = subprocess.run([*lmfleet_cmd(), "run", str(config), "--set", "stages.pretrain.scaling.num_workers=4",
                                  "--set", "stages.pretrain.batch.micro_batch=1", "--set", "ray.resource_wait_s=3"],
                                 capture_output=True, text=True, env=env, timeout=600)
        assert too_big.returncode == 2, too_big.stderr[-3000:]
        assert ("error: stages.pretrain.scaling: 4 worker(s) x {CPU: 1} still pending after 3 s: the autoscaler has "
                "not provided them (nodes now: {CPU: 1}, {CPU: 1})") in too_big.stderr


def test_the_local_ray_listens_on_loopback_only(ray_local):
    """Every listening socket of the Ray processes lmfleet started (GCS, raylet, workers, agents, dashboard)."""
    sockets = []
    for proc in psutil.Process().children(recursive=True):
        try:
            sockets += [(proc.name(), c.laddr) for c in proc.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    assert len(sockets) >= 5
    assert all(addr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, addr in sockets), sockets

