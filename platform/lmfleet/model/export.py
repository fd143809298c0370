"""Save a trained model for the next stage, and load it back.

Llama-compatible configs (RoPE, RMSNorm, SwiGLU, pre-LN, no sliding window) are saved as a HF
`LlamaForCausalLM` dir (safetensors + config + tokenizer) that `AutoModelForCausalLM.from_pretrained`
loads with identical logits: the input of the post-training stages. The same with dropless top-k (k >= 2)
MoE in every layer: a `MixtralForCausalLM` dir. Other configs are saved in
lmfleet's own format (`model.safetensors` + `lmfleet_model.json`), loaded by `load_model`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmfleet.model.config import ModelConfig
from lmfleet.model.hf_config import OWN_CONFIG, checkpoint_model_config
from lmfleet.model.transformer import Transformer

# ours -> HF Llama parameter names (the RoPE layouts already agree: half rotation).
_TO_HF = [
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attention\.wq\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^layers\.(\d+)\.attention\.wk\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^layers\.(\d+)\.attention\.wv\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
    # MoE layers as HF Mixtral's per-expert names (transformers 5 merges them into its fused experts on load)
    (r"^layers\.(\d+)\.feed_forward\.router\.", r"model.layers.\1.block_sparse_moe.gate."),
    (r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.", r"model.layers.\1.block_sparse_moe.experts.\2.\3."),
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
        head_dim=cfg.dim_per_head, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        architectures=["LlamaForCausalLM"],
    )


def mixtral_config(cfg: ModelConfig, eos_id: int | None = None, pad_id: int | None = None):
    from transformers import MixtralConfig

    dense = llama_config(cfg, eos_id, pad_id).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    return MixtralConfig(**{k: dense[k] for k in keep}, rope_theta=cfg.rope_theta, sliding_window=None,
                         num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                         router_jitter_noise=0.0, router_aux_loss_coef=cfg.moe.aux_loss_coef,
                         architectures=["MixtralForCausalLM"])


def export_model(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path,
                 tokenizer_dir: Path | None = None, eos_id: int | None = None, pad_id: int | None = None) -> str:
    """Write `state` (full, unsharded) to out_dir; returns the format written ("hf_llama", "hf_mixtral" or
    "lmfleet")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)  # safetensors refuses shared storage; tied on load
    if cfg.llama_compatible or cfg.mixtral_compatible:
        hf = llama_config(cfg, eos_id, pad_id) if cfg.llama_compatible else mixtral_config(cfg, eos_id, pad_id)
        hf.save_pretrained(str(out_dir))
        save_file({to_hf_name(k): v for k, v in state.items()}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        fmt = "hf_llama" if cfg.llama_compatible else "hf_mixtral"
    else:
        (out_dir / OWN_CONFIG).write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        fmt = "lmfleet"
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out_dir / f.name)
    return fmt


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The model's parameter names and shapes (built on the meta device: no memory); a tied output is the
    input embedding, not a parameter of its own."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


class Weights(Mapping):
    """lmfleet parameter name -> tensor, read from its safetensors file when asked: one tensor in memory at a
    time, so a rank that keeps a shard of each never holds the whole checkpoint."""

    def __init__(self, where: dict[str, tuple[Path, str]]):  # name -> (file, the name in the file)
        self.where = where

    def __getitem__(self, name: str) -> torch.Tensor:
        path, key = self.where[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def load_weights(model_dir: str | Path, cfg: ModelConfig) -> Weights:
    """The weights of an exported dir (either format; HF's `model.safetensors` or its shards listed in
    `model.safetensors.index.json`) under lmfleet's parameter names, checked against `cfg` (names and shapes,
    from the files' headers); each tensor is read when used."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                found[key] = (model_dir / name, tuple(f.get_slice(key).get_shape()))
    shapes = parameter_shapes(cfg)
    if (model_dir / OWN_CONFIG).exists():
        back = {k: k for k in found}
    else:
        if cfg.tie_embeddings:
            found.pop("lm_head.weight", None)  # the embedding's copy, where a checkpoint keeps one
        back = {to_hf_name(k): k for k in shapes}
        unknown = sorted(set(found) - set(back))
        if unknown:
            raise ValueError(f"{model_dir}: weights lmfleet's Llama has no place for: {unknown[:5]}")
    state = {back[k]: (path, k, shape) for k, (path, shape) in found.items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    wrong = [f"{k} {shape} != {shapes[k]}" for k, (_, _, shape) in state.items() if k in shapes and shape != shapes[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{model_dir}: weights do not match the config (missing {missing}, unexpected "
                         f"{unexpected}, shapes {wrong})")
    return Weights({k: (path, key) for k, (path, key, _) in state.items()})


def load_model(model_dir: str | Path) -> Transformer:
    """A Transformer from an exported dir of either format."""
    cfg = checkpoint_model_config(str(Path(model_dir).resolve()), "model")
    with torch.device("meta"):  # no init: the weights replace it
        model = Transformer(cfg)
    model.load_state_dict(dict(load_weights(model_dir, cfg)), strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model
