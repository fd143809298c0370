"""report.html: the header, a section per stage, one page with its style inline (no external file,
script or font: it opens offline, from a bucket's download, or attached to a ticket)."""

from __future__ import annotations

import logging
from pathlib import Path

from lmfleet.outputs import child, write_text
from lmfleet.report import markup as m
from lmfleet.report.load import load_run
from lmfleet.report.sections import Section, run_header, stage_section

log = logging.getLogger("lmfleet")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header,main{max-width:1340px;margin:0 auto;padding:0 24px}
header{padding-top:18px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:0 0 8px}h3{font-size:14px;margin:14px 0 6px}
nav a{margin-right:14px;color:#2557a7;text-decoration:none}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;margin:16px 0;padding:14px 18px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
td,th{border:1px solid #dde1e8;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}
table.kv td:first-child{color:#555;white-space:nowrap}
table.samples td{max-width:380px;white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,monospace;font-size:12px}
figure{margin:8px 0}figure img{max-width:100%;height:auto}figcaption{color:#555;font-size:12px}
pre{background:#f3f4f6;padding:10px;overflow:auto;font-size:12px}
ul.summary{margin:6px 0 4px;padding-left:20px}
.status-succeeded{color:#1a7f37}.status-failed,.status-interrupted{color:#c62828}
"""


def page(run_name: str, status: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{m.esc(s.id)}">{m.esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{m.esc(s.id)}" data-plots="{s.plots}"><h2>{m.esc(s.title)}</h2>{s.body}</section>'
                   for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lmfleet run {m.esc(run_name)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><header><h1>lmfleet run {m.esc(run_name)} <span class="status-{m.esc(status)}">{m.esc(status)}'
            f"</span></h1><nav>{nav}</nav></header><main>{body}</main></body></html>\n")


def build_html(run_dir: Path | str) -> str:
    """The report page of the run at `run_dir` (a path or URI)."""
    run = load_run(run_dir)
    sections = [run_header(run), *(stage_section(run, s) for s in run.stages)]
    return page(run.report.get("name", ""), run.report.get("status", ""), sections)


def write_html(run_dir: Path | str, out: Path | str | None = None) -> Path | str:
    """Build the report and write it to `out` (default: report.html in the run dir); returns where."""
    out = out if out is not None else child(run_dir, "report.html")
    write_text(out, build_html(run_dir))
    return out
