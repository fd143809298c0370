"""Fault tolerance: SIGKILL a training worker in the middle of a checkpoint (written to storage, not
yet registered by Ray Train); the run resumes from the previous checkpoint and reproduces the
uninterrupted run exactly (losses and the sample ids of every step)."""

import json
import threading
import time

from conftest import kill_a_train_worker, pretrain, registered_steps

STEPS = 40


def _by_step(path):
    """The last record of each step (steps between the checkpoint and the crash ran twice)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def _kill_while_a_checkpoint_is_pending(run, seen: dict) -> None:
    """SIGKILL a worker once a checkpoint dir is in storage but newer than every registered one (Ray Train
    registers a checkpoint when all ranks reported it, on the controller's next poll)."""
    storage = run / "pretrain" / "ray" / "train"
    deadline = time.time() + 300
    while time.time() < deadline:
        registered = registered_steps(run)
        written = [int(d.name.removeprefix("step_")) for d in storage.glob("step_*")]
        pending = [s for s in written if registered and s > max(registered)]
        if pending:
            seen.update(registered=max(registered), pending=max(pending), pid=kill_a_train_worker())
            return
        time.sleep(0.005)


def test_sigkill_mid_checkpoint_resumes_exactly(packed, tmp_path):
    common = dict(steps=STEPS, parallel__strategy="ddp", scaling__num_workers=2, checkpoint__every=5,
                  log_samples=True, model__dropout=0.1)
    reference, _ = pretrain(tmp_path, packed, name="uninterrupted", **common)

    seen: dict = {}
    watcher = threading.Thread(target=_kill_while_a_checkpoint_is_pending, args=(tmp_path / "faulty", seen))
    watcher.start()
    steps, report = pretrain(tmp_path, packed, name="faulty", **common)
    watcher.join()
    assert seen, "no checkpoint was caught between its upload and its registration"

    samples = (tmp_path / "faulty" / "pretrain" / "samples.jsonl").read_text().splitlines()
    logged = [json.loads(x)["step"] for x in samples]
    assert len(logged) > STEPS and sorted(set(logged)) == list(range(1, STEPS + 1))  # some steps re-ran
    first_rerun = logged[[i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]][0]]
    # From the last registered checkpoint: the one being written when the worker died is never loaded.
    assert first_rerun == seen["registered"] + 1 and seen["pending"] > seen["registered"], seen

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
