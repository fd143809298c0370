"""Document filters of the data stage (the rules themselves: test_quality.py): personal data (lmfleet.data.pii: what the patterns catch and leave;
masked, or the documents quarantined, counted per kind) and benchmark decontamination
(lmfleet.data.decontaminate: evaluation text planted in the corpus -> exactly those documents quarantined,
counted per evaluation file)."""

import gzip
import json
import subprocess

import pyarrow.parquet as pq
import pytest

from lmfleet.data import decontaminate
from lmfleet.data.config import DecontaminateConfig, FilterConfig, NormalizeConfig, SourceConfig
from lmfleet.data.inspect import rejected
from lmfleet.data.pii import scan
from lmfleet.data.read import expand_paths, read_file, with_compressions
from lmfleet.errors import UserError
from lmfleet.runner import load_run, run

from conftest import lmfleet_cmd, write_config


@pytest.mark.parametrize("text, masked, counts", [
    ("Write to jane.doe+news@example.co.uk or call (555) 123-4567 today.",
     "Write to <email> or call <phone> today.", {"email": 1, "phone": 1}),
    ("Server at 192.168.1.20 and fe80::1ff:fe23:4567:890a, also 2001:db8::1.",
     "Server at <ip> and <ip>, also <ip>.", {"ip": 3}),
    ("Call +44 20 7946 0958 or 555.123.4567; fax +1-800-555-0199.",
     "Call <phone> or <phone>; fax <phone>.", {"phone": 3}),
    ("IP 999.1.1.1 and 10.0.0.256 are not addresses; 10.0.0.255 is.",
     "IP 999.1.1.1 and 10.0.0.256 are not addresses; <ip> is.", {"ip": 1}),
    # Left alone: times, dates, version numbers of three parts, ISBNs, plain numbers, non-addresses.
    ("At 12:30:45 on 2020-12-01, version 3.10.4, ISBN 978-3-16-148410-0, order 1234567890, ratio 1:2:3.",
     None, {}),
    ("Not addresses: a@b, user@localhost, 5@3, 100 200 300.", None, {}),
])
def test_patterns(text, masked, counts):
    assert scan(text, mask=True) == (masked or text, counts)
    assert scan(text, mask=False) == (text, counts)  # counted, text untouched


def test_an_address_with_digits_is_an_email_not_a_phone():
    assert scan("mail 555.123.4567@example.com now", mask=True) == ("mail <email> now", {"email": 1})


DOCS = ["Contact me at jane@example.org about the boat.", "Our office line is (555) 123-4567, call anytime.",
        "The router sits at 10.1.2.3 on the lab network.", "A plain sentence about the sea and its tides.",
        "Another plain line, with the number 42 in it.", "Both: bob@example.com and +1 555 987 6543 here."]


FERRY = "The ferry left the harbour at noon with forty passengers."


