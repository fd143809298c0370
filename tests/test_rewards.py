"""Reward functions of the RL stages (lmfleet.posttrain.rewards): resolving `module:function` and
`file.py:function`, the weighted sum, and the errors a user sees for a bad path, a function that
raises, or one that returns something that is not a finite number."""

import pytest

from lmfleet.errors import ConfigError
from lmfleet.posttrain.config import RewardFunctionConfig
from lmfleet.posttrain.rewards import RewardFunctionError, RewardFunctions, source_files
from lmfleet.runner import load_run

from conftest import write_config

PROMPT = [{"role": "user", "content": "2 + 2?"}]


def fns(*specs):
    return [RewardFunctionConfig(**s) for s in specs]


def test_builtins_and_weighted_sum():
    rf = RewardFunctions(fns(
        {"function": "lmfleet.posttrain.rewards:exact_match", "weight": 2.0},
        {"function": "lmfleet.posttrain.rewards:regex", "weight": 0.5, "args": {"pattern": r"^\d+$"}},
        {"function": "lmfleet.posttrain.rewards:contains", "args": {"text": "FOUR"}},
        {"function": "lmfleet.posttrain.rewards:length", "args": {"max_words": 2}},
    ))
    total, parts = rf.score(PROMPT, "4", {"answer": " 4 "}, "r1")
    assert parts == [1.0, 1.0, 0.0, 0.0] and total == 2.5
    total, parts = rf.score(PROMPT, "four is four wait", {"answer": "4"}, "r1")
    assert parts == [0.0, 0.0, 1.0, -1.0] and total == 0.0  # 4 words, 2 over a limit of 2: -2/2
    assert rf.names == ["exact_match", "regex", "contains", "length"]


def test_a_file_reward_function_runs_from_its_text(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def shouty(prompt, completion, record, bonus=1.0):\n    return bonus * completion.isupper()\n")
    cfgs = fns({"function": f"{path}:shouty", "args": {"bonus": 3.0}})
    sources = source_files(cfgs)
    path.unlink()  # a worker on another node has only the text the driver read
    rf = RewardFunctions(cfgs, sources)
    assert rf.score(PROMPT, "YES", {}, "r")[0] == 3.0
    assert rf.score(PROMPT, "yes", {}, "r")[0] == 0.0


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "is not `module:function`"),
    ("lmfleet.posttrain.rewards:", "is not `module:function`"),
    ("lmfleet.no_such_module:f", "cannot import module 'lmfleet.no_such_module'"),
    ("lmfleet.posttrain.rewards:no_such_fn", "has no 'no_such_fn'"),
    ("lmfleet.posttrain.rewards:DRY_RUN", "has no 'DRY_RUN'"),
    ("lmfleet.posttrain.rewards:math", "is a module, not a function"),
    ("/no/such/file.py:f", "cannot read '/no/such/file.py'"),
])
def test_bad_function_paths_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        RewardFunctions(fns({"function": spec}))
    assert "reward_functions[0].function" in str(err.value)


def test_a_file_that_fails_to_load(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def f(:\n")
    with pytest.raises(ConfigError, match=r"broken.py fails to load: SyntaxError"):
        RewardFunctions(fns({"function": f"{path}:f"}))


@pytest.mark.parametrize("body, message", [
    ("return record['missing']", r"raised KeyError: 'missing' \(record data/train.jsonl:7\)"),
    ("return 'high'", r"returned str 'high', not a number \(record data/train.jsonl:7\)"),
    ("return True", r"returned bool True, not a number"),
    ("return float('nan')", r"returned nan \(record data/train.jsonl:7\)"),
    ("return float('inf')", r"returned inf"),
])
def test_a_reward_function_that_fails_names_itself_and_the_record(tmp_path, body, message):
    path = tmp_path / "user.py"
    path.write_text(f"def bad(prompt, completion, record):\n    {body}\n")
    rf = RewardFunctions(fns({"function": f"{path}:bad"}))
    with pytest.raises(RewardFunctionError, match=message) as err:
        rf.score(PROMPT, "x", {"answer": "4"}, "data/train.jsonl:7")
    assert f"reward function {path}:bad" in str(err.value)


def test_rl_stage_configs(tmp_path):
    def load(stage):
        cfg = {"name": "r", "output_dir": str(tmp_path / "out"), "stages": {"s": stage}}
        return load_run(write_config(tmp_path / "c.yaml", cfg))

    base = {"kind": "grpo", "model": "m", "dataset": {"format": "python_functions"}}
    with pytest.raises(ConfigError, match="no reward: set reward_model, reward_functions, or both"):
        load(base)
    with pytest.raises(ConfigError, match=r"stages\.s\.grpo\.bogus"):
        load({**base, "reward_model": "rm", "grpo": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"stages\.s\.training\.epochs"):  # PPO/GRPO/RLOO use no epochs key
        load({**base, "reward_model": "rm", "training": {"epochs": 2}})
    with pytest.raises(ConfigError, match=r"mini_batch must divide the completions per iteration \(6 x 4\)"):
        load({**base, "reward_model": "rm", "grpo": {"rollout_batch": 6, "mini_batch": 5}})
    with pytest.raises(ConfigError, match="num_generations"):
        load({**base, "kind": "rloo", "reward_model": "rm", "rloo": {"num_generations": 1}})


def test_python_tests_reward_runs_the_completion_against_the_records_asserts():
    rf = RewardFunctions(fns({"function": "lmfleet.posttrain.rewards:python_tests", "args": {"timeout_s": 5}}))
    record = {"tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert rf.score(PROMPT, good, record, "r")[0] == 1.0
    assert rf.score(PROMPT, "def add(a, b):\n    return a - b", record, "r")[0] == 0.0  # an assert fails
    assert rf.score(PROMPT, "def add(a, b) return", record, "r")[0] == 0.0  # not Python
    slow = RewardFunctions(fns({"function": "lmfleet.posttrain.rewards:python_tests", "args": {"timeout_s": 0.5}}))
    assert slow.score(PROMPT, "while True:\n    pass", record, "r")[0] == 0.0  # killed at the timeout
