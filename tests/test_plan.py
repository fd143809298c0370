"""`lmfleet plan`: parameter counts against built models, per-rank memory against hand-computed numbers for
each strategy, and the command's output and errors. (Against measured peaks: benchmarks/plan_vs_measured.py.)"""

import json
import subprocess

import pytest

from lmfleet.model.config import ModelConfig
from lmfleet.model.transformer import Transformer
from lmfleet.train.config import PretrainConfig
from lmfleet.train.plan import plan_pretrain

from conftest import lmfleet_cmd, write_config

# 2 layers, d 64, 4 heads of 16 (2 kv heads), SwiGLU hidden 8 * ((8 * 64 // 3 + 7) // 8) = 176, vocab 512.
MODEL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32, "vocab_size": 512}
LAYER = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (176 * 64) + 2 * 64  # wq, wk + wv, wo, w1-w3, two norms: 46,208
EMBED = 512 * 64  # 32,768
HEAD = 64 + 512 * 64  # final norm, output
PARAMS = 2 * LAYER + EMBED + HEAD  # 158,016


def config(**parallel) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "data": "d", "model": MODEL, "batch": {"global_batch": 8, "micro_batch": 4},
        "scaling": {"num_workers": 2}, "parallel": parallel, "steps": 100})


@pytest.mark.parametrize("model", [
    {},
    {"tie_embeddings": True},
    {"positions": "learned", "norm": "layernorm", "activation": "gelu"},
    {"norm_placement": "post", "n_kv_heads": 1, "ffn_dim": 100, "activation": "relu"},
    {"attention": ["local", "global"], "sliding_window": 8, "n_layers": 3},
    {"moe": {"num_experts": 4, "top_k": 1, "every_n_layers": 2}, "n_layers": 4},
])
def test_parameter_counts_are_the_built_models(model):
    cfg = ModelConfig.model_validate({**MODEL, **model})
    built = Transformer(cfg)
    plan = plan_pretrain(PretrainConfig.model_validate({"data": "d", "model": cfg.model_dump()}), 512, 32)
    assert plan.params == sum(p.numel() for p in built.parameters())
    # The FLOPs count (as the training loop's MFU): parameters outside the input embedding, a tied output's too.
    # MoE: a token pays for its top_k experts of each MoE layer
    outside = sum(p.numel() for n, p in built.named_parameters() if not n.startswith("tok_embeddings"))
    experts = sum(p.numel() for n, p in built.named_parameters() if ".experts." in n)
    inactive = experts * (1 - cfg.moe.top_k / cfg.moe.num_experts) if cfg.moe else 0
    assert plan.non_embedding_params == outside - inactive + (built.output.weight.numel() if cfg.tie_embeddings else 0)
    assert plan.flops_per_token == 6 * plan.non_embedding_params + 12 * cfg.n_layers * cfg.d_model * 32


