"""Model inputs and outputs of the post-training stages: HF model dirs, tokenizers, chat templates.

A stage names its input model either as a stage of the same run (whose `model/` dir it reads) or as
a path to a HF model dir. It writes `model/` in the same form, so stages chain through files.
"""

from __future__ import annotations

from pathlib import Path

from pyarrow import fs

from lmfleet import uri
from lmfleet.errors import InputError
from lmfleet.model.hf_config import model_dir

# lmfleet's chat template. `{% generation %}` marks the assistant text, so TRL can mask everything
# else out of the SFT loss; every assistant turn ends with EOS, so generation stops there.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ADAPTER_CONFIG = "adapter_config.json"


def check_model_dir(ref: str, key: str, upstream: set[str], run_dir: Path | str | None, full_weights: bool = False) -> None:
    """Preflight: the model exists and is a HF dir (a stage of this run that runs earlier is fine).
    `full_weights`: the stage trains or scores the weights, so an adapter-only dir will not do."""
    if ref in upstream:
        return
    path = str(model_dir(ref, run_dir))
    has = lambda name: uri.info(uri.join(path, name), key).is_file  # noqa: E731 - a path or URI
    if uri.info(path, key).type != fs.FileType.Directory:
        raise InputError(f"{key} {ref!r}: no model at {path} (expected a stage name of this run or a HF model dir)")
    if has("lmfleet_model.json"):
        raise InputError(
            f"{key} {ref!r}: {path} is in lmfleet's own format (the pretrained config is not Llama-compatible); "
            "post-training needs a HF model dir: pretrain with RoPE, RMSNorm, SwiGLU, pre-norm, global attention"
        )
    if full_weights and has(ADAPTER_CONFIG):
        raise InputError(
            f"{key} {ref!r}: {path} is a prompt/P-tuning adapter (virtual tokens cannot be merged into weights); "
            "train that stage with peft lora / ia3 or without peft to chain further stages"
        )
    if not has("config.json") and not has(ADAPTER_CONFIG):
        raise InputError(f"{key} {ref!r}: {path} has no config.json (expected a HF model dir)")


def load_tokenizer(path: Path, chat_template: str | None = None):
    """The model dir's tokenizer with a pad token and a chat template (lmfleet's when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None or not tok.chat_template:
        tok.chat_template = chat_template or CHAT_TEMPLATE
    return tok


def load_causal_lm(path: Path, **kwargs):
    """A causal LM from a HF dir, or from a PEFT adapter dir (prompt/P-tuning exports) on its base."""
    from transformers import AutoModelForCausalLM

    if (path / ADAPTER_CONFIG).exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(path), **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def load_reward_model(path: Path):
    """A one-score sequence classifier (a reward stage's model/) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(path)
    # The classifier reads the last non-pad token: the model must know the pad id.
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                               pad_token_id=tok.pad_token_id)
    return model, tok
