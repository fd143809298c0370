"""Save a trained model for the next stage, and load it back.

Llama-compatible configs (RoPE, RMSNorm, SwiGLU, pre-LN, no sliding window) are saved as a HF
`LlamaForCausalLM` dir (safetensors + config + tokenizer) that `AutoModelForCausalLM.from_pretrained`
loads with identical logits: the input of the post-training stages. Other configs are saved in
lmfleet's own format (`model.safetensors` + `lmfleet_model.json`), loaded by `load_model`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmfleet.model.config import ModelConfig
from lmfleet.model.transformer import Transformer

OWN_CONFIG = "lmfleet_model.json"

# ours -> HF Llama parameter names (the RoPE layouts already agree: half rotation).
_TO_HF = [
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attention\.wq\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^layers\.(\d+)\.attention\.wk\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^layers\.(\d+)\.attention\.wv\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
]


def to_hf_name(name: str) -> str:
    for pattern, repl in _TO_HF:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(f"no HF Llama name for parameter {name!r}")


def llama_config(cfg: ModelConfig, eos_id: int | None = None, pad_id: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        architectures=["LlamaForCausalLM"],
    )


def export_model(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path,
                 tokenizer_dir: Path | None = None, eos_id: int | None = None, pad_id: int | None = None) -> str:
    """Write `state` (full, unsharded) to out_dir; returns the format written ("hf_llama" or "lmfleet")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)  # safetensors refuses shared storage; tied on load
    if cfg.llama_compatible:
        llama_config(cfg, eos_id, pad_id).save_pretrained(str(out_dir))
        save_file({to_hf_name(k): v for k, v in state.items()}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        fmt = "hf_llama"
    else:
        (out_dir / OWN_CONFIG).write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        fmt = "lmfleet"
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out_dir / f.name)
    return fmt


def load_model(model_dir: str | Path) -> Transformer:
    """A Transformer from an exported dir of either format."""
    model_dir = Path(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    if (model_dir / OWN_CONFIG).exists():
        cfg = ModelConfig.model_validate_json((model_dir / OWN_CONFIG).read_text(encoding="utf-8"))
        state = weights
    else:
        hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"],
            ffn_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
            rope_theta=hf.get("rope_parameters", {}).get("rope_theta", 10000.0),
            max_seq_len=hf["max_position_embeddings"], tie_embeddings=hf.get("tie_word_embeddings", False),
        )
        back = {to_hf_name(k): k for k in Transformer(cfg).state_dict()}
        state = {back[k]: v for k, v in weights.items()}
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not (cfg.tie_embeddings and m == "output.weight")]:
        raise ValueError(f"{model_dir}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return model
