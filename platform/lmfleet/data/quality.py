"""Heuristic quality rules over one document's text (Gopher, Rae et al. 2021, appendix A): the first rule a
document breaks is its quarantine reason, or None if it passes them all. Each rule has its threshold in
the config (lmfleet.data.config: GopherQualityConfig, RepetitionConfig); a null threshold turns it off.

Words are whitespace-separated tokens; a token of punctuation alone is not a word. Lines split on
newlines, paragraphs on blank lines; n-grams are of lowercased words.
"""

from __future__ import annotations

import string
from collections import Counter

from lmfleet.data.config import GopherQualityConfig, RepetitionConfig

_PUNCT = set(string.punctuation) | {"…", "–", "—", "“", "”", "‘", "’", "«", "»"}
_BULLETS = ("•", "●", "○", "▪", "‣", "◦", "-", "*", "·")


def _is_word(token: str) -> bool:
    return not all(c in _PUNCT for c in token)


def gopher(text: str, cfg: GopherQualityConfig) -> str | None:
    """The first Gopher quality rule `text` breaks (reason name), or None."""
    tokens = text.split()
    words = [t for t in tokens if _is_word(t)]
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "gopher_few_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "gopher_many_words"
    if n == 0:  # (only with min_words off) nothing below can be measured
        return "gopher_few_words"
    mean = sum(len(w.strip("".join(_PUNCT)) or w) for w in words) / n
    if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
        return "gopher_short_words"
    if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
        return "gopher_long_words"
    if cfg.max_symbol_word_ratio is not None and max(
            text.count("#"), text.count("...") + text.count("…")) / n > cfg.max_symbol_word_ratio:
        return "gopher_symbols"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and cfg.max_bullet_lines is not None and (
            sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines):
        return "gopher_bullet_lines"
    if lines and cfg.max_ellipsis_lines is not None and (
            sum(line.endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines):
        return "gopher_ellipsis_lines"
    if cfg.min_alpha_words is not None and (
            sum(any(c.isalpha() for c in w) for w in words) / n < cfg.min_alpha_words):
        return "gopher_non_alpha"
    if cfg.min_stop_words is not None:
        stop = set(cfg.stop_words)
        if sum(w.lower().strip("".join(_PUNCT)) in stop for w in words) < cfg.min_stop_words:
            return "gopher_stop_words"
    return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        seen.add(item)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters (of its words) in every occurrence of the most frequent n-gram, if it occurs twice."""
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return sum(map(len, gram)) * count if count > 1 else 0


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by an n-gram that occurs more than once (each word counted once)."""
    starts: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(words) - n + 1):
        starts.setdefault(tuple(words[i:i + n]), []).append(i)
    covered = bytearray(len(words))
    for positions in starts.values():
        if len(positions) > 1:
            for i in positions:
                covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c)


def repetition(text: str, cfg: RepetitionConfig) -> str | None:
    """The first Gopher repetition rule `text` breaks (reason name), or None."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    for kind, items, max_count, max_chars in (
            ("lines", lines, cfg.max_duplicate_lines, cfg.max_duplicate_line_chars),
            ("paragraphs", paragraphs, cfg.max_duplicate_paragraphs, cfg.max_duplicate_paragraph_chars)):
        if not items:
            continue
        count, chars = _duplicates(items)
        if max_count is not None and count / len(items) > max_count:
            return f"repetition_{kind}"
        if max_chars is not None and chars / max(sum(map(len, items)), 1) > max_chars:
            return f"repetition_{kind[:-1]}_chars"
    words = [w.lower() for w in text.split() if _is_word(w)]
    total = sum(map(len, words))
    if not total:
        return None
    for n, limit in sorted(cfg.max_top_ngram_chars.items()):
        if _top_ngram_chars(words, n) / total > limit:
            return f"repetition_top_{n}gram"
    for n, limit in sorted(cfg.max_duplicate_ngram_chars.items()):
        if _duplicate_ngram_chars(words, n) / total > limit:
            return f"repetition_duplicate_{n}gram"
    return None
