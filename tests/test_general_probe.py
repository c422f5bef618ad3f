"""The general-ability probe that ships with fewtune and the replay that must never repeat it: the shipped files are
valid training data and disjoint from the replay prompts, answers are checked as whole words, data.probe adds rows,
on-policy replay is the base model's own answers to general prompts, and replay that repeats a probe row stops the
run with the row named."""

from __future__ import annotations

import pytest
from train_helpers import demo_rows, make_cfg

from data_checks.similarity import jaccard, shingles
from tasks.common.general_probe import (
    GENERAL_DIR,
    answer_is_right,
    check_replay_overlap,
    load_general_probe,
    replay_overlaps,
    replay_prompts,
)
from tasks.common.generation import GenerationSettings, generate_answers
from tasks.common.models import load_model, load_tokenizer
from tasks.common.records import DataError, LoadResult, load_records, read_jsonl, training_split
from tasks.config import FewtuneConfig
from tasks.train import answer_replay, train_adapter, training_mix
from tasks.validate import validate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

NUMBER_WORDS = {"two", "six", "seven", "eight", "nine", "eleven", "one hundred"}


def user_text(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def chat(rid: str, prompt: str, answer: str) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "label": None, "source": "gold", "parent_id": None}


# ----------------------------------------------------------------------------------------------------------------
# The shipped files


def test_shipped_probe_and_replay_prompts_are_valid_training_data(tmp_path):
    general = load_general_probe()
    assert len(general.prose) == 40 and len(general.questions) == 60 and general.extra == []
    questions = load_records(GENERAL_DIR / "questions.jsonl")
    assert not questions.rejects and questions.format == "prompt_completion"
    prompts = replay_prompts()
    assert len(prompts) >= 120
    ids = [p["id"] for p in general.prose] + [q["id"] for q in general.questions] + [r["id"] for r in prompts]
    assert len(ids) == len(set(ids)), "ids are unique across the three files"
    for p in general.prose:
        assert 60 <= len(p["text"].split()) <= 120, p["id"]
        assert "CC0" in p["source"]
    for q in general.questions:
        assert answer_is_right(q["messages"][-1]["content"], q["answers"]), q["id"]  # the reference is right
        assert not answer_is_right(user_text(q), q["answers"]), q["id"]  # repeating the question is not

    # The validate stage's checks (row checks, near-duplicates, split, leakage) quarantine none of them; prose and
    # replay prompts checked as the chat rows they are trained or scored as.
    rows = [dict(q) for q in questions.records]
    rows += [chat(p["id"], "Write a short encyclopedia passage.", p["text"]) for p in general.prose]
    rows += [chat(r["id"], user_text(r), "An answer.") for r in prompts]  # same answer: prompts must differ
    loaded = LoadResult(str(GENERAL_DIR), "messages", [{**r, "line": i} for i, r in enumerate(rows, 1)])
    result = validate_dataset(loaded, None, FewtuneConfig(data={"train": str(GENERAL_DIR)}), tmp_path / "validate")
    assert result.quarantined == [] and result.counts["usable"]
    assert len(result.train) + len(result.eval) == len(rows)


def test_replay_prompts_share_no_content_with_the_probe():
    general, prompts = load_general_probe(), replay_prompts()
    cfg = FewtuneConfig(data={"train": "-"})
    assert replay_overlaps(prompts, general, cfg.train.replay_overlap_threshold) == {}
    # Far below the threshold, not just under it: the closest replay prompt to any probe question.
    closest = max(jaccard(shingles(user_text(r), 3), shingles(user_text(q), 3)) for r in prompts for q in general.questions)
    assert closest < 0.4
    # No replay prompt mentions a probe question's answer (number words aside: "a two-sentence story").
    for r in prompts:
        for q in general.questions:
            names = [a for a in q["answers"] if not a[0].isdigit() and a.lower() not in NUMBER_WORDS and "-" not in a]
            assert not answer_is_right(user_text(r), names), (r["id"], q["id"])


@pytest.mark.parametrize(
    ("answer", "aliases", "right"),
    [
        ("The capital is Paris.", ["Paris"], True),
        ("paris", ["Paris"], True),
        ("It's PARIS!", ["Paris"], True),
        ("Parisian food is famous.", ["Paris"], False),
        ("18", ["8"], False),
        ("A spider has 8 legs.", ["eight", "8"], True),
        ("A spider has eight legs.", ["eight", "8"], True),
        ("Leonardo da Vinci painted it.", ["da Vinci"], True),
        ("Vinci da something", ["da Vinci"], False),
        ("It is fifty-six.", ["56", "fifty-six"], True),
        ("There are 1,000 of them.", ["1000"], True),
        ("Zürich is in Switzerland.", ["Zurich"], True),
        ("", ["Paris"], False),
        ("Paris", [], False),
    ],
)
def test_answer_is_right(answer, aliases, right):
    assert answer_is_right(answer, aliases) is right


