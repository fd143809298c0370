"""A search's trials as series over steps, from their metrics.jsonl records (no Ray): what the search's
plots/ and the run report draw."""

from __future__ import annotations

import math


def finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def attempt_records(records: list[dict]) -> list[tuple[dict, list[dict]]]:
    """A trial's records as (start event, its attempt's step records): late records of an attempt that was
    already replaced (its workers shutting down) are dropped."""
    out: list[tuple[dict, list[dict]]] = []
    for e in records:
        if e.get("event") in ("start", "resume", "exploit"):
            out.append((e, []))
        elif out and "step" in e and e.get("attempt") == out[-1][0].get("attempt"):
            out[-1][1].append(e)
    return out


def segments(records: list[dict], key: str, donors: dict[str, list[dict]]) -> list[list[tuple]]:
    """A trial's (step, value) series, one piece per attempt; after an exploit it starts at the donor's point."""
    pieces = []
    for event, steps in attempt_records(records):
        piece = []
        if event["event"] == "exploit":
            piece = [(d["step"], d[key]) for d in donors.get(event["donor"], [])
                     if d.get("step") == event["from_step"] and finite(d.get(key))][-1:]
        pieces.append(piece + [(e["step"], e[key]) for e in steps if finite(e.get(key))])
    return [p for p in pieces if p]


def lr_key(records: dict[str, list[dict]]) -> str:
    logged = {k for rows in records.values() for e in rows for k in e}
    return "lr" if "lr" in logged else "learning_rate"  # pretraining's name, HF's


def draw(ax, trials: list[dict], records: dict[str, list[dict]], key: str) -> None:
    """A line per trial (the search report's rows) of `key` over its steps; after an exploit the trial's
    line continues from its donor's point (dotted line: the step)."""
    for i, r in enumerate(trials):
        color = f"C{i % 10}"
        for j, piece in enumerate(segments(records.get(r["id"], []), key, records)):
            ax.plot(*zip(*piece, strict=True), color=color, linewidth=1, label=r["id"] if j == 0 else None)
        for e in r["exploits"]:
            ax.axvline(e["step"], color=color, linewidth=0.6, linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if key in ("lr", "learning_rate"):
        ax.set_yscale("log")
    if trials:
        ax.legend(fontsize=7)
