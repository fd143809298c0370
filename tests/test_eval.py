"""The eval stage: metrics by hand, the model adapter against token-by-token log-likelihoods and HF's own
greedy generation, and stage runs whose results do not depend on the actor count."""

import json
import math

import numpy as np
import pytest
import torch

from lmfleet.errors import ConfigError, InputError
from lmfleet.eval import metrics as M
from lmfleet.eval.lm import EvalModel
from lmfleet.eval.tasks import run_python
from lmfleet.runner import load_run

from conftest import REPO, report_sections, run_stages, shared, write_config


def test_metrics_by_hand():
    assert M.exact_match("The Cat!", ["dog", "cat"]) == 1.0 and M.exact_match("a cat sat", ["cat"]) == 0.0
    assert M.token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)  # P 1, R 2/3
    assert M.token_f1("", [""]) == 1.0 and M.token_f1("x", [""]) == 0.0
    assert M.choose([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)  # per byte: -2 vs -1
    r = M.classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(0.6) and r["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert r["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}
    p = M.perplexities([-10.0, -20.0], [5, 5], [10, 20], [2, 3])
    assert p == pytest.approx({"token_perplexity": math.exp(3), "word_perplexity": math.exp(6),
                               "bits_per_byte": 1 / math.log(2)})
    acc = M.mean_with_stderr([1, 0, 0, 1, 0, 0, 0, 1, 0, 0], 0.95)  # 3 of 10: Wilson's interval
    assert acc["value"] == 0.3 and acc["ci"] == pytest.approx([0.1078, 0.6032], abs=1e-4)
    assert acc["stderr"] == pytest.approx(math.sqrt(0.3 * 0.7 * 10 / 9 / 10))
    f = M.mean_with_stderr([0.5, 0.7, 0.9], 0.95)
    assert f["ci"] == pytest.approx([0.7 - 1.959964 * 0.2 / math.sqrt(3), 0.7 + 1.959964 * 0.2 / math.sqrt(3)])
    boot = M.bootstrap(lambda idx: float(np.mean(np.arange(20.0)[idx])), 20, 500, 0.9, seed=3)
    assert boot["value"] == 9.5 and boot["ci"][0] < 9.5 < boot["ci"][1]
    assert boot == M.bootstrap(lambda idx: float(np.mean(np.arange(20.0)[idx])), 20, 500, 0.9, seed=3)


def test_python_checks_run_isolated_with_a_timeout():
    assert run_python("def f(x):\n    return x + 1\n\nassert f(1) == 2\n", 10) == 1.0
    assert run_python("assert 1 == 2\n", 10) == 0.0
    assert run_python("while True:\n    pass\n", 0.5) == 0.0
    import os

    os.environ["LMFLEET_TEST_SECRET"] = "x"  # a credential of this process is not the model's code's to see
    try:
        assert run_python("import os\nassert 'LMFLEET_TEST_SECRET' not in os.environ\n", 10) == 1.0
    finally:
        del os.environ["LMFLEET_TEST_SECRET"]


def _by_token(model, tok, prefix: list[int], target: list[int]) -> float:
    """log P(target | prefix), one forward pass per target token (no batching, no padding)."""
    total = 0.0
    with torch.no_grad():
        for j, t in enumerate(target):
            ids = torch.tensor([prefix + target[:j]])
            total += float(torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[t])
    return total


def test_loglikelihood_rolling_and_greedy_against_the_model_itself(base_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(base_lm)).eval()
    tok = AutoTokenizer.from_pretrained(str(base_lm))
    em = EvalModel.load(base_lm, max_length=64, batch_size=3, device=torch.device("cpu"))
    requests = [("Give three tips for staying healthy.", " Eat well."), ("What is", " the capital of France?"),
                ("", "Hello there"), ("Question: 2+2 =  ", "4"), ("A longer context that goes on and on " * 3, " end")]
    got = em.loglikelihood(requests)
    for (context, continuation), (ll, _) in zip(requests, got, strict=True):
        ctx, cont = em.split_pair(context, continuation)
        assert cont  # every continuation here has tokens
        assert ll == pytest.approx(_by_token(hf, tok, ctx, cont), abs=1e-4)
    # lm-eval's split: a trailing space of the context belongs to the continuation; an empty context is the prefix
    assert em.split_pair("Question: 2+2 =  ", "4")[0] == tok.encode("Question: 2+2 =", add_special_tokens=False)
    assert em.split_pair("", "Hello")[0] == [em.prefix]
    # rolling windows of 16 tokens over 41: tokens 0-15 after the prefix, 16-31 after token 15, 32-40 after 24-31
    short = EvalModel.load(base_lm, max_length=16, batch_size=2, device=torch.device("cpu"))
    text = "Give three tips for staying healthy. Eat a balanced diet, exercise, and sleep well every night."
    tokens = tok.encode(text, add_special_tokens=False)
    assert len(tokens) == 41
    want = (_by_token(hf, tok, [short.prefix], tokens[:16]) + _by_token(hf, tok, tokens[15:16], tokens[16:32])
            + _by_token(hf, tok, tokens[24:32], tokens[32:]))
    (lp, n), = short.rolling_loglikelihood([text])
    assert n == len(tokens) and lp == pytest.approx(want, abs=1e-3)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for size in (4, 16, 40, 41, 64):  # lm-eval's own windows, as (context + scored)[:-1] and the scored count
        short.max_length = size
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, short.prefix, size, 1)]
        assert short.windows(tokens) == [((a + b)[:-1], len(b)) for a, b in theirs]
    # greedy generation = HF's generate, cut at the stop string
    prompt = "Give three tips for staying healthy."
    ids = tok.encode(prompt, add_special_tokens=False)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert em.generate(prompt, 12, stop=["\x00"]) == text
    stop = text[3:5]
    assert em.generate(prompt, 12, stop=[stop]) == text[: text.index(stop)]
    sampled = [em.generate(prompt, 12, [], temperature=1.0, top_p=0.9, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def _own_format_lm(base_lm, out):
    """A LayerNorm model (not Llama-compatible: lmfleet's own format) on base_lm's tokenizer."""
    from lmfleet.model.config import ModelConfig
    from lmfleet.model.export import export_model
    from lmfleet.model.transformer import Transformer

    vocab = json.loads((base_lm / "config.json").read_text())["vocab_size"]
    cfg = ModelConfig(vocab_size=vocab, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      norm="layernorm")
    assert export_model(Transformer(cfg, seed=1).state_dict(), cfg, out, base_lm.parent / "tokenizer") == "lmfleet"
    return out


def _task_files(root):
    """Small task files: module names by their docstring's first line (the stdlib), Shakespeare to score,
    answers to generate, labels to classify; with some broken records."""
    import importlib

    names = ["json", "csv", "math", "random", "string", "textwrap", "heapq", "bisect", "fractions", "statistics",
             "zlib", "base64"]
    firsts = {n: importlib.import_module(n).__doc__.strip().splitlines()[0] for n in names}
    rng = np.random.default_rng(0)
    with open(root / "mc.jsonl", "w") as f:
        for k, n in enumerate(names):
            others = [x for x in names if x != n]
            choices = [n, *rng.choice(others, 3, replace=False).tolist()]
            rng.shuffle(choices)
            f.write(json.dumps({"id": f"mc{k}", "doc": firsts[n], "choices": choices, "answer": choices.index(n)})
                    + "\n")
        f.write('{"doc": "no choices", "answer": 0}\n{"doc": "x", "choices": ["a", "b"], "answer": 5}\nnot json\n')
    blocks = [b for b in shared("tinyshakespeare.txt").read_text().split("\n\n") if b.strip()][-10:]
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks) + '{"text": ""}\n')
    (root / "gen.json").write_text(json.dumps([{"q": f"The module {n} is about", "a": [firsts[n], n]} for n in names[:5]]))
    (root / "cls.jsonl").write_text("".join(json.dumps({"text": b[:100], "label": "verse" if b.isupper() else "play"})
                                            + "\n" for b in blocks) + '{"text": "x", "label": "poem"}\n')
    return [
        {"name": "modules", "kind": "multiple_choice", "path": str(root / "mc.jsonl"),
         "prompt": "Docstring: {doc}\nModule:"},
        {"name": "shakespeare", "kind": "perplexity", "path": str(root / "ppl.jsonl")},
        {"name": "describe", "kind": "generate", "path": str(root / "gen.json"), "prompt": "{q}", "answer_field": "a",
         "metrics": ["exact_match", "f1", "bleu", "rouge_l"], "max_new_tokens": 6},
        {"name": "form", "kind": "classification", "path": str(root / "cls.jsonl"), "prompt": "{text}\nForm:",
         "labels": ["play", "verse"]},
    ]


