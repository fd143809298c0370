"""The report's and the trackers' pure parts, on hand-made records (the pages and tracker runs of real runs
are tested in test_tracking, test_cli, test_tune and test_shared_nothing)."""

import math

from lmfleet.report.load import _own_records
from lmfleet.report.markup import esc, table
from lmfleet.report.plots import Panel, auto_panels
from lmfleet.runlog import JsonlTail
from lmfleet.tracking import values_of


def test_auto_panels_pair_held_out_keys_and_group_families():
    records = [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-3, "rewards/chosen": 0.1, "rewards/rejected": -0.1,
         "min_reward": 0.0, "mean_reward": 0.5, "max_reward": 1.0, "mean_token_accuracy": 0.2, "epoch": 0.1,
         "note": "text", "flag": True},
        {"step": 2, "eval_loss": 1.9, "eval_rewards/chosen": 0.2, "eval_mean_token_accuracy": 0.25,
         "eval_runtime": 0.5},
    ]
    panels = auto_panels(records, "step", [Panel("loss", ["loss", "eval_loss"])], {"epoch", "eval_runtime"})
    logged = {k for r in records for k in r}
    assert [(p.title, p.expand(logged)) for p in panels] == [
        ("loss", ["loss", "eval_loss"]),
        ("learning rate", ["learning_rate", "eval_learning_rate"]),
        ("rewards", ["rewards/chosen", "rewards/rejected", "eval_rewards/chosen"]),
        ("reward (min, mean, max)", ["mean_reward", "min_reward", "max_reward", "eval_mean_reward",
                                     "eval_min_reward", "eval_max_reward"]),
        # a mean without its min / max is a series of its own
        ("mean token accuracy", ["mean_token_accuracy", "eval_mean_token_accuracy"]),
    ]


def test_a_stages_records_are_those_of_its_last_run():
    records = [{"stage": "sft", "time": 10.0, "step": 1}, {"stage": "sft", "time": 20.0, "step": 1},
               {"stage": "dpo", "time": 21.0, "step": 1}, {"stage": "sft", "time": 25.0, "step": 2},
               {"stage": "sft", "time": 40.0, "step": 1}]
    assert _own_records(records, "sft", {"started": 19.0, "finished": 30.0}) == records[1:2] + records[3:4]
    assert _own_records(records, "sft", {"started": 35.0}) == records[4:]  # still running (or failed)


def test_tracker_values_of_a_record():
    assert values_of({"time": 5.0, "stage": "data", "phase": "read", "seconds": 1.5}) == (0, {"seconds/read": 1.5})
    step, values = values_of({"time": 5.0, "stage": "pretrain", "step": 7, "loss": 2.5, "mfu": None,
                              "grad_norm": math.nan, "note": "x", "ok": True, "attempt": 3,
                              "eval": {"accuracy": 0.75}, "memory_per_rank": [1, 2]})
    assert (step, values) == (7, {"loss": 2.5, "eval.accuracy": 0.75})
    assert values_of({"stage": "grpo", "iteration": 3, "score": 1.0}) == (3, {"score": 1.0})


def test_the_page_escapes_what_it_shows():
    assert esc('<script>"x"</script>') == "&lt;script&gt;&quot;x&quot;&lt;/script&gt;"
    assert table([["<b>", 1234567, 0.000123]], ["a&b", "n", "x"]) == (
        '<table class=""><tr><th>a&amp;b</th><th>n</th><th>x</th></tr>'
        "<tr><td>&lt;b&gt;</td><td>1,234,567</td><td>0.000123</td></tr></table>")


def test_a_jsonl_tail_reads_whole_new_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    tail, everything = JsonlTail(path), JsonlTail(path, from_start=True)
    with path.open("a") as f:
        f.write('{"step": 2}\n[1, 2]\nnot json\n{"step": 3')  # a list, a broken line, a line being written
    assert tail.read() == [{"step": 2}] and everything.read() == [{"step": 1}, {"step": 2}]
    with path.open("a") as f:
        f.write(', "loss": 1.5}\n')
    assert tail.read() == [{"step": 3, "loss": 1.5}] and tail.read() == []
    assert JsonlTail(tmp_path / "none.jsonl").read() == []
