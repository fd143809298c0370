"""Pretraining objectives: how one packed sample becomes (inputs, positions, targets) for the loss.

A packed sample is `seq_len + 1` tokens of whole or partial documents, each a segment (position 0 starts
one; every pad token is a segment of its own; see lmfleet.data.packing). Each objective rewrites a sample
in the loader, with its own generator seeded by (seed, sample, epoch), so one packed dataset serves every
objective and a resumed or resized run draws the same corruption for the same sample. Everything here
is numpy on one sample: no torch, no model.

- `clm`: next-token prediction (inputs = tokens[:-1], targets = tokens[1:], pads ignored).
- `fim`: fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
  Middle"): each document (segment, its EOS kept last) is, with probability `rate`, cut at two uniform
  token offsets into prefix / middle / suffix and rearranged as PSM `<PRE> prefix <SUF> suffix <MID>
  middle` or, with probability `spm_rate`, SPM `<PRE> <SUF> suffix <MID> prefix middle` (the SPM variant
  of bigcode's Megatron-LM, StarCoder's); loss on every token. The three sentinels a document gains push
  the sample's last tokens out (they are dropped).
- `span_infill`, `sentence_permutation`, `document_rotation` (Lewis et al. 2020, BART's noising, for a
  decoder): the sample's documents are cut into pieces of at most seq_len / 2 tokens; each piece becomes
  `corrupted <SEP> original`, one attention segment, with the loss on the original only. Pieces fill the
  sample in order until it is full (about half of a sample's tokens are used). Text infilling: spans with
  Poisson(`poisson_lambda`) lengths (at least 1: BART's zero-length insertions are left out, so the
  corrupted text never grows) are drawn until `mask_ratio` of the piece is covered, and each run of
  masked tokens becomes one `<MASK>`. Sentence permutation: the piece's sentences (ending at a token that
  ends with . ! ? or holds a newline; pieces are cut at sentence ends where one falls in the window) in a
  random order. Document rotation: the piece rotated to start at a uniform token.
- `mlm` (Devlin et al. 2019, BERT): `mask_prob` of the sample's non-special tokens (exactly that many,
  rounded, at least 1) are chosen; of those 80% become `<MASK>`, 10% a random non-special token, 10% stay;
  the targets are the original tokens at the chosen places only. For a bidirectional model
  (`model.causal: false`): inputs and targets are aligned (not shifted).
- `mlm_nsp`: BERT's pair task on top: `<CLS> A <SEP> B <SEP>` where A is the first sentences of the
  sample's first document and B the sentences that follow (IsNext) or, with probability
  `nsp_random_fraction`, the start of another sample's first document (NotNext); the longer of A and B
  is cut from its end until the pair fits. Then MLM masking on A and B. The next-sentence label is a
  target at the `<CLS>` position: the token `<ISNEXT>` or `<NOTNEXT>`. With tied embeddings the output
  layer's rows of those two tokens are a linear two-way classifier on the `<CLS>` state (BERT's NSP head
  without its pooler layer), trained through the same cross-entropy as the masked tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmfleet.train.config import ObjectiveConfig

IGNORE = -100

# The special tokens the objectives use (lmfleet's trained tokenizers have them: lmfleet.data.config).
TOKENS = {"mask": "<|mask|>", "sep": "<|sep|>", "cls": "<|cls|>", "fim_prefix": "<|fim_prefix|>",
          "fim_middle": "<|fim_middle|>", "fim_suffix": "<|fim_suffix|>", "isnext": "<|isnext|>",
          "notnext": "<|notnext|>"}
NEEDS = {"clm": (), "fim": ("fim_prefix", "fim_middle", "fim_suffix"), "span_infill": ("mask", "sep"),
         "sentence_permutation": ("sep",), "document_rotation": ("sep",), "mlm": ("mask",),
         "mlm_nsp": ("mask", "sep", "cls", "isnext", "notnext")}
BIDIRECTIONAL = ("mlm", "mlm_nsp")


@dataclass(frozen=True)
class ObjectiveTokens:
    """The token ids an objective uses, read from the packed data's tokenizer by the driver."""

    eos: int
    pad: int
    vocab_size: int
    special: tuple[int, ...]  # every special token id: never masked, never drawn as a random replacement
    sentence_end: tuple[int, ...] = ()  # ids whose text ends a sentence (. ! ? or a newline)
    # TOKENS' ids (-1: not needed by the objective)
    mask: int = -1
    sep: int = -1
    cls: int = -1
    fim_prefix: int = -1
    fim_middle: int = -1
    fim_suffix: int = -1
    isnext: int = -1
    notnext: int = -1