def test_drop_quarantines_the_documents_with_any(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    task = {"source": json.dumps({"name": "web", "format": "jsonl", "paths": [str(path)]}), "source_index": 0,
            "path": str(path), "relpath": "docs.jsonl"}
    rows = [r for t in read_file(task, NormalizeConfig(), FilterConfig(pii="drop")) for r in t.to_pylist()]
    dropped = {r["raw"]: json.loads(r["pii"]) for r in rows if r["reject_reason"] == "pii"}
    assert dropped == {DOCS[0]: {"email": 1}, DOCS[1]: {"phone": 1}, DOCS[2]: {"ip": 1},
                       DOCS[5]: {"email": 1, "phone": 1}}
    assert sorted(r["text"] for r in rows if r["reject_reason"] is None) == sorted([DOCS[3], DOCS[4]])


QUESTION = ("Which river flows through the ancient city that was once the capital of the eastern empire "
            "for more than a thousand years")
PASSAGE = ("the lighthouse keeper counted the ships that passed the northern cape every winter night and wrote "
           "their names in a book that nobody else ever read")


def _eval_files(root):
    """Two evaluation files: JSONL records (gzipped) and a text file."""
    (root / "evals").mkdir()
    records = [{"question": QUESTION, "choices": ["the Danube", "the Bosporus"], "answer": 1},
               {"question": "An unrelated question about tides and the moon that no document repeats at all"}]
    (root / "evals" / "quiz.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    (root / "evals" / "reading.txt").write_text(PASSAGE.capitalize() + ".\n")
    return root / "evals"


def _corpus(root) -> list[str]:
    words = PASSAGE.split()
    planted = [f"A travel blog. {QUESTION}? Nobody on the tour knew.",  # a whole question, inside other text
               "Notes: " + " ".join(words[3:16]) + ", said the guide.",  # 13 words of the passage in a row
               "Notes: " + " ".join(words[3:15]) + " and more.",  # 12 in a row: not contaminated
               f"{QUESTION}. Also: " + " ".join(words[:14])]  # both files
    return DOCS + planted


def test_eval_documents_and_contamination(tmp_path):
    evals = _eval_files(tmp_path)
    quiz = decontaminate.eval_documents(str(evals / "quiz.jsonl.gz"))
    assert quiz[0] == f"{QUESTION}\nthe Danube\nthe Bosporus" and len(quiz) == 2  # string values, joined
    cfg = DecontaminateConfig(paths=[str(evals)])
    files = expand_paths(SourceConfig(name="decontaminate", format="jsonl", paths=cfg.paths),
                         with_compressions(decontaminate.SUFFIXES))
    ev = decontaminate.load(cfg, files)
    assert ev.files == ("quiz.jsonl.gz", "reading.txt")
    assert decontaminate.contaminated(_corpus(tmp_path), ev) == [[]] * 6 + [
        ["quiz.jsonl.gz"], ["reading.txt"], [], ["quiz.jsonl.gz", "reading.txt"]]


def test_the_data_stage_filters_and_counts(tmp_path, ray_local):
    """filter.pii: mask, filter.repetition and decontaminate in one run: masked texts kept, planted
    documents quarantined with their reasons, counted, a few ids of each in the report."""
    path = tmp_path / "docs.jsonl"
    docs = _corpus(tmp_path) + ["Buy now and save.\nBuy now and save.\nBuy now and save.\nLimited offer.",
                                FERRY + "\nPlease enable JavaScript to see the timetable.\nThis site uses cookies.",
                                "Lorem ipsum dolor sit amet, consectetur adipiscing elit."]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # C4's line rules with the rules that one-line documents break off (terminal punctuation, words per line,
    # sentences): JavaScript and cookie lines leave the ferry document, lorem ipsum quarantines its own.
    c4 = {"terminal_punctuation": False, "min_words_per_line": None, "min_sentences": None}
    cfg = {"name": "filters", "output_dir": str(tmp_path / "run"), "stages": {"data": {
        "sources": [{"name": "web", "format": "jsonl", "paths": [str(path)]}],
        "filter": {"pii": "mask", "repetition": {}, "c4": c4},
        "decontaminate": {"paths": [str(_eval_files(tmp_path))]},
        "dedup": {"near": False}, "tokenizer": {"vocab_size": 300}, "pack": None}}}
    report = run(load_run(write_config(tmp_path / "c.yaml", cfg)))["stages"]["data"]
    assert report["pii"] == {"action": "mask", "documents": 4, "matches": {"email": 2, "ip": 1, "phone": 2}}
    assert report["decontamination"] == {"ngram": 13, "documents": 3,
                                         "by_eval_file": {"quiz.jsonl.gz": 2, "reading.txt": 2}}
    assert report["c4"] == {"documents_edited": 1, "lines_removed": {
        "no_terminal_punctuation": 0, "short_line": 0, "long_word": 0, "javascript": 1, "policy": 1}}
    assert report["rejects"] == {"c4_lorem_ipsum": 1, "contaminated": 3, "repetition_lines": 1}
    assert report["reject_examples"] == {"c4_lorem_ipsum": ["web/docs.jsonl:13"],
                                         "contaminated": ["web/docs.jsonl:7", "web/docs.jsonl:8", "web/docs.jsonl:10"],
                                         "repetition_lines": ["web/docs.jsonl:11"]}
    assert "C4 line rules: 1 kept documents edited; lines removed: no_terminal_punctuation 0, short_line 0, " \
           "long_word 0, javascript 1, policy 1" in report["summary"]
    out = tmp_path / "run" / "data"
    rejects = {r["raw"]: r["reject_reason"] for r in pq.read_table(out / "rejects").to_pylist()}
    assert rejects == {docs[6]: "contaminated", docs[7]: "contaminated", docs[9]: "contaminated",
                       docs[10]: "repetition_lines", docs[12]: "c4_lorem_ipsum"}
    kept = sorted(pq.read_table(out / "kept")["text"].to_pylist())
    assert kept == sorted(["Contact me at <email> about the boat.", "Our office line is <phone>, call anytime.",
                           "The router sits at <ip> on the lab network.", DOCS[3], DOCS[4],
                           "Both: <email> and <phone> here.", docs[8], FERRY])
    # `lmfleet data inspect` on the run dir finds its data stage and shows why each was rejected.
    shown = subprocess.run([*lmfleet_cmd(), "data", "inspect", str(tmp_path / "run"), "--reason", "contaminated",
                            "--limit", "2"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("rejected: c4_lorem_ipsum 1, contaminated 3, repetition_lines 1\n") and shown.stdout.count("[contaminated] ") == 2
    assert 'contaminated_by=["quiz.jsonl.gz"]' in shown.stdout and "A travel blog." in shown.stdout
    with pytest.raises(UserError, match="--reason 'pii': no document was rejected for it here; reasons: c4_lorem_ipsum, contam"):
        rejected(str(out), "pii", 5)


def test_bad_evaluation_files_are_clear_errors(tmp_path):
    from lmfleet.data.stage import check_inputs
    from lmfleet.errors import InputError

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": DOCS[3]}) + "\n")
    cfg = {"name": "x", "output_dir": str(tmp_path / "run"), "stages": {"data": {
        "sources": [{"name": "web", "format": "jsonl", "paths": [str(path)]}],
        "decontaminate": {"paths": [str(tmp_path / "missing.jsonl")]}}}}
    data = load_run(write_config(tmp_path / "c.yaml", cfg)).stages[0].config
    with pytest.raises(InputError, match=r"'decontaminate': input path .*missing\.jsonl' does not exist"):
        check_inputs(data)
    (tmp_path / "broken.jsonl").write_text('{"question": "fine"}\n{"question": \n')
    with pytest.raises(InputError, match=r"decontaminate\.paths: .*broken\.jsonl:2: invalid JSON"):
        decontaminate.eval_documents(str(tmp_path / "broken.jsonl"))
