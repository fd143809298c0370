"""Post-training stages end to end on a tiny model and the shared data, each on real Ray Train workers:
SFT (DDP / FSDP / DeepSpeed, PEFT), reward model, PPO, GRPO, RLOO, DPO and distillation."""

import json
import threading
import time

import pytest
import torch

from lmfleet.posttrain.models import load_causal_lm, load_tokenizer

from conftest import kill_a_train_worker, posttrain, registered_steps, shared

ALPACA = {"paths": [str(shared("alpaca_5000.json"))], "max_records": 320, "val_fraction": 0.1}


def hf(lr: float = 3e-3, micro_batch: int = 8, log_every: int = 1, **training) -> dict:
    """The settings of these tests' HF-Trainer stages: `training` keys (max_length 128), the learning rate,
    the micro-batch; a metrics record every step, no checkpoint before the end."""
    return {"training": {"max_length": 128, **training}, "optimizer": {"lr": lr},
            "batch": {"micro_batch": micro_batch}, "log_every": log_every, "checkpoint": {"every": 100}}


@pytest.fixture(scope="module")
def sft(tmp_path_factory, ray_local, base_lm):
    """SFT of the tiny model on Alpaca, 2 workers, DDP."""
    return posttrain(tmp_path_factory.mktemp("sft"), "sft", model=str(base_lm), dataset=ALPACA,
                     **hf(max_steps=30), scaling={"num_workers": 2, "cpus_per_worker": 1},
                     eval={"samples": 8, "generation": {"max_new_tokens": 16}})


@pytest.fixture(scope="module")
def reward(tmp_path_factory, sft):
    hh = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 192, "val_fraction": 0.1}
    return posttrain(tmp_path_factory.mktemp("reward"), "reward", model=str(sft[1] / "model"), dataset=hh,
                     **hf(lr=1e-3, epochs=4, max_length=160),
                     scaling={"num_workers": 2})


def test_sft_learns_answers(sft):
    report, out = sft
    data = report["data"]
    assert data["train"] + data["val"] + data["rejected_by_reason"].get("too_many_tokens", 0) == 320
    assert data["rejected_by_reason"].get("too_many_tokens", 0) < 10  # prompts over max_length: counted
    assert report["steps"] == 30
    # One step's loss each (noisy); the held-out perplexity below is the measure of learning.
    assert report["final_loss"] < report["first_loss"] - 0.5
    ev = report["eval"]
    assert ev["perplexity_after"] < 0.5 * ev["perplexity_before"]
    assert {"bleu", "rouge1", "rougeL"} <= set(ev)
    # model/ is a HF dir the next stage loads, with the chat template it was trained with.
    tok = load_tokenizer(out / "model")
    assert "{% generation %}" in tok.chat_template
    model = load_causal_lm(out / "model")
    assert model.config.num_hidden_layers == 2
    # Each worker's peak memory, measured from before it loaded the model: at least its fp32 weights,
    # gradients and two AdamW states (DDP: all of them on every worker).
    states = 4 * 4 * sum(p.numel() for p in model.parameters())
    memory = report["memory"]
    assert len(memory["peak_bytes_per_rank"]) == 2 and min(memory["peak_bytes_per_rank"]) > states, memory
    assert all(i <= p for i, p in zip(memory["init_bytes_per_rank"], memory["peak_bytes_per_rank"], strict=True))
    assert any(line.startswith("memory: peak") for line in report["summary"])


