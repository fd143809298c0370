"""Gopher's quality and repetition rules (lmfleet.data.quality) on hand-made documents: one that passes
them all, and for each rule one that breaks it (and, where the rules overlap, only it)."""

import pytest

from lmfleet.data.config import GopherQualityConfig, RepetitionConfig
from lmfleet.data.quality import gopher, repetition

GOOD = ("The harbour was quiet when the fishing boats came back to the village before dawn. Most of the crew "
        "had worked through the night, and they were tired but pleased with the catch. An old sailor stood on "
        "the pier with a lantern, counting the boats as they entered the narrow channel between the rocks. "
        "When the last one arrived, he walked home slowly and told his daughter that the sea had been kind.")
Q, R = GopherQualityConfig(), RepetitionConfig()


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
