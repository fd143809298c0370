"""Config of the data stage (the `data:` section of a stage YAML)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmfleet.config import StrictModel

Format = Literal["jsonl", "json", "parquet", "text", "hf_dataset", "python_docstrings"]


class SourceConfig(StrictModel):
    """One named input. Every row it yields is tagged with `source: <name>`."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    format: Format
    paths: list[str] = Field(
        default_factory=list,
        description="Files, dirs or globs: local paths or URIs (s3://, gs://, abfs://); .gz, .zst, .bz2, .xz "
        "files are decompressed. Empty only for python_docstrings (default: this Python's stdlib).",
    )
    text_field: str | list[str] = Field(
        "text", description="Field holding the text; a list joins the non-empty fields with a blank line."
    )
    id_field: str | None = Field(None, description="Field holding a stable id; default: source/file:row.")
    text_unit: Literal["file", "block"] = Field(
        "file", description="text format: one document per file, or per blank-line-separated block."
    )
    split: str = Field("train", description="hf_dataset: split of a saved DatasetDict.")
    glob: str = Field("*", description="Pattern for the files inside a directory path.")

    @model_validator(mode="after")
    def _paths_required(self):
        if not self.paths and self.format != "python_docstrings":
            raise ValueError(f"source {self.name!r}: 'paths' is required for format {self.format!r}")
        return self


AUTO_SPLIT_BYTES = (4 << 20, 128 << 20)  # read.split_bytes: auto's range: bounds of a byte range's size


