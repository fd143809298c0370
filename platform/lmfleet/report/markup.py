"""HTML pieces of the report (everything escaped here)."""

from __future__ import annotations

import html
import json


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A value as a table shows it."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def table(rows: list[list], header: list[str] | None = None, cls: str = "") -> str:
    if not rows:
        return ""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}">{head}{body}</table>'


def kv(items: dict, cls: str = "kv") -> str:
    return table([[k, v] for k, v in items.items() if v is not None], cls=cls)


def figure(uri: str | None, caption: str) -> str:
    if uri is None:
        return ""
    return f'<figure><img alt="{esc(caption)}" src="{uri}"><figcaption>{esc(caption)}</figcaption></figure>'


def lines(items: list[str]) -> str:
    if not items:
        return ""
    return '<ul class="summary">' + "".join(f"<li>{esc(x)}</li>" for x in items) + "</ul>"


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def h3(text: str) -> str:
    return f"<h3>{esc(text)}</h3>"
