"""The augment stage's generators (tiny model in-process and over a real local OpenAI-compatible HTTP server that runs
the tiny model), the `fewtune augment` command, the cache key, and a `slow` check on the real base model."""

from __future__ import annotations

import pytest
from augment_support import TinyChatServer, config, demo_eval, demo_rows

from tasks.augment import GeneratorError, HttpGenerator, LocalGenerator, augment_records, missing_facts
from tasks.common.records import read_jsonl
from tasks.config import FewtuneConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tasks.common.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


# ----------------------------------------------------------------------------------------------------------------
# Generators: the tiny model in-process, and over HTTP


def test_local_generator_batches_and_samples_reproducibly(tiny):
    model, tok = tiny
    gen = LocalGenerator(model, tok, 96, "tiny")
    convs = [[{"role": "user", "content": q}] for q in ("Where is the shop?", "What are your opening hours today?", "Hi")]
    greedy = gen.generate(convs, 6, n=3, temperature=0.0, seed=0)
    assert [len(o) for o in greedy] == [1, 1, 1]  # greedy gives one variant
    one = gen.generate(convs[:1], 6, n=1, temperature=0.0, seed=0)
    assert one[0][0].text == greedy[0][0].text  # left padding does not change a row's answer
    sampled = gen.generate(convs, 6, n=3, temperature=1.0, seed=5)
    assert [len(o) for o in sampled] == [3, 3, 3]
    again = gen.generate(convs, 6, n=3, temperature=1.0, seed=5)
    assert [[g.text for g in o] for o in sampled] == [[g.text for g in o] for o in again]


def test_http_generator_matches_the_model_behind_it(tiny, monkeypatch):
    from tasks.config import GeneratorConfig

    model, tok = tiny
    local = LocalGenerator(model, tok, 96, "tiny")
    convs = [[{"role": "user", "content": q}] for q in ("Where is the shop?", "Do you repair bikes bought elsewhere?")]
    expected = local.generate(convs, 8, n=1, temperature=0.0, seed=0)
    # The server answers one conversation per request: compare with the same conversations generated one by one.
    expected = [local.generate([c], 8, n=1, temperature=0.0, seed=0)[0] for c in convs]
    monkeypatch.setenv("FEWTUNE_TEST_KEY", "s3cret")
    with TinyChatServer(local, key="s3cret") as server:
        g = GeneratorConfig(kind="http", url=server.url, model="tiny", api_key_env="FEWTUNE_TEST_KEY", concurrency=2)
        got = HttpGenerator(g).generate(convs, 8, n=1, temperature=0.0, seed=0)
        assert [[x.text for x in o] for o in got] == [[x.text for x in o] for o in expected]
        assert [o[0].finished for o in got] == [o[0].finished for o in expected]
        assert server.requests[0]["model"] == "tiny" and server.requests[0]["max_tokens"] == 8
        sampled = HttpGenerator(g).generate(convs, 4, n=2, temperature=1.0, seed=3)
        assert [len(o) for o in sampled] == [2, 2]

        monkeypatch.setenv("FEWTUNE_TEST_KEY", "wrong")
        with pytest.raises(GeneratorError) as info:
            HttpGenerator(g).generate(convs[:1], 4, n=1, temperature=0.0, seed=0)
        assert "HTTP 401" in str(info.value) and "FEWTUNE_TEST_KEY" in str(info.value)
        monkeypatch.setenv("FEWTUNE_TEST_KEY", "s3cret")
        bad_url = GeneratorConfig(kind="http", url=server.url.removesuffix("/v1"), api_key_env="FEWTUNE_TEST_KEY", max_retries=0)
        with pytest.raises(GeneratorError) as info:
            HttpGenerator(bad_url).generate(convs[:1], 4, n=1, temperature=0.0, seed=0)
        assert "HTTP 404" in str(info.value) and "/v1" in str(info.value)
    closed = GeneratorConfig(kind="http", url=server.url, max_retries=1, retry_delay_s=0.01)
    with pytest.raises(GeneratorError) as info:
        HttpGenerator(closed).generate(convs[:1], 4, n=1, temperature=0.0, seed=0)
    assert "cannot reach" in str(info.value) and "augment.generator.url" in str(info.value)