def test_sft_loss_only_on_completions(base_lm):
    """TRL's assistant mask from our chat template covers exactly the answer and its EOS."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(base_lm)
    record = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    trainer = SFTTrainer(model=load_causal_lm(base_lm), processing_class=tok,
                         train_dataset=datasets.Dataset.from_list([record]),
                         args=SFTConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[], assistant_only_loss=True,
                                        max_length=64))
    row = trainer.train_dataset[0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tok.decode(answer) == "Blue." + tok.eos_token
    assert tok.decode(row["input_ids"]).startswith("<|user|>\nName a colour.\n<|assistant|>\n")


def _sft_losses(tmp_path, base_lm, strategy: str) -> list[float]:
    _, out = posttrain(tmp_path, "sft", name=strategy, model=str(base_lm), dataset={**ALPACA, "max_records": 64},
                       **hf(max_steps=3), parallel={"strategy": strategy}, scaling={"num_workers": 2},
                       eval={"samples": 0})
    lines = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and "step" in x]


@pytest.fixture(scope="module")
def ddp_losses(tmp_path_factory, ray_local, base_lm):
    """The DDP run the other strategies are compared with (one for both)."""
    return _sft_losses(tmp_path_factory.mktemp("ddp"), base_lm, "ddp")


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sft_strategies_match_ddp(tmp_path, ddp_losses, base_lm, strategy):
    """FSDP2 and DeepSpeed ZeRO-2 on 2 workers give DDP's losses (same data, same init)."""
    assert len(ddp_losses) == 3
    assert _sft_losses(tmp_path, base_lm, strategy) == pytest.approx(ddp_losses, rel=2e-3)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "p_tuning"])
def test_peft_variants_train_and_reload(tmp_path, sft, method):
    """Each PEFT method fits 32 records of the SFT model (7 epochs of 4 batches: the last epoch's mean loss is
    below the first's); lora / ia3 export merged weights, prompt methods an adapter; both reload."""
    base = sft[1] / "model"
    # Step sizes these methods are used with: virtual tokens want large ones.
    lr = {"lora": 1e-2, "ia3": 1e-2, "prompt_tuning": 0.3, "p_tuning": 0.3}[method]
    report, out = posttrain(tmp_path, "sft", model=str(base), dataset={**ALPACA, "max_records": 32, "val_fraction": 0},
                            **hf(lr=lr, max_steps=28), lr_schedule={"decay": "constant"},
                            peft={"method": method, "r": 8, "num_virtual_tokens": 4},
                            scaling={"num_workers": 1}, eval={"samples": 0})
    lines = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x and "step" in x]
    assert len(losses) == 28
    # Each epoch sees all 32 records, so epoch means compare the objective itself. Virtual tokens move a
    # 2-layer model's loss little (measured: 5.855 -> 5.851 where LoRA gives 5.86 -> 5.59).
    margin = 0.02 if method in ("lora", "ia3") else 0.0
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - margin
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = method in ("lora", "ia3")
    assert (out / "model" / "adapter_config.json").exists() != merged
    tok = load_tokenizer(out / "model")
    ids = tok("Name a colour.", return_tensors="pt")
    with torch.no_grad():
        logits = load_causal_lm(out / "model")(**ids).logits
        base_logits = load_causal_lm(base)(**ids).logits
    assert not torch.allclose(logits[:, -1], base_logits[:, -1])  # the reloaded adapter changes the output


def test_reward_model_ranks_train_pairs(reward):
    report, out = reward
    assert report["data"]["train"] > 40
    assert report["data"]["rejected_by_reason"].get("too_many_tokens", 0) > 10  # counted, not silently dropped
    assert report["final_loss"] < report["first_loss"]
    assert report["eval"]["train"]["accuracy"] > 0.6


def test_reward_model_with_lora_exports_a_merged_classifier(tmp_path, sft):
    from lmfleet.posttrain.models import load_reward_model

    hh = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 64, "val_fraction": 0.1}
    report, out = posttrain(tmp_path, "reward", model=str(sft[1] / "model"), dataset=hh,
                            **hf(max_steps=4, max_length=160), peft={"method": "lora", "r": 4},
                            scaling={"num_workers": 1})
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "model" / "adapter_config.json").exists()
    model, tok = load_reward_model(out / "model")  # full weights with the trained one-score head
    assert model.score.weight.shape[0] == 1
    assert report["eval"]["train"]["pairs"] > 0


