"""The augment stage end to end on the tiny model: provenance, the leakage re-check, duplicates, budgets, score
outliers, the report, shard merging and the pass-through when disabled.

Hand-written candidates (good rewrites, rewrites that drop a price or invent a figure, repeated questions) come from
`ReplayGenerator`, so each rule is hit on purpose; the tiny model's own outputs are random text.
"""

from __future__ import annotations

import json

import pytest
from augment_support import GOOD_REWRITES, ReplayGenerator, config, demo_eval, demo_rows, stage_rows

from tasks.augment import augment_records
from tasks.common.records import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time


# ----------------------------------------------------------------------------------------------------------------
# The stage: provenance, duplicates, leakage, budgets, outliers, report


def test_self_distillation_replace_keeps_provenance_and_reasons(tmp_path, tiny_model_dir):
    rows = stage_rows()
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
    rows = stage_rows()
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
    rows = stage_rows()
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
    rows = stage_rows()
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
    from flows.sharded import split_rows
    from tasks.augment import merge_augmented

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
    rows = stage_rows()
    sunday = next(r for r in rows if "On Sundays we're open" in r["messages"][-1]["content"])
    cfg = config(tiny_model_dir, tmp_path, enabled=False)
    gen = ReplayGenerator(GOOD_REWRITES)
    result = augment_records(rows, cfg, tmp_path / "out", outlier_ids=[sunday["id"]], generator=gen)
    assert gen.calls == [1]  # only the outlier
    assert [r["parent_id"] for r in result.records if r["source"] == "self_distilled"] == [sunday["id"]]
    assert len(result.records) == len(rows)


def test_disabled_stage_passes_rows_through(tmp_path, tiny_model_dir):
    rows = stage_rows()
    cfg = config(tiny_model_dir, tmp_path, enabled=False)
    result = augment_records(rows, cfg, tmp_path / "out")
    assert result.records == rows and result.added == 0 and "disabled" in result.note
    assert read_jsonl(result.path) == rows
