"""Where a stage's input model is (a stage of this run, a path or a URI: `model_dir`, `input_model`) and its
model config: a HF Llama-family dir (`config.json` of a LlamaForCausalLM) or lmfleet's own export
(`lmfleet_model.json`), as pretraining's `init_from` continues from. Reads JSON only (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from pyarrow import fs

from lmfleet import uri
from lmfleet.errors import InputError
from lmfleet.model.config import ModelConfig, MoEConfig

OWN_CONFIG = "lmfleet_model.json"
# Settings of the run, not of the weights: a continued run may change them.
RUN_SETTINGS = {"max_seq_len", "dropout", "init_std", "attention_impl"}


def model_dir(ref: str, run_dir: Path | str | None) -> Path | str:
    """A stage name of this run (no '/') -> its model/ dir; a path or URI -> itself, or its model/ if a stage dir."""
    if run_dir is not None and "/" not in ref:
        return str(uri.join(str(run_dir), ref, "model")) if uri.is_uri(run_dir) else Path(run_dir) / ref / "model"
    if uri.is_uri(ref):
        base = ref.rstrip("/")
        inner = uri.join(base, "model")
        return inner if uri.info(inner).type == fs.FileType.Directory else base
    path = Path(ref)
    return path / "model" if (path / "model").is_dir() else path


def input_model(ref: str, run_dir: Path | str | None) -> str:
    """What a stage hands its workers: the model dir as an absolute path, or a URI (a node reads a URI
    through its own copy: lmfleet.posttrain.stage.StageInputs.local)."""
    path = model_dir(ref, run_dir)
    return path if isinstance(path, str) else str(path.resolve())


def _read(location: str, name: str, key: str) -> dict | None:
    path = uri.join(location, name)
    if not uri.info(path, key).is_file:
        return None
    return json.loads(uri.read_bytes(path).decode("utf-8"))


def llama_model_config(hf: dict, where: str) -> ModelConfig:
    """ModelConfig of a HF LlamaForCausalLM config.json; InputError naming the field lmfleet cannot map."""
    def refuse(field: str, value, why: str):
        raise InputError(f"{where}: {field} {value!r}: {why} (lmfleet imports LlamaForCausalLM checkpoints with "
                         "RoPE, RMSNorm, SwiGLU and no biases)")

    if hf.get("model_type") not in ("llama", "mixtral"):
        refuse("model_type", hf.get("model_type"), "not a Llama or Mixtral model")
    moe = None
    if hf["model_type"] == "mixtral":
        if hf.get("sliding_window"):
            refuse("sliding_window", hf["sliding_window"], "Mixtral's sliding window does not map")
        if hf.get("router_jitter_noise"):
            refuse("router_jitter_noise", hf["router_jitter_noise"], "router noise does not map")
        moe = MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "expected silu (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            refuse(flag, hf[flag], "biases are not supported")
    rope = hf.get("rope_parameters") or {}  # transformers 5; older configs: rope_theta + rope_scaling
    if (rope.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
        refuse("rope_parameters", rope or hf.get("rope_scaling"), "RoPE scaling does not map: plain rope_theta only")
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=d, n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
        head_dim=head_dim if head_dim not in (None, d // heads) or d % heads else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=hf.get("tie_word_embeddings", False),
        moe=moe,
    )


def checkpoint_model_config(location: str, key: str) -> ModelConfig:
    """The ModelConfig of the checkpoint dir at `location` (a path or URI); InputError naming `key`."""
    own = _read(location, OWN_CONFIG, key)
    if own is not None:
        return ModelConfig.model_validate(own)
    hf = _read(location, "config.json", key)
    if hf is None:
        raise InputError(f"{key} {location}: no config.json or {OWN_CONFIG} (expected a HF Llama dir or an "
                         "lmfleet model export)")
    return llama_model_config(hf, f"{key} {location}: config.json")


def loss_model(location: str, vocab_size: int, key: str, why: str) -> ModelConfig:
    """The ModelConfig of the checkpoint at `location` that computes token losses on packed data of `vocab_size`
    tokens (`why`: what for): a causal model whose vocabulary covers them, else an InputError naming `key`."""
    found = checkpoint_model_config(location, key)
    if not found.causal or found.vocab_size < vocab_size:
        raise InputError(f"{key} {location}: {why} needs a causal model over the packed data's tokenizer "
                         f"({vocab_size} tokens); it has {found.vocab_size}" + ("" if found.causal else " and is an encoder"))
    return found


def continued_model(wanted: ModelConfig, found: ModelConfig, key: str, where: str) -> ModelConfig:
    """The model to continue training: the checkpoint's architecture (`found`) with the run settings the
    config sets (max_seq_len, dropout, init_std, attention_impl). A field the config sets to another value
    than the checkpoint's is an InputError naming both."""
    mine = wanted.model_dump()
    theirs = found.model_dump()
    for field in sorted(wanted.model_fields_set - RUN_SETTINGS):
        if field == "vocab_size" and mine[field] is None:
            continue
        if mine[field] != theirs[field]:
            raise InputError(f"{key}.{field} {mine[field]!r} does not match the checkpoint's {theirs[field]!r} "
                             f"({where}): remove it from the config or set it to the checkpoint's value")
    run_settings = RUN_SETTINGS - ({"max_seq_len"} if found.positions == "learned" else set())  # a weight shape
    if found.positions == "learned" and "max_seq_len" in wanted.model_fields_set and mine["max_seq_len"] != theirs[
            "max_seq_len"]:
        raise InputError(f"{key}.max_seq_len {mine['max_seq_len']} does not match the checkpoint's "
                         f"{theirs['max_seq_len']} ({where}): its learned position embeddings have that many rows")
    return found.model_copy(update={f: mine[f] for f in wanted.model_fields_set & run_settings})
