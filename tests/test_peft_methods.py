"""Every fine-tuning method the config offers (`train.method`: lora, prefix, ia3, full; qlora on CUDA) trained on a
tiny model for a few steps, saved, reloaded and evaluated; and the bf16 path (training, evaluation, scoring, the
served model) run explicitly, so it is tested on every CPU, not only on those where `model.dtype: auto` picks it.

The base is the tiny model after a few seconds of training on the demo's chat rows (`build_chatty_model`): its
greedy answers are text, so "the reloaded model answers as the trained one" compares sentences, not empty strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
from train_helpers import REPO, demo_rows, make_cfg

from tasks.common.generation import GenerationSettings, generate_answers, load_tuned
from tasks.common.models import load_base, load_model, load_tokenizer, pick_dtype
from tasks.common.records import load_records, prompt_and_response, read_jsonl
from tasks.config import FewtuneConfig
from tasks.config.train import TrainConfig
from tasks.evaluate import evaluate_models
from tasks.train import METHODS, _encode_all, adapter_method, build_model, make_collator, train_adapter

from tiny_model import build_chatty_model, rel_tolerance

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

CPU_METHODS = ["lora", "prefix", "ia3", "full"]
ALL_METHODS = [*CPU_METHODS, pytest.param("qlora", marks=pytest.mark.gpu)]
# Learning rates high enough that a few steps move every method's answers measurably on the tiny model.
LEARNING_RATES = {"lora": 1e-2, "qlora": 1e-2, "prefix": 1e-2, "ia3": 3e-2, "full": 1e-3}
STEPS = 3
SETTINGS = GenerationSettings(max_new_tokens=12, max_length=96, batch_size=4)


def test_every_configurable_method_is_covered():
    assert set(METHODS) == set(CPU_METHODS) | {"qlora"}
    assert set(get_args(TrainConfig.model_fields["method"].annotation)) == {"auto", *METHODS}


@pytest.fixture(scope="module")
def chatty_base(tiny_model_dir, tmp_path_factory) -> Path:
    return build_chatty_model(tiny_model_dir, tmp_path_factory.mktemp("chatty-base"))


def method_cfg(method: str, dtype: str = "float32") -> FewtuneConfig:
    cfg = make_cfg(dtype=dtype, method=method, max_steps=STEPS, batch_size=4, learning_rate=LEARNING_RATES[method],
                   warmup_ratio=0, replay_fraction=0, evals_per_epoch=1)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_length": SETTINGS.max_length}),
                                  "evaluate": cfg.evaluate.model_copy(update={
        "max_new_tokens": SETTINGS.max_new_tokens, "batch_size": SETTINGS.batch_size, "bootstrap_samples": 200,
        "memorization_rows": 0, "robustness_original": False, "primary_metric": "rouge_l", "probe_max_rows": 4,
        "probe_max_new_tokens": 4,
    })})


def eval_rows() -> list[dict]:
    return load_records(REPO / "examples/support/test.jsonl").records[:6]


def prompts_of(rows: list[dict]) -> list[list[dict[str, str]]]:
    return [prompt_and_response(r)[0] for r in rows]


def logits(model, tokenizer, text: str = "Are you open on Sundays?"):
    import torch

    ids = torch.tensor([tokenizer(text)["input_ids"]], device=next(model.parameters()).device)
    model.eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits.float().cpu()


@pytest.mark.parametrize("method", CPU_METHODS)
def test_trained_model_saved_and_reloaded_answers_exactly_as_in_memory(method, chatty_base, tmp_path):
    """The train stage's model of `method` (`build_model`), trained a few steps on the stage's own encoding and
    collator, answers the same before saving and after `load_tuned` puts the saved adapter on a fresh base."""
    import torch

    cfg = method_cfg(method)
    tokenizer = load_tokenizer(str(chatty_base))
    model = build_model(method, str(chatty_base), cfg, "cpu", torch.float32, None)
    batches = _encode_all(tokenizer, demo_rows(4 * STEPS), cfg.model.max_length)
    collate = make_collator(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATES[method])
    model.train()
    for step in range(STEPS):
        batch = collate([{k: v for k, v in row.items() if k != "length"} for row in batches[4 * step : 4 * step + 4]])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.config.use_cache = True  # as a loaded model generates
    prompts = prompts_of(eval_rows())
    in_memory = generate_answers(model, tokenizer, prompts, SETTINGS, "in memory")
    in_memory_logits = logits(model, tokenizer)

    model.save_pretrained(str(tmp_path / "adapter"))
    assert adapter_method(tmp_path / "adapter") == method
    reloaded = load_tuned(load_model(str(chatty_base)), str(tmp_path / "adapter"))
    assert generate_answers(reloaded, tokenizer, prompts, SETTINGS, "reloaded") == in_memory
    assert torch.allclose(logits(reloaded, tokenizer), in_memory_logits, atol=1e-4)
    assert all(in_memory), "the base answers with text, so the comparison is of sentences"
    base_logits = logits(load_model(str(chatty_base)), tokenizer)
    assert (in_memory_logits - base_logits).abs().max() > 1e-3, "the steps trained something"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_train_stage_trains_saves_and_the_evaluation_reloads_each_method(method, chatty_base, tmp_path):
    """The real train entry point, then the evaluate stage on its saved adapter; the adapter reloaded as the served
    model loads it (`load_tuned`) gives the evaluation's answers."""
    cfg = method_cfg(method)
    result = train_adapter(demo_rows(24), cfg, str(chatty_base), tmp_path / "train")
    assert result.method == method and result.steps == STEPS and result.trainable_params > 0
    adapter = Path(result.adapter_path)
    assert (adapter / "adapter_model.safetensors").is_file()
    assert adapter_method(adapter) == ("lora" if method == "qlora" else method)
    plan = json.loads(Path(result.plan_path).read_text())
    assert plan["method"] == method and plan["reasons"]["method"] == "set in the config"

    rows = eval_rows()
    evaluation = evaluate_models(rows, None, cfg, str(chatty_base), str(adapter), tmp_path / "evaluate").to_dict()
    predictions = read_jsonl(evaluation["predictions_path"])
    assert [p["id"] for p in predictions] == [r["id"] for r in rows]
    assert evaluation["generation"]["dtype"] == "float32"

    base, tokenizer = load_base(str(chatty_base), cfg.model.dtype)
    reloaded = load_tuned(base, str(adapter))
    assert generate_answers(reloaded, tokenizer, prompts_of(rows), SETTINGS, "reloaded") == [p["tuned"] for p in predictions]
    base_logits = logits(load_base(str(chatty_base), cfg.model.dtype)[0], tokenizer)
    assert (logits(reloaded, tokenizer) - base_logits).abs().max() > 1e-3, "the adapter changed the model"


