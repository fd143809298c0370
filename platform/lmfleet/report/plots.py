"""Figures for the report, drawn with matplotlib (Agg) and embedded as PNG data URIs."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from lmfleet.tune.trials import finite

PANEL = (4.4, 2.7)  # inches of one panel; 100 dpi: ~440 x 270 px
MAX_PANELS = 12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid(n: int, cols: int = 3):
    """A figure of `n` panels, `cols` per row; returns (figure, the n axes)."""
    plt = _pyplot()
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL[0] * cols, PANEL[1] * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def data_uri(fig) -> str:
    """The figure as a PNG data URI (and closed)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def series(records: list[dict], x: str, key: str) -> tuple[list, list]:
    """(xs, ys) of the records that hold a finite `key` and an `x`."""
    pairs = [(r[x], r[key]) for r in records if finite(r.get(key)) and finite(r.get(x))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@dataclass
class Panel:
    title: str
    keys: list[str]  # a key ending in "/*": every logged key with that prefix
    log: bool = False  # log y axis
    step: bool = False  # a step plot (worker counts)

    def expand(self, logged: Iterable[str]) -> list[str]:
        out = []
        for k in self.keys:
            out += sorted(x for x in logged if x.startswith(k[:-1])) if k.endswith("/*") else [k]
        return out


@dataclass
class Marks:
    """Vertical lines on every panel: checkpoints (grey, dotted) and restarts (red, dashed)."""
    checkpoints: list = field(default_factory=list)
    restarts: list = field(default_factory=list)


def logged_keys(records: list[dict]) -> list[str]:
    """Keys with a finite number in some record, in the order first logged."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if finite(v):
                seen.setdefault(k, None)
    return list(seen)


def auto_panels(records: list[dict], x: str, explicit: list[Panel], skip: set[str]) -> list[Panel]:
    """The explicit panels, then one per other logged key (`eval_<key>` with `<key>`; `prefix/...` keys
    together), all but `skip` and the x axis; at most MAX_PANELS."""
    logged = logged_keys(records)
    used = {k for p in explicit for k in p.expand(logged)} | skip | {x}
    panels = list(explicit)
    for k in logged:
        if k in used:
            continue
        base = k.removeprefix("eval_")
        if "/" in k:  # a family (rewards/chosen, rewards/rejected, ...), held-out ones with it
            family = base.split("/")[0]
            panel = Panel(family, [f"{family}/*", f"eval_{family}/*"])
        elif base.startswith(("min_", "mean_", "max_")) and {f"min_{base[4:]}", f"max_{base[4:]}"} & set(logged):
            name = base.split("_", 1)[1]  # a spread (min_reward, mean_reward, max_reward): one panel
            panel = Panel(f"{name} (min, mean, max)".replace("_", " "),
                          [f"{p}{a}_{name}" for p in ("", "eval_") for a in ("mean", "min", "max")])
        else:
            panel = Panel(base.replace("_", " "), [base, f"eval_{base}"])
        used.update(panel.expand(logged))
        panels.append(panel)
    return panels[:MAX_PANELS]


def panels_figure(records: list[dict], x: str, panels: list[Panel], marks: Marks | None = None,
                  cols: int = 3) -> str | None:
    """A grid of the panels that have data: a line per key (`eval_` and `val_` keys as markers), the marks
    on each. None if no panel has data."""
    logged = logged_keys(records)
    drawn = [(p, [k for k in p.expand(logged) if series(records, x, k)[0]]) for p in panels]
    drawn = [(p, keys) for p, keys in drawn if keys]
    if not drawn:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = grid(len(drawn), cols)
    for ax, (panel, keys) in zip(axes, drawn, strict=True):
        for i, k in enumerate(keys):
            xs, ys = series(records, x, k)
            held_out = k.startswith(("eval_", "val_"))
            style = {"marker": "o", "markersize": 3, "linewidth": 1} if held_out or len(xs) < 3 else {"linewidth": 1}
            plot = ax.step if panel.step else ax.plot
            plot(xs, ys, label=k, color=f"C{i % 10}", **({"where": "post"} if panel.step else {}), **style)
        if marks:
            for s in marks.checkpoints:
                ax.axvline(s, color="0.6", linewidth=0.6, linestyle=":")
            for s in marks.restarts:
                ax.axvline(s, color="C3", linewidth=0.9, linestyle="--")
        values = [v for k in keys for v in series(records, x, k)[1]]
        if panel.log and min(values) > 0 and max(values) > 20 * min(values):  # spans decades
            ax.set_yscale("log")
        if panel.step:  # counts
            ax.set_ylim(0, max(values) + 1)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_yscale() == "linear":
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=6)
    return data_uri(fig)


def bars(ax, labels: list[str], values: list[float], title: str, color: str = "C0", log: bool = False) -> None:
    """Horizontal bars, top to bottom in the given order, each with its value."""
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=color)
    ax.set_yticks(y, labels, fontsize=7)
    for yi, v in zip(y, values, strict=True):
        ax.text(v, yi, f" {v:,.0f}" if float(v).is_integer() else f" {v:.3g}", va="center", fontsize=7)
    if log and values and min(values) > 0:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.margins(x=0.25)