class ReadConfig(StrictModel):
    split_bytes: int | Literal["auto"] | None = Field(
        "auto",
        description="Uncompressed JSONL and block-text files larger than this are read by several tasks, one "
        "per byte range, each from the first full line or block after its offset (same ids and rows as one "
        "task); auto: the input's bytes over 8 tasks per CPU of the cluster, within 4-128 MiB (two 34 MB "
        "files on 2 CPUs: 16 tasks, the data stage 1.9x faster than at 128 MiB); null: one task per file.",
    )

    @field_validator("split_bytes")
    @classmethod
    def _at_least_1k(cls, v):
        if isinstance(v, int) and v < 1 << 10:
            raise ValueError("must be at least 1024 (bytes), 'auto' or null")
        return v

    def split_for(self, total_bytes: int, cpus: int) -> int | None:
        """The byte-range size for an input of `total_bytes` on `cpus` CPUs."""
        if self.split_bytes != "auto":
            return self.split_bytes
        lo, hi = AUTO_SPLIT_BYTES
        return min(hi, max(lo, total_bytes // (8 * max(cpus, 1))))


class GopherQualityConfig(StrictModel):
    """Gopher's quality rules (Rae et al. 2021; lmfleet.data.quality.gopher): a document outside any bound is
    quarantined with the rule's reason. Null turns a rule off."""

    min_words: int | None = Field(50, ge=0, description="gopher_few_words")
    max_words: int | None = Field(100_000, ge=1, description="gopher_many_words")
    min_mean_word_length: float | None = Field(3.0, ge=0, description="gopher_short_words (characters)")
    max_mean_word_length: float | None = Field(10.0, ge=0, description="gopher_long_words (characters)")
    max_symbol_word_ratio: float | None = Field(0.1, ge=0, description="gopher_symbols: '#' or ellipses per word")
    max_bullet_lines: float | None = Field(0.9, ge=0, le=1, description="gopher_bullet_lines: fraction of lines")
    max_ellipsis_lines: float | None = Field(0.3, ge=0, le=1, description="gopher_ellipsis_lines: fraction of lines")
    min_alpha_words: float | None = Field(0.8, ge=0, le=1,
                                          description="gopher_non_alpha: fraction of words with a letter")
    min_stop_words: int | None = Field(2, ge=0, description="gopher_stop_words: how many of stop_words")
    stop_words: list[str] = ["the", "be", "to", "of", "and", "that", "have", "with"]


class RepetitionConfig(StrictModel):
    """Gopher's repetition rules (lmfleet.data.quality.repetition): fractions of a document that repeat.
    Null (or an n missing from a map) turns a rule off."""

    max_duplicate_lines: float | None = Field(0.3, ge=0, le=1, description="repetition_lines")
    max_duplicate_paragraphs: float | None = Field(0.3, ge=0, le=1, description="repetition_paragraphs")
    max_duplicate_line_chars: float | None = Field(0.2, ge=0, le=1, description="repetition_line_chars")
    max_duplicate_paragraph_chars: float | None = Field(0.2, ge=0, le=1,
                                                        description="repetition_paragraph_chars")
    max_top_ngram_chars: dict[int, float] = Field(
        {2: 0.2, 3: 0.18, 4: 0.16}, description="repetition_top_{n}gram: characters in the most frequent n-gram")
    max_duplicate_ngram_chars: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="repetition_duplicate_{n}gram: characters in n-grams that occur more than once")


class C4Config(StrictModel):
    """C4's line rules (Raffel et al. 2020, section 2.2; TFDS c4_utils; lmfleet.data.quality.c4): a line
    breaking one is removed from the document and counted under the rule; a document with "lorem ipsum" or
    a curly bracket in a kept line, or with too few sentences left, is quarantined. False / null turns a
    rule off (code or markup corpora: curly_bracket and terminal_punctuation off)."""

    terminal_punctuation: bool = Field(
        True, description="no_terminal_punctuation: remove lines not ending in . ? ! or a closing quote, or ending in '...'")
    min_words_per_line: int | None = Field(5, ge=1, description="short_line: remove lines of fewer words")
    max_word_length: int | None = Field(1000, ge=1, description="long_word: remove lines with a longer word")
    javascript: bool = Field(True, description="javascript: remove lines mentioning it (\"enable JavaScript\")")
    policy: bool = Field(True, description="policy: remove lines with 'terms of use', 'privacy policy', cookies...")
    citations: bool = Field(True, description="Strip Wikipedia-style markers ([1], [edit], [citation needed]).")
    lorem_ipsum: bool = Field(True, description="c4_lorem_ipsum: quarantine placeholder text")
    curly_bracket: bool = Field(True, description="c4_curly_bracket: quarantine documents with '{' (code)")
    min_sentences: int | None = Field(3, ge=1, description="c4_few_sentences: quarantine documents left with fewer")


class LanguageConfig(StrictModel):
    """Keep documents in these languages (lmfleet.data.language, Lingua): others are quarantined as
    language_<code>, those it cannot tell as language_uncertain."""

    languages: list[str] = Field(["en"], min_length=1, description="ISO 639-1 codes, e.g. [en, de].")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Below it: language_uncertain.")
    max_chars: int = Field(2000, ge=1, description="Characters of each document the decision reads.")

    @field_validator("languages")
    @classmethod
    def _known(cls, codes: list[str]) -> list[str]:
        from lingua import Language

        known = sorted(lang.iso_code_639_1.name.lower() for lang in Language.all())
        unknown = [c for c in codes if c.lower() not in known]
        if unknown:
            raise ValueError(f"{unknown}: not ISO 639-1 codes of languages Lingua identifies ({', '.join(known)})")
        return [c.lower() for c in codes]


class FilterConfig(StrictModel):
    min_chars: int = Field(1, ge=1, description="Shorter documents (after normalization) are rejected.")
    max_chars: int = Field(1_000_000, ge=1, description="Longer documents are rejected, not truncated.")
    pii: Literal["off", "mask", "drop"] = Field(
        "off", description="E-mail addresses, IP addresses and phone numbers (lmfleet.data.pii): mask each "
        "(<email>, <ip>, <phone>), drop the documents holding any (quarantined: reason pii), or off. Counts "
        "per kind in the report.")
    gopher: GopherQualityConfig | None = Field(None, description="Gopher's quality rules ({} for the defaults).")
    repetition: RepetitionConfig | None = Field(None, description="Gopher's repetition rules ({} for the defaults).")
    c4: C4Config | None = Field(None, description="C4's line rules, which edit documents ({} for the defaults).")
    language: LanguageConfig | None = Field(None, description="Language identification ({} keeps English).")


class NormalizeConfig(StrictModel):
    nfkc: bool = True
    whitespace: bool = Field(True, description="Collapse runs of spaces/tabs, trim lines, at most one blank line.")


class DedupConfig(StrictModel):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard similarity of near-duplicates.")
    num_perm: int = Field(128, ge=8, le=1024)
    ngram: int = Field(5, ge=1, le=32, description="Tokens (or characters with char_ngrams) per shingle.")
    char_ngrams: bool = False
    bands: tuple[int, int] | None = Field(None, description="(b, r); default: optimal for threshold.")
    false_positive_weight: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Weight of LSH false positives vs negatives when choosing bands; default 0.05 with "
        "verification (it drops false positives, so banding favours recall), 0.5 with verify: none.",
    )
    verify: Literal["exact", "estimate", "none"] = Field(
        "exact", description="How a candidate pair is checked before it links two documents: exact (the "
        "Jaccard of their hashed shingle sets, computed where the pair meets), estimate (the fraction of equal "
        "signature positions), none (every LSH candidate links). true / false read as exact / none.")
    max_bucket_pairs: int = Field(
        64, ge=2, description="Buckets larger than this link to their first doc instead of all pairs."
    )

    @field_validator("verify", mode="before")
    @classmethod
    def _verify_from_bool(cls, value):
        return {True: "exact", False: "none"}[value] if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _bands_fit(self):
        if self.bands is not None:
            b, r = self.bands
            if b < 1 or r < 1 or b * r > self.num_perm:
                raise ValueError(f"bands {self.bands}: need b, r >= 1 and b*r <= num_perm ({self.num_perm})")
        return self