@dataclass(frozen=True)
class Example:
    inputs: np.ndarray  # (seq_len,) token ids
    positions: np.ndarray  # (seq_len,) position in its attention segment (0 starts one)
    targets: np.ndarray  # (seq_len,) the token to predict at each place, IGNORE where none


def sample_rng(seed: int, sample: int, epoch: int, split: int = 0) -> np.random.Generator:
    """The generator of one sample's corruption: the same sample in the same epoch gets the same one."""
    return np.random.default_rng([seed, sample, epoch, split])


def segments(tokens: np.ndarray, positions: np.ndarray, pad: int) -> list[np.ndarray]:
    """The documents (or parts of one) a sample holds, without its pad tokens."""
    starts = np.flatnonzero(positions == 0)
    ends = np.append(starts[1:], len(tokens))
    return [tokens[s:e] for s, e in zip(starts, ends, strict=True) if tokens[s] != pad]


def _positions(lengths: list[int]) -> np.ndarray:
    return np.concatenate([np.arange(n) for n in lengths]) if lengths else np.zeros(0, dtype=np.int64)


def causal_example(pieces: list[np.ndarray], losses: list[np.ndarray], sample_len: int, pad: int) -> Example:
    """A causal example from segments (`losses[i][j]`: whether token j of segment i is a target), cut or padded
    to `sample_len` tokens (each pad its own segment, never a target)."""
    tokens = np.concatenate(pieces)[:sample_len] if pieces else np.zeros(0, dtype=np.int64)
    loss = np.concatenate(losses)[:sample_len] if pieces else np.zeros(0, dtype=bool)
    positions = _positions([len(p) for p in pieces])[:sample_len]
    n = len(tokens)
    if n < sample_len:
        tokens = np.concatenate([tokens, np.full(sample_len - n, pad, dtype=np.int64)])
        positions = np.concatenate([positions, np.zeros(sample_len - n, dtype=np.int64)])
        loss = np.concatenate([loss, np.zeros(sample_len - n, dtype=bool)])
    targets = np.where(loss[1:], tokens[1:], IGNORE)
    return Example(tokens[:-1], positions[:-1], targets)


def clm(tokens: np.ndarray, positions: np.ndarray, pad: int) -> Example:
    targets = np.where(tokens[1:] == pad, IGNORE, tokens[1:])
    return Example(tokens[:-1], positions[:-1], targets)


def fim(tokens, positions, rng: np.random.Generator, t: ObjectiveTokens, rate: float, spm_rate: float) -> Example:
    pieces = []
    for seg in segments(tokens, positions, t.pad):
        body, tail = (seg[:-1], seg[-1:]) if seg[-1] == t.eos else (seg, seg[:0])
        if len(body) >= 2 and rng.random() < rate:
            i, j = np.sort(rng.integers(0, len(body) + 1, size=2))
            pre, mid, suf = body[:i], body[i:j], body[j:]
            p, m, s = [t.fim_prefix], [t.fim_middle], [t.fim_suffix]
            if rng.random() < spm_rate:
                seg = np.concatenate([p, s, suf, m, pre, mid, tail]).astype(np.int64)
            else:
                seg = np.concatenate([p, pre, s, suf, m, mid, tail]).astype(np.int64)
        pieces.append(seg)
    return causal_example(pieces, [np.ones(len(p), dtype=bool) for p in pieces], len(tokens), t.pad)


