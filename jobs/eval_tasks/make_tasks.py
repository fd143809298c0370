"""Builds the task files in this folder from the Python standard library's own docstrings (read with `ast`,
never imported), so they need no download and carry the PSF license of their source.

    python jobs/eval_tasks/make_tasks.py      # rewrites the .jsonl files here (the files kept in the repository
                                              # were made with CPython 3.11.7; another Python gives others)

- stdlib_fluency.jsonl   (multiple_choice) the first line of a function's docstring among three copies with
                         their inner words shuffled: only fluency tells them apart (equal bytes: acc = acc_norm);
                         chance is 25%.
- stdlib_kind.jsonl      (classification) a docstring's first paragraph: does it document a function or a class?
                         Balanced: chance is 50%.
- stdlib_summaries.jsonl (generate) the SFT demo's prompt (write the docstring of this signature) and the first
                         paragraph as the answer: token F1 / ROUGE-L / BLEU.
- stdlib_docstrings.jsonl (perplexity) whole module docstrings.

The quickstart demo trains on the same docstrings: on its models these measure what they learned (fluency,
the SFT format), not generalization to unseen text. Records are sampled with a fixed seed.
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).parent
DOCSTRING_PROMPT = "Write the docstring of this Python function:\n"  # lmfleet.posttrain.records' SFT prompt
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_trees():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            yield path.relative_to(root).as_posix(), ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue


def main() -> None:
    rng = random.Random(0)
    functions, classes, modules, summaries = [], [], [], []
    for rel, tree in stdlib_trees():
        doc = ast.get_docstring(tree)
        if doc and len(doc) >= 200:
            modules.append({"id": rel, "text": doc})
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = doc.split("\n\n")[0].strip()
            where = f"{rel}:{node.lineno}"
            if isinstance(node, ast.ClassDef):
                classes.append({"id": where, "doc": first, "kind": "class"})
                continue
            functions.append({"id": where, "doc": first, "kind": "function"})
            if len(first) >= 20:
                returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
                signature = f"def {node.name}({ast.unparse(node.args)}){returns}:"
                summaries.append({"id": where, "prompt": DOCSTRING_PROMPT + signature, "answer": first})
    fluency = []
    for f in rng.sample(functions, len(functions)):
        words = f["doc"].splitlines()[0].split()
        if len(words) < 6:
            continue
        choices = {" ".join(words)}
        for _ in range(20):
            if len(choices) == 4:
                break
            middle = words[1:-1]
            rng.shuffle(middle)
            choices.add(" ".join(words[:1] + middle + words[-1:]))
        if len(choices) < 4:
            continue
        options = sorted(choices)
        rng.shuffle(options)
        fluency.append({"id": f["id"], "choices": options, "answer": options.index(" ".join(words))})
        if len(fluency) == 200:
            break
    kind = rng.sample([f for f in functions if len(f["doc"]) >= 30], 100) + rng.sample(
        [c for c in classes if len(c["doc"]) >= 30], 100)
    rng.shuffle(kind)
    files = {"stdlib_fluency.jsonl": fluency, "stdlib_kind.jsonl": kind,
             "stdlib_summaries.jsonl": rng.sample(summaries, 100), "stdlib_docstrings.jsonl": rng.sample(modules, 50)}
    for name, records in files.items():
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{name}: {len(records)} records (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