@pytest.mark.parametrize("parallel, weights, grads, optimizer, gathered", [
    # DDP: everything on every rank, plus its gradient buckets
    ({"strategy": "ddp"}, 4 * PARAMS, 4 * PARAMS, 8 * PARAMS, 4 * PARAMS),
    # FSDP2 over 2 ranks: half of everything, plus one layer's parameters and gradients unsharded
    ({"strategy": "fsdp"}, 2 * PARAMS, 2 * PARAMS, 4 * PARAMS, 2 * 4 * LAYER),
    ({"strategy": "fsdp", "fsdp": {"reshard_after_forward": False}}, 2 * PARAMS, 2 * PARAMS, 4 * PARAMS,
     4 * PARAMS + 4 * LAYER),
    # ZeRO over 2 ranks: optimizer states (1), gradients (2), weights (3) halved; every stage adds an fp32
    # master copy of the rank's half and a gradient bucket of d_model^2 = 4,096 elements
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}}, 4 * PARAMS, 4 * PARAMS, 6 * PARAMS, 4 * 4096),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}, 4 * PARAMS, 2 * PARAMS, 6 * PARAMS, 4 * 4096),
    # ZeRO-3 with DeepSpeed's reuse distance and live-parameter limits (1e9): the whole model stays gathered
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, 2 * PARAMS, 2 * PARAMS, 6 * PARAMS,
     4 * PARAMS + 4 * 4096),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "config": {"zero_optimization": {
        "reduce_bucket_size": 10**9}}}}, 2 * PARAMS, 2 * PARAMS, 6 * PARAMS, 4 * PARAMS + 4 * PARAMS),
    # ... at most stage3_max_live_parameters when nothing is reused within the distance; with no prefetching
    # a layer gathered and the next one (at least)
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "config": {"zero_optimization": {
        "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 100_000}}}}, 2 * PARAMS, 2 * PARAMS,
     6 * PARAMS, 4 * 100_000 + 4 * 4096),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "config": {"zero_optimization": {
        "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}}}, 2 * PARAMS, 2 * PARAMS,
     6 * PARAMS, 2 * 4 * LAYER + 4 * 4096),
    # TP 2: every linear weight and the embedding / output halved, norms replicated; dp 1
    ({"strategy": "ddp", "tp_size": 2}, 4 * (2 * (LAYER - 128) // 2 + 2 * 128 + EMBED // 2 + 64 + EMBED // 2),
     4 * (2 * (LAYER - 128) // 2 + 2 * 128 + EMBED // 2 + 64 + EMBED // 2),
     8 * (2 * (LAYER - 128) // 2 + 2 * 128 + EMBED // 2 + 64 + EMBED // 2), 0),
    # PP 2: the worse stage is the last (layer 1, final norm, output)
    ({"strategy": "ddp", "pp_size": 2}, 4 * (LAYER + HEAD), 4 * (LAYER + HEAD), 8 * (LAYER + HEAD), 0),
])
def test_memory_per_rank_by_strategy(parallel, weights, grads, optimizer, gathered):
    m = plan_pretrain(config(**parallel), 512, 32).memory
    assert (m.weights, m.gradients, m.optimizer, m.gathered) == (weights, grads, optimizer, gathered)


def test_ddp_with_tensor_parallel_keeps_its_fsdp_shards_gathered():
    """ddp with tp > 1 runs FSDP2 over dp without resharding (lmfleet.train.parallel): on 4 ranks (dp 2,
    tp 2) a rank holds half of its TP shard, and the whole TP shard once gathered, plus a layer's gradients."""
    shard = 2 * (LAYER - 128) // 2 + 2 * 128 + EMBED // 2 + 64 + EMBED // 2
    m = plan_pretrain(config(strategy="ddp", tp_size=2), 512, 32, world=4).memory
    assert (m.weights, m.gathered) == (4 * shard // 2, 4 * shard + 4 * ((LAYER - 128) // 2 + 128))


def test_activations_and_logits():
    tokens = 4 * 32  # a micro-batch
    per_layer = tokens * (7 * 64 + 2 * (4 + 2 * 2) * 16 + 4 * 176)  # 180,224 elements
    m = plan_pretrain(config(strategy="ddp"), 512, 32).memory
    assert m.activations == 4 * 2 * per_layer  # fp32, two layers
    assert m.logits == 3 * 4 * tokens * 512  # logits, log-softmax, gradient (fp32)
    m = plan_pretrain(config(strategy="ddp", activation_checkpointing=True), 512, 32).memory
    assert m.activations == 4 * (2 * tokens * 64 + per_layer)  # each layer's input, one layer recomputed
    # A 1F1B pipeline of 2 stages keeps 2 micro-batches of its layer in flight.
    m = plan_pretrain(config(strategy="ddp", pp_size=2), 512, 32).memory
    assert m.activations == 4 * 2 * per_layer and m.logits == 2 * 3 * 4 * tokens * 512


def test_tokens_step_time_and_memory_warning():
    plan = plan_pretrain(config(strategy="ddp"), 512, 32, device="H100", mfu=0.5, device_memory=1024)
    assert plan.tokens_per_step == 8 * 32 and plan.total_tokens == 100 * 8 * 32
    assert plan.compute_optimal_tokens == 20 * PARAMS
    assert plan.step_seconds == pytest.approx(plan.flops_per_token * 256 / (989e12 * 2 * 0.5))
    assert any("more than the 0.0 GiB given" in n for n in plan.notes)


def test_plan_command(tmp_path):
    stages = {
        "data": {"sources": [{"name": "a", "format": "jsonl", "paths": ["x.jsonl"]}],
                 "tokenizer": {"vocab_size": 512}, "pack": {"seq_len": 32}},
        "pretrain": {"data": "data", "model": {k: v for k, v in MODEL.items() if k != "vocab_size"},
                     "batch": {"global_batch": 8, "micro_batch": 4}, "scaling": {"num_workers": 2},
                     "parallel": {"strategy": "fsdp"}},
    }
    path = write_config(tmp_path / "c.yaml", {"name": "p", "output_dir": str(tmp_path / "out"), "stages": stages})
    run = lambda *a: subprocess.run([*lmfleet_cmd(), "plan", str(path), *a], capture_output=True, text=True)  # noqa: E731
    text = run("--device", "A100")
    assert text.returncode == 0, text.stderr
    assert "vocab and seq_len from data stage 'data'" in text.stdout and f"parameters: {PARAMS:,}" in text.stdout
    assert "mesh pp 1 x dp 2 x tp 1" in text.stdout and "on A100" in text.stdout
    (row,) = [json.loads(x) for x in run("--json").stdout.splitlines()]
    assert row["params"] == PARAMS and row["memory"]["weights"] == 2 * PARAMS
    warned = run("--device-memory", "1MiB")
    assert "warning: a rank needs" in warned.stdout
    # A bad config is the error validate gives; a bad option names itself.
    bad = run("--set", "stages.pretrain.parallel.tp_size=3")
    assert bad.returncode == 2 and "parallel.tp_size 3 must divide n_heads 4" in bad.stderr
    odd = run("--workers", "3")  # checked as the config would be on 3 ranks
    assert odd.returncode == 2 and "batch.global_batch 8 is not divisible by data-parallel size 3" in odd.stderr
    assert "--device 'B200'" in run("--device", "B200").stderr
    assert "stages.data: a data stage; lmfleet plan covers training stages" in run("--stage", "data").stderr


def test_plan_of_pretraining_on_distilled_data(tmp_path):
    """A distill_data stage packs with its data stage's tokenizer, at its own seq_len when it sets one."""
    stages = {
        "data": {"sources": [{"name": "a", "format": "jsonl", "paths": ["x.jsonl"]}],
                 "tokenizer": {"vocab_size": 512}, "pack": {"seq_len": 32}},
        "small": {"kind": "distill_data", "data": "data", "method": "random", "fraction": 0.1,
                  "pack": {"seq_len": 16}},
        "pretrain": {"data": "small", "model": {k: v for k, v in MODEL.items() if k != "vocab_size"},
                     "batch": {"global_batch": 8, "micro_batch": 4}, "scaling": {"num_workers": 2}},
    }
    path = write_config(tmp_path / "c.yaml", {"name": "p", "output_dir": str(tmp_path / "out"), "stages": stages})
    proc = subprocess.run([*lmfleet_cmd(), "plan", str(path), "--json"], capture_output=True, text=True)
    (row,) = [json.loads(x) for x in proc.stdout.splitlines()]
    assert row["params"] == PARAMS and row["seq_len"] == 16, proc.stderr


def test_plan_without_data(tmp_path):
    """With no packed data and no data stage, model.vocab_size and model.max_seq_len give the shapes."""
    pretrain = {"data": str(tmp_path / "nowhere"), "model": MODEL, "batch": {"global_batch": 8, "micro_batch": 4},
                "scaling": {"num_workers": 2}}
    path = write_config(tmp_path / "c.yaml", {"name": "p", "output_dir": str(tmp_path / "out"),
                                               "stages": {"pretrain": pretrain}})
    run = lambda *a: subprocess.run([*lmfleet_cmd(), "plan", str(path), *a], capture_output=True, text=True)  # noqa: E731
    (row,) = [json.loads(x) for x in run("--json").stdout.splitlines()]
    assert row["params"] == PARAMS and row["seq_len"] == 32
    bare = run("--set", "stages.pretrain.model.vocab_size=null")
    assert bare.returncode == 2 and "set model.vocab_size (and model.max_seq_len" in bare.stderr


# -- post-training --

def posttrain_config(kind: str, **over):
    from lmfleet.posttrain import config as pc
    from lmfleet.posttrain.plan import RL

    classes = {c.KIND: c for c in (pc.SFTStageConfig, pc.RewardStageConfig, pc.DPOStageConfig, pc.ORPOStageConfig,
                                   pc.DistillStageConfig, pc.GRPOStageConfig)}
    base = {"model": "m", "dataset": {"format": "python_functions"}, "scaling": {"num_workers": 2}}
    if kind in RL:
        base.update(reward_functions=[{"function": "lmfleet.posttrain.rewards:length", "args": {"max_words": 5}}])
    else:
        base.update(training={"max_length": 32}, batch={"micro_batch": 4})
    if kind in ("sft", "dpo"):
        base.update(eval={"generation": {"max_new_tokens": 8}})
    return classes[kind].model_validate({**base, **over})


M = ModelConfig.model_validate(MODEL)
TOKENS = 4 * 32  # a micro-batch of 4 sequences of 32 tokens
PER_LAYER = TOKENS * (7 * 64 + 2 * (4 + 2 * 2) * 16 + 4 * 176)  # as test_activations_and_logits


def test_posttrain_sft_full_and_lora():
    from lmfleet.posttrain.plan import plan_posttrain

    plan = plan_posttrain("sft", posttrain_config("sft"), {"model": M})
    (policy,) = plan.roles
    m = policy.memory
    assert (policy.params, m.weights, m.gradients, m.optimizer, m.gathered) == (
        PARAMS, 4 * PARAMS, 4 * PARAMS, 8 * PARAMS, 4 * PARAMS)  # DDP, as pretraining
    # TRL's fused LM head: ~8 tiles (here the whole 128 x 512 logits) and the head's fp32 weight gradient.
    assert m.activations == 4 * 2 * PER_LAYER and m.logits == 8 * 4 * TOKENS * 512 + 4 * 512 * 64
    assert plan.rank_peak == m.peak
    # LoRA r 8 on every linear layer of the blocks (not the output): r x (in + out) per matrix.
    lora = 8 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 176))  # 18,688
    (policy,) = plan_posttrain("sft", posttrain_config("sft", peft={"r": 8}), {"model": M}).roles
    m = policy.memory
    assert policy.trainable == lora
    assert (m.weights, m.gradients, m.optimizer, m.gathered) == (4 * PARAMS, 4 * lora, 8 * lora, 4 * lora)
    # Short sequences: DDP's start, the frozen weights twice while it broadcasts them, is the peak.
    short = posttrain_config("sft", peft={"r": 8}, training={"max_length": 8}, batch={"micro_batch": 1},
                             eval={"generation": {"max_new_tokens": 4}})
    plan = plan_posttrain("sft", short, {"model": M})
    assert plan.roles[0].memory.training < plan.rank_peak == plan.roles[0].memory.setup == 2 * 4 * PARAMS
    only_qv = posttrain_config("sft", peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert plan_posttrain("sft", only_qv, {"model": M}).roles[0].trainable == 4 * 2 * ((64 + 64) + (64 + 32))


def test_posttrain_logits_by_how_each_trainer_holds_them():
    """TRL's fused LM head (SFT, DPO, KTO) holds tiles of at most 4096 tokens x 32768 vocab columns (8 at
    once on CPU, 1 on GPU), so its logits stop growing with the batch and the vocab; the others hold whole
    logits, a measured number of copies per token."""
    from lmfleet.posttrain.plan import logits_bytes

    big = M.model_copy(update={"vocab_size": 128_256, "d_model": 64})
    head = 4 * 128_256 * 64  # the head's fp32 weight gradient
    assert logits_bytes("sft", 16 * 2048, big, on_gpu=False) == 8 * 4 * 4096 * 32768 + head
    assert logits_bytes("sft", 16 * 2048, big, on_gpu=True) == 4 * 4096 * 32768 + head
    assert logits_bytes("kto", 100, M, on_gpu=False) == 8 * 4 * 100 * 512 + 4 * 512 * 64
    assert logits_bytes("sft", 100, M, on_gpu=False, head_trained=False) == 8 * 4 * 100 * 512  # peft
    assert logits_bytes("orpo", 16 * 2048, big, on_gpu=False) == int(3.5 * 4 * 16 * 2048 * 128_256)
    assert logits_bytes("simpo", 100, M, False) == logits_bytes("distill", 100, M, False) == 3 * 4 * 100 * 512
    assert logits_bytes("reward", 100, M, False) == 0


def test_posttrain_roles_by_kind():
    from lmfleet.posttrain.plan import plan_posttrain

    # DPO under FSDP: policy and frozen reference both sharded over 2 ranks; pairs double the sequences.
    plan = plan_posttrain("dpo", posttrain_config("dpo", parallel={"strategy": "fsdp"}), {"model": M})
    policy, ref = plan.roles
    assert plan.sequences_per_micro_batch == 8
    assert (ref.name, ref.trained, ref.memory.weights, ref.memory.gradients, ref.memory.gathered) == (
        "reference", False, 2 * PARAMS, 0, 2 * 4 * LAYER)
    assert policy.memory.activations == 4 * 2 * 2 * PER_LAYER and ref.memory.logits == 0  # (its tiles pass)
    assert policy.memory.logits == 8 * 4 * 2 * TOKENS * 512 + 4 * 512 * 64
    assert plan.rank_peak == policy.memory.peak + ref.memory.peak
    # With peft the reference is the policy with its adapters off: no second model.
    assert [r.name for r in plan_posttrain("dpo", posttrain_config("dpo", peft={}), {"model": M}).roles] == ["policy"]
    # ORPO has no reference; a reward model scores (d_model -> 1) instead of the output layer.
    assert [r.name for r in plan_posttrain("orpo", posttrain_config("orpo"), {"model": M}).roles] == ["policy"]
    (rm,) = plan_posttrain("reward", posttrain_config("reward"), {"model": M}).roles
    assert rm.params == PARAMS - 512 * 64 + 64 and rm.memory.logits == 0
    # ZeRO-3 keeps DeepSpeed's gathering defaults in post-training (no key to lower): said once for both models
    z3 = plan_posttrain("dpo", posttrain_config("dpo", parallel={"strategy": "deepspeed", "deepspeed": {
        "zero_stage": 3}}), {"model": M})
    assert [n for n in z3.notes if "ZeRO-3 keeps" in n] == [
        "ZeRO-3 keeps 617.25 KiB of parameters gathered from forward to backward (stage3_max_reuse_distance "
        "1e+09, stage3_max_live_parameters 1e+09 elements), DeepSpeed's defaults, which this stage keeps"]
    # ZeRO-2: the gradient bucket is d_model^2 (what HF fills in for "auto")
    (z2,) = plan_posttrain("sft", posttrain_config("sft", parallel={"strategy": "deepspeed"}), {"model": M}).roles
    assert (z2.memory.gradients, z2.memory.optimizer, z2.memory.gathered) == (2 * PARAMS, 6 * PARAMS, 4 * 4096)
    # Distillation: the student trained, the teacher replicated on every rank.
    student = M.model_copy(update={"n_layers": 1})
    plan = plan_posttrain("distill", posttrain_config("distill"), {"model": M, "student": student})
    trained, teacher = plan.roles
    assert (trained.name, trained.params, teacher.name, teacher.memory.weights) == (
        "student", PARAMS - LAYER, "teacher", 4 * PARAMS)


def test_posttrain_rl_placements():
    from lmfleet.posttrain.plan import plan_posttrain

    grpo = {"grpo": {"rollout_batch": 8, "mini_batch": 4, "num_generations": 4, "kl_coef": 0.1},
            "training": {"max_length": 32}, "generation": {"max_new_tokens": 8}, "reward_model": "rm"}
    models = {"model": M, "reward_model": M}
    plan = plan_posttrain("grpo", posttrain_config("grpo", **grpo), models)
    assert [(r.name, r.where) for r in plan.roles] == [
        ("policy", "training rank"), ("reference", "training rank"), ("reward model", "training rank")]
    # The rollout of 8 x 4 / 2 = 16 sequences per worker: KV cache + log-probs, larger than a 2-sequence update.
    kv = 2 * 2 * 2 * 16 * 16 * 32 * 4  # keys and values, 2 layers, 2 kv heads of 16, 16 sequences of 32 tokens
    rollout = kv + 2 * 4 * 16 * 32 * 512
    policy = plan.roles[0].memory
    assert plan.rank_peak == sum(r.memory.peak for r in plan.roles) - policy.activations - policy.logits + rollout
    assert plan.actor_peak is None and any("the rollout is this rank's peak" in n for n in plan.notes)
    split = plan_posttrain("grpo", posttrain_config("grpo", **grpo, placement="split"), models)
    assert [r.where for r in split.roles[1:]] == ["frozen-model actor"] * 2
    frozen = 4 * PARAMS + 4 * (PARAMS - 512 * 64 + 64)  # the reference and the reward model (a score head)
    assert split.actor_peak == frozen + 2 * 4 * 16 * 32 * 512  # + the reference's log-probs of a worker's rollout
    assert split.rank_peak == plan.rank_peak - frozen
    # The RL workers train in fp32 even on GPUs: the same bytes.
    assert plan_posttrain("grpo", posttrain_config("grpo", **grpo), models, on_gpu=True).rank_peak == plan.rank_peak
    # No KL, no reward model: the policy alone.
    alone = posttrain_config("grpo", grpo={**grpo["grpo"], "kl_coef": 0}, training={"max_length": 32},
                             generation={"max_new_tokens": 8})
    assert [r.name for r in plan_posttrain("grpo", alone, {"model": M}).roles] == ["policy"]


def test_plan_command_posttrain_pipeline(tmp_path):
    """A pipeline planned before it runs: each stage's model from the stage it names (pretrain -> sft -> dpo,
    a distill student from its teacher's config)."""
    stages = {
        "pretrain": {"data": str(tmp_path / "nowhere"), "model": MODEL, "batch": {"global_batch": 8, "micro_batch": 4},
                     "scaling": {"num_workers": 2}},
        "sft": {"model": "pretrain", **{k: v for k, v in posttrain_config("sft").model_dump().items() if k in
                                         ("dataset", "training", "batch", "scaling", "eval")}},
        "dpo": {"kind": "dpo", "model": "sft", "dataset": {"format": "python_functions"},
                "eval": {"generation": {"max_new_tokens": 8}},
                "training": {"max_length": 32}, "batch": {"micro_batch": 4}, "scaling": {"num_workers": 2}},
        "distill": {"kind": "distill", "model": "sft", "student": {"n_layers": 1}, "dataset": {"format": "python_functions"},
                    "training": {"max_length": 32}, "batch": {"micro_batch": 4}, "scaling": {"num_workers": 2}},
    }
    path = write_config(tmp_path / "c.yaml", {"name": "p", "output_dir": str(tmp_path / "out"), "stages": stages})
    run = lambda *a: subprocess.run([*lmfleet_cmd(), "plan", str(path), *a], capture_output=True, text=True)  # noqa: E731
    rows = {r["stage"]: r for r in map(json.loads, run("--json").stdout.splitlines())}
    assert set(rows) == {"pretrain", "sft", "dpo", "distill"}
    assert rows["sft"]["roles"][0]["params"] == PARAMS and rows["sft"]["kind"] == "sft"
    assert [r["name"] for r in rows["dpo"]["roles"]] == ["policy", "reference"]
    assert [r["params"] for r in rows["distill"]["roles"]] == [PARAMS - LAYER, PARAMS]
    loop = run("--set", "stages.sft.model=dpo")  # sft <- dpo <- sft
    assert loop.returncode == 2 and "name each other in a loop" in loop.stderr, loop.stderr
    text = run("--stage", "dpo", "--device-memory", "1MiB")
    assert text.returncode == 0, text.stderr
    assert "reference (158,016 parameters, frozen; on each training rank)" in text.stdout
    assert "warning: a training rank needs" in text.stdout
    odd = run("--stage", "sft", "--workers", "3", "--set", "stages.sft.batch.global_batch=8")
    assert odd.returncode == 2 and "sft with 3 ranks" in odd.stderr