class DecontaminateConfig(StrictModel):
    """Quarantine training documents that share a word n-gram with an evaluation document (reason
    `contaminated`; counts per evaluation file in the report). lmfleet.data.decontaminate."""

    paths: list[str] = Field(..., min_length=1, description="Evaluation files, dirs or globs (paths or URIs): "
                             "JSONL / JSON records (all string values of a record are one document) or text.")
    ngram: int = Field(13, ge=1, le=64, description="Tokens per n-gram (13: GPT-3's decontamination).")


class MixingConfig(StrictModel):
    """Static mixing of the deduplicated corpus, measured in characters (a proxy for tokens).

    Target share of source i: `weights[i]` if given, else n_i^(1/T) / sum_j n_j^(1/T) (temperature T;
    T=1 keeps natural proportions, larger T flattens towards uniform). A source below its target is
    repeated (whole epochs, then a seeded fraction) up to `max_epochs`; above it, sampled down.
    """

    weights: dict[str, float] | None = None
    temperature: float = Field(1.0, gt=0.0)
    max_epochs: float | dict[str, float] = Field(4.0, description="Upsampling cap, global or per source.")
    caps: dict[str, int] = Field(default_factory=dict, description="Per-source cap in characters.")
    total_chars: int | None = Field(None, ge=1, description="Size of the mix; default: size of the corpus.")

    @model_validator(mode="after")
    def _positive(self):
        for name, w in (self.weights or {}).items():
            if w < 0:
                raise ValueError(f"weights.{name} = {w}: must be >= 0")
        if self.weights is not None and sum(self.weights.values()) <= 0:
            raise ValueError("weights: at least one must be > 0")
        epochs = self.max_epochs.values() if isinstance(self.max_epochs, dict) else [self.max_epochs]
        if any(e <= 0 for e in epochs):
            raise ValueError(f"max_epochs {self.max_epochs}: must be > 0")
        return self


# The special tokens of pretraining's objectives (lmfleet.train.objectives.TOKENS; repeated here: the data stage
# does not import training code, and tests/test_objectives.py checks the two agree).
OBJECTIVE_TOKENS = ("<|mask|>", "<|sep|>", "<|cls|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                    "<|isnext|>", "<|notnext|>")


class TokenizerConfig(StrictModel):
    path: Path | None = Field(None, description="Reuse this tokenizer dir instead of training one.")
    vocab_size: int = Field(8000, ge=300)
    min_frequency: int = Field(2, ge=1)
    special_tokens: list[str] = Field(
        default_factory=lambda: ["<|endoftext|>", "<|pad|>", *OBJECTIVE_TOKENS],
        description="EOS and pad, and the tokens pretraining objectives use (mask, separators, FIM sentinels).")
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    max_train_docs: int | None = Field(None, ge=1, description="Train on a seeded sample of about this many documents.")

    @model_validator(mode="after")
    def _specials_declared(self):
        if self.path is None:
            for tok in (self.eos_token, self.pad_token):
                if tok not in self.special_tokens:
                    raise ValueError(f"{tok!r} must be listed in special_tokens")
        return self


class PackConfig(StrictModel):
    seq_len: int = Field(256, ge=8, description="Model context; each stored sample holds seq_len + 1 tokens.")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="Documents held out for validation.")
    samples_per_shard: int = Field(4096, ge=16)
    columns: list[str] = Field(
        default_factory=list,
        description="Numeric fields of the records (their other fields, `meta`) kept per packed sample as the "
        "token-weighted mean over its documents, for `curriculum.score: column:NAME` of pretrain. A document "
        "without a finite number there adds nothing; a sample with none gets NaN.")

    @field_validator("columns")
    @classmethod
    def _column_names(cls, names: list[str]) -> list[str]:
        # a name is part of a file name (<shard>.<NAME>.npy) beside the tokens and positions
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_-]+", n) or n in ("tokens", "positions")]
        if bad:
            raise ValueError(f"{bad}: a column is a top-level field name of letters, digits, _ and - (not tokens "
                             "or positions)")
        if len(set(names)) < len(names):
            raise ValueError(f"{names}: a column is named twice")
        return names


