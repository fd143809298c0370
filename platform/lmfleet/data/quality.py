"""Heuristic quality rules over one document's text (Gopher, Rae et al. 2021, appendix A): the first rule a
document breaks is its quarantine reason, or None if it passes them all. Each rule has its threshold in
the config (lmfleet.data.config: GopherQualityConfig, RepetitionConfig); a null threshold turns it off.
C4's rules (Raffel et al. 2020) work on lines: they edit the document, and quarantine it only when little
or nothing is left (C4Config).

Words are whitespace-separated tokens; a token of punctuation alone is not a word. Lines split on
newlines, paragraphs on blank lines; n-grams are of lowercased words.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from lmfleet.data.config import C4Config, GopherQualityConfig, RepetitionConfig

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


# TFDS c4_utils' constants: what a kept line ends with, and the substrings of cookie / policy boilerplate.
_END_MARKS = (".", "?", "!", '"', "”")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\s*(?:\[\d*\]|\[edit\]|\[citation needed\])", re.IGNORECASE)
# A sentence ends at . ! or ? (closing quotes or brackets may follow) before whitespace or the line's end.
# C4 counted with NLTK's Punkt (its model is a download, not shipped here), which knows abbreviations:
# here "Dr." ends a sentence, so a line may count more sentences than C4's did.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
C4_LINE_RULES = ("no_terminal_punctuation", "short_line", "long_word", "javascript", "policy")


def c4(text: str, cfg: C4Config) -> tuple[str, str | None, Counter]:
    """(text with C4's bad lines removed, quarantine reason or None, lines removed per rule). Blank lines
    between kept lines that had them stay: paragraphs survive for the repetition rules and for readers."""
    kept: list[str] = []
    removed: Counter = Counter()
    sentences = 0
    gap = False  # a blank line (or a removed paragraph) since the last kept line
    for raw in text.splitlines():
        line = raw.strip()
        if cfg.citations:
            line = _CITATION.sub("", line).strip()
        if not line:
            gap = True
            continue
        rule = None
        if cfg.terminal_punctuation and (not line.endswith(_END_MARKS) or line.endswith(("...", "…"))):
            rule = "no_terminal_punctuation"
        elif cfg.min_words_per_line is not None and len(line.split()) < cfg.min_words_per_line:
            rule = "short_line"
        elif cfg.max_word_length is not None and any(len(w) > cfg.max_word_length for w in line.split()):
            rule = "long_word"
        else:
            lower = line.lower()
            if cfg.lorem_ipsum and "lorem ipsum" in lower:
                return text, "c4_lorem_ipsum", removed
            if cfg.javascript and "javascript" in lower:
                rule = "javascript"
            elif cfg.curly_bracket and "{" in line:
                return text, "c4_curly_bracket", removed
            elif cfg.policy and any(p in lower for p in _POLICY):
                rule = "policy"
        if rule:
            removed[rule] += 1
            continue
        if kept and gap:
            kept.append("")
        kept.append(line)
        gap = False
        sentences += max(1, len(_SENTENCE_END.findall(line)))
    if not kept or (cfg.min_sentences is not None and sentences < cfg.min_sentences):
        return text, "c4_few_sentences", removed
    return "\n".join(kept), None, removed
