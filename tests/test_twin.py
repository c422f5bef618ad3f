"""The tuned model beside its base model (tasks/common/twin.py): the base model's own upper layers swapped in and out,
and both models' perplexities from one pass that runs the layers below the adapter once — the same numbers as each
model scored on its own (fp32, a tiny model built in-process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common.models import encode_chat, load_model, load_tokenizer
from tasks.common.nll import sequence_nlls
from tasks.common.twin import adapted_from_layer, paired_nlls, twin_of
from tasks.evaluate.forgetting import unmerged_tuned

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = {"role": "system", "content": "You are the customer support assistant of a bicycle shop in town."}
CHATS = [("Where is the shop?", "On Main Street, next to the station."),
         ("Do you sell gift cards?", "Gift cards are available in the shop, from 10 to 200 euros."),
         ("Open Sunday?", "No, we are closed on Sundays and public holidays."),
         ("Can I rent a bike?", "Yes: city bikes for 15 euros a day.")]


def _adapter(tiny_model_dir, path: Path, layers: list[int] | None) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM", layers_to_transform=layers))
    model.save_pretrained(str(path))
    return str(path)


def _sequences(tok) -> list[list[int]]:
    rows = [{"messages": [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHATS]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHATS[:2]]
    return [encode_chat(tok, r, 96)["input_ids"] for r in rows]


def test_both_perplexities_from_one_pass_equal_each_model_scored_alone(tiny_model_dir, tmp_path) -> None:
    from peft import PeftModel

    tok = load_tokenizer(str(tiny_model_dir))
    adapter = _adapter(tiny_model_dir, tmp_path / "top", layers=[1])
    assert adapted_from_layer(adapter) == 1
    twin = twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter))
    assert twin.shared == 1 and twin.peft is None and len(twin.base_upper) == 1
    seqs = _sequences(tok)
    got = paired_nlls(twin, seqs, pad_id=tok.pad_token_id, batch_size=3)
    assert got is not None
    tuned_alone = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), adapter).merge_and_unload()
    for pair, model in zip(got, (tuned_alone, load_model(str(tiny_model_dir)))):
        alone = sequence_nlls(model, seqs, pad_id=tok.pad_token_id, batch_size=3)
        assert [len(r) for r in pair] == [len(r) for r in alone] == [len(s) - 1 for s in seqs]
        assert sum(pair, []) == pytest.approx(sum(alone, []), rel=1e-4, abs=1e-5)
    # the two models differ (a random adapter): the pass did not score one model twice
    assert max(abs(a - b) for a, b in zip(sum(got[0], []), sum(got[1], []))) > 0.05


def test_base_inside_the_context_and_the_tuned_layers_back_after_it(tiny_model_dir, tmp_path) -> None:
    import torch
    from peft import PeftModel

    adapter = _adapter(tiny_model_dir, tmp_path / "top", layers=[1])
    twin = twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter))
    ids = torch.tensor([[5, 17, 40, 9, 33, 21]])
    base = load_model(str(tiny_model_dir)).eval()
    tuned = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), adapter).merge_and_unload().eval()
    with torch.no_grad():
        with twin.base():
            inside = twin.model(input_ids=ids).logits
        after = twin.model(input_ids=ids).logits
        assert torch.allclose(inside, base(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(after, tuned(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(inside, after, atol=1e-3)
    assert twin.merged() is twin.model


def test_an_adapter_on_every_layer_gives_whole_passes(tiny_model_dir, tmp_path) -> None:
    import torch

    tok = load_tokenizer(str(tiny_model_dir))
    adapter = _adapter(tiny_model_dir, tmp_path / "all", layers=None)
    assert adapted_from_layer(adapter) == 0
    twin = twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter))
    assert twin.shared == 0 and twin.peft is not None and twin.base_upper is None
    assert paired_nlls(twin, _sequences(tok), pad_id=tok.pad_token_id, batch_size=3) is None
    ids = torch.tensor([[5, 17, 40, 9]])
    with torch.no_grad(), twin.base():  # the adapter switched off: the base model
        assert torch.allclose(twin.model(input_ids=ids).logits, load_model(str(tiny_model_dir))(input_ids=ids).logits,
                              atol=1e-5)


def test_the_shortcut_is_checked_once_per_twin_and_a_failed_check_gives_whole_passes(tiny_model_dir, tmp_path,
                                                                                      monkeypatch) -> None:
    import torch

    from tasks.common.twin import Twin

    adapter = _adapter(tiny_model_dir, tmp_path / "top", layers=[1])
    twin = twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter))
    ids, mask = torch.tensor([[5, 17, 40, 9]]), torch.ones(1, 4, dtype=torch.long)
    checks = []
    real = Twin._check
    monkeypatch.setattr(Twin, "_check", lambda self, *a: checks.append(1) or real(self, *a))
    with torch.no_grad():
        assert twin.checked(ids, mask) is twin and twin.checked(ids, mask) is twin
    assert len(checks) == 1  # the second call reads the verdict
    # A shortcut that differs from two whole passes (here: its states shifted) fails the check, once, for good.
    broken = twin_of(unmerged_tuned(load_model(str(tiny_model_dir)), adapter))
    hidden = Twin.hidden
    monkeypatch.setattr(Twin, "hidden", lambda self, *a: tuple(h + 1.0 for h in hidden(self, *a)) if self.shared
                        else hidden(self, *a))
    with torch.no_grad():
        whole = broken.checked(ids, mask)
        assert whole is not broken and whole.shared == 0 and broken.checked(ids, mask) is whole
    assert len(checks) == 2
