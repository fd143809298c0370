"""`lmfleet plan` for the post-training stages: the memory one training rank (and, with `placement: split`,
one frozen-model actor) needs, by arithmetic only, from the models each stage holds in its roles.

A role is a model the stage keeps: the one it trains (a policy, a reward model, a student; with `peft`, its
base frozen and only the adapters trained) and the frozen ones it reads from (DPO / KTO's reference unless
`peft` lets the adapters be switched off instead; a distillation teacher; an RL stage's reference and reward
model). Each role's states follow the stage's strategy as pretraining's do (lmfleet.train.plan.states);
a distillation teacher and an RL stage's models are replicated per worker (lmfleet.posttrain.distill,
lmfleet.posttrain.rl). Activations are counted for one micro-batch of `training.max_length`-token sequences
(pairs: chosen and rejected, two per record), with the loss's logits as each trainer holds them (whole, or
TRL's fused LM head's tiles: `logits_bytes`); an RL stage also counts its rollout: the KV cache of
`generation` and the log-probs pass over every sampled sequence of the worker at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lmfleet.errors import InputError
from lmfleet.model.config import ModelConfig
from lmfleet.train import plan as base
from lmfleet.train.config import DeepSpeedConfig
from lmfleet.train.plan import GiB, RankMemory, Sharding, Tensor, ddp_setup, size_text, states

PAIRED = {"reward", "dpo", "orpo", "simpo"}  # a record is two sequences (chosen, rejected) in one forward pass
REFERENCE = {"dpo", "kto"}  # a frozen reference policy unless peft (the adapters switched off instead)
RL = {"ppo", "grpo", "rloo"}
# The loss's logits-sized tensors at a step's peak, measured on CPU (fp32, 1 worker, MALLOC_MMAP_THRESHOLD_;
# each kind's peak at vocab 4096 and 32768, 4 sequences of 64 tokens, the growth less the plan's other
# vocab-sized terms). TRL 1.16's SFT, DPO and KTO trainers compute log-probs with its fused LM head
# (trl.trainer.utils.add_fused_lm_head): tile by tile, at most 4096 tokens x 32768 vocab columns, never the
# whole logits. On CPU the tile's fold runs in torch and holds ~8 tile-sized fp32 temporaries at once (SFT
# 8.7 and KTO 8.2 with its head's fp32 weight gradient, below, 0.5 of them; a standalone TRL SFT step at 6,144
# tokens grew by 7.8 tiles of 4,096 tokens from vocab 4096 to 16384, not by 7.8 x 6,144: the tiling holds);
# on GPU a Triton kernel folds the tile in place: one tile (read from TRL's kernel; no GPU measured here).
# Its backward allocates the head's weight gradient in fp32 (vocab x d_model) beside the parameter's.
FUSED = {"sft", "dpo", "kto"}
FUSED_TILE = (4096, 32768)  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE, trl's _CHUNKED_LOGPROB_CHUNK_SIZE
FUSED_TILE_COPIES = {False: 8, True: 1}  # on GPU?
# The others hold whole logits: per token of the micro-batch (pairs: both sequences), measured as above.
# ORPO 3.5 (7.0 for the pair: its NLL term on the chosen answer adds one), SimPO 3.0 (6.01), distillation
# 3.0 for the student's and the teacher's together (2.95); the RL stages' update 3 (logits, log-softmax,
# gradient; not measured by vocab).
LOGITS_COPIES = {"orpo": 3.5, "simpo": 3.0, "distill": 3.0, "ppo": 3, "grpo": 3, "rloo": 3}
# HF Llama module names of PEFT's target_modules -> lmfleet's (lmfleet.model.export maps the weights so).
HF_LINEAR = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2",
             "up_proj": "w3"}


@dataclass
class Role:
    name: str  # policy, reward model, student, reference, teacher
    trained: bool
    params: int
    trainable: int
    where: str  # "training rank" or "frozen-model actor"
    memory: RankMemory


@dataclass
class PostTrainPlan:
    kind: str
    world: int
    strategy: str
    seq_len: int
    sequences_per_micro_batch: int
    roles: list[Role]
    rank_peak: int
    actor_peak: int | None = None
    device_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        roles = [{**asdict(r), "memory": {**asdict(r.memory), "peak": r.memory.peak}} for r in self.roles]
        return {**asdict(self), "roles": roles}


def _targets(cfg, m: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, out features, in features) of each matrix of a block that the `peft` block adapts."""
    p = cfg.peft
    wanted = None if p.target_modules == "all-linear" else {HF_LINEAR.get(t, t) for t in p.target_modules}
    return [(t.name.split(".")[-2], *t.shape) for t in base.layer_tensors(m, 0)
            if len(t.shape) == 2 and (wanted is None or t.name.split(".")[-2] in wanted)]


