"""A model under evaluation behind the three requests lm-evaluation-harness makes of a model: the
log-likelihood of a continuation after a context, the rolling log-likelihood of a whole text, and generation
until a stop string. lmfleet's own tasks (lmfleet.eval.tasks) and lm-eval's (lmfleet.eval.harness) both go
through it, so a task scored either way sees the same numbers.

It loads HF causal LMs (a pretrain stage's Llama / Mixtral export, SFT / DPO / PPO / GRPO models, merged LoRA,
prompt-tuning adapters on their base) and lmfleet's own format (`lmfleet_model.json`: ALiBi, LayerNorm, ...).
Encoders (`causal: false`) have no left-to-right likelihood: the stage refuses them before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lmfleet.model.hf_config import OWN_CONFIG


class EvalModel:
    """`model`: a HF causal LM (`hf`) or lmfleet's Transformer, in eval mode on `device`; `tok`: a HF tokenizer
    with a pad token and a chat template (lmfleet.posttrain.models.load_tokenizer)."""

    def __init__(self, model, tok, hf: bool, max_length: int, batch_size: int, device: torch.device):
        self.model, self.tok, self.hf = model, tok, hf
        self.device, self.batch_size = device, batch_size
        context = (getattr(model.config, "max_position_embeddings", None) if hf else model.cfg.max_seq_len) or max_length
        self.max_length = min(max_length, context)
        # generation reuses HF's KV cache; a prompt-tuning adapter prepends virtual tokens: it reruns the sequence
        self.cached = hf and not hasattr(model, "peft_config")
        self.eos = tok.eos_token_id
        self.prefix = tok.bos_token_id if tok.bos_token_id is not None else self.eos
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos

    @classmethod
    def load(cls, path: Path, max_length: int, batch_size: int, device: torch.device) -> EvalModel:
        """The model dir at `path` (HF, a PEFT adapter on its base, or lmfleet's own format)."""
        from lmfleet.posttrain.models import load_causal_lm, load_tokenizer

        if (path / OWN_CONFIG).exists():
            from lmfleet.model.export import load_model

            model, hf = load_model(path), False
        else:
            model, hf = load_causal_lm(path), True
        return cls(model.to(device).eval(), load_tokenizer(path), hf, max_length, batch_size, device)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax of the next-token logits of each row (right-padded into one batch: causal attention keeps
        the padding out of the real tokens)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits if self.hf else self.model(ids)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        return [logp[i, : len(r)] for i, r in enumerate(rows)]

    def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's encoding of a request: trailing spaces of the context move to the continuation, the pair
        is encoded whole and split after the context's tokens (so merges across the boundary count for the
        continuation); an empty context is the prefix token (BOS, else EOS)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix], self.encode(continuation)
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding gives it) per request,
        in batches of batch_size in the given order; the context loses its oldest tokens past max_length."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            rows, conts = [], []
            for context, continuation in requests[start : start + self.batch_size]:
                ctx, cont = self.split_pair(context, continuation)
                ids = (ctx + cont)[-(self.max_length + 1):]
                cont = cont[-(len(ids) - 1):] if len(cont) >= len(ids) else cont
                rows.append(ids[:-1] or [self.prefix])
                conts.append(cont)
            for logp, cont in zip(self._logprobs(rows), conts, strict=True):
                if not cont:
                    out.append((0.0, True))
                    continue
                picked = logp[-len(cont):]
                target = torch.tensor(cont)
                out.append((float(picked.gather(-1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all())))
        return out

    def windows(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        """lm-eval's rolling windows (get_rolling_token_windows with context 1, made disjoint): (input ids, tokens
        it scores at its end). Every token is scored once: the first max_length after the prefix token, each
        later max_length after the token before them; the last window keeps a full max_length of context."""
        n, size = len(tokens), self.max_length
        if not n:
            return []
        first = min(size, n)
        out, done = [([self.prefix] + tokens[: first - 1], first)], first
        while done < n:
            scored = min(n - done, size)
            end = done + scored
            out.append((tokens[max(0, end - size - 1) : end - 1], scored))
            done = end
        return out

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(log-likelihood of the whole text, its tokens) per text."""
        requests = []  # (text index, input ids, scored tokens, their ids)
        for i, text in enumerate(texts):
            tokens = self.encode(text)
            s = 0
            for ids, scored in self.windows(tokens):
                requests.append((i, ids, tokens[s : s + scored]))
                s += scored
        totals = [[0.0, 0] for _ in texts]
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            for (i, _, target), logp in zip(batch, self._logprobs([r[1] for r in batch]), strict=True):
                picked = logp[-len(target):]
                totals[i][0] += float(picked.gather(-1, torch.tensor(target)[:, None]).sum())
                totals[i][1] += len(target)
        return [(lp, n) for lp, n in totals]

    def chat_prompt(self, prompt: str) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=False)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, stop: Sequence[str], temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> str:
        """Greedy (temperature 0) or sampled continuation of `prompt`, ended by EOS, max_new_tokens or the first
        stop string (cut off). One record at a time: no padding, so the result does not depend on batching."""
        ids = (self.encode(prompt) or [self.prefix])[-max(1, self.max_length - max_new_tokens):]
        gen = torch.Generator().manual_seed(seed)
        new: list[int] = []
        past, step_ids = None, ids
        text = ""
        for _ in range(max_new_tokens):
            x = torch.tensor([step_ids], device=self.device)
            if self.cached:  # transformers 5: the KV cache is `cache` (past_key_values is deprecated)
                result = self.model(input_ids=x, cache=past, use_cache=True)
                past, logits = result.cache, result.logits[0, -1]
            else:
                whole = torch.tensor([(ids + new)[-self.max_length:]], device=self.device)
                logits = (self.model(input_ids=whole).logits if self.hf else self.model(whole))[0, -1]
            nxt = _pick(logits.float().cpu(), temperature, top_p, gen)
            if nxt == self.eos:
                break
            new.append(nxt)
            step_ids = [nxt]
            text = self.tok.decode(new, skip_special_tokens=True)
            if any(s in text for s in stop) or len(ids) + len(new) >= self.max_length:
                break
        cut = min((text.index(s) for s in stop if s in text), default=len(text))
        return text[:cut]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    sorted_p = probs[order]
    keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # the smallest top set reaching top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