def pieces_of(seg: np.ndarray, max_len: int, ends: np.ndarray | None = None) -> list[np.ndarray]:
    """`seg` cut into pieces of at most `max_len` tokens, after the last sentence end in each window (`ends`:
    a boolean per token) where there is one."""
    out, start = [], 0
    while start < len(seg):
        stop = min(start + max_len, len(seg))
        if ends is not None and stop < len(seg):
            inside = np.flatnonzero(ends[start:stop])
            if inside.size:
                stop = start + int(inside[-1]) + 1
        out.append(seg[start:stop])
        start = stop
    return out


def infill(piece: np.ndarray, rng: np.random.Generator, mask: int, ratio: float, lam: float) -> np.ndarray:
    """BART text infilling of one piece: Poisson-length spans over `ratio` of it, each masked run -> one mask."""
    n = len(piece)
    masked = np.zeros(n, dtype=bool)
    todo = int(round(ratio * n))
    while todo > 0:
        length = min(max(1, int(rng.poisson(lam))), todo, n)
        start = int(rng.integers(0, n - length + 1))
        masked[start : start + length] = True
        todo -= length
    run_start = masked & ~np.concatenate([[False], masked[:-1]])
    return np.where(run_start, mask, piece)[~masked | run_start]


def permute_sentences(piece: np.ndarray, rng: np.random.Generator, sentence_end: np.ndarray) -> np.ndarray:
    cuts = np.flatnonzero(np.isin(piece[:-1], sentence_end)) + 1
    sentences = np.split(piece, cuts)
    return np.concatenate([sentences[i] for i in rng.permutation(len(sentences))])


