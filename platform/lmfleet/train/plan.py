"""`lmfleet plan`: what a pretraining config costs, by arithmetic only (no Ray, no torch, no model build).

Exact: parameter counts (those of lmfleet.model.transformer.Transformer, tested against a built model),
training FLOPs per token, tokens per step and in all, the compute-optimal token count (Chinchilla: ~20
tokens per parameter), and per rank the bytes of weights, gradients and optimizer states under the
configured strategy and (pp, dp, tp) mesh. Estimated: activations (the tensors a layer keeps for its
backward pass, counted per element below) and the step time at an assumed MFU on a named device.
Every tensor is fp32 on CPU; on GPU the activations are bf16 (autocast) and so is FSDP's gathered copy
when `parallel.fsdp.param_dtype` is bfloat16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lmfleet.model.config import ModelConfig
from lmfleet.train.config import PEAK_FLOPS, PretrainConfig, stage_layers

CHINCHILLA_TOKENS_PER_PARAM = 20
GiB = 1024**3
# Optimizer state elements per parameter element (Adafactor and 8-bit AdamW: counted per tensor below).
STATE_PER_PARAM = {"adamw": 2, "lion": 1, "lamb": 2}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None = None  # the dim tensor parallelism splits (None: replicated on TP ranks)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def layer_tensors(m: ModelConfig, i: int) -> list[Tensor]:
    """The parameters of block i (names as in the model), with the dim the TP plan shards
    (lmfleet.train.parallel.apply_tp: colwise = output features, dim 0 of the weight; rowwise = dim 1)."""
    d, hd, h = m.d_model, m.dim_per_head, m.hidden_dim
    p = f"layers.{i}."
    norms = [Tensor(p + f"{n}.weight", (d,)) for n in ("attention_norm", "ffn_norm")]
    if m.norm == "layernorm":
        norms += [Tensor(p + f"{n}.bias", (d,)) for n in ("attention_norm", "ffn_norm")]
    experts = [f"experts.{e}." for e in range(m.moe.num_experts)] if m.is_moe_layer(i) else [""]
    ffn = [Tensor(p + "feed_forward.router.weight", (m.moe.num_experts, d))] if m.is_moe_layer(i) else []
    for x in experts:  # (MoE: never TP-sharded, the config refuses it)
        ffn += [Tensor(p + f"feed_forward.{x}w1.weight", (h, d), 0), Tensor(p + f"feed_forward.{x}w2.weight", (d, h), 1)]
        if m.activation == "swiglu":
            ffn.append(Tensor(p + f"feed_forward.{x}w3.weight", (h, d), 0))
    return [
        Tensor(p + "attention.wq.weight", (m.n_heads * hd, d), 0),
        Tensor(p + "attention.wk.weight", (m.kv_heads * hd, d), 0),
        Tensor(p + "attention.wv.weight", (m.kv_heads * hd, d), 0),
        Tensor(p + "attention.wo.weight", (d, m.n_heads * hd), 1),
        *ffn, *norms,
    ]


def model_tensors(m: ModelConfig) -> dict[str, list[Tensor]]:
    """Parameters by where they live: `embed` (first pipeline stage), `layers.<i>`, `head` (last stage).
    A tied output projection is the input embedding (counted once)."""
    d = m.d_model
    embed = [Tensor("tok_embeddings.weight", (m.vocab_size, d), 0)]
    if m.positions == "learned":
        embed.append(Tensor("pos_embeddings.weight", (m.max_seq_len, d)))
    head = []
    if m.norm_placement == "pre":
        head.append(Tensor("norm.weight", (d,)))
        if m.norm == "layernorm":
            head.append(Tensor("norm.bias", (d,)))
    if not m.tie_embeddings:
        head.append(Tensor("output.weight", (m.vocab_size, d), 0))
    return {"embed": embed, **{f"layers.{i}": layer_tensors(m, i) for i in range(m.n_layers)}, "head": head}


def _elements(tensors: list[Tensor], tp: int) -> int:
    return sum(t.numel // tp if t.tp_dim is not None else t.numel for t in tensors)


def optimizer_bytes(name: str, tensors: list[Tensor], tp: int) -> int:
    """Bytes of optimizer state for `tensors` (a TP rank's part), before data-parallel sharding."""
    if name in STATE_PER_PARAM:
        return 4 * STATE_PER_PARAM[name] * _elements(tensors, tp)
    if name == "adamw_8bit":  # never TP-sharded (the config refuses it)
        from lmfleet.train.optim import BLOCK_8BIT, MIN_8BIT_SIZE

        # two uint8 states, a fp32 absmax per block of each and two 256-entry fp32 quantization maps;
        # tensors under MIN_8BIT_SIZE elements keep two fp32 states
        return sum(2 * t.numel + 8 * -(-t.numel // BLOCK_8BIT) + 2 * 4 * 256 if t.numel >= MIN_8BIT_SIZE
                   else 8 * t.numel for t in tensors)
    total = 0  # adafactor: a row and a column second moment per matrix, a full one per vector
    for t in tensors:
        rows, cols = (t.shape[0], t.shape[1]) if len(t.shape) == 2 else (t.numel, 0)
        if t.tp_dim == 0:
            rows //= tp
        elif t.tp_dim == 1:
            cols //= tp
        total += rows + cols
    return 4 * total


# DeepSpeed's own defaults for the zero_optimization keys the plan reads that lmfleet does not set.
DEEPSPEED_ZERO_DEFAULTS = {"stage3_max_reuse_distance": 10**9, "stage3_max_live_parameters": 10**9,
                           "stage3_prefetch_bucket_size": 5 * 10**7}


def zero3_kept_gathered(zo: dict, elements: int) -> int:
    """Parameter elements ZeRO-3 (DeepSpeed 0.19) leaves gathered from a layer's forward to its backward:
    a parameter is not released when its next use lies within stage3_max_reuse_distance elements of the
    trace (the backward comes back to layer i after the forward of the layers after it and their backward:
    about twice their parameters), nor when the prefetcher has scanned past its next use, which it does up
    to stage3_max_live_parameters elements while prefetching is on. Measured (this rule's figure) on
    benchmarks/plan_vs_measured.py's 105M-parameter model, 2 ranks, RSS at the last forward above the same
    run with nothing kept: DeepSpeed's defaults (reuse 1e9, live 1e9) 403 MiB (402: the whole model);
    reuse 1e9 with prefetch 0: the whole model too; reuse 0, live 3e7: 116 (114); reuse 2e7, live 1e6:
    39 (38); reuse 0, prefetch 0: 0 (0)."""
    live = zo["stage3_max_live_parameters"] if zo["stage3_prefetch_bucket_size"] > 0 else 0
    return min(elements, max(zo["stage3_max_reuse_distance"] // 2, live))


@dataclass(frozen=True)
class Sharding:
    """How the data-parallel ranks hold one model's states: `replicated` (none, DDP: a whole copy each),
    `fsdp` (FSDP2: `reshard` after forward or not, the gathered copy in `gathered_bytes` per element) or
    `deepspeed` (ZeRO: its `zero_optimization` section, DeepSpeed's defaults where a key is absent)."""

    kind: str
    dp: int
    reshard: bool = True
    gathered_bytes: int = 4
    zero: dict | None = None
    zero_keys: str | None = "parallel.deepspeed.config.zero_optimization"  # where a user sets them (None: nowhere)


def states(s: Sharding, elements: int, trainable: int, optimizer: int, largest_layer: int,
           notes: list[str]) -> tuple[int, int, int, int]:
    """Bytes on one rank of a model's weights, gradients, optimizer states and gathered / bucket buffers:
    `elements` parameter elements before data-parallel sharding (a TP / pipeline rank's part), `trainable`
    of them trained (gradients; 0: a frozen model), `optimizer` state bytes, `largest_layer` the
    elements of its largest layer. Notes what the user may want to change in `notes`."""
    dp = s.dp
    weights, grads, opt, gathered = 4 * elements, 4 * trainable, optimizer, 0
    if s.kind == "fsdp" and dp > 1:
        weights, grads, opt = weights // dp, grads // dp, opt // dp
        if s.reshard:  # one layer unsharded at a time, the next one prefetched
            gathered = 2 * s.gathered_bytes * largest_layer
        else:  # parameters stay unsharded from forward to backward
            gathered = s.gathered_bytes * elements + 4 * largest_layer * (trainable > 0)
    elif s.kind == "deepspeed":
        zo = {**DEEPSPEED_ZERO_DEFAULTS, **s.zero}
        zero = zo["stage"]
        opt //= dp if zero >= 1 else 1
        grads //= dp if zero >= 2 else 1
        if zero >= 1:  # every stage clones this rank's partition as fp32 master weights, even from fp32 ones
            opt += 4 * trainable // dp
        if zero == 3:
            weights //= dp
            kept = zero3_kept_gathered(zo, elements)
            gathered = 4 * max(kept, 2 * largest_layer)  # at least a layer gathered and the next prefetched
            if kept > 2 * largest_layer:
                notes.append(
                    f"ZeRO-3 keeps {size_text(4 * kept)} of parameters gathered from forward to backward "
                    f"(stage3_max_reuse_distance {zo['stage3_max_reuse_distance']:.3g}, stage3_max_live_parameters "
                    f"{zo['stage3_max_live_parameters']:.3g} elements)" + (
                        f": lower both in {s.zero_keys} to gather them again in the backward (less memory, more "
                        "communication)" if s.zero_keys else ", DeepSpeed's defaults, which this stage keeps"))
        # gradients collected into a bucket before each reduce (lmfleet sizes it d_model^2 by default)
        gathered += 4 * min(zo["reduce_bucket_size"], trainable)
    elif s.kind == "replicated" and dp > 1:
        gathered = 4 * trainable  # DDP's gradient buckets (a second copy of the gradients)
    return weights, grads, opt, gathered


@dataclass
class RankMemory:
    """Bytes one rank holds at its peak (the worst pipeline stage)."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int  # FSDP / ZeRO-3: unsharded parameters (and gradients) in flight; DDP: its gradient buckets
    activations: int
    logits: int
    setup: int = 0  # held while DDP wraps the model (weights and their broadcast copy), before any step

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.logits

    @property
    def peak(self) -> int:
        return max(self.training, self.setup)


def ddp_setup(s: Sharding, weights: int) -> int:
    """Bytes at DDP's start: it broadcasts rank 0's parameters, trained or frozen, through flattened
    copies, so a rank briefly holds its weights twice. It is the peak when little else is: measured on the
    105M-parameter model with LoRA (402 MiB of frozen fp32 weights, 2 ranks), RSS peaked at 873 MiB
    while the HF Trainer wrapped the model, 414 MiB above where training began (benchmarks/
    plan_vs_measured.py)."""
    return 2 * weights if s.kind == "replicated" and s.dp > 1 else 0


@dataclass
class Plan:
    params: int
    non_embedding_params: int  # outside the input embedding (a tied output still costs its matmul; MoE: a token's
    # top_k experts only): FLOPs
    flops_per_token: float
    seq_len: int
    tokens_per_step: int
    total_tokens: int
    compute_optimal_tokens: int
    world: int
    mesh: dict[str, int]  # pp, dp, tp
    strategy: str
    micro_batches_in_flight: int
    activation_checkpointing: bool
    memory: RankMemory
    device: str | None = None
    assumed_mfu: float | None = None
    step_seconds: float | None = None
    tokens_per_s: float | None = None
    device_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    moe: bool = False  # Mixture of Experts: non_embedding_params counts a token's experts

    def as_dict(self) -> dict:
        return {**asdict(self), "memory": {**asdict(self.memory), "peak": self.memory.peak}}


def activation_elements(m: ModelConfig, tokens: int, tp: int) -> int:
    """Elements one layer keeps for its backward pass, for `tokens` tokens of a micro-batch (SDPA's fused
    kernels keep no score matrix): the block input and the two norms' inputs and outputs (5 d), q, k, v
    and their rotated copies (2 (n_heads + 2 kv_heads) head_dim, split by TP), the attention output and
    the out-projection's input (2 d), the FFN's up / gate projections, activation and product (4 hidden
    for SwiGLU, 2 for GeLU / ReLU, split by TP). An MoE layer runs the FFN for each of a token's top_k experts,
    on a gathered copy of its input, and keeps the gated output and the router's logits and probabilities
    (averaged over the layers: MoE layers' share; counted, not measured)."""
    qkv = 2 * (m.n_heads + 2 * m.kv_heads) * m.dim_per_head // tp
    ffn = (4 if m.activation == "swiglu" else 2) * m.hidden_dim // tp
    if m.moe is not None:
        share = sum(m.is_moe_layer(i) for i in range(m.n_layers)) / m.n_layers
        routed = m.moe.top_k * (ffn + 2 * m.d_model) + 2 * m.moe.num_experts
        ffn = round(ffn + share * (routed - ffn))
    return tokens * (7 * m.d_model + qkv + ffn)


def plan_pretrain(cfg: PretrainConfig, vocab_size: int, seq_len: int, world: int | None = None,
                  device: str | None = None, mfu: float = 0.4, device_memory: int | None = None,
                  on_gpu: bool | None = None) -> Plan:
    """The plan of `cfg` on `world` ranks (default: its scaling's minimum). `device`: a PEAK_FLOPS name
    for the step time (on_gpu defaults to whether one is named)."""
    m = cfg.model.model_copy(update={"vocab_size": vocab_size}) if cfg.model.vocab_size is None else cfg.model
    p = cfg.parallel
    world = world or cfg.scaling.bounds[0]  # elastic: the fewest ranks, the most memory per rank
    tp, pp = p.tp_size, p.pp_size
    dp = world // (tp * pp)
    on_gpu = device is not None if on_gpu is None else on_gpu
    groups = model_tensors(m)
    params = sum(t.numel for ts in groups.values() for t in ts)
    non_embedding = m.flops_params(params, groups["embed"][0].numel)
    flops = m.flops_per_token(non_embedding, seq_len)

    # The worst pipeline stage: its parameters after the TP split.
    worst, worst_elems = [], -1
    for stage in range(pp):
        ts = [t for i in stage_layers(m.n_layers, pp, stage) for t in groups[f"layers.{i}"]]
        ts += groups["embed"] if stage == 0 else []
        ts += groups["head"] if stage == pp - 1 else []
        if _elements(ts, tp) > worst_elems:
            worst, worst_elems = ts, _elements(ts, tp)
    largest_layer = max(_elements(groups[f"layers.{i}"], tp) for i in range(m.n_layers))
    opt = optimizer_bytes(cfg.optimizer.name, worst, tp)
    notes: list[str] = []
    strategy = p.strategy
    if p.fsdp_over_dp(dp):
        # The gathered copy: param_dtype, or (None) bf16 on GPU (lmfleet.train.parallel)
        gathered_bytes = 2 if (p.fsdp.param_dtype or ("bfloat16" if on_gpu else "float32")) == "bfloat16" else 4
        sharding = Sharding("fsdp", dp, reshard=p.fsdp_reshards, gathered_bytes=gathered_bytes)
    elif strategy == "deepspeed":
        sharding = Sharding("deepspeed", dp, zero=p.deepspeed.zero_optimization(m.d_model))
    else:
        sharding = Sharding("replicated", dp)
    weights, grads, optimizer, gathered = states(sharding, worst_elems, worst_elems, opt, largest_layer, notes)
    if strategy == "deepspeed" and on_gpu:
        notes.append("DeepSpeed on GPU trains in bf16 with fp32 master weights: the plan counts fp32 weights and "
                     "gradients, so it overestimates them")
    if p.fsdp.cpu_offload or p.deepspeed.offload_optimizer or p.deepspeed.offload_param:
        notes.append("CPU offload is not modelled: the offloaded states are counted on the device")
    # Activations: micro-batches whose activations a stage holds at once (gpipe: all; 1F1B: up to pp).
    micro = cfg.batch.micro_batch
    n_micro = cfg.batch.global_batch // (dp * micro)
    in_flight = 1 if pp == 1 else (n_micro if p.pp_schedule == "gpipe" else min(pp, n_micro))
    layers_per_stage = max(len(stage_layers(m.n_layers, pp, s)) for s in range(pp))
    act_bytes = 2 if on_gpu else 4
    per_layer = activation_elements(m, micro * seq_len, tp)
    if p.activation_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        act = in_flight * layers_per_stage * micro * seq_len * m.d_model + per_layer
    else:
        act = in_flight * layers_per_stage * per_layer
    # The loss in fp32: logits, their log-softmax and its gradient, on the last stage.
    logits = 3 * 4 * micro * seq_len * m.vocab_size * (in_flight if pp > 1 else 1)
    memory = RankMemory(weights, grads, optimizer, gathered, act * act_bytes, logits, ddp_setup(sharding, weights))
    tokens_per_step = cfg.batch.global_batch * seq_len
    plan = Plan(
        params=params, non_embedding_params=non_embedding, flops_per_token=flops, seq_len=seq_len, moe=m.moe is not None,
        tokens_per_step=tokens_per_step, total_tokens=tokens_per_step * cfg.steps,
        compute_optimal_tokens=CHINCHILLA_TOKENS_PER_PARAM * params, world=world,
        mesh={"pp": pp, "dp": dp, "tp": tp}, strategy=strategy, micro_batches_in_flight=in_flight,
        activation_checkpointing=p.activation_checkpointing, memory=memory, device=device,
        device_memory=device_memory, notes=notes,
    )
    if device is not None:
        plan.assumed_mfu = mfu
        plan.step_seconds = flops * tokens_per_step / (PEAK_FLOPS[device] * world * mfu)
        plan.tokens_per_s = tokens_per_step / plan.step_seconds
    if device_memory is not None and memory.peak > device_memory:
        notes.append(f"a rank needs {memory.peak / GiB:.1f} GiB, more than the {device_memory / GiB:.1f} GiB given: "
                     "shard more (fsdp, deepspeed zero_stage 3, tp_size, pp_size), turn on "
                     "parallel.activation_checkpointing or lower batch.micro_batch")
    return plan


def size_text(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def plan_lines(plan: Plan) -> list[str]:
    mem, mesh = plan.memory, plan.mesh
    ratio = plan.total_tokens / plan.params
    lines = [
        f"parameters: {plan.params:,} ({plan.non_embedding_params:,} outside the input embedding"
        + (", a token's active ones)" if plan.moe else ")"),
        f"compute: {_count(plan.flops_per_token)}FLOPs per token; {plan.tokens_per_step:,} tokens per step "
        f"({plan.seq_len} per sample); {_count(plan.total_tokens)} tokens in all = {ratio:.1f} per parameter "
        f"(compute-optimal ~{CHINCHILLA_TOKENS_PER_PARAM}: {_count(plan.compute_optimal_tokens)} tokens)",
        f"per rank ({plan.world} ranks, {plan.strategy}, mesh pp {mesh['pp']} x dp {mesh['dp']} x tp {mesh['tp']}; "
        f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}, "
        f"{plan.micro_batches_in_flight} micro-batch(es) in flight):",
        f"  weights {size_text(mem.weights)}, gradients {size_text(mem.gradients)}, optimizer {size_text(mem.optimizer)}, "
        f"gathered / buckets {size_text(mem.gathered)}",
        f"  activations {size_text(mem.activations)} (estimate), logits {size_text(mem.logits)}",
        *([f"  DDP's start (the weights and their broadcast copy) {size_text(mem.setup)}"]
          if mem.setup > mem.training else []),
        f"  predicted peak {size_text(mem.peak)}",
    ]
    if plan.device is not None:
        hours = plan.step_seconds * plan.total_tokens / plan.tokens_per_step / 3600
        lines.append(f"on {plan.device} ({PEAK_FLOPS[plan.device] / 1e12:.0f} TFLOP/s bf16 peak) at an assumed MFU of "
                     f"{100 * plan.assumed_mfu:.0f}%: {plan.step_seconds:.3g} s per step, "
                     f"{_count(plan.tokens_per_s)} tokens/s, {hours:.3g} h in all")
    return lines + [f"warning: {n}" for n in plan.notes]


def planned_config(cfg: PretrainConfig, run_dir, world: int | None) -> PretrainConfig:
    """`cfg` as it will train: with `init_from`, the checkpoint's architecture (keys set in `model` must
    agree); with `world` ranks, the config's checks for that count (ConfigError naming the key)."""
    from pydantic import ValidationError

    from lmfleet.config import format_validation_error
    from lmfleet.errors import ConfigError
    from lmfleet.train.stage import init_model

    data = cfg.model_dump()
    if cfg.init_from is not None:
        data["model"] = init_model(cfg, run_dir)[1].model_dump()
    if world is not None:
        data["scaling"] = {**data["scaling"], "num_workers": world}
    try:
        return PretrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"pretrain with {world} ranks" if world else "pretrain",
                                                  ("pretrain",))) from None


def data_shapes(cfg: PretrainConfig, data_stages: dict, run_dir) -> tuple[int, int, str]:
    """(vocab size, sequence length, where they came from) for planning `cfg`: its model.vocab_size, else
    the packed data's index when it exists, else the data stage of the same config that `cfg.data` names
    (its tokenizer.vocab_size: an upper bound, BPE may learn fewer), else model.vocab_size with
    model.max_seq_len as the sequence length; InputError when none says."""
    from lmfleet import uri
    from lmfleet.errors import InputError
    from lmfleet.train.stage import packed_dir, read_index

    index = None
    if cfg.data not in data_stages:
        packed = packed_dir(cfg, run_dir)
        if uri.info(uri.join(packed, "index.json"), "pretrain.data").is_file:
            index = read_index(packed)
    if index is not None:
        vocab, seq, source = index["vocab_size"], index["seq_len"], f"the packed data's index ({packed})"
    elif cfg.data in data_stages:
        data = data_stages[cfg.data]
        vocab, seq = data.tokenizer.vocab_size, data.pack.seq_len
        source = f"data stage {cfg.data!r} (tokenizer.vocab_size, pack.seq_len)"
    elif cfg.model.vocab_size is not None:  # sequences of model.max_seq_len: the longest the data may pack
        vocab, seq = cfg.model.vocab_size, cfg.model.max_seq_len
        return vocab, seq, "model.vocab_size and model.max_seq_len (no packed data yet)"
    else:
        raise InputError(f"pretrain.data {cfg.data!r}: no packed data yet and no data stage of that name in this "
                         "config: set model.vocab_size (and model.max_seq_len, the sequence length) to plan")
    if cfg.model.vocab_size is not None:
        vocab, source = cfg.model.vocab_size, f"model.vocab_size; seq_len from {source}"
    return vocab, seq, source
