"""Gopher's quality and repetition rules and C4's line rules (lmfleet.data.quality) on hand-made documents:
one that passes them all, and for each rule one that breaks it (and, where the rules overlap, only it)."""

import pytest

from lmfleet.data.config import C4Config, GopherQualityConfig, RepetitionConfig
from lmfleet.data.quality import c4, gopher, repetition

GOOD = ("The harbour was quiet when the fishing boats came back to the village before dawn. Most of the crew "
        "had worked through the night, and they were tired but pleased with the catch. An old sailor stood on "
        "the pier with a lantern, counting the boats as they entered the narrow channel between the rocks. "
        "When the last one arrived, he walked home slowly and told his daughter that the sea had been kind.")
Q, R, C4 = GopherQualityConfig(), RepetitionConfig(), C4Config()


def test_a_good_document_passes_every_rule():
    assert gopher(GOOD, Q) is None and repetition(GOOD, R) is None


@pytest.mark.parametrize("text, config, reason", [
    ("The cat and the dog slept.", {}, "gopher_few_words"),
    (GOOD, {"max_words": 20}, "gopher_many_words"),
    (" ".join(["a to of an it is be"] * 10), {}, "gopher_short_words"),
    (" ".join(["extraordinarily incomprehensible characteristically"] * 20) + " the and", {},
     "gopher_long_words"),
    (GOOD + " " + " ".join(["#tag"] * 10), {}, "gopher_symbols"),
    ("\n".join(f"• the {w} of the boats and that crew" for w in ["red", "blue", "green", "white", "black",
                                                                   "grey", "brown", "pink"]), {},
     "gopher_bullet_lines"),
    ("\n".join(f"the {w} boat came back to the village with the crew and..." for w in
               ["red", "blue", "green", "white", "black", "grey"]), {}, "gopher_ellipsis_lines"),
    (GOOD + " " + " ".join(str(1000 + i) for i in range(40)), {}, "gopher_non_alpha"),
    (GOOD.replace("the ", "").replace("The ", "").replace(" and", "").replace(" that", "").replace(" to", "")
     .replace(" of", "").replace(" with", "").replace(" be ", " "), {}, "gopher_stop_words"),
])
def test_each_gopher_rule(text, config, reason):
    assert gopher(text, GopherQualityConfig(**config)) == reason
    if config:  # the rule off: the document passes
        assert gopher(text, GopherQualityConfig(**{k: None for k in config})) is None


def test_each_repetition_rule():
    line = "The boats came back to the village before dawn."
    assert repetition("\n".join([line, line, line, "A different closing line of the story."]), R) == "repetition_lines"
    long_line = GOOD[:200]
    assert repetition("\n".join([long_line, long_line, "short one", "short two", "short three", "short four"]),
                      R.model_copy(update={"max_duplicate_lines": None})) == "repetition_line_chars"
    para = "First line of a paragraph.\nSecond line of it."
    no_lines = R.model_copy(update={"max_duplicate_lines": None, "max_duplicate_line_chars": None})
    assert repetition("\n\n".join([para, para, "Another paragraph here.\nWith two lines."]), no_lines) == \
        "repetition_paragraphs"
    words = "ships harbour lantern sailor daughter channel rocks village morning crew catch pier".split()
    assert repetition(" ".join(words) + " new york" * 10, R) == "repetition_top_2gram"
    phrase = "an old sailor counted every boat that came in slowly"  # 10 words twice: ~20% of the characters
    text = f"{phrase} {GOOD} {phrase}"
    assert repetition(text, R) == "repetition_duplicate_5gram"
    assert repetition(text, R.model_copy(update={"max_duplicate_ngram_chars": {}})) is None


def test_a_good_document_keeps_every_line_under_c4():
    assert c4(GOOD, C4) == (GOOD, None, {})


# A web page as C4 sees one: navigation, a JavaScript notice, a cookie banner, a citation, a word over the
# limit, a teaser with an ellipsis; two paragraphs of real sentences survive, their blank line too.
PAGE = """Home | News | Contact
The harbour was quiet when the fishing boats came back to the village before dawn.[1] Most of the crew had worked through the night.
Please enable JavaScript in your browser to read the comments.

We use cookies. By using this site you agree to our cookie policy and terms.
An old sailor stood on the pier with a lantern, counting the boats. He walked home slowly!
Read the full story of the old sailor and his daughter here...
Short line only.
The catch was weighed on the quay: %s was written on the slate.""" % ("x" * 60)
KEPT = ("The harbour was quiet when the fishing boats came back to the village before dawn. Most of the crew had "
        "worked through the night.\n\nAn old sailor stood on the pier with a lantern, counting the boats. He walked "
        "home slowly!")


