"""Evaluation of post-trained models: perplexity, BLEU / ROUGE of generations, reward-model scores,
win rate and KL of a policy against its reference. Runs in a Ray task on the saved `model/` dirs."""

from __future__ import annotations

import math

import torch

from lmfleet.posttrain.config import GenerationConfig


def device(use_gpu: bool) -> torch.device:
    """Where an evaluation task puts its models: the GPU Ray gave it, else the CPU."""
    return torch.device("cuda" if use_gpu else "cpu")


def encode_chat(tok, prompt: list[dict], response: str | None = None) -> tuple[list[int], int]:
    """Token ids of a prompt (+ the assistant's response) and where the response starts."""
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    if response is None:
        return list(ids), len(ids)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True,
                                   return_dict=False)
    return list(full), len(ids)


@torch.no_grad()
def response_logprobs(model, tok, prompt: list[dict], response: str, max_length: int) -> torch.Tensor:
    """Per-token log-probabilities of `response` after `prompt` under a causal LM."""
    ids, start = encode_chat(tok, prompt, response)
    if tok.eos_token_id in ids[start:]:  # the answer ends at its EOS; the template's newline after it is not trained
        ids = ids[: ids.index(tok.eos_token_id, start) + 1]
    ids = ids[:max_length]  # TRL's trainers keep the start of what is too long: score what they trained on
    if start >= len(ids):
        return torch.zeros(0, device=model.device)
    x = torch.tensor([ids], device=model.device)
    # Prompt-tuned models prepend virtual tokens' logits: keep the positions of the real tokens.
    logits = model(input_ids=x).logits[0, -x.shape[1] : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    return logp[start - 1 :]


def completion_perplexity(model, tok, records: list[dict], max_length: int) -> float | None:
    """exp(mean NLL) of the reference answers' tokens given their prompts."""
    nll, n = 0.0, 0
    for r in records:
        lp = response_logprobs(model, tok, r["messages"][:-1], r["messages"][-1]["content"], max_length)
        nll, n = nll - float(lp.sum()), n + lp.numel()
    return math.exp(min(nll / n, 50.0)) if n else None


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], gen: GenerationConfig, max_length: int,
             batch: int = 8) -> list[str]:
    """Responses to chat prompts (left-padded batches; stops at EOS)."""
    torch.manual_seed(0)  # sampled answers reproduce, and every model compared gets the same draws
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        ids = [encode_chat(tok, p)[0][-(max_length - gen.max_new_tokens):] for p in prompts[i : i + batch]]
        enc = tok.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
        sampling = gen.temperature > 0
        seqs = model.generate(
            **enc, max_new_tokens=gen.max_new_tokens, do_sample=sampling, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **({"temperature": gen.temperature, "top_k": gen.top_k or None, "top_p": gen.top_p} if sampling else {}),
        )
        out += tok.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def bleu_rouge(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        **{k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")},
    }


@torch.no_grad()
def reward_scores(rm, tok, prompts: list[list[dict]], responses: list[str], max_length: int,
                  batch: int = 8) -> list[float]:
    """The reward model's score of each (prompt, response)."""
    tok.padding_side = "right"
    scores = []
    for i in range(0, len(prompts), batch):
        ids = [encode_chat(tok, p, r)[0][:max_length] for p, r in zip(prompts[i : i + batch],
                                                                        responses[i : i + batch], strict=True)]
        enc = tok.pad({"input_ids": ids}, return_tensors="pt").to(rm.device)
        scores += rm(**enc).logits[:, 0].float().tolist()
    return scores


def pairwise_accuracy(rm, tok, records: list[dict], max_length: int) -> dict:
    """How often the reward model scores the chosen answer above the rejected one."""
    prompts = [r["prompt"] for r in records]
    chosen = reward_scores(rm, tok, prompts, [r["chosen"][0]["content"] for r in records], max_length)
    rejected = reward_scores(rm, tok, prompts, [r["rejected"][0]["content"] for r in records], max_length)
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    return {"accuracy": sum(wins) / len(wins) if wins else None, "pairs": len(wins),
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / max(1, len(wins))}


def kl_to_reference(policy, ref, tok, prompts: list[list[dict]], responses: list[str], max_length: int) -> float:
    """Mean over samples of sum_t [log pi(y_t) - log ref(y_t)] on the policy's sampled answers (decoded and
    re-encoded with the chat template): a Monte-Carlo estimate of KL(pi || ref)."""
    kls = [float((response_logprobs(policy, tok, p, r, max_length) - response_logprobs(ref, tok, p, r, max_length)).sum())
           for p, r in zip(prompts, responses, strict=True)]
    return sum(kls) / max(1, len(kls))


def compare_policies(policy, reference, tok, prompts: list[list[dict]], reward_model_dir, gen: GenerationConfig,
                     max_length: int) -> dict:
    """Reward-model score of each policy's answers, the policy's win rate (ties count half), and its KL.

    Answers are sampled (temperature 1, no top-k/p: the policies' own distributions), so the mean of
    log pi - log ref over them estimates KL(pi || ref)."""
    from lmfleet.posttrain.models import load_reward_model

    rm, rm_tok = load_reward_model(reward_model_dir)
    rm.to(policy.device).eval()
    sampling = gen.model_copy(update={"temperature": 1.0, "top_k": 0, "top_p": 1.0})
    answers = {}
    for name, model in (("policy", policy), ("reference", reference)):
        answers[name] = generate(model, tok, prompts, sampling, max_length)
    scores = {name: reward_scores(rm, rm_tok, prompts, a, max_length) for name, a in answers.items()}
    if not prompts:
        return {"samples": 0}
    wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(scores["policy"], scores["reference"], strict=True)]
    return {
        "policy_score": sum(scores["policy"]) / len(wins), "reference_score": sum(scores["reference"]) / len(wins),
        "win_rate": sum(wins) / len(wins), "kl": kl_to_reference(policy, reference, tok, prompts, answers["policy"],
                                                                 max_length),
        "samples": len(wins),
        "examples": [{"prompt": p[-1]["content"], "before": b, "after": a}  # the reference's answer, the policy's
                     for p, a, b in list(zip(prompts, answers["policy"], answers["reference"], strict=True))[:3]],
    }


