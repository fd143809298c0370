"""Curriculum learning: pacing and pools by hand, the batch plan's determinism and resume with a curriculum,
and pretraining runs that order samples by length and by a proxy model's loss."""

import json

import numpy as np
import pytest

from lmfleet.data.mixing import MixingSchedule
from lmfleet.errors import InputError
from lmfleet.train.config import CurriculumConfig
from lmfleet.train.curriculum import Curriculum, length_scores
from lmfleet.train.data import BatchPlan

from conftest import pretrain_stage, run_stages


def test_pacing_by_hand():
    linear = Curriculum(CurriculumConfig(start_fraction=0.2, steps=10), np.zeros(1), total_steps=100)
    assert [linear.fraction(s) for s in (0, 5, 9, 10, 50)] == pytest.approx([0.2, 0.6, 0.92, 1.0, 1.0])
    step = Curriculum(CurriculumConfig(start_fraction=0.2, steps=10, pacing="step", buckets=4), np.zeros(1), 100)
    assert [step.fraction(s) for s in (0, 2, 3, 5, 9, 10)] == pytest.approx([0.2, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert Curriculum(CurriculumConfig(), np.zeros(1), total_steps=100).steps == 50  # default: half the stage


def test_order_and_pool():
    scores = np.array([5.0, 1.0, 3.0, 1.0, 9.0, 2.0, 7.0, 4.0])
    c = Curriculum(CurriculumConfig(start_fraction=0.25, steps=4), scores, 8)
    assert c.ordered(np.arange(8)).tolist() == [1, 3, 5, 2, 7, 0, 6, 4]  # ties by index
    assert Curriculum(CurriculumConfig(order="hard_first"), scores, 8).ordered(np.arange(8)).tolist()[:2] == [4, 6]
    assert sorted(c.draw(c.ordered(np.arange(8)), 4, 0, seed=1).tolist()) == [1, 1, 3, 3]  # 2 in the pool at step 0
    assert set(c.draw(c.ordered(np.arange(8)), 8, 2, seed=1).tolist()) == {1, 3, 5, 2, 7}  # ceil(0.625 x 8)
    unscored = np.array([2.0, np.nan, 1.0, 3.0])  # column scores: NaN (no value) last in either order
    assert Curriculum(CurriculumConfig(), unscored, 8).ordered(np.arange(4)).tolist() == [2, 0, 3, 1]
    assert Curriculum(CurriculumConfig(order="hard_first"), unscored, 8).ordered(np.arange(4)).tolist() == [3, 0, 2, 1]


def test_length_scores():
    tokens = np.array([[5, 6, 0, 7, 0, 8], [5, 6, 7, 8, 9, 1]])
    positions = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
    assert length_scores(tokens, positions, pad=1).tolist() == [2.0, 5.0]  # 6 tokens / 3 documents; 5 / 1


def _plans(curriculum, schedule=None):
    ranges = {"a": [(0, 40)], "b": [(40, 100)]}
    return lambda: BatchPlan(ranges, 10, 3, schedule() if schedule else None, curriculum)


@pytest.mark.parametrize("mixing", [False, True])
def test_plan_with_a_curriculum_is_deterministic_and_resumes_exactly(mixing):
    scores = np.random.default_rng(0).random(100)
    curriculum = Curriculum(CurriculumConfig(start_fraction=0.1, steps=6), scores, 12)
    make = _plans(curriculum, (lambda: MixingSchedule({"a": 0.5, "b": 0.5})) if mixing else None)
    plan = make()
    want = [plan.next_batch(s).tolist() for s in range(12)]
    easiest = set(curriculum.ordered(np.arange(100))[:10].tolist())
    if not mixing:
        assert set(want[0]) <= easiest  # step 0: the easiest 10% only
    else:  # each source's own easiest 10%: the mixing weights hold
        assert set(want[0]) <= set(curriculum.ordered(np.arange(40))[:4]) | set(curriculum.ordered(np.arange(40, 100))[:6])
        assert sum(i < 40 for i in want[0]) == 5
    first = make()
    got = [first.next_batch(s).tolist() for s in range(7)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.next_batch(s).tolist() for s in range(7, 12)]
    assert got == want
    after = want[6:]  # the usual epoch walk from its start: no sample twice before an epoch ends
    assert len({i for b in after for i in b}) == 60


def test_pretraining_with_length_loss_and_column_curricula(packed, tmp_path):
    """A clm stage, then one ordered by its loss, one by length and one by the packed column `quality` (hardest
    first): their first steps draw from the first quarter of the samples by the scores they wrote."""
    stages = {
        "proxy": {"kind": "pretrain", **pretrain_stage(packed, steps=5, export=True)},
        "by_loss": {"kind": "pretrain", **pretrain_stage(packed, steps=8, log_samples=True,
                                                         curriculum={"score": "loss", "proxy": "proxy", "steps": 4})},
        "by_length": {"kind": "pretrain", **pretrain_stage(packed, steps=8, log_samples=True,
                                                           curriculum={"steps": 4, "pacing": "step", "buckets": 2})},
        "by_column": {"kind": "pretrain", **pretrain_stage(packed, steps=8, log_samples=True, curriculum={
            "score": "column:quality", "order": "hard_first", "steps": 4})},
    }
    report, out = run_stages(tmp_path, stages)
    index = json.loads((packed / "packed" / "index.json").read_text())
    quality = np.concatenate([np.load(packed / "packed" / s["columns"]["quality"])
                              for s in index["splits"]["train"]["shards"]])
    for name in ("by_loss", "by_length", "by_column"):
        scores = np.load(out / name / "curriculum" / "scores.npy")
        assert len(scores) == index["splits"]["train"]["num_samples"]
        first = int(np.ceil(0.25 * len(scores)))
        if name == "by_column":  # the packed column as it is; samples without a value (Shakespeare's) never first
            assert np.array_equal(scores, quality, equal_nan=True) and 0 < np.isnan(scores).sum() < len(scores) - first
            scored = np.flatnonzero(~np.isnan(scores))
            easiest = set(scored[np.argsort(-scores[scored], kind="stable")][:first].tolist())
            assert report["stages"][name]["curriculum"]["unscored_samples"] == np.isnan(scores).sum()
        else:
            easiest = set(np.argsort(scores, kind="stable")[:first].tolist())
        steps = [json.loads(x) for x in (out / name / "samples.jsonl").read_text().splitlines()]
        assert all(set(s["samples"]) <= easiest for s in steps if s["step"] == 1)
        assert not all(set(s["samples"]) <= easiest for s in steps if s["step"] == 8)  # every sample by then
        r = report["stages"][name]
        assert r["curriculum"]["steps"] == 4 and r["curriculum"]["summary"] in r["summary"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fractions = [x["curriculum_fraction"] for x in lines if x.get("stage") == "by_length" and "curriculum_fraction" in x]
    assert fractions == [0.25, 0.25, 0.625, 0.625]


def test_a_column_the_data_did_not_pack_is_an_input_error(packed, tmp_path):
    stages = {"p": {"kind": "pretrain", **pretrain_stage(packed, steps=2, curriculum={"score": "column:length"})}}
    with pytest.raises(InputError, match=r"curriculum.score 'column:length': the packed data at .* has no column "
                                         r"'length' \(it has \['quality'\]\): add it to the data stage's pack.columns"):
        run_stages(tmp_path, stages)