def test_data_probe_adds_to_the_shipped_probe():
    mine = [chat("mine-1", "Who maintains our intranet?", "The IT desk on the second floor.")]
    general = load_general_probe(mine)
    assert general.extra == mine and len(general.questions) == 60 and len(general.prose) == 40
    assert general.counts() == {"prose_rows": 40, "question_rows": 60, "extra_rows": 1}
    general.questions[0]["answers"].append("Saturn")  # a caller's edit does not leak into the next load
    general.prose.clear()
    again = load_general_probe()
    assert "Saturn" not in again.questions[0]["answers"] and len(again.prose) == 40 and again.extra == []


# ----------------------------------------------------------------------------------------------------------------
# Replay never repeats the probe


def test_replay_rows_that_repeat_probe_rows_are_named():
    mine = [chat("mine-1", "Who maintains our intranet?", "The IT desk on the second floor, room 214.")]
    general = load_general_probe(mine)
    france = general.questions[1]
    assert user_text(france) == "What is the capital of France?"
    replay = [
        chat("r-ok", "How do I fold a paper plane?", "Fold a sheet in half lengthwise, then fold the corners in."),
        {**chat("r-copy", "what's the capital of France", "Paris."), "line": 7},  # a copy-edit of a probe question
        chat("r-japan", "What is the capital of Japan?", "Tokyo."),  # the same template, another country: a probe row
        chat("r-prose", "Tell me about tides.", general.prose[14]["text"]),  # a passage, word for word
        chat("r-mine", "Who looks after the intranet?", "The IT desk on the second floor, room 214."),  # data.probe
    ]
    found = replay_overlaps(replay, general, 0.6)
    assert sorted(found) == [1, 2, 3, 4]
    assert any("question question-02" in h for h in found[1])
    assert found[3] == ["answer ~ prose passage prose-15 (similarity 1.00)"]
    assert any("data.probe row mine-1" in h for h in found[4])
    with pytest.raises(DataError) as err:
        check_replay_overlap(replay, general, 0.6, source="data.replay replay.jsonl")
    message = str(err.value)
    assert message.startswith("data.replay replay.jsonl: 4 replay row(s) nearly repeat rows of the general-ability probe")
    assert "row 'r-copy' (line 7): prompt ~ question question-02" in message and "'r-ok'" not in message
    assert "fix: drop these rows from data.replay" in message
    check_replay_overlap(replay[:1], general, 0.6)  # nothing to report: no error


def test_data_replay_that_copies_a_probe_question_stops_the_run(tiny_model_dir, tmp_path):
    general = load_general_probe()
    replay = [chat(f"mine-{i}", f"Give me tip number {i} for a tidy garage.", f"Tip {i}: label the shelves.") for i in range(8)]
    replay.append({**general.questions[4], "id": "mine-romeo", "line": 9})  # "Who wrote the play Romeo and Juliet?"
    cfg = make_cfg(method="lora", max_steps=1, batch_size=8)
    with pytest.raises(DataError, match=r"row 'mine-romeo' \(line 9\): prompt ~ question question-05 \(similarity 1.00\)"):
        train_adapter(demo_rows(40), cfg, str(tiny_model_dir), tmp_path / "run", replay=replay)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoints").exists()
    # Without the copy the same rows are the replay mix: 10% of 40 rows, chosen by a seeded hash of their ids.
    mix = training_mix(demo_rows(40), cfg, replay[:-1], general)
    assert mix.source == "data.replay" and len(mix.mixed) == 4 and not mix.pending
    assert all(r["id"].startswith("replay-mine-") for r in mix.mixed)
    assert [r["id"] for r in training_mix(demo_rows(40), cfg, replay[:-1][::-1], general).mixed] == [r["id"] for r in mix.mixed]


def test_on_policy_prompts_leave_out_those_that_repeat_a_data_probe_row():
    prompts = replay_prompts()
    mine = [chat("mine-1", user_text(prompts[0]), "Cold air is pumped around the inside."), chat("mine-2", "Hi?", "Hello.")]
    cfg = make_cfg(replay_fraction=0.9)  # wants more replay rows than there are prompts: all usable ones are picked
    mix = training_mix(demo_rows(40), cfg, None, load_general_probe(mine))
    assert mix.source == "on-policy" and mix.mixed == []
    assert {r["id"] for r in mix.pending} == {r["id"] for r in prompts[1:]}
    assert "the pool holds only 124 rows" in mix.fraction_why