def peft_trainable(cfg, m: ModelConfig) -> int:
    """Parameters the `peft` block trains on model `m` (LoRA: r x (in + out) per targeted matrix; IA3: one
    scale per output feature, per input feature on the FFN's down projection; prompt / P-tuning: the virtual
    tokens' embeddings and, for P-tuning, its encoder MLP). PEFT's all-linear leaves the output layer out."""
    p = cfg.peft
    if p.method in ("prompt_tuning", "p_tuning"):
        prompt = p.num_virtual_tokens * m.d_model
        if p.method == "prompt_tuning":
            return prompt
        h = p.encoder_hidden_size  # PEFT's MLP encoder: d -> h -> h -> d with biases
        return prompt + (m.d_model * h + h) + (h * h + h) + (h * m.d_model + m.d_model)
    per_layer = sum(p.r * (in_f + out_f) if p.method == "lora" else (in_f if name == "w2" else out_f)
                    for name, out_f, in_f in _targets(cfg, m))
    return m.n_layers * per_layer


def lora_dropout_bytes(cfg, m: ModelConfig, tokens: int, act_bytes: int) -> int:
    """What LoRA's dropout keeps for the backward pass, beyond the model's own activations: lora_A's input,
    a dropped copy of each adapted matrix's input (and its mask, a byte an element), per layer."""
    p = cfg.peft
    if p is None or p.method != "lora" or p.dropout == 0:
        return 0
    return m.n_layers * tokens * sum(in_f for _, _, in_f in _targets(cfg, m)) * (act_bytes + 1)


def _sharding(cfg, m: ModelConfig, world: int, on_gpu: bool) -> Sharding:
    par = cfg.parallel
    if par.strategy == "fsdp":  # the HF Trainer's FSDP2, resharded after forward; bf16 mixed precision on GPU
        bf16 = cfg.training.bf16 if cfg.training.bf16 is not None else on_gpu
        return Sharding("fsdp", world, reshard=True, gathered_bytes=2 if bf16 else 4)
    if par.strategy == "deepspeed":  # the bucket sizes HF fills in for "auto" (lmfleet.posttrain.hf)
        return Sharding("deepspeed", world, zero=DeepSpeedConfig(zero_stage=par.deepspeed.zero_stage)
                        .zero_optimization(m.d_model), zero_keys=None)
    return Sharding("replicated", world)


def _role(name: str, m: ModelConfig, sharding: Sharding, where: str, trainable: int | None = None,
          score_head: bool = False, notes: list[str] | None = None) -> Role:
    """A role's weights and, if trained (`trainable`: None = every parameter), gradients, AdamW states and
    buffers. `score_head`: a sequence classifier (a score per sequence instead of the output layer)."""
    groups = base.model_tensors(m)
    if score_head:
        groups["head"] = [t for t in groups["head"] if not t.name.startswith("output")] + [Tensor("score", (1, m.d_model))]
    tensors = [t for ts in groups.values() for t in ts]
    params = sum(t.numel for t in tensors)
    largest_layer = max(sum(t.numel for t in groups[f"layers.{i}"]) for i in range(m.n_layers))
    if trainable is None:
        trainable, opt = params, base.optimizer_bytes("adamw", tensors, 1)
    else:
        opt = 8 * trainable  # AdamW on the adapters
    weights, grads, optimizer, gathered = states(sharding, params, trainable, opt, largest_layer,
                                                notes if notes is not None else [])
    setup = ddp_setup(sharding, weights) if trainable else 0  # frozen models are not wrapped in DDP
    return Role(name, trainable > 0, params, trainable, where,
                RankMemory(weights, grads, optimizer, gathered, 0, 0, setup))


def logits_bytes(kind: str, tokens: int, m: ModelConfig, on_gpu: bool, head_trained: bool = True) -> int:
    """Bytes of the logits-sized tensors a `kind` step holds at once for a forward pass over `tokens` (a
    micro-batch's sequences, pairs counted both) of model `m` (FUSED, LOGITS_COPIES). `head_trained`: False
    under peft (the output layer frozen: no weight gradient)."""
    if kind == "reward":  # a score head, no vocab
        return 0
    if kind in FUSED:
        tile = min(tokens, FUSED_TILE[0]) * min(m.vocab_size, FUSED_TILE[1]) * 4
        return FUSED_TILE_COPIES[on_gpu] * tile + (4 * m.vocab_size * m.d_model if head_trained else 0)
    return int(LOGITS_COPIES[kind] * 4 * tokens * m.vocab_size)