# ----------------------------------------------------------------------------------------------------------------
# bf16 on any CPU (model.dtype bfloat16 forced)


def test_lora_trains_and_evaluates_in_bf16_close_to_fp32(chatty_base, tmp_path):
    import torch

    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = method_cfg("lora", dtype)
        result = train_adapter(demo_rows(24), cfg, str(chatty_base), tmp_path / dtype / "train")
        log = json.loads((Path(result.adapter_path).parent / "train_log.json").read_text())
        evaluation = evaluate_models(eval_rows(), None, cfg, str(chatty_base), result.adapter_path,
                                     tmp_path / dtype / "evaluate").to_dict()
        runs[dtype] = (result, log, evaluation)
    result, log, evaluation = runs["bfloat16"]
    assert result.steps == STEPS and evaluation["generation"]["dtype"] == "bfloat16"

    # Same rows, same seed: bf16 training follows the fp32 losses within bf16's precision.
    first = {d: next(h["loss"] for h in runs[d][1] if "loss" in h) for d in runs}
    evals = {d: [h["eval_loss"] for h in runs[d][1] if "eval_loss" in h] for d in runs}
    tol = rel_tolerance("bfloat16")
    assert first["bfloat16"] == pytest.approx(first["float32"], rel=tol)
    assert evals["bfloat16"] == pytest.approx(evals["float32"], rel=tol)
    assert evaluation["tuned"]["eval_ppl"] == pytest.approx(runs["float32"][2]["tuned"]["eval_ppl"], rel=2 * tol)

    # The bf16 adapter reloaded on a bf16 base answers as the bf16 evaluation did.
    base, tokenizer = load_base(str(chatty_base), "bfloat16")
    reloaded = load_tuned(base, result.adapter_path)
    assert reloaded.dtype == torch.bfloat16
    predictions = read_jsonl(evaluation["predictions_path"])
    assert generate_answers(reloaded, tokenizer, prompts_of(eval_rows()), SETTINGS, "bf16") == [p["tuned"] for p in predictions]


