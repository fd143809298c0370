"""Byte-level BPE tokenizer: trained with HF `tokenizers`, saved so `AutoTokenizer.from_pretrained` loads it."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from lmfleet.data.config import TokenizerConfig
from lmfleet.errors import InputError


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=sys.stderr.isatty(),  # a bar on a terminal, nothing in job logs
    )
    count = 0

    def counted():
        nonlocal count
        for t in texts:
            count += 1
            yield t

    tok.train_from_iterator(counted(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=cfg.eos_token, bos_token=cfg.eos_token, pad_token=cfg.pad_token
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return {"path": str(out_dir), "trained_on_docs": count, "vocab_size": tok.get_vocab_size()}


def train_tokenizer_remote(blocks: list, cfg: TokenizerConfig, out_dir: Path) -> dict:
    """`train_tokenizer` on the `text` column of the Arrow blocks behind `blocks` (object refs), in a Ray
    task: the BPE trainer's counts grow with the corpus's distinct words (data_scale, trained in the driver:
    its private memory 214 -> 248 MB from 57 to 228 MB of text while the other steps stayed at ~140 MB; in
    this task: the driver's peak 149 -> 156 MB). The task fetches one block at a time and sends back the
    saved files, which are written to `out_dir` here."""
    import ray

    info, files = ray.get(ray.remote(num_cpus=1)(_train_in_task).remote(blocks, cfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(data)
    return {**info, "path": str(out_dir)}


def _train_in_task(blocks: list, cfg: TokenizerConfig) -> tuple[dict, dict[str, bytes]]:
    import tempfile

    import ray

    def texts():
        for ref in blocks:  # refs in a list arrive unresolved: one block in memory at a time
            yield from ray.get(ref)["text"].to_pylist()

    with tempfile.TemporaryDirectory() as tmp:
        info = train_tokenizer(texts(), cfg, Path(tmp))
        return info, {str(f.relative_to(tmp)): f.read_bytes() for f in Path(tmp).rglob("*") if f.is_file()}


def check_tokenizer_dir(path: Path) -> None:
    if not (path / "tokenizer.json").is_file():
        raise InputError(f"tokenizer.path {path}: no tokenizer.json there (expected a saved HF tokenizer dir)")


def tokenizer_info(path: Path, cfg: TokenizerConfig) -> dict:
    """Ids the packer needs, read back from a saved dir (trained here or reused)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = {}
    for role, token in (("eos_id", cfg.eos_token), ("pad_id", cfg.pad_token)):
        ids[role] = tok.token_to_id(token)
        if ids[role] is None:
            raise InputError(f"tokenizer {path}: has no {role[:3]} token {token!r} (set tokenizer.{role[:3]}_token)")
    if ids["eos_id"] == ids["pad_id"]:
        # Padding is masked out of the loss by id: a shared id would hide every EOS target.
        raise InputError(f"tokenizer {path}: pad token {cfg.pad_token!r} is the EOS token; set a distinct "
                         "tokenizer.pad_token (it must exist in the tokenizer)")
    return {"path": str(path), "vocab_size": tok.get_vocab_size(), **ids}
