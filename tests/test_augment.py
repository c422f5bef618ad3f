"""The augment stage: key facts, each equivalence rule (accept and reject), paraphrase rules, provenance, the leakage
re-check, budgets, score outliers, the report, the generators (tiny model in-process and over a real local
OpenAI-compatible HTTP server that runs the tiny model), the cache key, and a `slow` check on the real base model.

The filter tests feed hand-written candidates (the kinds a small model writes: good rewrites, rewrites that drop a
price or invent a time, answers instead of questions) through `ReplayGenerator`, so each rule is hit on purpose; the
tiny model's own outputs are random text, which only tests that everything runs.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.config import AugmentConfig, FewtuneConfig, load_config
from tasks.augment import (
    Embedder,
    Generated,
    GeneratorError,
    HttpGenerator,
    LocalGenerator,
    added_figures,
    augment_records,
    clean_generation,
    judge_paraphrase,
    judge_rewrite,
    key_facts,
    missing_facts,
    plan_augmentation,
    spread_order,
)
from tasks.common.records import load_records, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tasks.common.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def demo_rows(n: int | None = None) -> list[dict]:
    return load_records(REPO / "examples/support/train.jsonl").records[:n]


def demo_eval() -> list[dict]:
    return load_records(REPO / "examples/support/test.jsonl").records


def config(model_dir: Path, tmp_path: Path, **augment) -> FewtuneConfig:
    return FewtuneConfig.model_validate({
        "data": {"train": "unused.jsonl"},
        "model": {"base": str(model_dir), "max_length": 160},
        "augment": {"enabled": True, "score_rewrites": False, **augment},
        "run": {"runs_dir": str(tmp_path / "runs")},
    })


class ReplayGenerator:
    """Hands back prepared candidates: for the conversation whose instruction holds `key`, `replies[key]` in turn."""

    description = "replay of prepared candidates"

    def __init__(self, replies: dict[str, list[str]], delay_s: float = 0.0):
        self.replies = replies
        self.delay_s = delay_s
        self.calls: list[int] = []

    def generate(self, conversations, max_new_tokens, *, n, temperature, seed):
        self.calls.append(len(conversations))
        time.sleep(self.delay_s)
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            # The longest matching key: a gold answer's key also matches the rewrite instruction of another row.
            key = max((k for k in self.replies if k in prompt), key=len, default=None)
            texts = self.replies.get(key, [""]) if key else [""]
            out.append([Generated(texts[k % len(texts)], True) for k in range(n if temperature > 0 else 1)])
        return out


# ----------------------------------------------------------------------------------------------------------------
# Key facts


def test_key_facts_find_prices_times_dates_and_names():
    facts = key_facts("We're closed on 25 and 26 December; Sunday hours are 11:00 to 16:00 at Kestrel Cycles, €250 deposit.")
    assert {"25", "26", "250", "t:11:00", "t:16:00"} <= set(facts.figures)
    assert {"december", "sunday", "kestrel", "cycles"} <= set(facts.names)
    assert "we're" not in facts.names  # capitalised only for starting the sentence


def test_facts_survive_rewording_and_are_missed_when_dropped():
    gold = "On Sundays we're open from 11:00 to 16:00; a day of e-bike rental costs €45, two working days' notice."
    good = "We open 11 am to 4 pm every Sunday. Renting an e-bike for a day is 45 euros; please give 2 working days' notice."
    assert missing_facts(gold, good) == []
    assert missing_facts(gold, "We open 11 am to 5 pm on Sundays; e-bike rental is €45 a day, two days' notice.") == ["16:00"]
    assert missing_facts(gold, "We open 11:00-16:00 on Saturdays, e-bike rental €45, two days' notice.") == ["Sundays"]
    assert added_figures("Open 11:00 to 16:00, rental €45, or €200 a week.", gold) == ["200"]
    assert added_figures(good, gold) == []


def test_clean_generation_strips_labels_preambles_and_quotes():
    assert clean_generation('Sure! Here is the rewritten answer: "We open at 9."') == "We open at 9."
    assert clean_generation("Rewrite: Is there theft insurance?") == "Is there theft insurance?"
    assert clean_generation("Here is a question that asks the same thing:\n\nWhen do you open?\nWe open at 9.", first_line=True) == "When do you open?"


# ----------------------------------------------------------------------------------------------------------------
# Equivalence rules: each one accepts and rejects


def _rewrite(gold_row, text, embedder, cfg=AugmentConfig(), labels=(), finished=True):
    from tasks.augment import _answer

    sim = embedder.similarities([_answer(gold_row)], [text])[0]
    tokens = (len(_answer(gold_row).split()) + 5, len(text.split()) + 5)  # about one token per word, plus punctuation
    return judge_rewrite(gold_row, Generated(text, finished), sim, cfg, labels, tokens)


def _row(question, answer, label=None):
    return {"id": "r1", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "label": label}


def test_short_factual_answer_keeps_every_fact(embedder):
    gold = _row("How much is a day of e-bike rental?", "A day of e-bike rental costs €45, helmet and lock included.")
    kept = _rewrite(gold, "Renting an e-bike for one day costs €45, and the helmet and lock are included.", embedder)
    assert kept.kept and kept.rule == "key_facts"
    lost = _rewrite(gold, "Renting an e-bike for one day is cheap, and the helmet and lock are included.", embedder)
    assert not lost.kept and lost.rule == "key_facts" and "'45'" in lost.reason
    invented = _rewrite(gold, "A day of e-bike rental costs €45, or €200 for a week, helmet and lock included.", embedder)
    assert not invented.kept and invented.rule == "key_facts" and "'200'" in invented.reason


def test_facts_kept_but_meaning_changed_is_caught_by_similarity(embedder):
    gold = _row("How much is a day of e-bike rental?", "A day of e-bike rental costs €45, helmet and lock included.")
    verdict = _rewrite(gold, "I love cycling through the mountains; the view is worth 45 of anything.", embedder)
    assert not verdict.kept and verdict.rule == "similarity"


def test_free_text_needs_similarity(embedder):
    answer = (
        "Our mechanics look at the whole bike: they check the brakes, adjust the gears, true the wheels, tighten "
        "every bolt, lubricate the chain and tell you about anything that will need replacing soon, with a quote "
        "before any extra work is done, so there are never surprises when you come to collect your bike from us."
    )
    gold = _row("What does a service include?", answer)
    assert len(answer.split()) > AugmentConfig().short_answer_words
    good = (
        "Our mechanics check the whole bike: they test the brakes, adjust the gears, true the wheels, tighten every "
        "bolt and lubricate the chain. They tell you about anything that will need replacing soon and quote you "
        "before doing any extra work, so there are no surprises when you collect your bike."
    )
    verdict = _rewrite(gold, good, embedder)
    assert verdict.kept and verdict.rule == "similarity" and verdict.similarity >= AugmentConfig().similarity_threshold
    drifted = _rewrite(gold, "Bicycles were invented in the nineteenth century and became popular in Europe quickly.", embedder)
    assert not drifted.kept and drifted.rule == "similarity"


def test_labelled_rows_keep_their_label(embedder):
    gold = _row("The brakes squeal and the shop never called back.", "negative", label="negative")
    labels = ["negative", "neutral", "positive"]
    assert _rewrite(gold, "Negative.", embedder, labels=labels).kept is False  # same words: nothing new
    kept = _rewrite(gold, "Negative - the customer is unhappy.", embedder, labels=labels)
    assert kept.kept and kept.rule == "label"
    changed = _rewrite(gold, "Positive, mostly.", embedder, labels=labels)
    assert not changed.kept and changed.rule == "label" and "'positive" in changed.reason.lower()


def test_empty_unchanged_cut_off_and_too_long_rewrites_are_rejected(embedder):
    gold = _row("Where is the shop?", "You'll find us at 17 Canal Row, Lindenhaven, next to the Fishmarket tram stop.")
    assert _rewrite(gold, "", embedder).rule == "empty"
    assert _rewrite(gold, "you'll find us at 17 canal row lindenhaven next to the fishmarket tram stop", embedder).rule == "unchanged"
    assert _rewrite(gold, "We are at 17 Canal Row, Lindenhaven", embedder, finished=False).rule == "cut_off"
    verdict = judge_rewrite(gold, Generated("We are at 17 Canal Row. " * 20, True), 0.9, AugmentConfig(), (), (20, 200))
    assert verdict.rule == "too_long"


def _paraphrase(row, text, embedder):
    from tasks.augment import _answer, _question

    sq = embedder.similarities([_question(row)], [text])[0]
    sa = embedder.similarities([_answer(row)], [text])[0]
    return judge_paraphrase(row, Generated(text, True), sq, sa, AugmentConfig(), (10, len(text.split()) + 3))


def test_paraphrase_rules(embedder):
    row = _row("How much does it cost to rent an e-bike for a day?", "A day of e-bike rental costs €45, helmet and lock included.")
    kept = _paraphrase(row, "What is the daily price for renting an e-bike?", embedder)
    assert kept.kept, kept.reason
    assert _paraphrase(row, "How much does it cost to rent an e-bike for a day?!", embedder).rule == "unchanged"
    assert _paraphrase(row, "An e-bike costs €45 a day with a helmet and a lock.", embedder).rule == "not_a_question"
    assert _paraphrase(row, "Which museums are open in the city centre?", embedder).rule == "similarity"
    assert _paraphrase(row, "How much does it cost to rent an e-bike for a day, please?", embedder).rule == "near_identical"
    assert _paraphrase(row, "How much does it cost to rent an e-bike for 3 days?", embedder).rule == "key_facts"


# ----------------------------------------------------------------------------------------------------------------
# The stage: provenance, duplicates, leakage, budgets, outliers, report


GOOD_REWRITES = {
    # gold answer (as it appears in the rewrite instruction) -> the generator's rewrite
    "On Sundays we're open from 11:00 to 16:00": ["Every Sunday we open 11:00 to 16:00, for rentals and sales only, and the workshop is closed."],
    "liability is capped at €250": ["If a rental bike is stolen while it was locked with our lock, you pay at most €250, as long as you hand back the keys."],
    "We're closed on 25 and 26 December": ["We close on 25 and 26 December and on 1 January; other public holidays follow Sunday hours, 11:00 to 16:00."],
    "Email us at help@kestrelcycles.example": ["Write to help@kestrelcycles.example and you will get an answer within 2 working days."],  # invents a figure
}


def _stage_rows():
    rows = demo_rows(12)
    assert any("On Sundays we're open" in r["messages"][-1]["content"] for r in rows)
    return rows


def test_self_distillation_replace_keeps_provenance_and_reasons(tmp_path, tiny_model_dir):
    rows = _stage_rows()
    cfg = config(tiny_model_dir, tmp_path, self_distill="replace", paraphrase={"n": 0})
    gen = ReplayGenerator(GOOD_REWRITES)
    result = augment_records(rows, cfg, tmp_path / "out", eval_records=demo_eval(), generator=gen)

    assert len(result.records) == len(rows) and result.added == 0
    distilled = [r for r in result.records if r["source"] == "self_distilled"]
    assert distilled, result.note
    by_id = {r["id"]: r for r in rows}
    for r in distilled:
        parent = by_id[r["parent_id"]]
        assert r["messages"][:-1] == parent["messages"][:-1]  # same prompt, new answer
        assert r["messages"][-1]["content"] != parent["messages"][-1]["content"]
        assert r["id"] not in by_id
    replaced = {r["parent_id"] for r in distilled}
    for r in result.records:
        if r["source"] == "gold":
            assert r["parent_id"] is None and r["id"] not in replaced
    rejected = read_jsonl(result.rejected_path)
    email = [r for r in rejected if "help@kestrelcycles.example" in r["original"]]
    assert email and all(r["rule"] == "key_facts" and "'2'" in r["reason"] for r in email)
    assert {r["rule"] for r in rejected} >= {"key_facts", "empty"}  # rows the generator had nothing for

    report = json.loads(result.report_path.read_text())
    sd = report["techniques"]["self_distilled"]
    assert sd["kept"] == len(distilled) and sd["kept"] + sd["rejected"] == sd["generated"] == len(rows)
    assert report["replaced"] == len(distilled) and report["rows_out"] == len(rows)
    md = result.markdown_path.read_text()
    assert "self_distilled: kept examples" in md and "self_distilled: rejected examples" in md and "key_facts" in md
    assert result.summary()["techniques"]["self_distilled"]["kept"] == len(distilled)


def test_add_mode_and_paraphrases_are_new_rows_after_their_parent(tmp_path, tiny_model_dir):
    rows = _stage_rows()
    sunday = next(r for r in rows if "On Sundays we're open" in r["messages"][-1]["content"])
    q = sunday["messages"][-2]["content"]
    replies = {**GOOD_REWRITES, q: ["On Sundays, what are your opening times?", "When do you open on Sunday?"]}
    cfg = config(tiny_model_dir, tmp_path, self_distill="add", paraphrase={"n": 2})
    result = augment_records(rows, cfg, tmp_path / "out", eval_records=[], generator=ReplayGenerator(replies))

    ids = [r["id"] for r in result.records]
    assert len(ids) == len(set(ids))
    assert [r["id"] for r in result.records if r["source"] == "gold"] == [r["id"] for r in rows]  # every gold row stays
    paraphrases = [r for r in result.records if r["source"] == "paraphrase"]
    assert {r["messages"][-2]["content"] for r in paraphrases} == set(replies[q])
    for r in paraphrases:
        assert r["parent_id"] == sunday["id"] and r["messages"][-1] == sunday["messages"][-1]
    position = {r["id"]: i for i, r in enumerate(result.records)}
    for r in result.records:
        if r["source"] != "gold":
            assert position[r["id"]] > position[r["parent_id"]]
    assert result.added == len(result.records) - len(rows) > len(paraphrases)


def test_paraphrases_are_deduplicated_against_the_dataset_and_each_other(tmp_path, tiny_model_dir):
    rows = _stage_rows()
    sunday = next(r for r in rows if "On Sundays we're open" in r["messages"][-1]["content"])
    # Another phrasing of the same question, already in the dataset with the same answer.
    twin = next(r for r in demo_rows() if r["messages"][-1] == sunday["messages"][-1] and r["id"] != sunday["id"])
    rows = rows + [twin]
    replies = {sunday["messages"][-2]["content"]: [
        "What time do you open on Sundays?",
        "What time do you open on Sundays ?",  # the same question again
        twin["messages"][-2]["content"],        # a question the dataset already holds
    ]}
    cfg = config(tiny_model_dir, tmp_path, self_distill="off",
                 paraphrase={"n": 3, "min_similarity": 0.3, "max_similarity": 0.999})
    result = augment_records(rows, cfg, tmp_path / "out", generator=ReplayGenerator(replies))
    kept = [r for r in result.records if r["source"] == "paraphrase"]
    assert [r["messages"][-2]["content"] for r in kept] == ["What time do you open on Sundays?"]
    reasons = sorted(r["reason"] for r in read_jsonl(result.rejected_path) if r["rule"] == "duplicate")
    assert reasons == sorted([f"asks the same as row {twin['id']}", f"asks the same as row {kept[0]['id']}"])


def test_augmented_rows_that_leak_into_eval_are_dropped(tmp_path, tiny_model_dir):
    rows = _stage_rows()
    evals = demo_eval()
    sunday = next(r for r in rows if "On Sundays we're open" in r["messages"][-1]["content"])
    leak = next(e for e in evals if e["messages"][-1]["content"] == sunday["messages"][-1]["content"])
    replies = {sunday["messages"][-2]["content"]: [leak["messages"][-2]["content"], "Are you open on a Sunday at all?"]}
    # The eval question is much longer than the training one (and the tiny tokenizer splits words finely).
    cfg = config(tiny_model_dir, tmp_path, self_distill="off", paraphrase={"n": 2, "min_similarity": 0.3, "max_length_ratio": 10})
    result = augment_records(rows, cfg, tmp_path / "out", eval_records=evals, generator=ReplayGenerator(replies))

    kept = [r["messages"][-2]["content"] for r in result.records if r["source"] == "paraphrase"]
    assert leak["messages"][-2]["content"] not in kept
    dropped = result.report["leakage"]["rows"]
    assert len(dropped) == 1 and f"id {leak['id']}" in dropped[0]["reason"] and "same prompt and answer as eval" in dropped[0]["reason"]
    assert result.report["techniques"]["paraphrase"]["rejected_by_rule"].get("leakage") == 1
    eval_keys = {(e["messages"][-2]["content"], e["messages"][-1]["content"]) for e in evals}
    assert not any((r["messages"][-2]["content"], r["messages"][-1]["content"]) in eval_keys for r in result.records)


def test_shards_merge_into_one_result_without_cross_shard_duplicates(tmp_path, tiny_model_dir):
    from flows.sharded import merge_augmented, split_rows

    sunday_rows = [r for r in demo_rows() if "On Sundays we're open" in r["messages"][-1]["content"]][:2]
    rows = demo_rows(6) + sunday_rows
    # Both phrasings of the Sunday question get the same paraphrase, one in each shard.
    replies = {r["messages"][-2]["content"]: ["Can I visit the shop on a Sunday?"] for r in sunday_rows}
    cfg = config(tiny_model_dir, tmp_path, self_distill="off", paraphrase={"n": 1, "min_similarity": 0.3, "max_length_ratio": 10})
    shards = split_rows(rows, 2)
    assert all(any(r in shard for r in sunday_rows) for shard in shards)
    results = [
        augment_records(shard, cfg, tmp_path / f"shard{i}", context_records=rows, generator=ReplayGenerator(replies))
        for i, shard in enumerate(shards)
    ]
    assert sum(r.added for r in results) == 2  # each shard kept its own copy
    merged = merge_augmented(results, tmp_path / "merged", cfg)
    paraphrases = [r for r in merged.records if r["source"] == "paraphrase"]
    assert [r["messages"][-2]["content"] for r in paraphrases] == ["Can I visit the shop on a Sunday?"]
    assert merged.added == 1 and len(merged.records) == len(rows) + 1
    t = merged.report["techniques"]["paraphrase"]
    assert t["generated"] == len(rows) and t["kept"] == 1 and t["rejected_by_rule"]["duplicate"] == 1
    assert "2 shards on Dask" in merged.note and json.loads(merged.report_path.read_text())["added"] == 1


def test_max_new_rows_stops_generation(tmp_path, tiny_model_dir):
    rows = demo_rows(40)
    replies = {r["messages"][-2]["content"]: [f"Could you tell me this: {r['messages'][-2]['content'].rstrip('?')}?"] for r in rows}
    cfg = config(tiny_model_dir, tmp_path, self_distill="off", max_new_rows=3,
                 paraphrase={"n": 1, "min_similarity": 0.3, "max_similarity": 0.999}, generator={"batch_size": 4})
    gen = ReplayGenerator(replies)
    result = augment_records(rows, cfg, tmp_path / "out", generator=gen)
    assert sum(r["source"] == "paraphrase" for r in result.records) == 3
    pp = result.report["techniques"]["paraphrase"]
    assert result.report["budget"]["stopped_by"] == "max_new_rows"
    assert pp["rows_attempted"] < len(rows) and pp["rows_not_attempted"] > 0
    assert "max_new_rows=3" in result.note


def test_max_seconds_stops_generation_and_keeps_what_passed(tmp_path, tiny_model_dir):
    rows = demo_rows(12)
    replies = {r["messages"][-2]["content"]: [f"Could you tell me this: {r['messages'][-2]['content'].rstrip('?')}?"] for r in rows}
    cfg = config(tiny_model_dir, tmp_path, self_distill="off", max_seconds=0.5,
                 paraphrase={"n": 1, "min_similarity": 0.3, "max_similarity": 0.999}, generator={"batch_size": 2})
    gen = ReplayGenerator(replies, delay_s=0.3)  # a second batch would end at ~0.6 s, past the budget
    result = augment_records(rows, cfg, tmp_path / "out", generator=gen)
    assert gen.calls == [2]
    assert result.report["budget"]["stopped_by"] == "max_seconds"
    pp = result.report["techniques"]["paraphrase"]
    assert pp["rows_attempted"] == 2 and pp["rows_not_attempted"] == 10
    assert sum(r["source"] == "paraphrase" for r in result.records) == pp["kept"] >= 1
    assert "max_seconds=0.5" in result.note


def test_outliers_from_the_score_stage_are_rewritten_first_even_when_augmentation_is_off(tmp_path, tiny_model_dir):
    rows = _stage_rows()
    sunday = next(r for r in rows if "On Sundays we're open" in r["messages"][-1]["content"])
    cfg = config(tiny_model_dir, tmp_path, enabled=False)
    gen = ReplayGenerator(GOOD_REWRITES)
    result = augment_records(rows, cfg, tmp_path / "out", outlier_ids=[sunday["id"]], generator=gen)
    assert gen.calls == [1]  # only the outlier
    assert [r["parent_id"] for r in result.records if r["source"] == "self_distilled"] == [sunday["id"]]
    assert len(result.records) == len(rows)


def test_plan_by_dataset_size_and_yaml_switches(tmp_path):
    a = AugmentConfig(enabled=True)
    assert (plan_augmentation(demo_rows(50), a).self_distill, plan_augmentation(demo_rows(50), a).paraphrase_n) == ("add", 3)
    big = [dict(r, id=str(i)) for i, r in enumerate(demo_rows() * 8)]  # 2,000 rows
    assert (plan_augmentation(big, a).self_distill, plan_augmentation(big, a).paraphrase_n) == ("replace", 0)
    labelled = [dict(r, label="yes") for r in demo_rows(50)]
    assert plan_augmentation(labelled, a).self_distill == "off"
    assert not plan_augmentation(demo_rows(50), AugmentConfig()).active  # enabled false: pass-through
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x.jsonl}\naugment: {enabled: true, self_distill: off}\n")
    assert load_config(path).augment.self_distill == "off"  # YAML reads `off` as false
    path.write_text("data: {train: x.jsonl}\naugment: {enabled: true, self_distill: on}\n")
    assert plan_augmentation(big, load_config(path).augment).self_distill == "replace"


def test_spread_order_covers_distinct_answers_first():
    rows = demo_rows(60)
    order = spread_order(rows, first_ids=[rows[5]["id"]])
    assert order[0] == 5
    answers = [rows[i]["messages"][-1]["content"] for i in order]
    distinct = len(set(answers))
    assert len(set(answers[1 : distinct + 1])) == distinct  # after the outlier: one row of every answer, then seconds


def test_disabled_stage_passes_rows_through(tmp_path, tiny_model_dir):
    rows = _stage_rows()
    cfg = config(tiny_model_dir, tmp_path, enabled=False)
    result = augment_records(rows, cfg, tmp_path / "out")
    assert result.records == rows and result.added == 0 and "disabled" in result.note
    assert read_jsonl(result.path) == rows


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


class _TinyChatServer:
    """A real OpenAI-compatible chat-completions server on 127.0.0.1 that answers with the tiny model."""

    def __init__(self, generator: LocalGenerator, key: str | None):
        server = self
        self.requests: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 - http.server's naming
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                with server.lock:  # one generate at a time on the shared model
                    g = generator.generate([body["messages"]], body["max_tokens"], n=1,
                                           temperature=body.get("temperature", 0.0), seed=body.get("seed", 0))[0][0]
                self._send(200, {"object": "chat.completion", "model": body.get("model"), "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": g.text},
                     "finish_reason": "stop" if g.finished else "length"}]})

        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_generator_matches_the_model_behind_it(tiny, monkeypatch):
    from tasks.config import GeneratorConfig

    model, tok = tiny
    local = LocalGenerator(model, tok, 96, "tiny")
    convs = [[{"role": "user", "content": q}] for q in ("Where is the shop?", "Do you repair bikes bought elsewhere?")]
    expected = local.generate(convs, 8, n=1, temperature=0.0, seed=0)
    # The server answers one conversation per request: compare with the same conversations generated one by one.
    expected = [local.generate([c], 8, n=1, temperature=0.0, seed=0)[0] for c in convs]
    monkeypatch.setenv("FEWTUNE_TEST_KEY", "s3cret")
    with _TinyChatServer(local, key="s3cret") as server:
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
    with _TinyChatServer(LocalGenerator(model, tok, 96, "tiny"), key=None) as server:
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
    from flows.finetune import augment_key
    from tasks.common.models import resolve_base_model

    base = resolve_base_model(str(tiny_model_dir))
    validated = {"train_hash": "t", "eval_hash": "e"}

    def key(*overrides):
        path = tmp_path / "c.yaml"
        path.write_text("data: {train: x.jsonl}\naugment: {enabled: true}\n")
        return augment_key(load_config(path, list(overrides)), validated, base, None)

    plain = key()
    assert key() == plain
    assert key("train.learning_rate=1e-4") == plain
    for change in ("augment.generator.batch_size=3", "augment.paraphrase.temperature=0.5", "augment.self_distill=replace",
                   "augment.generator.kind=http", "validate.near_dup_threshold=0.9", "model.max_length=64"):
        extra = ["augment.generator.url=http://127.0.0.1:9/v1"] if "http" in change else []
        assert key(change, *extra) != plain, change
    assert augment_key(load_config(tmp_path / "c.yaml"), {"train_hash": "t", "eval_hash": "other"}, base, None) != plain
    assert key(f"augment.generator.kind=local", f"augment.generator.model={tiny_model_dir}") != plain


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