def test_ppo_raises_reward_within_kl_bound(tmp_path, sft, reward):
    report, out = posttrain(
        tmp_path, "ppo", model=str(sft[1] / "model"), reward_model=str(reward[1] / "model"),
        dataset={**ALPACA, "max_records": 256, "val_fraction": 0.25}, training={"max_length": 128},
        optimizer={"lr": 2e-4}, iterations=40, generation={"max_new_tokens": 16}, checkpoint={"every": 20}, scaling={"num_workers": 2},
        # Adaptive KL (a 64-sample horizon moves kl_coef up to 10% per rollout) holds the policy near 3 nats.
        ppo={"rollout_batch": 32, "mini_batch": 16, "epochs": 2, "kl_coef": 0.1, "kl_target": 3.0, "kl_horizon": 64},
        eval={"samples": 64},
    )
    ev = report["eval"]  # ~54 held-out prompts, one sampled answer per policy each
    assert ev["samples"] > 40
    # Reproducible since models are built after seeding (the reward model's score head was drawn from whatever
    # RNG state its Ray worker process had): policy 0.240 vs SFT 0.063, win rate 0.70, KL 2.0 in 3 runs.
    assert ev["policy_score"] > ev["reference_score"], ev
    assert ev["win_rate"] > 0.5, ev  # under the reward model, against the SFT policy's answers
    assert ev["kl"] < 10.0, ev  # a bound on the drift: ~3x the configured kl_target
    assert (out / "model" / "config.json").exists()
    # Colocated: each worker holds the policy's weights, gradients and two AdamW states, the reference (the
    # policy's size) and the reward model, all fp32 as saved, at its peak.
    size = lambda d: sum(f.stat().st_size for f in (d / "model").glob("*.safetensors"))  # noqa: E731
    assert min(report["memory"]["peak_bytes_per_rank"]) > 5 * size(sft[1]) + size(reward[1]), report["memory"]


def _kill_a_worker_once_checkpointed(storage, metrics, killed: list, every: int) -> None:
    """SIGKILL a Ray Train worker once the controller lists a checkpoint (Ray Train v2 registers a reported
    checkpoint when it next polls the workers; a kill before that loses it) and an iteration after it,
    but before the next checkpoint's, is logged: the resumed run re-runs at least that one. (Iterations
    take ~0.3 s: a kill once the next checkpoint is logged could let it register and hide the restart.)"""
    deadline = time.time() + 300
    while time.time() < deadline:
        if registered := registered_steps(None, storage=str(storage), prefix="iteration_"):
            saved = max(registered)
            logged = [json.loads(x).get("iteration", 0) for x in metrics.read_text().splitlines()]
            if saved < max(logged, default=0) < saved + every:
                killed.append(kill_a_train_worker())
                return
        time.sleep(0.05)


# A verifiable reward the SFT model earns on ~1 in 3 held-out prompts: its answer contains "the".
THE = [{"function": "lmfleet.posttrain.rewards:contains", "args": {"text": "the"}}]
GROUP_RL = {"rollout_batch": 8, "mini_batch": 16, "num_generations": 4}


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_rl_raises_a_verifiable_reward(tmp_path, sft, kind):
    """GRPO and RLOO with a reward function only (no reward model), 2 workers: the held-out prompts'
    answers earn it far more often than the SFT model's."""
    report, out = posttrain(
        tmp_path, kind, model=str(sft[1] / "model"), reward_functions=THE,
        dataset={**ALPACA, "max_records": 256, "val_fraction": 0.25}, training={"max_length": 128},
        optimizer={"lr": 1e-3}, iterations=15, generation={"max_new_tokens": 16}, checkpoint={"every": 15}, scaling={"num_workers": 2},
        eval={"samples": 64}, **{kind: GROUP_RL})
    ev = report["eval"]  # ~54 held-out prompts, one sampled answer per policy each
    assert ev["samples"] > 40
    # Seen: GRPO 0.37 -> 1.00, RLOO 0.37 -> 0.91 (the reward is the part's mean: no reward model here).
    assert ev["policy_contains"] > ev["reference_contains"] + 0.3, ev
    assert ev["policy_score"] == ev["policy_contains"] and "policy_reward_model" not in ev
    assert ev["win_rate"] > 0.6 and ev["kl"] > 0, ev
    assert report["final_score"] > report["first_score"], report
    logged = [json.loads(x) for x in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in logged if "iteration" in x] == list(range(1, 16))
    assert all(x["response_length"] <= 16 and "generation_seconds" in x for x in logged if "iteration" in x)
    assert (out / "model" / "config.json").exists()


