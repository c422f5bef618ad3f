"""Forgetting signals on hand-checkable cases, and their direction on a tiny model that is made to forget.

The direction test pre-trains the tiny model on general prose (so it has a general ability to lose), fine-tunes it
hard on narrow support rows without replay (many epochs, high learning rate), and checks that fewtune's forgetting
figures move the same way as the perplexity of independent general text that neither the probe nor replay uses.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tasks.common.general_probe import load_general_probe
from tasks.common.models import encode_chat, load_model, load_tokenizer
from tasks.common.records import load_records, training_split
from tasks.common.twin import first_adapted_layer, twin_of
from tasks.config import FewtuneConfig
from tasks.evaluate import evaluate_models
from tasks.evaluate.forgetting import flips_signal, ppl_of, prose_encoding, unmerged_tuned
from tasks.evaluate.paired import kl_items, kl_prefix

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent

# Independent general text: in no probe file and no replay prompt (written for this test).
INDEPENDENT = [
    "Glaciers form where more snow falls in winter than melts in summer. Over many years the snow is pressed into "
    "dense ice, which slowly flows downhill under its own weight, carving valleys and carrying rocks far from where "
    "they started.",
    "A sourdough starter is a mixture of flour and water in which wild yeast and lactic acid bacteria live together. "
    "Bakers feed it regularly, and the gas the yeast produces is what makes the bread rise without any packaged yeast.",
    "The printing press with movable metal type spread across Europe in the second half of the fifteenth century. "
    "Books became cheaper and more common, and ideas could travel much faster than when every copy was written by hand.",
    "Honeybees tell each other where flowers are by dancing. The angle of the dance shows the direction relative to "
    "the sun, and the length of the waggle run shows how far away the food is.",
    "A lighthouse keeper once had to wind the clockwork that turned the lamp every few hours through the night. Today "
    "most lighthouses are automatic, powered by electricity and watched from a distance.",
    "Chess is played on a board of sixty-four squares. Each player starts with sixteen pieces, and the game ends when "
    "one king is attacked and has no safe move left, which is called checkmate.",
]


def _cfg(**sections) -> FewtuneConfig:
    base = {
        "data": {"train": "-"},
        "model": {"max_length": 96, "dtype": "float32"},
        "score": {"batch_size": 8},
        "evaluate": {"max_new_tokens": 8, "batch_size": 16, "bootstrap_samples": 300, "probe_max_new_tokens": 6,
                     "memorization_rows": 16},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return FewtuneConfig(**base)


# ---------------------------------------------------------------------------------------------------------------
# Hand-checkable pieces


def test_flips_count_both_ways_and_the_value_is_the_accuracy_drop() -> None:
    cfg = _cfg()
    s = flips_signal([True, True, False, False], [False, True, True, False], cfg)
    assert (s["right_to_wrong"], s["wrong_to_right"], s["value"]) == (1, 1, 0.0)
    assert s["baseline_accuracy"] == 0.5 and s["tuned_accuracy"] == 0.5
    s = flips_signal([True] * 8, [False, False, False, False, True, True, True, True], cfg)
    assert s["value"] == 0.5 and s["right_to_wrong"] == 4 and s["low"] > 0 and s["high"] <= 1
    s = flips_signal([True] * 6, [True] * 6, cfg)
    assert s["value"] == s["low"] == s["high"] == 0


def _adapter(tiny_model_dir, path: Path, *, random_init: bool, layers: list[int] | None = None) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(
        load_model(str(tiny_model_dir)),
        LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=not random_init,
                   task_type="CAUSAL_LM", layers_to_transform=layers),
    )
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("top_only", [False, True])
def test_kl_is_zero_for_an_adapter_that_changes_nothing_and_matches_a_hand_computation(tiny_model_dir, tmp_path,
                                                                                       top_only, caplog) -> None:
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    cfg = _cfg()
    tok = load_tokenizer(str(tiny_model_dir))
    rows = [
        {"messages": [{"role": "user", "content": "Where is the shop?"},
                      {"role": "assistant", "content": "On Main Street, next to the station."}]},
        {"messages": [{"role": "user", "content": "Do you sell gift cards?"},
                      {"role": "assistant", "content": "Gift cards are available in the shop."}]},
    ]
    # A fresh LoRA adapter (B = 0) leaves the model as it is: KL 0 on every token.
    same = kl_items(twin_of(unmerged_tuned(load_model(str(tiny_model_dir)),
                                          _adapter(tiny_model_dir, tmp_path / "zero", random_init=False))),
                    tok, rows, cfg, "kl")
    assert len(same) == 2 and all(n > 3 for _, n in same)
    assert all(abs(s) < 1e-5 for s, _ in same)

    # A random adapter: the KL summed over the answer tokens equals one computed by hand from two separate models.
    # top_only: the adapter changes the top layer only; the layer below runs once for both models
    adapter = _adapter(tiny_model_dir, tmp_path / "random", random_init=True, layers=[1] if top_only else None)
    assert first_adapted_layer(unmerged_tuned(load_model(str(tiny_model_dir)), adapter)) == (1 if top_only else 0)
    got = kl_items(twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter)), tok, rows[:1], cfg, "kl")
    base = load_model(str(tiny_model_dir)).eval()
    tuned = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), adapter).merge_and_unload().eval()
    text = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    prompt = tok.apply_chat_template(rows[0]["messages"][:1], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lb = F.log_softmax(base(ids).logits[0].float(), -1)
        lt = F.log_softmax(tuned(ids).logits[0].float(), -1)
    by_hand = [float((lb[j - 1].exp() * (lb[j - 1] - lt[j - 1])).sum()) for j in range(start, ids.shape[1])]
    # the answer's tokens (and the end-of-turn token the chat encoding also scores)
    assert got[0][1] in (len(by_hand), len(by_hand) - 1)
    assert got[0][0] == pytest.approx(sum(by_hand[: got[0][1]]), rel=1e-3, abs=1e-4)
    assert got[0][0] > 0.01
    # in a batch with a longer row (rows padded, answer positions gathered row by row): the same per-row figures
    both = kl_items(twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter)), tok, rows, cfg, "kl")
    assert both[0] == pytest.approx(got[0], rel=1e-4) and both[1][0] > 0.01
    assert "shortcut differs" not in caplog.text  # the shared-layers pass agreed with two whole passes


@pytest.mark.parametrize("top_only", [False, True])
def test_kl_runs_a_shared_system_prompt_once_with_the_same_figures(tiny_model_dir, tmp_path, top_only) -> None:
    import torch

    cfg = _cfg()
    tok = load_tokenizer(str(tiny_model_dir))
    system = {"role": "system", "content": "You are the customer support assistant of a bicycle shop in town."}
    rows = [{"messages": [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Where is the shop?", "On Main Street, next to the station."),
                         ("Do you sell gift cards?", "Gift cards are available in the shop."),
                         ("Open Sunday?", "No, we are closed on Sundays and public holidays.")]]
    adapter = _adapter(tiny_model_dir, tmp_path / "random", random_init=True, layers=[1] if top_only else None)
    model = twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter))
    assert (model.shared, model.peft is None) == ((1, True) if top_only else (0, False))
    encoded = [encode_chat(tok, r, cfg.model.max_length) for r in rows]
    with torch.inference_mode():
        prefix = kl_prefix(model, encoded, "cpu")
    assert prefix is not None and prefix["length"] >= 10  # the system prompt's tokens
    once = kl_items(model, tok, rows, cfg, "kl")
    whole = kl_items(model, tok, rows, cfg, "kl", share_prefix=False)
    assert [n for _, n in once] == [n for _, n in whole] and all(n > 3 for _, n in once)
    assert [s for s, _ in once] == pytest.approx([s for s, _ in whole], rel=1e-4, abs=1e-6)
    assert all(s > 0.01 for s, _ in once)


def test_kl_in_chunks_of_positions_equals_one_pass_and_a_hand_computation() -> None:
    import torch

    from tasks.evaluate.paired import _kl_per_position

    torch.manual_seed(0)
    base, tuned, head = torch.randn(7, 5), torch.randn(7, 5), torch.nn.Linear(5, 11)
    with torch.no_grad():
        whole, chunked = _kl_per_position(base, tuned, head, chunk=100), _kl_per_position(base, tuned, head, chunk=3)
        p, q = torch.softmax(head(base), -1), torch.softmax(head(tuned), -1)
    assert whole.shape == (7,) and torch.allclose(whole, chunked)
    assert torch.allclose(whole, (p * (p / q).log()).sum(-1), atol=1e-6) and bool((whole > 0).all())


def test_prose_encoding_scores_every_token_but_the_first(tiny_model_dir) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    enc = prose_encoding(tok, "The river flows to the sea.", 64)
    assert enc["labels"][0] == -100 and enc["labels"][1:] == enc["input_ids"][1:]
    assert len(prose_encoding(tok, " ".join(["word"] * 200), 32)["input_ids"]) == 32


# ---------------------------------------------------------------------------------------------------------------
# Direction on a model that is made to forget


@pytest.fixture(scope="module")
def general_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model pre-trained on general prose (the shipped probe's and the independent text): a base model
    with a general ability to lose."""
    import torch

    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("general-base")
    shutil.copytree(tiny_model_dir, target, dirs_exist_ok=True)
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    texts = [p["text"] for p in load_general_probe().prose] + INDEPENDENT
    seqs = [tok(t, add_special_tokens=False)["input_ids"][:96] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        batch = [seqs[(step * 8 + i) % len(seqs)] for i in range(8)]
        width = max(map(len, batch))
        ids = torch.full((8, width), tok.pad_token_id)
        labels = torch.full((8, width), -100)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(s)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(target)
    return target


def test_forgetting_figures_move_with_independent_general_text(general_base, tmp_path) -> None:
    from tasks.common.generation import load_tuned
    from tasks.train import train_adapter

    rows = load_records(REPO / "examples/support/train.jsonl").records[:40]
    tests = load_records(REPO / "examples/support/test.jsonl").records[:8]
    cfg = _cfg(train={"method": "lora", "epochs": 12, "learning_rate": 1e-2, "batch_size": 8, "replay_fraction": 0.0,
                      "early_stopping_patience": 50, "evals_per_epoch": 1, "validation_fraction": 0.1, "seed": 1, "lora_r": 16})
    trained = train_adapter(rows, cfg, str(general_base), tmp_path / "train")
    _, held_out = training_split(rows, cfg.train.validation_fraction, cfg.train.seed)
    result = evaluate_models(tests, None, cfg, str(general_base), trained.adapter_path, tmp_path / "eval",
                             train_records=rows, validation_records=held_out).to_dict()

    # The independent measurement: perplexity of text neither the probe nor replay uses, base vs tuned.
    tok = load_tokenizer(str(general_base))
    encoded = [prose_encoding(tok, t, 96) for t in INDEPENDENT]
    base_ppl = ppl_of(load_model(str(general_base)), tok, encoded, cfg, "independent").value
    tuned_ppl = ppl_of(load_tuned(load_model(str(general_base)), trained.adapter_path), tok, encoded, cfg, "independent").value
    independent_rise = tuned_ppl / base_ppl - 1

    signals = result["forgetting"]["signals"]
    assert independent_rise > 0.05, independent_rise  # the narrow fine-tune did make the model forget
    assert signals["general_ppl"]["value"] > 0 and signals["general_ppl"]["low"] > 0  # fewtune sees it, same direction
    assert signals["kl_general"]["low"] > 0 and signals["kl_task"]["value"] > 0
    assert math.isfinite(signals["general_flips"]["value"])
    assert result["forgetting"]["not_measured"] == {}
    assert result["forgetting"]["probe"]["prose_rows"] >= 20 and result["forgetting"]["probe"]["question_rows"] >= 20

    # The memorization control is drawn from the validation slice (held-out rows with untrained answers), never the
    # test rows (tests/test_evaluation.py checks which rows).
    mem = result["memorization"]
    assert mem["status"] in ("measured", "not_applicable") and "validation slice" in mem["control"]

    # The gate refuses it, and says it is forgetting that stops it.
    from tasks.register.gate import gate_decision

    gate = gate_decision(result, cfg, None)
    failed = {c.name for c in gate.criteria if c.status == "fail"}
    assert not gate.promoted
    assert failed & {"forgetting_ppl", "forgetting_kl_general", "forgetting_flips"}, gate.decision
    assert "forgetting" in gate.decision