def plan_posttrain(kind: str, cfg, models: dict[str, ModelConfig], world: int | None = None,
                   on_gpu: bool = False, device_memory: int | None = None) -> PostTrainPlan:
    """The plan of post-training stage `cfg` (of `kind`) on `world` ranks (default: its scaling's minimum),
    `models`: the ModelConfig of each model key it reads (model, reward_model, student_model) and, for
    distill, "student" (the model it trains). `on_gpu`: bf16 activations (and FSDP's gathered copy), as
    training on GPUs; else fp32, as on CPUs."""
    world = world or cfg.scaling.bounds[0]
    rl = kind in RL
    act_bytes = 2 if on_gpu and not rl else 4  # the RL workers train an fp32 policy without autocast
    seq = cfg.training.max_length
    notes: list[str] = []
    policy = models["student" if kind == "distill" else "model"]
    sharding = Sharding("replicated", world) if rl else _sharding(cfg, policy, world, on_gpu)
    peft = getattr(cfg, "peft", None)
    trained_name = {"reward": "reward model", "distill": "student"}.get(kind, "policy")
    trained = _role(trained_name, policy, sharding, "training rank", peft_trainable(cfg, policy) if peft else None,
                    score_head=kind == "reward", notes=notes)
    roles = [trained]

    if rl:
        hp = cfg.algorithm
        per_worker = hp.rollout_batch * cfg.group // world
        seqs = hp.mini_batch // world
        frozen_where = "frozen-model actor" if cfg.placement == "split" else "training rank"
        frozen = Sharding("replicated", 1)
        if hp.kl_coef > 0:
            roles.append(_role("reference", models["model"], frozen, frozen_where, trainable=0))
        if cfg.reward_model is not None:
            roles.append(_role("reward model", models["reward_model"], frozen, frozen_where, trainable=0,
                               score_head=True))
        # The rollout: generation's KV cache (keys and values of every layer, every sampled sequence), then one
        # no-grad pass over them all for the log-probs (logits and their log-softmax).
        m = policy
        kv = 2 * m.n_layers * m.kv_heads * m.dim_per_head * per_worker * seq * act_bytes
        rollout = kv + 2 * 4 * per_worker * seq * m.vocab_size
    else:
        seqs = cfg.batch.micro_batch * (2 if kind in PAIRED else 1)
        rollout = 0
        if kind in REFERENCE and not peft:
            roles.append(_role("reference", models["model"], sharding, "training rank", trainable=0, notes=notes))
        if kind == "distill":  # the teacher is moved to each worker's device as it is (replicated)
            roles.append(_role("teacher", models["model"], Sharding("replicated", 1), "training rank", trainable=0))

    # Activations of the trained model for one micro-batch, and its loss's logits (`logits_bytes`).
    tokens = seqs * seq
    per_layer = base.activation_elements(policy, tokens, 1)
    lora = lora_dropout_bytes(cfg, policy, tokens, act_bytes) if peft else 0
    if not rl and cfg.parallel.activation_checkpointing:
        act = policy.n_layers * tokens * policy.d_model + per_layer
        lora //= policy.n_layers  # kept for the layer being recomputed only
    else:
        act = policy.n_layers * per_layer
    trained.memory.activations = act * act_bytes + lora
    # (the frozen models' passes: in the fused tiles, the distillation count and an RL stage's rollout)
    trained.memory.logits = logits_bytes(kind, tokens, policy, on_gpu, head_trained=not peft)
    rank = [r for r in roles if r.where == "training rank"]
    # Training: every role's states, and the larger of an update's activations and the rollout. Before it,
    # DDP's setup: the trained model's weights twice, the frozen ones loaded beside them.
    update = trained.memory.activations + trained.memory.logits
    training = sum(r.memory.training for r in rank) - update + max(update, rollout)
    setup = trained.memory.setup + sum(r.memory.weights for r in rank if r is not trained)
    rank_peak = max(training, setup)
    if rollout > update and training >= setup:
        notes.append(f"the rollout is this rank's peak: {size_text(rollout)} for {per_worker} sampled sequences "
                     f"of up to {seq} tokens (KV cache and log-probs); lower rollout_batch or add workers")
    actors = [r for r in roles if r.where != "training rank"]
    actor_peak = sum(r.memory.peak for r in actors) if actors else None
    if any(r.name == "reference" for r in actors):  # its log-probs pass over a worker's whole rollout
        actor_peak += 2 * 4 * per_worker * seq * models["model"].vocab_size
    if on_gpu and (kind not in RL):
        notes.append("bf16 on GPU with fp32 master weights: the plan counts fp32 weights and gradients, so it "
                     "overestimates them")
    if device_memory is not None and max(rank_peak, actor_peak or 0) > device_memory:
        notes.append(f"a training rank needs {rank_peak / GiB:.1f} GiB"
                     + (f" and a frozen-model actor {actor_peak / GiB:.1f} GiB" if actor_peak else "")
                     + f", more than the {device_memory / GiB:.1f} GiB given: shard more (fsdp, deepspeed zero_stage 3), "
                     "turn on parallel.activation_checkpointing, lower batch.micro_batch, use peft"
                     + (" or placement: split" if rl else ""))
    return PostTrainPlan(kind, world, "ddp" if rl else cfg.parallel.strategy, seq, seqs, roles, rank_peak,
                         actor_peak, device_memory, list(dict.fromkeys(notes)))  # (a note per role said once)