def test_a_reward_function_that_fails_in_a_worker_is_a_clear_error(tmp_path, sft):
    """It passes the driver's dry run on reference answers, then raises on a sampled completion inside a
    Ray Train worker: the run stops with the function's error and the record, not a Ray traceback."""
    from lmfleet.errors import UserError

    rewards = tmp_path / "picky.py"
    rewards.write_text("def picky(prompt, completion, record):\n"
                       "    if completion != record['answer']:\n"
                       "        raise ValueError('not the answer')\n"
                       "    return 1.0\n")
    with pytest.raises(UserError, match=rf"reward function {rewards}:picky raised ValueError: not the answer "
                                        r"\(record data/train.jsonl:\d+ \(iteration 1, worker \d\)\)"):
        posttrain(tmp_path, "grpo", model=str(sft[1] / "model"), reward_functions=[{"function": f"{rewards}:picky"}],
                  dataset={**ALPACA, "max_records": 32}, training={"max_length": 128}, checkpoint={"max_failures": 0},
                  iterations=2, generation={"max_new_tokens": 8}, scaling={"num_workers": 2}, eval={"samples": 0},
                  grpo={"rollout_batch": 2, "mini_batch": 4, "num_generations": 2})


def _rl_config(kind: str, sft, reward) -> dict:
    """A short RL run on 2 workers, checkpointed every 4 iterations (GRPO: 8). PPO adapts its KL coefficient
    (state that must survive a restart); GRPO adds a reward function to the reward model and the KL to its loss."""
    common = dict(model=str(sft[1] / "model"), reward_model=str(reward[1] / "model"),
                  dataset={**ALPACA, "max_records": 64}, training={"max_length": 128}, optimizer={"lr": 1e-3},
                  generation={"max_new_tokens": 8}, checkpoint={"every": 4},
                  # half a CPU each: the split run's actor takes the session cluster's other CPU
                  scaling={"num_workers": 2, "cpus_per_worker": 0.5}, eval={"samples": 0})
    if kind == "ppo":
        return {**common, "iterations": 30, "ppo": {"rollout_batch": 8, "mini_batch": 4, "kl_target": 0.5,
                                                 "kl_horizon": 100}}
    # GRPO's iterations are shorter (0.1-0.3 s): a checkpoint every 8 leaves the controller (it registers a
    # checkpoint at its next poll, every 0.5 s here) time to register one before the next is reported; every 4
    # at 0.1 s raced it (the kill never came).
    return {**common, "iterations": 20, "checkpoint": {"every": 8},
            "grpo": {"rollout_batch": 4, "mini_batch": 8, "num_generations": 2, "kl_coef": 0.05},
            "reward_functions": THE}


