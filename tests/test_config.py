"""Config loading and the CLI's handling of user mistakes: clear messages, no tracebacks."""

import subprocess
from pathlib import Path

import pytest

from lmfleet.errors import ConfigError
from lmfleet.runner import load_run

from conftest import lmfleet_cmd, write_config

GOOD = {
    "name": "t",
    "stages": {"data": {"sources": [{"name": "a", "format": "jsonl", "paths": ["x.jsonl"]}]}},
}


def _with(**data_overrides):
    cfg = {"name": "t", "stages": {"data": {"sources": [{"name": "a", "format": "jsonl", "paths": ["x.jsonl"]}]}}}
    cfg["stages"]["data"].update(data_overrides)
    return cfg


def test_valid_config_fills_defaults(tmp_path):
    loaded = load_run(write_config(tmp_path / "c.yaml", GOOD))
    (spec,) = loaded.stages
    assert spec.kind == "data" and spec.config.dedup.num_perm == 128
    assert loaded.config.run_dir == Path("runs/t").resolve()
    assert loaded.resolved()["stages"]["data"]["dedup"]["threshold"] == 0.8


def test_unknown_key_names_file_and_path(tmp_path):
    path = write_config(tmp_path / "c.yaml", _with(dedup={"treshold": 0.5}))
    with pytest.raises(ConfigError) as err:
        load_run(path)
    msg = str(err.value)
    assert str(path) in msg and "stages.data.dedup.treshold" in msg and "unknown key" in msg


def test_wrong_type_and_range_name_value_and_expectation(tmp_path):
    path = write_config(tmp_path / "c.yaml", _with(dedup={"num_perm": "many", "threshold": 1.5}))
    with pytest.raises(ConfigError) as err:
        load_run(path)
    msg = str(err.value)
    assert "stages.data.dedup.num_perm: got 'many'" in msg and "integer" in msg
    assert "stages.data.dedup.threshold: got 1.5" in msg and "less than 1" in msg
    with pytest.raises(ConfigError, match=r"stages\.data\.dedup\.verify: got 'maybe'.*'exact', 'estimate' or 'none'"):
        load_run(write_config(tmp_path / "v.yaml", _with(dedup={"verify": "maybe"})))


def test_dedup_verify_modes_and_the_old_booleans(tmp_path):
    for given, mode in ((True, "exact"), (False, "none"), ("estimate", "estimate"), (None, "exact")):
        dedup = {} if given is None else {"verify": given}
        path = write_config(tmp_path / "c.yaml", _with(dedup=dedup))
        assert load_run(path).stages[0].config.dedup.verify == mode


def test_cross_field_checks(tmp_path):
    path = write_config(tmp_path / "c.yaml", _with(mixing={"weights": {"nope": 1.0}}))
    with pytest.raises(ConfigError, match=r"stages.data: mixing.weights: unknown sources \['nope'\]"):
        load_run(path)
    path = write_config(tmp_path / "c.yaml", _with(dedup={"bands": [20, 10]}))
    with pytest.raises(ConfigError, match=r"stages.data.dedup: bands \(20, 10\): need b, r >= 1 and b\*r <= num_perm"):
        load_run(path)


def test_pack_columns_are_field_names(tmp_path):
    path = write_config(tmp_path / "c.yaml", _with(pack={"columns": ["quality", "../x", "tokens"]}))
    with pytest.raises(ConfigError, match=r"stages.data.pack.columns: .*\['../x', 'tokens'\]: a column is a top-level "
                                          "field name"):
        load_run(path)
    path = write_config(tmp_path / "c.yaml", _with(pack={"columns": ["q", "q"]}))
    with pytest.raises(ConfigError, match="a column is named twice"):
        load_run(path)


def test_stage_names_are_folder_names(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"name": "t", "stages": {"/data": {"kind": "data"}}})
    with pytest.raises(ConfigError, match="stage name '/data'"):
        load_run(path)
    path = write_config(tmp_path / "c.yaml", {"name": "t", "stages": {"x": {"kind": ["data"]}}})
    with pytest.raises(ConfigError, match="unknown stage kind"):
        load_run(path)