def posttrain_lines(plan: PostTrainPlan) -> list[str]:
    lines = [f"{plan.kind} on {plan.world} ranks ({plan.strategy}); {plan.sequences_per_micro_batch} sequence(s) of "
             f"up to {plan.seq_len} tokens per forward pass"]
    for r in plan.roles:
        mem = r.memory
        what = "trained" if r.trainable == r.params else (f"{r.trainable:,} adapter parameters trained" if r.trained
                                                           else "frozen")
        parts = [f"weights {size_text(mem.weights)}"]
        if r.trained:
            parts += [f"gradients {size_text(mem.gradients)}", f"optimizer {size_text(mem.optimizer)}"]
        if mem.gathered:
            parts.append(f"gathered / buckets {size_text(mem.gathered)}")
        if mem.activations:
            parts.append(f"activations {size_text(mem.activations)} (estimate)")
        if mem.logits:
            parts.append(f"logits {size_text(mem.logits)}")
        if mem.setup:
            parts.append(f"at DDP's start {size_text(mem.setup)} (the weights and their broadcast copy)")
        lines.append(f"  {r.name} ({r.params:,} parameters, {what}; on each {r.where}): {', '.join(parts)}")
    lines.append(f"  predicted peak per training rank {size_text(plan.rank_peak)}")
    if plan.actor_peak is not None:
        lines.append(f"  predicted peak per frozen-model actor {size_text(plan.actor_peak)}")
    return lines + [f"warning: {n}" for n in plan.notes]


def stage_model(ref: str, key: str, stages: dict, run_dir, seen: frozenset = frozenset()) -> ModelConfig:
    """The ModelConfig of the model `ref` names (config key `key`): a stage of this config (`stages`: name ->
    (kind, config)) by what it will write, so a pipeline plans before it runs; else the dir's config.json."""
    from lmfleet.model.hf_config import checkpoint_model_config, model_dir
    from lmfleet.train.plan import data_shapes, planned_config

    if ref not in stages:
        return checkpoint_model_config(str(model_dir(ref, run_dir)), key)
    if ref in seen:
        raise InputError(f"{key} {ref!r}: the stages' models name each other in a loop ({', '.join(sorted(seen))})")
    seen = seen | {ref}
    kind, cfg = stages[ref]
    if kind == "pretrain":
        cfg = planned_config(cfg, run_dir, None)
        vocab, _, _ = data_shapes(cfg, {n: c for n, (k, c) in stages.items() if k == "data"}, run_dir)
        return cfg.model.model_copy(update={"vocab_size": vocab})
    if kind == "distill":
        return student_model(cfg, stages, run_dir, seen)
    if kind == "data":
        raise InputError(f"{key} {ref!r}: a data stage has no model")
    return stage_model(cfg.model, f"{ref}.model", stages, run_dir, seen)  # fine-tuning keeps the architecture


def student_model(cfg, stages: dict, run_dir, seen: frozenset = frozenset()) -> ModelConfig:
    """A distill stage's student: `student_model`, or the teacher's config with `student`'s sizes."""
    if cfg.student_model is not None:
        return stage_model(cfg.student_model, "distill.student_model", stages, run_dir, seen)
    teacher = stage_model(cfg.model, "distill.model", stages, run_dir, seen)
    return teacher.model_copy(update={k: v for k, v in cfg.student.model_dump().items() if v is not None})


def role_models(kind: str, cfg, stages: dict, run_dir) -> dict[str, ModelConfig]:
    """What plan_posttrain needs: the ModelConfig of each model the stage reads (and a distill's student)."""
    keys = ("model", "reward_model") if kind in RL else ("model",)  # (DPO's reward model only evaluates)
    models = {key: stage_model(getattr(cfg, key), f"{kind}.{key}", stages, run_dir)
              for key in keys if getattr(cfg, key, None) is not None}
    if kind == "distill":
        models["student"] = student_model(cfg, stages, run_dir)
    return models


def with_workers(cfg, workers: int | None):
    """`cfg` checked as it would be on `workers` ranks (batch and rollout divisibility; ConfigError naming
    the key); itself when None."""
    if workers is None:
        return cfg
    from pydantic import ValidationError

    from lmfleet.config import format_validation_error
    from lmfleet.errors import ConfigError

    data = cfg.model_dump()
    data["scaling"] = {**data["scaling"], "num_workers": workers}
    try:
        return type(cfg).model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{cfg.KIND} with {workers} ranks", (cfg.KIND,))) from None