@pytest.fixture(scope="module")
def talking_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with its whitespace tokens silenced: its random weights otherwise answer with newlines only."""
    import torch

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    blank = [i for i in range(model.config.vocab_size) if not tokenizer.decode([i]).strip()]
    with torch.no_grad():
        model.lm_head.weight[blank] = 0
    folder = tmp_path_factory.mktemp("talking-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_blank_base_model_answers_are_not_replayed(tiny_model_dir):
    cfg = make_cfg(replay_max_new_tokens=6)
    general = load_general_probe()
    mix = training_mix(demo_rows(40), cfg, None, general)
    assert len(mix.pending) == 4
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    assert answer_replay(model, tokenizer, mix, general, cfg) == [] == mix.mixed  # the tiny model answers "\n\n..."
    assert mix.fraction_why.endswith("; 4 blank base-model answer(s) dropped")


def test_on_policy_replay_is_the_base_models_answers_and_the_validation_slice_is_written(talking_model_dir, tmp_path):
    rows = demo_rows(40)
    cfg = make_cfg(method="lora", max_steps=1, batch_size=8, replay_max_new_tokens=12)
    result = train_adapter(rows, cfg, talking_model_dir, tmp_path / "run")

    replayed = read_jsonl(tmp_path / "run" / "replay.jsonl")  # the rows mixed into training
    assert result.replay_rows == len(replayed) == 4  # 36 training rows + 4 replay rows: 10% of the mix
    assert result.replay_source.startswith("on-policy: the base model's greedy answers to 4 general prompts")
    shipped = {r["id"]: r for r in replay_prompts()}
    probe_prompts = {user_text(q) for q in load_general_probe().questions}
    picked = [shipped[r["id"].removeprefix("replay-")] for r in replayed]
    assert [user_text(r) for r in replayed] == [user_text(p) for p in picked]
    assert not {user_text(r) for r in replayed} & probe_prompts
    # The answers are the base model's own greedy answers to those prompts, with the same settings.
    model, tokenizer = load_model(talking_model_dir), load_tokenizer(talking_model_dir)
    expected = generate_answers(model, tokenizer, [p["messages"] for p in picked], GenerationSettings(12, 64, 8), "test")
    assert [r["messages"][-1]["content"] for r in replayed] == expected and all(expected)

    # The validation slice: written, held out of training, the same split training used.
    validation = read_jsonl(result.validation_path)
    trained, held = training_split(rows, cfg.train.validation_fraction, cfg.train.seed)
    assert [r["id"] for r in validation] == [r["id"] for r in held] and len(validation) == result.validation_rows == 4
    assert not {r["id"] for r in validation} & ({r["id"] for r in trained} | {r["id"] for r in replayed})
    assert {r["id"] for r in validation} | {r["id"] for r in trained} == {r["id"] for r in rows}


def test_editing_the_shipped_files_changes_the_keys_of_training_and_evaluation(tmp_path):
    import shutil

    from flows import keys

    for package in keys.PROJECT_PACKAGES:
        shutil.copytree(keys.REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))

    def code_key(stage: str) -> str:
        keys._code_hash_cached.cache_clear()
        return keys.stage_code_hash(stage, root=tmp_path)

    for name in ("prose.jsonl", "questions.jsonl", "replay_prompts.jsonl"):
        before = {stage: code_key(stage) for stage in ("train", "cv", "evaluate")}
        path = tmp_path / GENERAL_DIR.relative_to(keys.REPO_ROOT) / name
        path.write_text(path.read_text() + '{"id": "added"}\n')
        assert all(code_key(stage) != key for stage, key in before.items()), name
    keys._code_hash_cached.cache_clear()


def test_data_probe_rows_are_never_dropped_silently(tmp_path):
    from flows.stages import probe_rows

    good = '{"id": "p1", "prompt": "Who runs the intranet?", "completion": "The IT desk."}\n'
    path = tmp_path / "probe.jsonl"
    path.write_text(good + '{"id": "p2", "prompt": "Where is it?", "completion": ""}\n')
    cfg = FewtuneConfig(data={"train": "-", "probe": str(path)})
    with pytest.raises(DataError, match=r"probe.jsonl, line 2: data.probe: 1 row\(s\) cannot be used; first: `completion` is empty"):
        probe_rows(cfg)
    path.write_text(good + good.replace("Who runs", "Who owns"))
    with pytest.raises(DataError, match=r"line 2: data.probe: id 'p1' is also used on line 1\n  fix: give every probe row"):
        probe_rows(cfg)
    path.write_text(good)
    assert [r["id"] for r in probe_rows(cfg)] == ["p1"]