def preference_margin(model, tok, records: list[dict], max_length: int) -> float:
    """Mean of log pi(chosen | prompt) - log pi(rejected | prompt) over preference pairs; over unpaired
    records (kto), mean log pi of the desirable completions minus that of the undesirable ones."""
    def logp(prompt, answer) -> float:
        return float(response_logprobs(model, tok, prompt, answer, max_length).sum())

    if records and "label" in records[0]:
        good = [logp(r["prompt"], r["completion"][0]["content"]) for r in records if r["label"]]
        bad = [logp(r["prompt"], r["completion"][0]["content"]) for r in records if not r["label"]]
        return sum(good) / max(1, len(good)) - sum(bad) / max(1, len(bad))
    margins = [logp(r["prompt"], r["chosen"][0]["content"]) - logp(r["prompt"], r["rejected"][0]["content"])
               for r in records]
    return sum(margins) / max(1, len(margins))


def preference_evaluation(cfg, inputs, trained: str):
    """The preference stages' evaluation (dpo, kto, orpo, simpo): the log-probability margin of chosen
    over rejected (desirable over undesirable) on held-out records, or on up to 64 training records
    when none are held out, under the input model and the trained one (`trained`). Returns (result,
    input model, trained model, tokenizer, records)."""
    from pathlib import Path

    from lmfleet.posttrain.models import load_causal_lm, load_tokenizer
    from lmfleet.runlog import read_jsonl

    tok = load_tokenizer(Path(trained))
    n = cfg.training.max_length
    held_out = bool(read_jsonl(inputs.val))
    val = read_jsonl(inputs.val) or read_jsonl(inputs.train)[:64]
    before = load_causal_lm(Path(inputs.local("model"))).to(device(inputs.use_gpu)).eval()
    after = load_causal_lm(Path(trained)).to(device(inputs.use_gpu)).eval()
    result = {"pairs": len(val), "held_out": held_out, "margin_before": preference_margin(before, tok, val, n),
              "margin_after": preference_margin(after, tok, val, n)}
    return result, before, after, tok, val


def preference_line(e: dict) -> str:
    return (f"log-prob margin chosen - rejected on {e['pairs']} {'held-out' if e['held_out'] else 'train'} "
            f"records: {e['margin_before']:.3f} -> {e['margin_after']:.3f}")


def policy_line(e: dict) -> str:
    """A summary line of compare_policies' result."""
    return (f"reward model score: {e['reference_score']:.3f} (input model) -> {e['policy_score']:.3f}; "
            f"win rate {e['win_rate']:.2f}; KL to the input model {e['kl']:.3f}")