def test_scoring_in_bf16_is_close_to_fp32(chatty_base, tmp_path):
    from tasks.score import score_records

    rows = demo_rows(24)
    scored = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_base(str(chatty_base), dtype)
        assert str(model.dtype) == f"torch.{dtype}"
        scored[dtype] = score_records(rows, model, tokenizer, max_length=96, batch_size=8, outlier_z=3.5,
                                      out_path=tmp_path / f"{dtype}.parquet").rows
    tol = rel_tolerance("float32", "bfloat16")
    fp32, bf16 = ([r["nll_mean"] for r in scored[d]] for d in ("float32", "bfloat16"))
    assert bf16 == pytest.approx(fp32, rel=tol)
    assert bf16 != fp32, "the bf16 path computed in bf16"
    assert [r["n_tokens"] for r in scored["bfloat16"]] == [r["n_tokens"] for r in scored["float32"]]


@pytest.mark.parametrize("recorded", ["bfloat16", "float32", "auto"])
def test_served_model_loads_and_reports_the_recorded_dtype(recorded, chatty_base, tmp_path):
    """The registered pyfunc loads the base in the dtype recorded with it and says which; its answers are those of
    the same adapter loaded directly in that dtype."""
    from mlflow.pyfunc import PythonModelContext

    from tasks.register.pyfunc import SERVE_BATCH_SIZE, AdapterModel

    result = train_adapter(demo_rows(24), method_cfg("lora", "float32"), str(chatty_base), tmp_path / "train")
    served = AdapterModel()
    served.load_context(PythonModelContext({"adapter": result.adapter_path},
                                           {"base_path": str(chatty_base), "dtype": recorded, "max_new_tokens": 12, "max_length": 96}))
    expected = str(pick_dtype(recorded, "cpu")).removeprefix("torch.")
    assert served.dtype == expected and str(served.model.dtype) == f"torch.{expected}"
    base, tokenizer = load_base(str(chatty_base), expected)
    direct = load_tuned(base, result.adapter_path)
    rows = eval_rows()
    answers = served.predict(None, [prompt_and_response(r)[0][-1]["content"] for r in rows])
    conversations = [[{"role": "user", "content": prompt_and_response(r)[0][-1]["content"]}] for r in rows]
    served_settings = GenerationSettings(max_new_tokens=12, max_length=96, batch_size=SERVE_BATCH_SIZE)
    assert answers == generate_answers(direct, tokenizer, conversations, served_settings, "direct")


def test_models_load_concurrently_in_threads(chatty_base):
    """Dask workers run as threads of the flow's process (`run.dask_processes: false`): their loads overlap. Every
    load gives the stored weights in the dtype asked for."""
    import threading

    import torch

    reference = load_model(str(chatty_base)).state_dict()
    found: list[tuple[str, object]] = []

    def load(dtype: str) -> None:
        try:
            for _ in range(3):
                model, _ = load_base(str(chatty_base), dtype, device="cpu")
                found.append((dtype, model))
        except Exception as exc:  # noqa: BLE001 - reported below with its message
            found.append((dtype, exc))

    threads = [threading.Thread(target=load, args=(d,)) for d in ("float32", "bfloat16", "float32")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [repr(m) for _, m in found if isinstance(m, Exception)]
    assert not errors and len(found) == 9, errors
    for dtype, model in found:
        assert model.dtype == getattr(torch, dtype)
        state = model.state_dict()
        assert all(torch.equal(state[k], v.to(model.dtype)) for k, v in reference.items())


def test_served_model_config_records_the_dtype_the_evaluation_used(chatty_base, tmp_path):
    """What a registered version records: the evaluation's dtype, never the setting `auto`, which could resolve to
    another dtype on the machine that serves it; the served model then computes in that dtype."""
    from mlflow.pyfunc import PythonModelContext

    from tasks.register.pyfunc import AdapterModel, served_model_config

    cfg = method_cfg("lora", "auto")
    evaluated_in_bf16 = {"generation": {"dtype": "bfloat16"}}
    config = served_model_config(cfg, evaluated_in_bf16, str(chatty_base), "spec", None)
    assert config["dtype"] == "bfloat16" and config["max_length"] == cfg.model.max_length
    unrecorded = served_model_config(cfg, {}, str(chatty_base), "spec", None)
    assert unrecorded["dtype"] == str(pick_dtype("auto")).removeprefix("torch.") != "auto"

    result = train_adapter(demo_rows(24), method_cfg("lora"), str(chatty_base), tmp_path / "train")
    served = AdapterModel()
    served.load_context(PythonModelContext({"adapter": result.adapter_path}, config))
    assert served.dtype == "bfloat16"
