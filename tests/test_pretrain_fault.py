"""Fault tolerance: SIGKILL a training worker mid-run; the run resumes from its last checkpoint and
reproduces the uninterrupted run exactly (losses and the sample ids of every step)."""

import json
import threading

from conftest import kill_a_worker_after, pretrain

STEPS = 40


def _by_step(path):
    """The last record of each step (steps between the checkpoint and the crash ran twice)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def test_sigkill_worker_resumes_exactly(packed, tmp_path):
    common = dict(steps=STEPS, parallel__strategy="ddp", scaling__num_workers=2, checkpoint__every=5,
                  log_samples=True, model__dropout=0.1)
    reference, _ = pretrain(tmp_path, packed, name="uninterrupted", **common)

    killed: list = []
    watcher = threading.Thread(target=kill_a_worker_after, args=(tmp_path / "faulty" / "metrics.jsonl", "step", 12, killed))
    watcher.start()
    steps, report = pretrain(tmp_path, packed, name="faulty", **common)
    watcher.join()
    assert killed, "the run finished before a worker could be killed"
    killed_at = killed[0][1]
    assert killed_at < STEPS

    samples = (tmp_path / "faulty" / "pretrain" / "samples.jsonl").read_text().splitlines()
    logged = [json.loads(x)["step"] for x in samples]
    assert len(logged) > STEPS and sorted(set(logged)) == list(range(1, STEPS + 1))  # some steps re-ran
    first_rerun = logged[[i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]][0]]
    assert first_rerun % 5 == 1 and first_rerun <= killed_at  # resumed right after a checkpoint

    ref_samples = _by_step(tmp_path / "uninterrupted" / "pretrain" / "samples.jsonl")
    got_samples = _by_step(tmp_path / "faulty" / "pretrain" / "samples.jsonl")
    assert all(got_samples[s]["samples"] == ref_samples[s]["samples"] for s in range(1, STEPS + 1))
    seen = [i for s in range(1, STEPS + 1) for i in got_samples[s]["samples"]]
    assert len(seen) == len(set(seen)) == STEPS * 8  # within one epoch: none seen twice, none skipped

    got = {s["step"]: s["loss"] for s in steps}
    want = {s["step"]: s["loss"] for s in reference}
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * want[step], (step, got[step], want[step])
    assert report["final_loss"] == got[STEPS]