def test_the_eval_stage_is_the_same_on_one_actor_or_two(base_lm, tmp_path, ray_local):
    own = _own_format_lm(base_lm, tmp_path / "own")
    tasks = _task_files(tmp_path)
    stage = {"models": [str(base_lm), str(own)], "tasks": tasks, "batch_size": 4, "bootstrap": 200}
    runs = {}
    for workers in (2, 1):
        report, out = run_stages(tmp_path, {"eval": {**stage, "scaling": {"num_workers": workers}}}, f"w{workers}")
        runs[workers] = report["stages"]["eval"], out / "eval"
    (two, two_dir), (one, one_dir) = runs[2], runs[1]
    assert two["actors_per_model"] == 2 and one["actors_per_model"] == 1
    assert two["results"] == one["results"]
    for model in ("model", "own"):
        for t in tasks:
            a, b = (d / "predictions" / model / f"{t['name']}.jsonl" for d in (two_dir, one_dir))
            assert a.read_bytes() == b.read_bytes()
    r = two["tasks"]
    assert r["modules"]["records"] == 12 and r["modules"]["rejected"] == {"missing_choices": 1, "bad_answer": 1,
                                                                          "invalid_json": 1}
    assert r["shakespeare"]["rejected"] == {"empty_text": 1} and r["form"]["rejected"] == {"unknown_label": 1}
    # the report's numbers are the predictions' own; the adapter in this process gives the same log-likelihoods
    rows = [json.loads(x) for x in (two_dir / "predictions" / "model" / "modules.jsonl").read_text().splitlines()]
    assert two["results"]["model"]["modules"]["acc"]["value"] == pytest.approx(np.mean([x["acc"] for x in rows]))
    em = EvalModel.load(base_lm, max_length=2048, batch_size=4, device=torch.device("cpu"))
    first = json.loads((tmp_path / "mc.jsonl").read_text().splitlines()[0])
    want = em.loglikelihood([(f"Docstring: {first['doc']}\nModule:", " " + c) for c in first["choices"]])
    assert rows[0]["logliks"] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    ppl = two["results"]["own"]["shakespeare"]
    assert ppl["bits_per_byte"]["ci"][0] < ppl["bits_per_byte"]["value"] < ppl["bits_per_byte"]["ci"][1]
    assert set(two["results"]["model"]["form"]["per_class"]) == {"play", "verse"}
    assert any(line.startswith("| modules | acc_norm |") for line in two["summary"])
    html = (two_dir.parent / "report.html").read_text()
    assert report_sections(html)["stage-eval"] == 1  # the chart of each task's first metric
    assert "modules (multiple_choice, 12 records; rejected: missing_choices 1" in html


