"""The pretraining stage's outputs: dynamic mixing with per-source loss, HF export, TensorBoard."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmfleet.data.packing import PackedDataset
from lmfleet.model.export import load_model

from conftest import pretrain


def test_adaptive_mixing_export_and_tensorboard(packed, tmp_path):
    steps, report = pretrain(
        tmp_path, packed, name="mix", steps=12, export=True, tensorboard=True,
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
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
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
