"""Pruning: exact sparsity of magnitude pruning, structured removal equal to zeroing what it removes, and the
prune stage end to end (recovery holding the zeros, exports that transformers loads)."""

import json

import pytest
import torch

from lmfleet.model import ModelConfig, Transformer
from lmfleet.model.export import load_model
from lmfleet.prune.methods import magnitude, prunable, sparsity_of, structured

from conftest import pretrain_stage, run_stages

CFG = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32)


def test_magnitude_pruning_is_exact_globally_and_per_matrix():
    state = Transformer(CFG, seed=0).state_dict()
    names = prunable(state)
    assert len(names) == 2 * 7 and not any("tok_embeddings" in n or "norm" in n or "output" in n for n in names)
    total = sum(state[n].numel() for n in names)
    g = magnitude(state, 0.3, "global")
    assert sum(int((g[n] == 0).sum()) for n in names) == round(0.3 * total)
    kept = torch.cat([g[n][g[n] != 0].abs() for n in names])
    dropped = torch.cat([state[n][g[n] == 0].abs() for n in names])
    assert dropped.max() <= kept.min()  # the smallest magnitudes went
    per = magnitude(state, 0.7, "layer")
    assert all(int((per[n] == 0).sum()) == round(0.7 * per[n].numel()) for n in names)
    assert torch.equal(per["tok_embeddings.weight"], state["tok_embeddings.weight"])
    assert sparsity_of(per)[0] == pytest.approx(0.7, abs=1e-3)


def test_structured_removal_equals_zeroing_the_removed_outputs():
    model = Transformer(CFG, seed=0).eval()
    state = model.state_dict()
    small_state, small_cfg = structured(state, CFG, heads=0.5, ffn=0.25)
    assert (small_cfg.n_heads, small_cfg.n_kv_heads, small_cfg.dim_per_head, small_cfg.ffn_dim) == (2, 1, 8, 66)
    small = Transformer(small_cfg, seed=None)
    small.load_state_dict(small_state)
    # the same model with the removed head group's wo columns and the removed channels' w2 columns zeroed
    zeroed = {k: v.clone() for k, v in state.items()}
    for i in range(2):
        p = f"layers.{i}."
        wo = zeroed[p + "attention.wo.weight"].view(32, 2, 2, 8)  # (d, kv group, query head in it, head_dim)
        kept_k = small_state[p + "attention.wk.weight"].view(-1, 8, 32)
        for g in range(2):
            if not any(torch.equal(state[p + "attention.wk.weight"].view(2, 8, 32)[g], k) for k in kept_k):
                wo[:, g] = 0
        w1 = state[p + "feed_forward.w1.weight"]
        kept_rows = {tuple(r.tolist()) for r in small_state[p + "feed_forward.w1.weight"]}
        for c in range(w1.shape[0]):
            if tuple(w1[c].tolist()) not in kept_rows:
                zeroed[p + "feed_forward.w2.weight"][:, c] = 0
    model.load_state_dict(zeroed)
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_prune_stage(packed, tmp_path):
    """Pretrain a tiny model, then prune it: magnitude 50% with 4 recovery steps on 2 FSDP workers (its zeros
    stay zeros), and structured (half the head groups, half the FFN channels) without recovery; transformers
    loads both exports, the smaller one with the same logits as lmfleet's loader."""
    from transformers import AutoModelForCausalLM

    base = {"kind": "pretrain", **pretrain_stage(packed, steps=10, export=True)}
    data = str(packed)
    stages = {
        "base": base,
        "magnitude": {"kind": "prune", "model": "base", "data": data, "sparsity": 0.5, "eval_batches": 1,
                      "recovery": {"steps": 4, "parallel": {"strategy": "fsdp"}, "batch": {"global_batch": 8,
                                   "micro_batch": 2}, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}}},
        "structured": {"kind": "prune", "model": "base", "data": data, "method": "structured", "eval_batches": 2,
                       "structured": {"heads": 0.5, "ffn": 0.5}},
    }
    report, out = run_stages(tmp_path, stages)
    mag, st = report["stages"]["magnitude"], report["stages"]["structured"]
    assert mag["pruned"]["sparsity"] == pytest.approx(0.5, abs=1e-4) and mag["before"]["sparsity"] < 0.01
    assert mag["recovered"]["sparsity"] == pytest.approx(mag["pruned"]["sparsity"])  # held at zero
    assert mag["pruned"]["val_loss"] > mag["before"]["val_loss"]
    assert mag["recovered"]["val_loss"] < mag["pruned"]["val_loss"]  # recovery recovers some
    assert mag["before"]["val_loss"] == pytest.approx(report["stages"]["base"]["val_loss"], rel=1e-5)  # same val set
    assert st["pruned"]["params"] < st["before"]["params"] and st["export"]["format"] == "hf_llama"
    assert any("validation perplexity" in line for line in st["summary"])
    x = torch.randint(0, 500, (2, 16))
    for name in ("magnitude", "structured"):
        hf = AutoModelForCausalLM.from_pretrained(out / name / "model").eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, load_model(out / name / "model").eval()(x), atol=1e-4, rtol=1e-4)
    hf_cfg = json.loads((out / "structured" / "model" / "config.json").read_text())
    assert (hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"], hf_cfg["head_dim"]) == (2, 1, 8)
