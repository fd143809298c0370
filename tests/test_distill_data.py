"""distill_data: DSIR's math by hand, and stages that choose documents by importance resampling, a proxy's
perplexity and at random, deterministically, into packed data that pretraining reads."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmfleet.data import dsir
from lmfleet.errors import ConfigError
from lmfleet.runner import load_run

from conftest import pretrain_stage, report_sections, run_stages, shared, write_config


def test_dsir_by_hand():
    f = dsir.features("The cat, the CAT sat.", buckets=1000, ngrams=(1, 2), seed=0)
    assert len(f) == 5 + 4  # words: the cat the cat sat
    assert f[0] == f[2] and f[1] == f[3] and f[5] == f[7]  # "the", "cat", "the cat" hash alike wherever they are
    assert not np.array_equal(f, dsir.features("The cat, the CAT sat.", 1000, (1, 2), seed=1))
    counts = dsir.bucket_counts(["a b", "a"], buckets=4, ngrams=(1,), seed=0)
    assert counts.sum() == 3 and counts.max() == 2
    logf = dsir.log_frequencies(np.array([3, 1, 0, 0]), smoothing=1.0)
    assert np.allclose(np.exp(logf), [4 / 8, 2 / 8, 1 / 8, 1 / 8])
    # log weight = the document's features' log p_target - log p_raw, summed
    ratio = np.log(np.array([0.5, 0.1, 0.2, 0.2])) - np.log(np.full(4, 0.25))
    text = "x y x"
    feats = dsir.features(text, 4, (1,), seed=0)
    assert dsir.log_weights([text], ratio, (1,), seed=0)[0] == pytest.approx(ratio[feats].sum())
    uids = np.arange(1, 6, dtype=np.uint64)
    g = dsir.gumbel(uids, seed=3)
    assert np.array_equal(g, dsir.gumbel(uids, seed=3)) and not np.array_equal(g, dsir.gumbel(uids, seed=4))
    assert dsir.top_k(np.array([1.0, 3.0, 3.0, 0.0, 2.0]), uids, 3).tolist() == [2, 3, 5]  # ties: smaller uid
    keys, sizes = np.array([1.0, 3.0, 3.0, 0.0, 2.0]), np.array([5, 4, 1, 9, 2])  # key order: uid 2, 3, 5, 1, 4
    assert dsir.top_size(keys, uids, sizes, 5).tolist() == [2, 3]  # 4 + 1 reaches 5
    assert dsir.top_size(keys, uids, sizes, 6).tolist() == [2, 3, 5]  # the crossing document is in
    assert dsir.top_size(keys, uids, sizes, 100).tolist() == [1, 2, 3, 4, 5]


def test_distill_data_config_errors(tmp_path):
    def load(**stage):
        cfg = {"name": "d", "stages": {"distill_data": {"data": "data", **stage}}}
        return load_run(write_config(tmp_path / "c.yaml", cfg))

    with pytest.raises(ConfigError, match="set one of fraction or docs"):
        load(method="random")
    with pytest.raises(ConfigError, match="method dsir needs target"):
        load(fraction=0.1)
    with pytest.raises(ConfigError, match="method perplexity needs proxy"):
        load(fraction=0.1, method="perplexity")
    assert load(fraction=0.1, target={"format": "text", "paths": ["x.txt"]}).stages[0].config.target.name == "target"


def test_distill_data_stages_choose_and_pack_what_pretraining_reads(packed, tmp_path):
    """From the shared data stage (C4 and Shakespeare): DSIR toward held-out Shakespeare keeps mostly Shakespeare,
    the same with the same seed; random keeps about the input's shares; perplexity under a proxy trained for a few
    steps keeps documents it finds likelier than the ones it leaves; pretraining reads the DSIR output."""
    blocks = [b for b in shared("tinyshakespeare.txt").read_text().split("\n\n") if b.strip()]
    (tmp_path / "target.txt").write_text("\n\n".join(blocks[:40]))  # in the corpus too: the target's own text
    target = {"format": "text", "text_unit": "block", "paths": [str(tmp_path / "target.txt")]}
    data = str(packed)  # the data stage's dir (kept/, report.json)
    stages = {
        "dsir": {"kind": "distill_data", "data": data, "fraction": 0.2, "target": target,
                 "pack": {"seq_len": 32, "val_fraction": 0.05}},
        "dsir_again": {"kind": "distill_data", "data": data, "fraction": 0.2, "target": target,
                       "pack": {"seq_len": 32, "val_fraction": 0.05}},
        "random": {"kind": "distill_data", "data": data, "method": "random", "fraction": 0.2, "unit": "docs"},
        "proxy": {"kind": "pretrain", **pretrain_stage(packed, steps=6, export=True)},
        "ppl": {"kind": "distill_data", "data": data, "method": "perplexity", "proxy": "proxy", "docs": 100},
        "train": {"kind": "pretrain", **pretrain_stage("dsir", steps=2)},
    }
    report, out = run_stages(tmp_path, stages)
    r = report["stages"]
    src = r["dsir"]["per_source"]
    n = r["dsir"]["docs_in"]
    chars_in, chars_kept = (sum(v[k] for v in src.values()) for k in ("chars_in", "chars_kept"))
    assert r["dsir"]["budget"] == {"unit": "chars", "target": round(0.2 * chars_in)}
    assert 0.2 * chars_in <= chars_kept < 0.2 * chars_in + 40_000  # the crossing document at most (C4's < 40k)
    assert r["dsir"]["docs_kept"] == sum(v["docs_kept"] for v in src.values())
    plays_in = src["plays"]["docs_in"] / n
    assert src["plays"]["docs_kept"] / r["dsir"]["docs_kept"] > min(0.95, 2 * plays_in)  # toward the target
    rand = r["random"]["per_source"]
    assert r["random"]["docs_kept"] == round(0.2 * n) == sum(v["docs_kept"] for v in rand.values())
    assert abs(rand["plays"]["docs_kept"] / r["random"]["docs_kept"] - plays_in) < 0.1  # the input's shares
    ids = lambda name: sorted(pq.read_table(out / name / "kept", columns=["uid"])["uid"].to_pylist())  # noqa: E731
    assert ids("dsir") == ids("dsir_again") != ids("random")
    assert r["ppl"]["docs_kept"] == 100 and r["ppl"]["scores"]["kept"]["max"] <= r["ppl"]["scores"]["left"]["min"]
    kept = pq.read_table(out / "dsir" / "kept")
    assert set(kept.column_names) >= {"id", "source", "text", "meta", "uid", "score"}
    index = json.loads((out / "dsir" / "packed" / "index.json").read_text())
    assert index["seq_len"] == 32 and r["dsir"]["packing"]["real_tokens"] > 0
    assert r["train"]["steps"] == 2 and np.isfinite(r["train"]["final_loss"])
    sections = report_sections((out / "report.html").read_text())
    assert all(sections[f"stage-{name}"] == 1 for name in ("dsir", "random", "ppl"))