def test_lm_eval_through_the_adapter_scores_as_the_native_task(base_lm, tmp_path, ray_local):
    """The shipped fluency task natively and as lm-eval's YAML (its data file beside it): the same log-likelihood
    of every choice, so the same picks and accuracy; the shipped classification likewise."""
    tasks = REPO / "jobs" / "eval_tasks"
    stage = {"models": [str(base_lm)], "batch_size": 8, "bootstrap": 0, "tasks": [
        {"name": "fluency", "kind": "multiple_choice", "path": str(tasks / "stdlib_fluency.jsonl"),
         "prompt": "Docstring:", "limit": 24},
        {"name": "kind", "kind": "classification", "path": str(tasks / "stdlib_kind.jsonl"), "limit": 24,
         "prompt": "Docstring: {doc}\nThis documents a", "label_field": "kind", "labels": ["function", "class"]},
        {"name": "harness", "kind": "lm_eval", "tasks": ["lmfleet_stdlib_fluency", "lmfleet_stdlib_kind"],
         "include_path": str(tasks), "limit": 24}]}
    report, out = run_stages(tmp_path, {"eval": stage})
    r = report["stages"]["eval"]["results"]["model"]
    assert report["stages"]["eval"]["tasks"]["harness"]["records"] == 48
    lines = lambda name: [json.loads(x) for x in (out / "eval" / "predictions" / "model" / name).read_text().splitlines()]  # noqa: E731
    harness = lines("harness.jsonl")
    for native, lm_task in (("fluency.jsonl", "lmfleet_stdlib_fluency"), ("kind.jsonl", "lmfleet_stdlib_kind")):
        theirs = sorted((x for x in harness if x["task"] == lm_task), key=lambda x: x["doc_id"])
        ours = lines(native)
        assert len(theirs) == len(ours) == 24
        for a, b in zip(ours, theirs, strict=True):
            assert a["logliks"] == pytest.approx([float(resp[0]) for resp in b["filtered_resps"]], abs=1e-4)
    assert r["harness"]["lmfleet_stdlib_fluency/acc"]["value"] == r["fluency"]["acc"]["value"]
    assert r["harness"]["lmfleet_stdlib_fluency/acc_norm"]["value"] == r["fluency"]["acc_norm"]["value"]
    assert r["harness"]["lmfleet_stdlib_kind/acc"]["value"] == r["kind"]["acc"]["value"]


