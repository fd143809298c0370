"""Model architecture config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmfleet.config import StrictModel


class MoEConfig(StrictModel):
    """`model.moe`: sparse Mixture-of-Experts feed-forward layers (lmfleet.model.moe)."""

    num_experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1, description="Experts per token (1: Switch; 2: Mixtral).")
    capacity_factor: float | None = Field(None, gt=0, description="Assignments an expert takes per forward "
                                          "pass, x tokens x top_k / experts; null: dropless.")
    aux_loss_coef: float = Field(0.01, ge=0, description="Load-balancing loss (Switch) weight.")
    z_loss_coef: float = Field(0.001, ge=0, description="Router z-loss (ST-MoE) weight.")
    every_n_layers: int = Field(1, ge=1, description="Every n-th layer is MoE (the last of each n); 1: all.")

    @model_validator(mode="after")
    def _k(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} is more than num_experts {self.num_experts}")
        return self


class ModelConfig(StrictModel):
    vocab_size: int | None = Field(None, ge=2, description="Default: the data stage tokenizer's vocab size.")
    n_layers: int = Field(4, ge=1)
    d_model: int = Field(256, ge=8)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="None: = n_heads (MHA); 1: MQA; between: GQA.")
    head_dim: int | None = Field(None, ge=2, description="None: d_model / n_heads (set where heads were pruned).")
    ffn_dim: int | None = Field(None, ge=1, description="Default: 4*d_model, or 8/3*d_model for SwiGLU.")
    activation: Literal["swiglu", "gelu", "relu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_placement: Literal["pre", "post"] = "pre"
    norm_eps: float = Field(1e-5, gt=0)
    positions: Literal["rope", "alibi", "learned"] = "rope"
    rope_theta: float = Field(10000.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = False
    max_seq_len: int = Field(256, ge=2)
    attention: list[Literal["global", "local"]] = Field(
        default_factory=lambda: ["global"],
        description="Per-layer pattern, repeated over the layers: e.g. [local, global] alternates.",
    )
    sliding_window: int | None = Field(None, ge=1, description="Tokens a local layer attends to (incl. itself).")
    causal: bool = Field(True, description="False: a bidirectional encoder (each token attends to its whole "
                                           "document segment), for objective mlm / mlm_nsp; ties the embeddings "
                                           "unless tie_embeddings is set.")
    moe: MoEConfig | None = Field(None, description="Mixture-of-Experts feed-forward layers; null: dense.")
    init_std: float = Field(0.02, gt=0)
    attention_impl: Literal["sdpa", "flex"] = Field(
        "sdpa", description="sdpa: a dense boolean mask (or is_causal where every row is one document); "
        "flex: FlexAttention block masks (document, causal, sliding window; compiled on GPU).")

    @model_validator(mode="after")
    def _encoder_ties(self):
        # An encoder's MLM head is its embeddings (BERT's decoder), unless tie_embeddings is set to false.
        if not self.causal and "tie_embeddings" not in self.model_fields_set:
            self.tie_embeddings = True
        return self

    @model_validator(mode="after")
    def _shapes(self):
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.kv_heads > self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.positions == "rope" and self.dim_per_head % 2:
            raise ValueError(f"rope needs an even head dim, got {self.dim_per_head}")
        if "local" in self.attention and self.sliding_window is None:
            raise ValueError("attention has local layers: set sliding_window")
        if self.attention_impl == "flex" and self.dropout > 0:
            raise ValueError("attention_impl 'flex' has no attention dropout: set dropout 0 or use 'sdpa'")
        return self

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        if self.activation == "swiglu":  # same parameter count as a 4x GeLU MLP, rounded to 8
            return 8 * ((8 * self.d_model // 3 + 7) // 8)
        return 4 * self.d_model

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i % self.moe.every_n_layers == self.moe.every_n_layers - 1

    def layer_kind(self, i: int) -> str:
        return self.attention[i % len(self.attention)]

    @property
    def llama_compatible(self) -> bool:
        """Exportable as HF LlamaForCausalLM with identical logits."""
        return (self.positions == "rope" and self.norm == "rmsnorm" and self.activation == "swiglu"
                and self.norm_placement == "pre" and "local" not in self.attention and self.causal and self.moe is None)

    @property
    def mixtral_compatible(self) -> bool:
        """Exportable as HF MixtralForCausalLM with identical logits: Llama's attention, every layer MoE,
        dropless, top_k >= 2 (Mixtral renormalizes the k gates)."""
        m = self.moe
        dense = self.model_copy(update={"moe": None})
        return (m is not None and dense.llama_compatible and m.every_n_layers == 1 and m.capacity_factor is None
                and m.top_k >= 2)

    def flops_params(self, params: int, embedding: int) -> int:
        """The parameters whose matmuls a token pays for, of `params` in all with an input embedding of
        `embedding`: all but that lookup, though a tied output projection still costs its matmul; of an MoE
        layer's experts only the top_k a token goes to."""
        active = params if self.tie_embeddings else params - embedding
        if self.moe is not None:
            expert = (3 if self.activation == "swiglu" else 2) * self.d_model * self.hidden_dim
            moe_layers = sum(self.is_moe_layer(i) for i in range(self.n_layers))
            active -= moe_layers * (self.moe.num_experts - self.moe.top_k) * expert
        return active

    def flops_per_token(self, params: int, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B): 6 x params outside the input embedding
        (`params`) plus attention scores, 12 x layers x d_model x seq_len."""
        return 6 * params + 12 * self.n_layers * self.d_model * seq_len
