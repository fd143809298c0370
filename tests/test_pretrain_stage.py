"""The pretraining stage's outputs: dynamic mixing with per-source loss, HF export, TensorBoard."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmfleet.data.packing import PackedDataset
from lmfleet.model.export import load_model

from conftest import pretrain


def test_adaptive_mixing_export_and_tensorboard(packed, tmp_path):
    steps, report = pretrain(
        tmp_path, packed, name="mix", steps=12, export=True, run_keys={"tracking": {"tensorboard": True}},
        mixing={"kind": "adaptive", "weights": {"c4": 0.5, "plays": 0.5}, "lr": 5.0, "update_every": 2},
        eval={"every": 6, "batches": 1},
    )
    # per-source losses are logged and move the weights away from the start
    assert all("loss/c4" in s and "loss/plays" in s for s in steps)
    assert steps[0]["weight/c4"] == pytest.approx(0.5)
    assert abs(steps[-1]["weight/c4"] - 0.5) > 0.01
    assert sum(v for k, v in steps[-1].items() if k.startswith("weight/")) == pytest.approx(1.0)
    assert [s["step"] for s in steps if "val_loss" in s] == [6, 12]
    assert report["val_perplexity"] > 1.0

    out = tmp_path / "mix" / "pretrain"
    assert list((tmp_path / "mix" / "tensorboard" / "pretrain").glob("events.out.tfevents.*"))
    assert report["export"]["format"] == "hf_llama"
    hf = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    ours = load_model(out / "model").eval()
    tokens, positions = PackedDataset(packed / "packed", "val")[0]
    x = torch.from_numpy(tokens[None, :16])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=1e-5)
    assert (out / "model" / "tokenizer.json").exists()


def test_pipeline_parallel_export_has_every_stage(packed, tmp_path):
    """Weights of all pipeline stages reach the export (load_model is strict about missing layers)."""
    _, report = pretrain(tmp_path, packed, name="pp", steps=2, export=True, scaling__num_workers=2,
                         parallel__strategy="fsdp", parallel__pp_size=2)
    model = load_model(report["export"]["path"]).eval()
    hf = AutoModelForCausalLM.from_pretrained(report["export"]["path"]).eval()
    x = torch.from_numpy(PackedDataset(packed / "packed", "val")[0][0][None, :16])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.layers["1"].attention.wq.weight, model.layers["0"].attention.wq.weight)
    # Each rank's peak memory since it started building its model (lmfleet.train.memory), in the report.
    memory = report["memory"]
    assert memory["measure"].startswith("peak RSS") and len(memory["peak_bytes_per_rank"]) == 2
    assert all(isinstance(b, int) and b > 0 for b in memory["peak_bytes_per_rank"]), memory
    # and once its stage's part of the model was in place (sharded init), before any step
    assert all(0 < i <= b for i, b in zip(memory["init_bytes_per_rank"], memory["peak_bytes_per_rank"], strict=True))


def test_continued_pretraining_from_a_transformers_llama(packed, tmp_path):
    """A LlamaForCausalLM built and saved by transformers (GQA, untied, its own FFN width) is imported with
    transformers' logits, trained 10 steps from its weights with DDP and with FSDP (same losses), exported,
    and loads back in transformers; a config that disagrees with it is an error naming the key."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from lmfleet.errors import InputError
    from lmfleet.runner import load_run, preflight

    from conftest import pretrain_stage, write_config

    index = json.loads((packed / "packed" / "index.json").read_text())
    torch.manual_seed(3)
    ckpt = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=index["vocab_size"], hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
    )).save_pretrained(ckpt)
    for f in (packed / "tokenizer").iterdir():  # the tokenizer the data was packed with
        shutil.copy(f, ckpt / f.name)
    theirs = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    x = torch.from_numpy(PackedDataset(packed / "packed", "val")[0][0][None, :16])
    with torch.no_grad():
        torch.testing.assert_close(load_model(ckpt).eval()(x), theirs(x).logits, atol=1e-5, rtol=1e-5)

    losses = {}
    for strategy in ("ddp", "fsdp"):  # a small lr: the trained weights stay within 1e-3 of the checkpoint's
        steps, report = pretrain(tmp_path, packed, name=strategy, steps=10, init_from=str(ckpt), export=True,
                                 optimizer__lr=1e-5, scaling__num_workers=2, parallel__strategy=strategy)
        losses[strategy] = [s["loss"] for s in steps]
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5) and len(losses["ddp"]) == 10
    trained = AutoModelForCausalLM.from_pretrained(report["export"]["path"]).eval()
    assert trained.config.intermediate_size == 48  # the checkpoint's, not the config's default
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), theirs.parameters(), strict=True))
    assert 0 < moved < 1e-3, moved
    with torch.no_grad():
        torch.testing.assert_close(load_model(report["export"]["path"]).eval()(x), trained(x).logits,
                                   atol=1e-5, rtol=1e-5)

    stage = pretrain_stage(packed, init_from=str(ckpt), model__d_model=64)
    loaded = load_run(write_config(tmp_path / "bad.yaml", {"name": "bad", "output_dir": str(tmp_path / "bad"),
                                                           "stages": {"pretrain": stage}}))
    with pytest.raises(InputError, match=r"pretrain\.model\.d_model 64 does not match the checkpoint's 32 "
                                         rf"\(pretrain\.init_from {ckpt}\)"):
        preflight(loaded, loaded.stages, loaded.config.run_dir)