class DataConfig(StrictModel):
    sources: list[SourceConfig] = Field(..., min_length=1)
    read: ReadConfig = ReadConfig()
    filter: FilterConfig = FilterConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig | None = None
    mixing: MixingConfig = MixingConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig | None = PackConfig()

    @model_validator(mode="after")
    def _names(self):
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        for key in ("weights", "caps"):
            unknown = sorted(set(getattr(self.mixing, key) or {}) - set(names))
            if unknown:
                raise ValueError(f"mixing.{key}: unknown sources {unknown}; sources are {names}")
        return self


class DsirConfig(StrictModel):
    """`dsir:` of distill_data (lmfleet.data.dsir): the hashed n-gram features of both bag-of-n-gram models."""

    buckets: int = Field(10_000, ge=16, description="Hash buckets of the n-grams (the paper: 10,000).")
    ngrams: list[int] = Field([1, 2], min_length=1, description="Word n-gram lengths (the paper: unigrams and bigrams).")
    smoothing: float = Field(1.0, gt=0, description="Add-k smoothing of the bucket counts.")

    @field_validator("ngrams")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"{v}: n-gram lengths are 1 or more")
        return sorted(set(v))


class DistillDataConfig(StrictModel):
    """Stage kind `distill_data`: a subset of a data stage's kept documents, packed as a data stage packs, which
    pretrain reads like any data stage (lmfleet.data.distill)."""

    data: str = Field(..., description="A data stage of this run (its dir) or a data stage's output dir: its kept/ "
                                       "documents and tokenizer.")
    method: Literal["dsir", "perplexity", "random"] = Field("dsir", description=(
        "dsir: importance resampling toward `target` (Xie et al. 2023); perplexity: the documents `proxy` (a model "
        "trained on reference text) finds likeliest (Wenzek et al. 2020, Marion et al. 2023); random: a seeded "
        "uniform sample (the baseline)."))
    fraction: float | None = Field(None, gt=0, le=1, description="Keep this fraction of the corpus (`unit`), or `docs`.")
    unit: Literal["chars", "docs"] = Field("chars", description="What `fraction` measures: the characters (a subset "
                                           "of that size, whatever its documents' lengths) or the documents.")
    docs: int | None = Field(None, ge=1, description="Keep this many documents (or `fraction`).")
    target: SourceConfig | None = Field(None, description="dsir: the reference texts, read as a data stage source.")
    proxy: str | None = Field(None, description="perplexity: a causal model (a stage of this run or a model dir).")
    dsir: DsirConfig = DsirConfig()
    pack: PackConfig | None = Field(None, description="None: the input's seq_len, val_fraction 0.01.")

    @model_validator(mode="before")
    @classmethod
    def _target_name(cls, data):
        if isinstance(data, dict) and isinstance(data.get("target"), dict) and "name" not in data["target"]:
            data = {**data, "target": {"name": "target", **data["target"]}}
        return data

    @model_validator(mode="after")
    def _method(self):
        if (self.fraction is None) == (self.docs is None):
            raise ValueError("set one of fraction or docs (how much to keep)")
        if (self.method == "dsir") != (self.target is not None):
            raise ValueError("method dsir needs target (the reference texts); target is only for dsir")
        if (self.method == "perplexity") != (self.proxy is not None):
            raise ValueError("method perplexity needs proxy (a model trained on reference text); proxy is only for "
                             "perplexity")
        if self.target is not None and self.target.format == "hf_dataset":
            raise ValueError("target.format hf_dataset: use jsonl, json, parquet or text files")
        return self
