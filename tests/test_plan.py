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
])
def test_parameter_counts_are_the_built_models(model):
    cfg = ModelConfig.model_validate({**MODEL, **model})
    built = Transformer(cfg)
    plan = plan_pretrain(PretrainConfig.model_validate({"data": "d", "model": cfg.model_dump()}), 512, 32)
    assert plan.params == sum(p.numel() for p in built.parameters())
    # The FLOPs count (as the training loop's MFU): parameters outside the input embedding, a tied output's too.
    outside = sum(p.numel() for n, p in built.named_parameters() if not n.startswith("tok_embeddings"))
    assert plan.non_embedding_params == outside + (built.output.weight.numel() if cfg.tie_embeddings else 0)
    assert plan.flops_per_token == 6 * plan.non_embedding_params + 12 * cfg.n_layers * cfg.d_model * 32


@pytest.mark.parametrize("parallel, weights, grads, optimizer, gathered", [
    # DDP: everything on every rank, plus its gradient buckets
    ({"strategy": "ddp"}, 4 * PARAMS, 4 * PARAMS, 8 * PARAMS, 4 * PARAMS),
    # FSDP2 over 2 ranks: half of everything, plus one layer's parameters and gradients unsharded
    ({"strategy": "fsdp"}, 2 * PARAMS, 2 * PARAMS, 4 * PARAMS, 2 * 4 * LAYER),
    ({"strategy": "fsdp", "fsdp": {"reshard_after_forward": False}}, 2 * PARAMS, 2 * PARAMS, 4 * PARAMS,
     4 * PARAMS + 4 * LAYER),
    # ZeRO over 2 ranks: optimizer states (1), gradients (2), weights (3) halved; stages 1-2 add an fp32 master
    # copy of the rank's half; every stage a gradient bucket of d_model^2 = 4,096 elements
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}}, 4 * PARAMS, 4 * PARAMS, 6 * PARAMS, 4 * 4096),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}, 4 * PARAMS, 2 * PARAMS, 6 * PARAMS, 4 * 4096),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, 2 * PARAMS, 2 * PARAMS, 4 * PARAMS,
     2 * 4 * LAYER + 4 * 4096),
    ({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "config": {"zero_optimization": {
        "reduce_bucket_size": 10**9}}}}, 2 * PARAMS, 2 * PARAMS, 4 * PARAMS, 2 * 4 * LAYER + 4 * PARAMS),
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
    assert "stages.data: a data stage; lmfleet plan covers pretraining" in run("--stage", "data").stderr
