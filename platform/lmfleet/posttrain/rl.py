"""The RL stages' shared machinery (ppo, grpo, rloo): rollout -> score -> advantage -> update on Ray Train.

An algorithm is a subclass of `RLTrainer` (its own module: ppo.py, grpo.py, rloo.py) that says how many
completions it samples per prompt, whether the policy carries a value head, how advantages come from a
rollout (`advantages`) and its policy loss on a mini-batch (`loss`); the math is in lmfleet.posttrain.loss.
Everything else is here: reading and quarantining prompts, the Ray Train run, models, sampling, rewards
(a reward model and / or Python reward functions: lmfleet.posttrain.rewards), mini-batch updates,
checkpoints and exact resume, metrics, the exported model, the held-out evaluation and the report.

Where the models live: all of them in each Ray Train worker (the policy, trained with DDP; the frozen
reference, unless kl_coef is 0; the frozen reward model, if any). Workers split every iteration's prompts
(data parallel), each sampling all `num_generations` completions of its prompts, so group statistics are
local. Each worker needs memory for every model (the frozen ones have no optimizer state).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from lmfleet import runtime
from lmfleet.errors import UserError
from lmfleet.outputs import publish, workdir
from lmfleet.posttrain.config import PREFERENCE_FORMATS, _RLStage
from lmfleet.posttrain.records import Records, prompt_of
from lmfleet.posttrain.stage import PostTrainStage, StageInputs, quarantine_long_prompts
from lmfleet.runlog import read_jsonl
from lmfleet.runtime import ORDER, SAMPLING, SHUFFLE, WorkerRun, step_seed, worker_device
from lmfleet.storage import checkpoint_uri
from lmfleet.train.memory import PeakMemory, gather_record, report_section, summary_line

DRY_RUN_RECORDS = 4  # reward functions are called on this many records' reference answers before any work


@dataclass(frozen=True)
class RLInputs(StageInputs):
    """StageInputs (`model`: the policy to improve, also the frozen reference) and what the RL workers add."""

    prompts: str = ""  # prompts.jsonl: {"prompt": messages, "record": the record reward functions see}
    val_prompts: str = ""
    reward_sources: dict[str, str] = field(default_factory=dict)  # file.py reward functions' text
    seed: int = 0  # the evaluation's sampling (the workers' comes with their WorkerRun)
    frozen: tuple = ()  # placement split: the FrozenModels actors (empty: colocated)


# -- models --


class PolicyWithValue(nn.Module):
    """A causal LM and a scalar value head on its last hidden state (PPO's critic)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def response_stats(model, seq, attention, prompt_len: int, with_values: bool, temperature: float = 1.0):
    """Log-probs under softmax(logits / temperature), the distribution responses were sampled from (and
    values) at the response positions: logits at t predict token t + 1."""
    # Left-padded prompts: count positions from each row's first real token, as generate() did.
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    if with_values:
        logits, values = model(seq, attention, position_ids=positions)
        values = values[:, prompt_len - 1 : -1]
    else:
        logits, values = model(input_ids=seq, attention_mask=attention, position_ids=positions).logits, None
    return token_logprobs(logits[:, prompt_len - 1 : -1] / temperature, seq[:, prompt_len:]), values


# -- rewards --


class Reward:
    """The stage's reward of (record, completion): reward model score x weight + weighted reward functions."""

    def __init__(self, cfg: _RLStage, reward_model: str | None, sources: dict[str, str], device):
        from lmfleet.posttrain.models import load_reward_model
        from lmfleet.posttrain.rewards import RewardFunctions

        self.cfg = cfg
        self.rm = self.rm_tok = None
        if reward_model is not None:
            self.rm, self.rm_tok = load_reward_model(Path(reward_model))
            self.rm.to(device).eval().requires_grad_(False)
        self.functions = RewardFunctions(cfg.reward_functions, sources)

    @torch.no_grad()
    def __call__(self, records: list[dict], completions: list[str], where: list[str]) -> tuple[list[float], dict]:
        """Each completion's reward, and the mean of each part (reward_model, each function by name)."""
        from lmfleet.posttrain.evaluate import reward_scores

        totals, parts = [0.0] * len(completions), {}
        if self.rm is not None:
            scores = reward_scores(self.rm, self.rm_tok, [r["prompt"] for r in records], completions,
                                   self.cfg.training.max_length)
            totals = [self.cfg.reward_model_weight * s for s in scores]
            parts["reward_model"] = scores
        if self.functions.fns:
            rows = [self.functions.score(r["prompt"], c, r["record"], w)
                    for r, c, w in zip(records, completions, where, strict=True)]
            totals = [t + total for t, (total, _) in zip(totals, rows, strict=True)]
            for i, name in enumerate(self.functions.names):
                parts[name] = [values[i] for _, values in rows]
        return totals, parts


class FrozenModels:
    """The frozen side of an RL stage: the reference policy (per-token log-probs) and the reward. In each
    training worker (placement colocated) or in Ray actors of their own (split); tensors in and out are
    on the CPU in split placement, so actors can sit on other nodes or GPUs."""

    def __init__(self, cfg: _RLStage, inputs: RLInputs, with_reference: bool, device, seed: int):
        from transformers import AutoModelForCausalLM

        # A reward model dir without a trained score head gets a drawn one: the same in every placement and run.
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.ref = None
        if with_reference:
            self.ref = AutoModelForCausalLM.from_pretrained(inputs.local("model")).float().to(self.device).eval()
            self.ref.requires_grad_(False)
        self.reward = Reward(cfg, inputs.local("reward_model"), inputs.reward_sources, self.device)

    @torch.no_grad()
    def ref_logprobs(self, seq, attention, prompt_len: int, temperature: float) -> torch.Tensor:
        out, _ = response_stats(self.ref, seq.to(self.device), attention.to(self.device), prompt_len, False,
                                temperature)
        return out

    def score(self, records: list[dict], completions: list[str], where: list[str]) -> tuple[list[float], dict]:
        return self.reward(records, completions, where)


class _Remote:
    """A FrozenModels actor behind the same methods (tensors sent on the CPU, results brought back)."""

    def __init__(self, actor, device):
        self.actor, self.device = actor, device

    def ref_logprobs(self, seq, attention, prompt_len: int, temperature: float) -> torch.Tensor:
        import ray

        out = ray.get(self.actor.ref_logprobs.remote(seq.cpu(), attention.cpu(), prompt_len, temperature))
        return out.to(self.device)

    def score(self, records, completions, where):
        import ray

        return ray.get(self.actor.score.remote(records, completions, where))


# -- the Ray Train worker --


class RLTrainer:
    """One worker's share of an RL algorithm: sampling, rewards, advantages, updates, checkpoints.
    Subclasses set `value_head` and implement `advantages` and `loss`."""

    value_head = False

    def __init__(self, cfg: _RLStage, inputs: RLInputs, seed: int):
        import ray.train
        import ray.train.torch
        from transformers import AutoModelForCausalLM

        from lmfleet.posttrain.models import load_tokenizer

        self.cfg, self.hp, self.seed = cfg, cfg.algorithm, seed
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = worker_device(inputs.use_gpu)
        model = inputs.local("model")
        self.tok = load_tokenizer(Path(model))
        self.tok.padding_side = "left"
        torch.manual_seed(seed)
        # fp32 master weights whatever the checkpoint's dtype (transformers loads dtype="auto").
        lm = AutoModelForCausalLM.from_pretrained(model).float()
        for m in lm.modules():  # no dropout: the first ratio of every update epoch must be exactly 1
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        self.module = PolicyWithValue(lm) if self.value_head else lm
        self.lm = lm
        self.policy = ray.train.torch.prepare_model(self.module, move_to_device=self.device)
        self.with_reference = self.uses_reference(cfg.algorithm)
        if inputs.frozen:  # placement split
            self.frozen = _Remote(inputs.frozen[self.rank % len(inputs.frozen)], self.device)
        else:
            self.frozen = FrozenModels(cfg, inputs, self.with_reference, self.device, seed)
        opt = cfg.optimizer
        # Weight decay on matrices only, as pretraining and the HF Trainer (optimizer.weight_decay).
        params = [p for p in self.policy.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)
        self.prompts = read_jsonl(inputs.prompts)

    # -- what an algorithm decides --

    @classmethod
    def uses_reference(cls, hp) -> bool:
        """Whether the algorithm with these hyperparameters needs the reference policy's log-probs."""
        return hp.kl_coef > 0

    def advantages(self, batch: dict) -> dict:
        """Tensors to add to the rollout batch (at least `advantages`), from its scores and log-probs."""
        raise NotImplementedError

    def loss(self, mb: dict, prompt_len: int) -> tuple[torch.Tensor, dict]:
        """The loss of a mini-batch of the rollout (a forward pass of the policy) and its statistics."""
        raise NotImplementedError

    def state(self) -> dict:
        """Algorithm state to checkpoint beside the weights and optimizer."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def after_iteration(self, rollout: dict) -> None:
        """Called with the iteration's rollout means over workers (score, kl, ...)."""

    # -- shared --

    def batch_prompts(self, iteration: int) -> list[dict]:
        """This worker's slice of the iteration's prompts (a seeded order over epochs of the prompt set)."""
        n = self.hp.rollout_batch
        order: list[int] = []
        epoch = (iteration * n) // len(self.prompts)
        while len(order) < (iteration * n) % len(self.prompts) + n:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, stream=ORDER))
            order += torch.randperm(len(self.prompts), generator=g).tolist()
            epoch += 1
        start = (iteration * n) % len(self.prompts)
        return [self.prompts[i] for i in order[start : start + n][self.rank :: self.world]]

    def generate(self, enc: dict) -> torch.Tensor:
        """Sampled sequences (prompt + completion) with `generation.engine` (hf: this worker's policy); the seam
        for another engine (a vLLM server fed the policy's weights each iteration)."""
        g = self.cfg.generation
        return self.lm.generate(
            **enc, do_sample=True, max_new_tokens=g.max_new_tokens, pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id, temperature=g.temperature, top_k=None, top_p=1.0,
        )

    @torch.no_grad()
    def rollout(self, prompts: list[dict], iteration: int) -> dict:
        from lmfleet.posttrain.evaluate import encode_chat

        g, t, group = self.cfg.generation, self.cfg.training, self.cfg.group
        records = [p for p in prompts for _ in range(group)]  # each prompt's completions side by side
        started = time.perf_counter()
        ids = [encode_chat(self.tok, r["prompt"])[0][-(t.max_length - g.max_new_tokens):] for r in records]
        enc = self.tok.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        self.module.eval()
        seq = self.generate(enc)
        prompt_len = enc["input_ids"].shape[1]
        response = seq[:, prompt_len:]
        # Real tokens: up to and including the first EOS.
        is_eos = response == self.tok.eos_token_id
        after_eos = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
        mask = (~after_eos).float()
        attention = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        texts = [self.tok.decode(r[m.bool()], skip_special_tokens=True).strip()
                 for r, m in zip(response, mask, strict=True)]
        generated = time.perf_counter()
        where = [f"{r.get('where', '?')} (iteration {iteration + 1}, worker {self.rank})" for r in records]
        scores, parts = self.frozen.score(records, texts, where)
        scores = torch.tensor(scores, device=self.device)
        has_eos = is_eos.any(dim=1)
        if self.hp.missing_eos_penalty is not None:
            scores = scores + self.hp.missing_eos_penalty * (~has_eos)
        scored = time.perf_counter()
        logprobs, values = response_stats(self.policy, seq, attention, prompt_len, self.value_head, g.temperature)
        batch = {"seq": seq, "attention": attention, "mask": mask, "logprobs": logprobs, "scores": scores,
                 "length": mask.sum(dim=1), "has_eos": has_eos.float(),
                 **{f"reward/{k}": torch.tensor(v, device=self.device) for k, v in parts.items()}}
        if values is not None:
            batch["values"] = values * mask
        if self.with_reference:
            batch["ref_logprobs"] = self.frozen.ref_logprobs(seq, attention, prompt_len, g.temperature)
            batch["kl"] = ((logprobs - batch["ref_logprobs"]) * mask).sum(dim=1)
        batch.update(self.advantages(batch))
        batch["prompt_len"] = prompt_len
        batch["seconds"] = {"generation": generated - started, "scoring": scored - generated,
                            "tokens": float(mask.sum())}
        return batch

    def optimize(self, batch: dict, iteration: int) -> dict:
        self.module.train()
        local_mb = self.hp.mini_batch // self.world
        n = len(batch["seq"])
        stats: dict[str, list[float]] = {}
        g = torch.Generator().manual_seed(step_seed(self.seed, iteration, self.rank, SHUFFLE))
        for _ in range(self.hp.epochs):
            for idx in torch.randperm(n, generator=g).split(local_mb):
                mb = {k: v[idx] for k, v in batch.items() if isinstance(v, torch.Tensor)}
                loss, mb_stats = self.loss(mb, batch["prompt_len"])
                loss.backward()
                if self.cfg.optimizer.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optimizer.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss, **mb_stats}.items():
                    stats.setdefault(k, []).append(float(v.detach()))
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def all_sum(self, values: list[torch.Tensor | float]) -> list[float]:
        """Sums over the workers (one all-reduce)."""
        import torch.distributed as dist

        sums = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        return sums.tolist()

    def mean_over_workers(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        sums = self.all_sum([values[k].double().sum() for k in keys] + [float(len(values[keys[0]]))])
        return {k: sums[i] / sums[-1] for i, k in enumerate(keys)}

    def save(self, iteration: int, metrics: dict) -> None:
        def write(d: Path) -> None:  # the weights are replicated: rank 0 writes them
            torch.save({"policy": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "iteration": iteration, **self.state()}, d / "rl.pt")

        runtime.save_checkpoint(metrics, f"iteration_{iteration:06d}", write if self.rank == 0 else None)

    def restore(self) -> int:
        with runtime.latest_checkpoint() as d:
            if d is None:
                return 0
            state = torch.load(d / "rl.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_state(state)
        return state["iteration"]


def _worker(config: dict) -> None:
    run: WorkerRun = config["run"]
    cfg, inputs = run.cfg, run.inputs
    memory = PeakMemory(worker_device(inputs.use_gpu))
    memory.start()  # the policy (and colocated frozen models), optimizer states, rollouts, activations
    trainer = run.stage_class(cfg, inputs, run.seed)
    memory.mark("init")
    for iteration in range(trainer.restore(), cfg.iterations):
        started = time.perf_counter()
        torch.manual_seed(step_seed(run.seed, iteration, trainer.rank, SAMPLING))
        batch = trainer.rollout(trainer.batch_prompts(iteration), iteration)
        before = trainer.state()
        trained = time.perf_counter()
        stats = trainer.optimize(batch, iteration)
        trained = time.perf_counter() - trained
        means = {k: batch[k] for k in ("scores", "length", "has_eos", "kl") if k in batch}
        means.update({k: v for k, v in batch.items() if k.startswith("reward/")})
        rollout = trainer.mean_over_workers(means)
        trainer.after_iteration(rollout)
        seconds = trainer.all_sum([batch["seconds"]["generation"], batch["seconds"]["scoring"], trained,
                                   batch["seconds"]["tokens"]])
        metrics = {"iteration": iteration + 1, "score": rollout.pop("scores"), "kl": rollout.pop("kl", None),
                   "response_length": rollout.pop("length"), "eos_fraction": rollout.pop("has_eos"), **rollout,
                   **before, **stats, "seconds": time.perf_counter() - started,
                   # per worker, averaged over workers; tokens/s over all workers
                   "generation_seconds": seconds[0] / trainer.world, "scoring_seconds": seconds[1] / trainer.world,
                   "training_seconds": seconds[2] / trainer.world,
                   "rollout_tokens_per_s": seconds[3] / max(seconds[0] / trainer.world, 1e-9)}
        if trainer.rank == 0:
            run.metrics.write(run.stage, **metrics)
        if (iteration + 1) % cfg.checkpoint.every == 0 or iteration + 1 == cfg.iterations:
            trainer.save(iteration + 1, metrics)
    record = gather_record(memory)
    if trainer.rank == 0:
        run.metrics.write(run.stage, **record)
        local = workdir(inputs.export, fresh=True)
        trainer.lm.save_pretrained(str(local))
        trainer.tok.padding_side = "right"  # left was for generation; the next stage trains on it
        trainer.tok.save_pretrained(str(local))
        publish(local, inputs.export, move=True)


# -- the stage, on the driver --


def read_prompt_records(cfg: _RLStage, seed: int) -> Records:
    """Prompt, SFT or preference records (the RL stages take their prompts); `auto` reads each way and
    keeps the one that fits."""
    from lmfleet.posttrain.records import read_preferences, read_prompts, read_sft

    fmt = cfg.dataset.format
    if fmt == "auto":
        return max((read_prompts(cfg.dataset, seed), read_sft(cfg.dataset, seed), read_preferences(cfg.dataset, seed)),
                   key=lambda r: r.counts()["kept"])
    if fmt == "prompts":
        return read_prompts(cfg.dataset, seed)
    if fmt in PREFERENCE_FORMATS and fmt != "python_functions":
        return read_preferences(cfg.dataset, seed)
    return read_sft(cfg.dataset, seed)


def reward_record(record: dict) -> dict:
    """What a reward function sees: the record, with `answer` (when it has none) its reference answer:
    an SFT record's last turn, a preference record's chosen one."""
    if "answer" in record:
        return record
    if "messages" in record:
        return {**record, "answer": record["messages"][-1]["content"]}
    if "chosen" in record:
        return {**record, "answer": record["chosen"][0]["content"]}
    return record


def prompt_rows(rows: list[dict], split: str) -> list[dict]:
    """prompts.jsonl rows: the prompt, the record reward functions see, where the record is (for errors)."""
    return [{"prompt": prompt_of(r), "record": reward_record(r), "where": f"data/{split}.jsonl:{i + 1}"}
            for i, r in enumerate(rows)]


def evaluate(cfg: _RLStage, inputs: RLInputs, trained: str) -> dict:
    """The trained policy against the input model on held-out prompts: one sampled answer each (seeded),
    scored by the stage's reward; win rate (ties half), each reward part's mean, KL to the input model."""
    from lmfleet.posttrain.evaluate import device, generate, kl_to_reference
    from lmfleet.posttrain.models import load_causal_lm, load_tokenizer

    rows = read_jsonl(inputs.val_prompts)[: cfg.eval.samples]
    if not rows:
        return {"samples": 0}
    dev = device(inputs.use_gpu)
    policy = load_causal_lm(Path(trained)).to(dev).eval()
    reference = load_causal_lm(Path(inputs.local("model"))).to(dev).eval()
    tok = load_tokenizer(Path(trained))
    torch.manual_seed(inputs.seed)  # as in training: a reward model dir without a trained score head draws the same one
    reward = Reward(cfg, inputs.local("reward_model"), inputs.reward_sources, dev)
    prompts = [r["prompt"] for r in rows]
    # The policies' own distributions (temperature 1): log pi - log ref over their answers estimates the KL.
    sampling = cfg.generation.model_copy(update={"temperature": 1.0})
    answers, scores = {}, {}
    for name, model in (("policy", policy), ("reference", reference)):
        answers[name] = generate(model, tok, prompts, sampling, cfg.training.max_length)
        total, parts = reward(rows, answers[name], [r["where"] for r in rows])
        scores[name] = {"score": total, **parts}
    result = {"samples": len(rows)}
    # The reward, and each of its parts (reward_model, each function): both means and the policy's win rate.
    for part in scores["policy"]:
        mine, theirs = scores["policy"][part], scores["reference"][part]
        wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(mine, theirs, strict=True)]
        suffix = "" if part == "score" else f"_{part}"
        result[f"policy_{part}"], result[f"reference_{part}"] = sum(mine) / len(mine), sum(theirs) / len(theirs)
        result[f"win_rate{suffix}"] = sum(wins) / len(wins)
    result["kl"] = kl_to_reference(policy, reference, tok, prompts, answers["policy"], cfg.training.max_length)
    result["examples"] = [{"prompt": p[-1]["content"], "before": b, "after": a}  # the input model's, the policy's
                          for p, a, b in list(zip(prompts, answers["policy"], answers["reference"], strict=True))[:3]]
    return result


class RLStage(PostTrainStage):
    """An RL stage kind: `TRAINER` (an RLTrainer subclass) runs in every Ray Train worker."""

    TRAINER: ClassVar[type[RLTrainer]]

    @classmethod
    def read(cls, cfg: _RLStage, seed: int) -> Records:
        return read_prompt_records(cfg, seed)

    @classmethod
    def quarantine(cls, cfg: _RLStage, records: Records, tokenizer) -> None:
        # A prompt must leave room for max_new_tokens: longer ones are quarantined, not cut.
        quarantine_long_prompts(records, tokenizer, cfg.training.max_length - cfg.generation.max_new_tokens)

    @classmethod
    def write_data(cls, cfg: _RLStage, records: Records, ctx) -> None:
        super().write_data(cfg, records, ctx)
        for name, rows in (("prompts", prompt_rows(records.train, "train")),
                           ("val_prompts", prompt_rows(records.val, "val"))):
            (ctx.out_dir / "data" / f"{name}.jsonl").write_text(
                "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")

    @classmethod
    def worker_inputs(cls, cfg: _RLStage, ctx, inputs: StageInputs) -> RLInputs:
        from lmfleet.posttrain.rewards import RewardFunctions

        functions = RewardFunctions.load(cfg.reward_functions)  # ConfigError for one that does not load
        return RLInputs(**vars(inputs), prompts=ctx.uri("data", "prompts.jsonl"),
                        val_prompts=ctx.uri("data", "val_prompts.jsonl"), reward_sources=functions.sources,
                        seed=ctx.seed)

    @classmethod
    def train(cls, cfg: _RLStage, ctx, records: Records, inputs: RLInputs) -> dict:
        import ray

        from lmfleet.posttrain.rewards import RewardFunctions

        # A reward function that fails on a record fails here, before any training, on its reference answer.
        functions = RewardFunctions(cfg.reward_functions, inputs.reward_sources)
        for row in prompt_rows(records.train[:DRY_RUN_RECORDS], "train"):
            functions.score(row["prompt"], row["record"].get("answer", ""), row["record"], row["where"])
        actors = start_frozen_actors(cls.TRAINER, cfg, inputs, ctx.seed) if cfg.placement == "split" else ()
        run = WorkerRun(cfg, cls.TRAINER, replace(inputs, frozen=actors), ctx.seed, ctx.name,
                        ctx.metrics.for_workers(), tty=runtime.tty())
        try:
            with ctx.step("train"):
                result = runtime.launch(_worker, run, storage=ctx.storage, use_gpu=inputs.use_gpu)
        except Exception as err:  # Ray Train's failure, wrapping a worker's
            if (user := _user_error(err)) is not None:
                raise user from None
            raise
        finally:
            for actor in actors:
                ray.kill(actor)
        history = ctx.history("score")
        first, last = (history[0], history[-1]) if history else ({}, {})
        report = {"iterations": cfg.iterations, "first_score": first.get("score"), "final_score": last.get("score"),
                  "final_kl": last.get("kl"), "checkpoint": checkpoint_uri(result.checkpoint)}
        memory = report_section(ctx.history("memory_per_rank"))
        if memory:
            report["memory"] = memory
        kl = f", KL {report['final_kl']:.3f}" if report["final_kl"] is not None else ""
        report["summary"] = [
            f"prompts: {len(records.train)} train, {len(records.val)} val, {records.counts()['rejected']} quarantined",
            f"{cfg.iterations} {cfg.KIND.upper()} iterations on {cfg.scaling.bounds[0]} worker(s), {cfg.group} "
            f"completion(s) per prompt: rollout reward {report['first_score']:.3f} -> {report['final_score']:.3f}{kl}"
            if history else "no iteration logged",
            *summary_line(memory),
        ]
        return report

    @classmethod
    def evaluate(cls, cfg: _RLStage, inputs: RLInputs, trained: str) -> dict:
        return evaluate(cfg, inputs, trained)

    @classmethod
    def summary(cls, evaluation: dict, report: dict) -> list[str]:
        return rl_eval_lines(evaluation) if evaluation.get("samples") else ["evaluation: no held-out prompts"]


def start_frozen_actors(trainer_cls: type[RLTrainer], cfg: _RLStage, inputs: RLInputs, seed: int) -> tuple:
    """placement split: `split.actors` FrozenModels actors with their own resources, ready (models loaded).
    The driver owns them, so they outlive a restarted worker group."""
    import ray

    s = cfg.split
    remote = ray.remote(FrozenModels)
    device = "cuda" if s.gpus_per_actor else "cpu"
    actors = tuple(remote.options(name=f"{cfg.KIND}_frozen_{i}_{id(inputs):x}", num_cpus=s.cpus_per_actor,
                                  num_gpus=s.gpus_per_actor).remote(
        cfg, inputs, trainer_cls.uses_reference(cfg.algorithm), device, seed) for i in range(s.actors))
    ray.get([a.__ray_ready__.remote() for a in actors])
    return actors


def rl_eval_lines(e: dict) -> list[str]:
    lines = [f"held-out reward: {e['reference_score']:.3f} (input model) -> {e['policy_score']:.3f}; "
             f"win rate {e['win_rate']:.2f} over {e['samples']} prompts; KL to the input model {e['kl']:.3f}"]
    parts = [k.removeprefix("win_rate_") for k in e if k.startswith("win_rate_")]
    if len(parts) > 1:
        lines += [f"  {p}: {e['reference_' + p]:.3f} -> {e['policy_' + p]:.3f}, win rate {e['win_rate_' + p]:.2f}"
                  for p in parts]
    return lines


def _user_error(err: BaseException) -> UserError | None:
    """The UserError (a reward function's) behind a failed Ray Train run, if that is why it failed."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(str(e))
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None),
                  *getattr(e, "worker_failures", {}).values()]
    return None