def rotate(piece: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.roll(piece, -int(rng.integers(0, len(piece))))


def denoising(tokens, positions, rng: np.random.Generator, t: ObjectiveTokens,
              corrupt: Callable[[np.ndarray, np.random.Generator], np.ndarray], by_sentence: bool = False) -> Example:
    """`corrupted <SEP> original` per piece (loss on the original), pieces filling the sample in order."""
    sample_len = len(tokens)
    room, pieces, losses = sample_len, [], []
    ends = np.asarray(t.sentence_end)
    for seg in segments(tokens, positions, t.pad):
        for piece in pieces_of(seg, (sample_len - 1) // 2, np.isin(seg, ends) if by_sentence else None):
            n = min(len(piece), (room - 1) // 2)
            if n < 1:
                break
            piece = piece[:n]
            corrupted = corrupt(piece, rng)
            pieces.append(np.concatenate([corrupted, [t.sep], piece]).astype(np.int64))
            losses.append(np.concatenate([np.zeros(len(corrupted) + 1, dtype=bool), np.ones(n, dtype=bool)]))
            room -= len(pieces[-1])
    return causal_example(pieces, losses, sample_len, t.pad)


def mask_tokens(inputs: np.ndarray, eligible: np.ndarray, rng: np.random.Generator, t: ObjectiveTokens,
                prob: float) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of `inputs` at `eligible` places: (corrupted inputs, targets)."""
    inputs = inputs.copy()
    targets = np.full(len(inputs), IGNORE, dtype=np.int64)
    if not eligible.size:
        return inputs, targets
    k = max(1, int(round(prob * len(eligible))))
    chosen = np.sort(rng.choice(eligible, size=k, replace=False))
    targets[chosen] = inputs[chosen]
    u = rng.random(k)
    inputs[chosen[u < 0.8]] = t.mask
    swap = chosen[(u >= 0.8) & (u < 0.9)]
    if swap.size:
        inputs[swap] = _random_tokens(rng, len(swap), t)
    return inputs, targets


def _random_tokens(rng: np.random.Generator, n: int, t: ObjectiveTokens) -> np.ndarray:
    out = rng.integers(0, t.vocab_size, size=n)
    special = np.asarray(t.special)
    while np.isin(out, special).any():  # redraw the specials (a few of thousands of ids)
        bad = np.isin(out, special)
        out[bad] = rng.integers(0, t.vocab_size, size=int(bad.sum()))
    return out


def mlm(tokens, positions, rng: np.random.Generator, t: ObjectiveTokens, prob: float) -> Example:
    inputs, positions = tokens[:-1], positions[:-1]
    eligible = np.flatnonzero(~np.isin(inputs, np.asarray(t.special)))
    inputs, targets = mask_tokens(inputs, eligible, rng, t, prob)
    return Example(inputs, positions, targets)


def _sentences(doc: np.ndarray, sentence_end: np.ndarray) -> list[np.ndarray]:
    cuts = np.flatnonzero(np.isin(doc[:-1], sentence_end)) + 1
    parts = [p for p in np.split(doc, cuts) if len(p)]
    if len(parts) < 2 and len(doc) >= 2:  # no sentence end inside: halves
        parts = [doc[: len(doc) // 2], doc[len(doc) // 2 :]]
    return parts


def _first_document(tokens, positions, t: ObjectiveTokens) -> np.ndarray:
    segs = segments(tokens, positions, t.pad)
    docs = [s[:-1] if s[-1] == t.eos else s for s in segs]
    docs = [d for d in docs if len(d) >= 2] or [np.concatenate(docs) if docs else tokens[:2]]
    return docs[0]


def mlm_nsp(tokens, positions, rng: np.random.Generator, t: ObjectiveTokens, prob: float, random_fraction: float,
            other: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]) -> Example:
    """`other(rng)`: (tokens, positions) of a random other sample (the NotNext second segment)."""
    length = len(tokens) - 1
    ends = np.asarray(t.sentence_end)
    sentences = _sentences(_first_document(tokens, positions, t), ends)
    cut = int(rng.integers(1, len(sentences)))
    a = np.concatenate(sentences[:cut])
    is_next = rng.random() >= random_fraction
    b = np.concatenate(sentences[cut:]) if is_next else _first_document(*other(rng), t)
    while len(a) + len(b) > length - 3:  # the longer one loses its last token
        if len(a) > len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    pair = np.concatenate([[t.cls], a, [t.sep], b, [t.sep]]).astype(np.int64)
    n = len(pair)
    inputs = np.concatenate([pair, np.full(length - n, t.pad, dtype=np.int64)])
    positions = np.concatenate([np.arange(n), np.zeros(length - n, dtype=np.int64)])
    eligible = np.concatenate([np.arange(1, 1 + len(a)), np.arange(2 + len(a), 2 + len(a) + len(b))])
    inputs, targets = mask_tokens(inputs, eligible, rng, t, prob)
    targets[0] = t.isnext if is_next else t.notnext
    return Example(inputs, positions, targets)


def make_example(cfg: ObjectiveConfig, tokens: np.ndarray, positions: np.ndarray, rng: np.random.Generator,
                 t: ObjectiveTokens, other=None) -> Example:
    """The example `cfg`'s objective makes of one packed sample (`other`: mlm_nsp's random other sample)."""
    k = cfg.kind
    if k == "clm":
        return clm(tokens, positions, t.pad)
    if k == "fim":
        return fim(tokens, positions, rng, t, cfg.rate, cfg.spm_rate)
    if k == "span_infill":
        return denoising(tokens, positions, rng, t,
                         lambda p, r: infill(p, r, t.mask, cfg.mask_ratio, cfg.poisson_lambda))
    if k == "sentence_permutation":
        ends = np.asarray(t.sentence_end)
        return denoising(tokens, positions, rng, t, lambda p, r: permute_sentences(p, r, ends), by_sentence=True)
    if k == "document_rotation":
        return denoising(tokens, positions, rng, t, rotate)
    if k == "mlm":
        return mlm(tokens, positions, rng, t, cfg.mask_prob)
    return mlm_nsp(tokens, positions, rng, t, cfg.mask_prob, cfg.nsp_random_fraction, other)
