"""An example reward function file for the RL stages (jobs/grpo.yaml): `jobs/rewards_example.py:mentions_arguments`.

A reward function is called as fn(prompt, completion, record, **args) -> float: prompt is the chat
messages, completion the sampled text, record the dataset record (with `answer`, its reference answer,
when it has none). The driver reads this file and sends its text to the workers: no node needs it.
"""

import re


def mentions_arguments(prompt, completion, record, per_argument=0.25):
    """`per_argument` for each parameter of the function's signature (the prompt's last line) that the
    docstring names, up to 1: a check a docstring writer can verify."""
    signature = prompt[-1]["content"].splitlines()[-1]
    inside = signature[signature.find("(") + 1 : signature.rfind(")")]
    names = {m.group(1) for m in re.finditer(r"(?:^|,)\s*\**(\w+)", inside)} - {"self", "cls"}
    found = sum(1 for name in names if re.search(rf"\b{re.escape(name)}\b", completion))
    return min(1.0, per_argument * found)