def test_unknown_stage_kind(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"name": "t", "stages": {"pretrian": {}}})
    with pytest.raises(ConfigError, match=r"stages.pretrian: unknown stage kind 'pretrian'"):
        load_run(path)


def test_set_overrides_parse_yaml_values(tmp_path):
    path = write_config(tmp_path / "c.yaml", GOOD)
    loaded = load_run(path, ["stages.data.dedup.threshold=0.7", "stages.data.sources.0.name=b", "seed=7",
                             "stages.data.dedup.bands=[16, 8]"])
    cfg = loaded.stages[0].config
    assert cfg.dedup.threshold == 0.7 and cfg.sources[0].name == "b" and cfg.dedup.bands == (16, 8)
    assert loaded.config.seed == 7
    with pytest.raises(ConfigError, match="not a list index"):
        load_run(path, ["stages.data.sources.x.name=b"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_run(path, ["seed"])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run(tmp_path / "missing.yaml")


def test_cli_validate_reports_errors_without_traceback(tmp_path):
    path = write_config(tmp_path / "c.yaml", _with(dedup={"num_perm": -3}))
    proc = subprocess.run([*lmfleet_cmd(), "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "stages.data.dedup.num_perm: got -3" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout

    # validate also checks the inputs (x.jsonl, relative to where it runs) and the output dir
    ok = subprocess.run([*lmfleet_cmd(), "validate", str(write_config(tmp_path / "ok.yaml", GOOD))],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 2 and "input path 'x.jsonl' does not exist" in ok.stderr
    (tmp_path / "x.jsonl").write_text('{"text": "a document"}\n')
    ok = subprocess.run([*lmfleet_cmd(), "validate", "ok.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "ok" in ok.stdout


def test_cli_run_missing_input_fails_before_work(tmp_path):
    cfg = {"name": "t", "output_dir": str(tmp_path / "run"),
           "stages": {"data": {"sources": [{"name": "a", "format": "jsonl", "paths": [str(tmp_path / "nope.jsonl")]}]}}}
    proc = subprocess.run([*lmfleet_cmd(), "run", str(write_config(tmp_path / "c.yaml", cfg))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "input path" in proc.stderr and "nope.jsonl" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr  # failed before any work


def _stage(tmp_path, stage: dict):
    cfg = {"name": "v", "output_dir": str(tmp_path / "out"), "stages": {"s": stage}}
    (spec,) = load_run(write_config(tmp_path / "c.yaml", cfg)).stages
    return spec.config


SFT = {"kind": "sft", "model": "m", "dataset": {"format": "python_functions"}}
GRPO = {"kind": "grpo", "model": "m", "reward_model": "rm", "dataset": {"format": "python_functions"}}


def test_post_training_speaks_pretrainings_vocabulary(tmp_path):
    """optimizer / lr_schedule / batch / parallel / checkpoint / log_every mean in the HF-Trainer stages
    what they mean in pretraining, and reach the HF Trainer's arguments."""
    from lmfleet.posttrain.hf import training_args

    cfg = _stage(tmp_path, {**SFT, "optimizer": {"lr": 2e-4, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                 "grad_clip": None},
                            "lr_schedule": {"decay": "cosine", "warmup_steps": 5}, "log_every": 3,
                            "batch": {"micro_batch": 4, "global_batch": 32}, "scaling": {"num_workers": 2},
                            "parallel": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}},
                            "checkpoint": {"every": 20, "keep_last": 3, "max_failures": 1}})
    args = training_args(cfg, "/tmp/x", seed=7, use_gpu=False, has_eval=True, tty=False)
    assert (args["learning_rate"], args["adam_beta2"], args["weight_decay"], args["max_grad_norm"]) == (2e-4, 0.95,
                                                                                                       0.1, 0.0)
    assert (args["lr_scheduler_type"], args["warmup_steps"], args["logging_steps"]) == ("cosine", 5, 3)
    # 32 records per optimizer step = 4 per forward pass x 2 workers x 4 accumulated
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (4, 4)
    assert (args["save_steps"], args["eval_steps"], args["save_total_limit"]) == (20, 20, 3)
    assert args["deepspeed"]["zero_optimization"]["stage"] == 3
    assert "load_best_model_at_end" not in args
    stopping = _stage(tmp_path, {**SFT, "kind": "reward", "early_stopping": {"metric": "eval_accuracy"}})
    args = training_args(stopping, "/tmp/x", 7, False, True, False)
    assert (args["load_best_model_at_end"], args["metric_for_best_model"], args["greater_is_better"]) == (
        True, "eval_accuracy", True)
    constant = _stage(tmp_path, {**SFT, "lr_schedule": {"decay": "constant"}})
    assert training_args(constant, "/tmp/x", 7, False, False, False)["lr_scheduler_type"] == "constant_with_warmup"
    rl = _stage(tmp_path, {**GRPO, "optimizer": {"lr": 3e-5}, "checkpoint": {"every": 4}})
    assert (rl.optimizer.lr, rl.checkpoint.every, rl.checkpoint.keep_last) == (3e-5, 4, 2)
    assert _stage(tmp_path, GRPO).optimizer.lr == 1e-5 and _stage(tmp_path, SFT).optimizer.lr == 1e-4


@pytest.mark.parametrize("stage, message", [
    ({**SFT, "training": {"save_steps": 10, "learning_rate": 1e-3}},
     r"renamed keys \(one vocabulary with pretraining\): training.learning_rate -> optimizer.lr, "
     r"training.save_steps -> checkpoint.every"),
    ({**SFT, "training": {"per_device_batch": 8, "strategy": "fsdp"}},
     "training.strategy -> parallel.strategy, training.per_device_batch -> batch.micro_batch"),
    ({**GRPO, "checkpoint_every": 5}, "checkpoint_every -> checkpoint.every"),
    ({**GRPO, "training": {"logging_steps": 5}}, r"stages\.s\.training\.logging_steps: unknown key"),  # no log_every
    ({**GRPO, "batch": {"micro_batch": 4}}, r"stages\.s\.batch: unknown key"),  # the RL stages have no such key
    ({**GRPO, "parallel": {"strategy": "fsdp"}}, r"stages\.s\.parallel: unknown key"),
    ({**GRPO, "eval": {"generation": {"top_k": 5}}}, r"stages\.s\.eval\.generation: unknown key"),  # generation:
    ({**SFT, "kind": "reward", "eval": {"samples": 4}}, r"stages\.s\.eval: unknown key"),  # no generating eval
    ({**SFT, "batch": {"micro_batch": 4, "global_batch": 12}, "scaling": {"num_workers": 2}},
     "batch.global_batch 12 is not divisible by micro_batch 4 x 2 worker"),
    ({**SFT, "early_stopping": {"metric": "loss"}}, "early_stopping.metric 'loss': val_loss or an evaluation metric"),
    ({**SFT, "early_stopping": {}, "dataset": {**SFT["dataset"], "val_fraction": 0}}, "needs held-out records"),
    ({**GRPO, "early_stopping": {}}, r"stages\.s\.early_stopping: unknown key"),  # RL evaluates after training
])
def test_post_training_config_errors_name_the_key(tmp_path, stage, message):
    with pytest.raises(ConfigError, match=message):
        _stage(tmp_path, stage)


def test_each_post_training_kind_is_one_config_and_one_stage_class():
    """The registry's config model of a post-training kind is its stage class's CONFIG, whose KIND is the
    kind (registered once: lmfleet.stages)."""
    from lmfleet.posttrain.stage import PostTrainStage
    from lmfleet.stages import _REGISTRY, _load

    kinds = {k for k, e in _REGISTRY.items() if e.run.startswith("lmfleet.posttrain.")}
    assert kinds == {"sft", "reward", "dpo", "kto", "orpo", "simpo", "distill", "ppo", "grpo", "rloo"}
    for kind in kinds:
        stage = _load(_REGISTRY[kind].run).__self__
        assert issubclass(stage, PostTrainStage)
        assert stage.CONFIG is _load(_REGISTRY[kind].config) and stage.CONFIG.KIND == kind