def test_eval_config_and_input_errors(base_lm, tmp_path):
    def stage(**over):
        return {"name": "e", "output_dir": str(tmp_path / "out"), "stages": {"eval": {
            "models": [str(base_lm)], "tasks": [{"name": "t", "kind": "perplexity", "path": str(tmp_path / "t.jsonl")}],
            **over}}}

    with pytest.raises(ConfigError, match="metric python runs the model's code: set allow_code_execution"):
        load_run(write_config(tmp_path / "c.yaml", stage(tasks=[
            {"name": "g", "kind": "generate", "path": "x", "prompt": "{q}", "metrics": ["python"]}])))
    with pytest.raises(ConfigError, match="task names must be unique; repeated: t"):
        load_run(write_config(tmp_path / "c.yaml", stage(tasks=[{"name": "t", "kind": "perplexity", "path": "x"}] * 2)))
    with pytest.raises(ConfigError, match=r"\{a\.b\}: name a top-level field"):
        load_run(write_config(tmp_path / "c.yaml", stage(tasks=[
            {"name": "m", "kind": "multiple_choice", "path": "x", "prompt": "{a.b}"}])))
    from lmfleet.eval.stage import check_inputs

    with pytest.raises(InputError, match=r"eval.tasks.t.path .*t.jsonl': no such file"):
        check_inputs(load_run(write_config(tmp_path / "c.yaml", stage())).stages[0].config)
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    from lmfleet.model.config import ModelConfig
    from lmfleet.model.export import export_model
    from lmfleet.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, causal=False)
    export_model(Transformer(cfg).state_dict(), cfg, tmp_path / "encoder")
    with pytest.raises(InputError, match="an encoder .* has no left-to-right likelihood"):
        check_inputs(load_run(write_config(tmp_path / "c.yaml", stage(models=[str(tmp_path / "encoder")]))).stages[0].config)


