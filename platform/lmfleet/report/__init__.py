"""A run's report.html: one self-contained page (plots embedded as PNG data, no network) built from what
the run dir holds (report.json, config.yaml, metrics.jsonl, the stages' files). The runner writes it at
the end of every run; `lmfleet report RUN` rebuilds it from a run dir or URI.

  load.py      the run dir read into a RunView (each stage's own records of metrics.jsonl)
  plots.py     matplotlib figures as data URIs; panels of series over steps
  sections.py  one section per stage kind (data, pretraining, post-training, RL, search)
  page.py      the HTML: header, sections, the page itself; build_html / write_html
"""