def _by_iteration(run_dir) -> tuple[list[int], dict[int, dict]]:
    """The iterations a run logged, in order (a restarted run logs some twice), and the last record of each."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [x for x in lines if "iteration" in x]
    return [x["iteration"] for x in records], {x["iteration"]: x for x in records}


@pytest.fixture(scope="module")
def grpo_colocated(tmp_path_factory, sft, reward):
    """The GRPO run every model in the training workers, uninterrupted: what the split placement and a run
    whose worker dies must reproduce."""
    tmp = tmp_path_factory.mktemp("grpo")
    posttrain(tmp, "grpo", name="colocated", **_rl_config("grpo", sft, reward))
    return _by_iteration(tmp / "colocated")[1]


def test_split_placement_matches_colocated(tmp_path, sft, reward, grpo_colocated, ray_local):
    """placement split (reference, reward model and reward function in a Ray actor of their own, which both
    workers send their batches to) gives the same rollout rewards, KL and losses as every model in the
    training workers, iteration by iteration."""
    from ray.util.state import list_actors

    posttrain(tmp_path, "grpo", name="split", placement="split", split={"actors": 1, "cpus_per_actor": 1},
              **_rl_config("grpo", sft, reward))
    actors = list_actors(filters=[("class_name", "=", "FrozenModels")], detail=True)
    assert any(a.name.startswith("grpo_frozen_0") and a.state == "DEAD" for a in actors)  # ran, then was stopped
    order, split = _by_iteration(tmp_path / "split")
    assert order == list(range(1, 21))
    for i, a in grpo_colocated.items():
        for key in ("score", "kl", "loss", "reward/reward_model", "reward/contains", "clipfrac"):
            assert a[key] == split[i][key], (i, key, a[key], split[i][key])


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_rl_resumes_exactly_after_a_worker_dies(tmp_path, sft, reward, grpo_colocated, kind):
    """SIGKILL a worker once a checkpoint is registered: Ray Train restarts the group from the latest
    checkpoint and the run reproduces the uninterrupted one (same rollout scores, KL and KL coefficient at
    every iteration)."""
    config = _rl_config(kind, sft, reward)
    every = config["checkpoint"]["every"]
    if kind == "ppo":
        posttrain(tmp_path, kind, name="uninterrupted", **config)
        want = _by_iteration(tmp_path / "uninterrupted")[1]
    else:
        want = grpo_colocated
    killed: list = []
    watcher = threading.Thread(target=_kill_a_worker_once_checkpointed,
                               args=(tmp_path / "faulty" / kind / "ray", tmp_path / "faulty" / "metrics.jsonl", killed, every))
    watcher.start()
    posttrain(tmp_path, kind, name="faulty", **config)
    watcher.join()
    assert killed, "no checkpoint was registered before the run finished"
    order, got = _by_iteration(tmp_path / "faulty")
    iterations = config["iterations"]
    restart = next(i for i in range(1, len(order)) if order[i] <= order[i - 1])
    resumed_at = order[restart]
    assert resumed_at > 1 and (resumed_at - 1) % every == 0, order  # right after a checkpoint, not from scratch
    assert order[restart:] == list(range(resumed_at, iterations + 1))
    for i in range(1, iterations + 1):
        assert got[i]["score"] == pytest.approx(want[i]["score"], abs=1e-5), i
        assert got[i]["kl"] == pytest.approx(want[i]["kl"], abs=1e-5), i
        if kind == "ppo":  # the adaptive KL controller's state came back with the checkpoint
            assert got[i]["kl_coef"] == pytest.approx(want[i]["kl_coef"], rel=1e-6), i
    if kind == "ppo":
        assert len({round(want[i]["kl_coef"], 8) for i in want}) > 2  # it did adapt


def test_dpo_widens_the_preference_margin(tmp_path, sft):
    pairs = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 64, "val_fraction": 0.0}
    report, _ = posttrain(tmp_path, "dpo", model=str(sft[1] / "model"), dataset=pairs,
                          **hf(lr=1e-3, micro_batch=4, max_steps=8),
                          scaling={"num_workers": 2})
    assert report["eval"]["margin_after"] > report["eval"]["margin_before"] + 1.0


def test_distillation_student_approaches_teacher(tmp_path, sft):
    report, out = posttrain(tmp_path, "distill", model=str(sft[1] / "model"), dataset=ALPACA,
                            student={"n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
                            **hf(max_steps=20), scaling={"num_workers": 2},
                            temperature=2.0, alpha=0.5)
    assert report["final_kl"] < 0.7 * report["first_kl"]
    assert report["eval"]["student_params"] < report["eval"]["teacher_params"] / 2


HH = {"paths": [str(shared("hh_rlhf_harmless_base_test.jsonl.gz"))], "max_records": 64, "val_fraction": 0.0}
PREF_TRAIN = hf(lr=1e-3, micro_batch=4, log_every=4, max_steps=12)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_offline_preference_methods_learn_the_pairs(tmp_path, sft, kind):
    """ORPO and SimPO (TRL's experimental trainers) on HH pairs, 2 workers: the loss falls and the chosen
    answers gain log-probability over the rejected ones (on the training pairs). KTO: the test below."""
    report, out = posttrain(tmp_path, kind, model=str(sft[1] / "model"), dataset=HH, **PREF_TRAIN,
                            scaling={"num_workers": 2})
    data = report["data"]  # 64 valid pairs sampled; those whose prompt fills max_length are quarantined
    assert data["kept"] + data["rejected_by_reason"].get("too_many_tokens", 0) == 64
    assert report["steps"] == 12
    assert report["final_loss"] < report["first_loss"], report
    assert report["eval"]["margin_after"] > report["eval"]["margin_before"], report["eval"]
    assert (out / "model" / "config.json").exists()


def test_kto_on_unpaired_records_with_exact_quarantine(tmp_path, sft):
    """KTO on unpaired {prompt, completion, label} records made from HH pairs, some broken: each broken one is
    counted by reason; the loss falls and desirable answers gain log-probability over undesirable ones."""
    import gzip

    with gzip.open(shared("hh_rlhf_harmless_base_test.jsonl.gz"), "rt") as f:
        pairs = [json.loads(next(f)) for _ in range(40)]
    lines = []
    for p in pairs:
        for key, label in (("chosen", True), ("rejected", False)):
            prompt, _, answer = p[key].rpartition("\n\nAssistant:")
            lines.append(json.dumps({"prompt": prompt.replace("\n\nHuman:", "").strip(), "completion": answer.strip(),
                                     "label": label}))
    bad = ['{"prompt": "hi", "completion": "yo", "label": "yes"}',  # bad_type
           '{"prompt": "hi", "label": true}',  # missing_field
           'not json',  # invalid_json
           '{"prompt": "hi", "completion": "  ", "label": false}']  # empty
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(lines[:30] + bad + lines[30:]) + "\n")
    report, _ = posttrain(tmp_path, "kto", model=str(sft[1] / "model"),
                          dataset={"paths": [str(path)], "format": "unpaired", "val_fraction": 0.0},
                          **PREF_TRAIN, scaling={"num_workers": 2})
    data = report["data"]
    assert data["read"] == 84
    too_long = data["rejected_by_reason"].pop("too_many_tokens", 0)
    assert data["rejected_by_reason"] == {"bad_type": 1, "empty": 1, "invalid_json": 1, "missing_field": 1}
    assert data["kept"] + too_long == 80
    assert report["steps"] == 12
    assert report["final_loss"] < report["first_loss"], report
    assert report["eval"]["margin_after"] > report["eval"]["margin_before"], report["eval"]


def test_sft_early_stopping_exports_the_best_checkpoint(tmp_path, sft):
    """At lr 0.05 the SFT model's held-out loss rises after its first evaluation (step 2): with patience 1 the
    HF Trainer stops at step 4 and loads step 2's checkpoint back, which is the exported model (= a 2-step run)."""
    def run(name, steps, **over):
        return posttrain(tmp_path, "sft", name=name, model=str(sft[1] / "model"), dataset={**ALPACA, "max_records": 96},
                         **{**hf(lr=0.05, max_steps=steps), "checkpoint": {"every": 2}},  # evaluated at checkpoints
                         lr_schedule={"decay": "constant"}, scaling={"num_workers": 2}, eval={"samples": 0}, **over)

    report, out = run("stopped", 20, early_stopping={"patience": 1})
    es = report["early_stopping"]
    assert (es["stopped_at"], es["best_step"], es["metric"]) == (4, 2, "val_loss"), es
    evals = [json.loads(x) for x in (out.parent / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in evals if "eval_loss" in x and x.get("stage") == "sft"]
    assert [x["step"] for x in evals] == [2, 4] and evals[1]["eval_loss"] > evals[0]["eval_loss"]
    assert "stopped at step 4 of 20: val_loss did not improve" in "\n".join(report["summary"])

    _, two = run("two", 2)
    got, want = load_causal_lm(out / "model").state_dict(), load_causal_lm(two / "model").state_dict()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
