"""Task metrics and their uncertainty, pure math over per-example numbers (no models).

Per-example metrics (accuracy, exact match, token F1, pass rate) are means: reported with the standard error
of the mean (sample standard deviation / sqrt(n), as lm-evaluation-harness does) and an interval (Wilson's
for 0/1 outcomes, else normal).
Corpus metrics (perplexity, bits per byte, BLEU, macro F1) are not means of independent numbers: their
interval is a seeded percentile bootstrap over examples.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

# -- choices (multiple_choice, classification) --

def choose(logliks: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax of the log-likelihoods per byte of the choice): lm-eval's acc and
    acc_norm picks (ties: the first)."""
    raw = int(np.argmax(logliks))
    norm = int(np.argmax([ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, choices, strict=True)]))
    return raw, norm


# -- generated answers --

def normalize_answer(s: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized reference."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1 of the normalized words, the best over the references."""
    def f1(p: list[str], r: list[str]) -> float:
        if not p or not r:
            return float(p == r)
        same = sum((Counter(p) & Counter(r)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(r)
        return 2 * precision * recall / (precision + recall)

    words = normalize_answer(prediction).split()
    return max(f1(words, normalize_answer(r).split()) for r in references)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 (rouge_score, stemmed), the best over the references."""
    return max(_rouge_scorer().score(r, prediction)["rougeL"].fmeasure for r in references)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100); examples with fewer references are padded with their first."""
    import sacrebleu

    k = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(k)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score


# -- classification --

def classification_report(gold: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 (0 where undefined) and their macro means."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    per_class = {}
    for k, name in enumerate(labels):
        tp = int(((predicted == k) & (gold == k)).sum())
        p_den, r_den = int((predicted == k).sum()), int((gold == k).sum())
        precision = tp / p_den if p_den else 0.0
        recall = tp / r_den if r_den else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": r_den}
    return {"accuracy": float((gold == predicted).mean()) if len(gold) else 0.0,
            "macro_precision": float(np.mean([c["precision"] for c in per_class.values()])),
            "macro_recall": float(np.mean([c["recall"] for c in per_class.values()])),
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])), "per_class": per_class}


# -- perplexity --

def perplexities(logprob: Sequence[float], tokens: Sequence[int], nbytes: Sequence[int], words: Sequence[int]) -> dict:
    """lm-eval's wikitext metrics from per-document sums: token and word perplexity, bits per byte."""
    lp, t, b, w = (float(np.sum(x)) for x in (logprob, tokens, nbytes, words))
    return {"token_perplexity": math.exp(min(-lp / max(t, 1), 700.0)),
            "word_perplexity": math.exp(min(-lp / max(w, 1), 700.0)),
            "bits_per_byte": -lp / max(b, 1) / math.log(2)}


# -- uncertainty --

def mean_with_stderr(values: Sequence[float], confidence: float) -> dict:
    """Mean, standard error of the mean (lm-eval's stderr) and an interval at `confidence`: Wilson's score
    interval for 0/1 values (a proportion: it stays inside [0, 1] and is not empty at 0 or 1 correct), else the
    normal one, mean +- z * stderr."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    if n and np.isin(x, (0.0, 1.0)).all():
        return {"value": mean, "stderr": se, "ci": wilson(mean, n, z)}
    return {"value": mean, "stderr": se, "ci": [mean - z * se, mean + z * se] if n > 1 else None}


def wilson(p: float, n: int, z: float) -> list[float]:
    """Wilson's score interval of a proportion p of n trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, resamples: int, confidence: float,
              seed: int) -> dict:
    """`statistic(indices)` on all n examples, with a percentile bootstrap interval from `resamples` draws of
    n indices with replacement (numpy Generator seeded by `seed`)."""
    value = statistic(np.arange(n))
    if n < 2 or resamples < 1:
        return {"value": value, "ci": None}
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"value": value, "ci": [float(lo), float(hi)]}