def test_c4_documents_pass_c4_rules_unchanged():
    import json

    from conftest import shared

    docs = [json.loads(line)["text"] for line in shared("c4_demo.jsonl").read_text().splitlines()]
    assert len(docs) == 300 and [c4(d, C4) for d in docs] == [(d, None, {}) for d in docs]


def test_c4_removes_each_kind_of_bad_line_and_counts_it():
    text, reason, removed = c4(PAGE, C4.model_copy(update={"max_word_length": 50}))
    assert (text, reason) == (KEPT, None)
    assert removed == {"no_terminal_punctuation": 2, "short_line": 1, "javascript": 1, "policy": 1, "long_word": 1}
    # Every line rule off: only the citation marker goes.
    off = C4Config(terminal_punctuation=False, min_words_per_line=None, max_word_length=None, javascript=False,
                   policy=False)
    text, reason, removed = c4(PAGE, off)
    assert reason is None and not removed and "[1]" not in text and "JavaScript" in text and "Home | News" in text
    assert c4(PAGE, off.model_copy(update={"citations": False}))[0] == PAGE


@pytest.mark.parametrize("text, reason, off", [
    (GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "c4_lorem_ipsum", {"lorem_ipsum": False}),
    (GOOD + "\nThe function returns { a: 1 } when it is called twice.", "c4_curly_bracket", {"curly_bracket": False}),
    ("The boats came back to the village. The crew was tired.\nMenu and links", "c4_few_sentences",
     {"min_sentences": None}),
    ("Menu\nSign in\nShare", "c4_few_sentences", None),  # nothing left: quarantined whatever min_sentences
])
def test_c4_quarantines(text, reason, off):
    assert c4(text, C4) == (text, reason, c4(text, C4)[2])  # the text as it came, for the rejects
    if off:
        assert c4(text, C4.model_copy(update=off))[1] is None
    else:
        assert c4(text, C4.model_copy(update={"min_sentences": None}))[1] == reason


def test_language_identification_on_real_and_hand_written_text():
    import json

    from lmfleet.data.config import LanguageConfig
    from lmfleet.data.language import check

    from conftest import shared

    english = LanguageConfig()
    c4 = [json.loads(line)["text"] for line in shared("c4_demo.jsonl").read_text().splitlines()[:100]]
    plays = [b for b in shared("tinyshakespeare.txt").read_text().split("\n\n") if len(b) > 300][:50]
    assert [check(t, english) for t in c4 + plays] == [None] * (len(c4) + len(plays))
    others = {"de": "Der Fischer kehrte am frühen Morgen mit seinem Boot in den kleinen Hafen zurück.",
              "fr": "Le pêcheur est revenu au petit port avec son bateau tôt le matin, fatigué mais content.",
              "es": "El pescador volvió al pequeño puerto con su barco temprano por la mañana.",
              "ru": "Рыбак вернулся в маленькую гавань на своей лодке рано утром."}
    assert {code: check(text, english) for code, text in others.items()} == {
        code: f"language_{code}" for code in others}
    assert check(others["de"], LanguageConfig(languages=["en", "de"])) is None
    assert check("12345 67890 %%% ###", english) == "language_uncertain"


def test_unknown_language_codes_are_config_errors(tmp_path):
    from lmfleet.errors import ConfigError
    from lmfleet.runner import load_run

    from conftest import write_config

    cfg = {"name": "x", "output_dir": str(tmp_path / "o"), "stages": {"data": {
        "sources": [{"name": "w", "format": "jsonl", "paths": [str(tmp_path)]}],
        "filter": {"language": {"languages": ["en", "xx"]}}}}}
    with pytest.raises(ConfigError, match=r"stages\.data\.filter\.language\.languages: .*\['xx'\]: not ISO 639-1"):
        load_run(write_config(tmp_path / "c.yaml", cfg))