def test_pretraining_scores_eval_tasks_as_the_eval_stage_does(packed, tmp_path):
    """eval_tasks in a 2-worker FSDP pretraining run: logged at steps 3 and 4 (the last) by the first worker,
    and at the last step equal to an eval stage's scores of the exported model."""
    from conftest import pretrain_stage

    tasks = [{"name": "fluency", "kind": "multiple_choice", "path": str(REPO / "jobs/eval_tasks/stdlib_fluency.jsonl"),
              "prompt": "Docstring:", "limit": 16},
             {"name": "plays", "kind": "perplexity", "path": str(tmp_path / "plays.jsonl")}]
    blocks = [b for b in shared("tinyshakespeare.txt").read_text().split("\n\n") if b.strip()][-6:]
    (tmp_path / "plays.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks))
    stages = {
        "p": {"kind": "pretrain", **pretrain_stage(packed, steps=4, export=True, parallel__strategy="fsdp",
                                                   scaling__num_workers=2, eval_tasks={"every": 3, "tasks": tasks})},
        "e": {"kind": "eval", "models": ["p"], "tasks": tasks, "bootstrap": 0, "max_length": 32},
    }
    report, out = run_stages(tmp_path, stages)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [x for x in lines if x.get("stage") == "p" and "task/fluency/acc" in x]
    assert [x["step"] for x in scored] == [3, 4]
    section = report["stages"]["p"]["eval_tasks"]
    assert section["step"] == 4 and section["tasks"]["fluency"]["records"] == 16
    assert section["summary"] in report["stages"]["p"]["summary"]
    e = report["stages"]["e"]["results"]["p"]
    assert section["last"]["fluency/acc"] == e["fluency"]["acc"]["value"]
    assert section["last"]["fluency/acc_norm"] == e["fluency"]["acc_norm"]["value"]
    assert section["last"]["plays/bits_per_byte"] == pytest.approx(e["plays"]["bits_per_byte"]["value"], rel=1e-5)


def test_sft_scores_eval_tasks_as_the_eval_stage_does(base_lm, tmp_path, ray_local):
    """eval_tasks in a 2-worker DDP SFT run: logged at steps 2 and 4 (the last), and then equal to an eval stage's
    scores of the exported model, generations included."""
    tasks = [{"name": "fluency", "kind": "multiple_choice", "path": str(REPO / "jobs/eval_tasks/stdlib_fluency.jsonl"),
              "prompt": "Docstring:", "limit": 12},
             {"name": "summaries", "kind": "generate", "path": str(REPO / "jobs/eval_tasks/stdlib_summaries.jsonl"),
              "prompt": "{prompt}", "chat": True, "metrics": ["f1", "rouge_l"], "max_new_tokens": 8, "limit": 4}]
    alpaca = {"paths": [str(shared("alpaca_5000.json"))], "max_records": 64, "val_fraction": 0.1}
    stages = {
        "sft": {"model": str(base_lm), "dataset": alpaca, "training": {"max_length": 128, "max_steps": 4},
                "optimizer": {"lr": 3e-3}, "batch": {"micro_batch": 8}, "checkpoint": {"every": 100},
                "eval": {"samples": 0}, "scaling": {"num_workers": 2}, "eval_tasks": {"every": 2, "tasks": tasks}},
        "eval": {"models": ["sft"], "tasks": tasks, "bootstrap": 0, "max_length": 128},
    }
    report, out = run_stages(tmp_path, stages)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("stage") == "sft" and "task/fluency/acc" in x] == [2, 4]
    section = report["stages"]["sft"]["eval_tasks"]
    assert section["step"] == 4 and section["summary"] in report["stages"]["sft"]["summary"]
    e = report["stages"]["eval"]["results"]["sft"]
    for key in ("fluency/acc", "fluency/acc_norm", "summaries/f1", "summaries/rouge_l"):
        task, metric = key.split("/")
        assert section["last"][key] == pytest.approx(e[task][metric]["value"], abs=1e-9), key