def test_stage_with_http_generator_from_config(tmp_path, tiny, tiny_model_dir):
    model, tok = tiny
    rows = demo_rows(6)
    with TinyChatServer(LocalGenerator(model, tok, 96, "tiny"), key=None) as server:
        cfg = config(tiny_model_dir, tmp_path, self_distill="replace", paraphrase={"n": 1}, max_new_tokens=8,
                     generator={"kind": "http", "url": server.url, "model": "tiny", "batch_size": 3})
        result = augment_records(rows, cfg, tmp_path / "out", eval_records=demo_eval())
        assert len(server.requests) == 12  # a rewrite and a paraphrase per row
    report = result.report
    assert report["generator"].startswith("http ") and server.url in report["generator"]
    for name in ("self_distilled", "paraphrase"):
        t = report["techniques"][name]
        assert t["generated"] == 6 and t["kept"] + t["rejected"] + t["over_budget"] == 6


def test_fewtune_augment_cli(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from flows import cli
    from flows.cli import main
    from tasks.common.records import write_jsonl

    monkeypatch.setattr(cli.console, "width", 1000)  # no wrapping inside the table and paths

    data = write_jsonl(tmp_path / "rows.jsonl", [{k: v for k, v in r.items() if k != "line"} for r in demo_rows(6)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{k: v for k, v in r.items() if k != "line"} for r in demo_eval()[:4]])
    out = tmp_path / "out"
    code = main(["augment", str(data), "--eval", str(evals), "--model", str(tiny_model_dir), "--out", str(out),
                 "--set", "augment.self_distill=replace", "--set", "augment.paraphrase.n=1", "--set", "augment.max_new_tokens=6"])
    assert code == 0
    for name in ("train.jsonl", "rejected.jsonl", "augment_report.json", "augment_report.md"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "self_distilled (replace)" in printed and "paraphrase (n=1)" in printed and "6 rows in" in printed
    assert len(read_jsonl(out / "train.jsonl")) >= 6
    assert main(["augment", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir), "--out", str(out)]) == 2


# ----------------------------------------------------------------------------------------------------------------
# Cache key


def test_augment_cache_key_follows_generator_settings_and_eval_rows(tmp_path, tiny_model_dir):
    from flows.stage_keys import augment_key
    from tasks.common.models import resolve_base_model

    base = resolve_base_model(str(tiny_model_dir))

    def key(*overrides):
        path = tmp_path / "c.yaml"
        path.write_text("data: {train: x.jsonl}\naugment: {enabled: true}\n")
        return augment_key(load_config(path, list(overrides)), "t", "e", base, None)

    plain = key()
    assert key() == plain
    assert key("train.learning_rate=1e-4") == plain
    for change in ("augment.generator.batch_size=3", "augment.paraphrase.temperature=0.5", "augment.self_distill=replace",
                   "augment.generator.kind=http", "validate.near_dup_threshold=0.9", "model.max_length=64"):
        extra = ["augment.generator.url=http://127.0.0.1:9/v1"] if "http" in change else []
        assert key(change, *extra) != plain, change
    assert augment_key(load_config(tmp_path / "c.yaml"), "t", "other", base, None) != plain
    assert key("augment.generator.kind=local", f"augment.generator.model={tiny_model_dir}") != plain


# ----------------------------------------------------------------------------------------------------------------
# The real base model


@pytest.mark.slow
def test_real_model_rewrites_pass_the_filter_with_lower_perplexity(real_base_model, tmp_path):
    """SmolLM2-135M-Instruct rewrites demo answers; the kept ones keep every fact and have lower base-model perplexity."""
    rows = demo_rows()
    cfg = FewtuneConfig.model_validate({
        "data": {"train": "unused.jsonl"},
        "model": {"base": real_base_model.path, "max_length": 160},
        "augment": {"enabled": True, "self_distill": "replace", "self_distill_max_rows": 24, "paraphrase": {"n": 0},
                    "generator": {"batch_size": 8, "threads": 1}},
    })
    result = augment_records(rows, cfg, tmp_path / "out", base_path=real_base_model.path, eval_records=demo_eval())
    sd = result.report["techniques"]["self_distilled"]
    assert sd["generated"] == 24 and sd["kept"] >= 2, result.note
    by_id = {r["id"]: r for r in rows}
    for r in result.records:
        if r["source"] == "self_distilled":
            assert missing_facts(by_id[r["parent_id"]]["messages"][-1]["content"], r["messages"][-1]["content"]) == []
    ppl = result.report["perplexity"]
    assert ppl["rows"] == sd["kept"]
    assert ppl["rewrite_mean_ppl"] < ppl["gold_mean_ppl"], ppl
