"""Training: auto choices, masks, early stopping and the over-memorization guard, best-checkpoint reload, kill -9
resume, determinism, replay, incremental mode, several processes, QLoRA and out-of-memory retry (CUDA only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config import ConfigError, FewtuneConfig
from tasks.common.records import load_records, split_train_eval, write_jsonl
from tasks.common.models import EncodingError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def make_cfg(**train) -> FewtuneConfig:
    return FewtuneConfig(data={"train": "-"}, model={"max_length": 64}, train=train)


def demo_rows(n: int) -> list[dict]:
    return load_records(REPO / "examples/support/train.jsonl").records[:n]


def probe_rows() -> list[dict]:
    return load_records(REPO / "examples/probe/general.jsonl").records


def history(result) -> list[dict]:
    return json.loads((Path(result.adapter_path).parent / "train_log.json").read_text())


def curve(log: list[dict]) -> list[tuple]:
    return [(h["step"], h.get("loss"), h.get("eval_loss")) for h in log if "loss" in h or "eval_loss" in h]


# ----------------------------------------------------------------------------------------------------------------
# Auto choices


@pytest.mark.parametrize(
    ("rows", "gpu_gib", "params", "method", "why"),
    [
        (250, None, 135e6, "lora", "under 1,000 rows"),
        (5_000, None, 135e6, "lora", "1,000-10,000 rows"),
        (50_000, None, 135e6, "lora", "10,000-100,000 rows"),
        (200_000, None, 135e6, "full", "over 100,000 rows"),
        (200_000, 80, 1e9, "full", "over 100,000 rows"),  # 16 GB for full fine-tuning fits in 80 GiB
        (200_000, 24, 7e9, "qlora", "full fine-tuning needs"),  # neither full (112 GB) nor bf16 LoRA (14 GB) fits
        (500, 24, 7e9, "qlora", "QLoRA"),  # bf16 weights: 14 GB > half of 24 GiB
        (500, 80, 7e9, "lora", "under 1,000 rows"),  # fits in bf16
    ],
)
def test_method_auto_selection_table(rows, gpu_gib, params, method, why):
    from tasks.train import choose_method

    chosen, reason = choose_method(rows, int(params), int(gpu_gib * GiB) if gpu_gib else None, make_cfg())
    assert chosen == method
    assert why in reason


def test_auto_hyperparameters_follow_the_data_size():
    from tasks.train import choose_epochs, choose_learning_rate, choose_replay_fraction

    cfg = make_cfg()
    assert choose_epochs(250, cfg)[0] == 12  # 3,000 examples / 250 rows
    assert choose_epochs(60, cfg)[0] == 25  # capped at epochs_max
    assert choose_epochs(5_000, cfg)[0] == 2  # at least epochs_min
    assert choose_epochs(250, make_cfg(epochs=3))[0] == 3
    assert choose_learning_rate("lora", False, cfg)[0] == 2e-4
    assert choose_learning_rate("full", False, cfg)[0] == 2e-5
    lr, why = choose_learning_rate("full", True, cfg)
    assert lr == pytest.approx(2e-6) and "incremental" in why  # inside the 1e-6..5e-6 range for updates
    assert choose_learning_rate("lora", True, make_cfg(learning_rate=1e-3))[0] == 1e-3
    assert choose_replay_fraction(250, cfg)[0] == 0.1
    assert choose_replay_fraction(50_000, cfg)[0] == 0.0
    assert choose_replay_fraction(250, make_cfg(replay_fraction=0))[0] == 0.0


def test_out_of_memory_schedule_keeps_the_effective_batch():
    from tasks.train import TrainingError, next_micro_batch

    steps = [(8, 1)]
    while steps[-1][0] > 1:
        steps.append(next_micro_batch(*steps[-1]))
    assert steps == [(8, 1), (4, 2), (2, 4), (1, 8)]
    with pytest.raises(TrainingError, match="micro-batch 1"):
        next_micro_batch(1, 8)


def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir, tmp_path):
    import torch

    from tasks.train import train_adapter

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: QLoRA runs (see test_qlora_trains_on_cuda)")
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU.*use train.method lora"):
        train_adapter(demo_rows(20), make_cfg(method="qlora"), str(tiny_model_dir), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Data: masks, empty rows, batching, replay


def test_assistant_only_masks_reach_the_loss(tiny_model_dir):
    import torch

    from tasks.common.models import load_model, load_tokenizer
    from tasks.train import _encode_all, make_collator

    tok = load_tokenizer(str(tiny_model_dir))
    rows = demo_rows(4)
    encoded = _encode_all(tok, rows, 96)
    for row, enc in zip(rows, encoded):
        labelled = tok.decode([t for t in enc["labels"] if t != -100])
        assert labelled == row["messages"][-1]["content"] + "<|im_end|>\n"  # the answer and nothing else
    batch = make_collator(tok)([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encoded])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding carries no loss
    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        out = model(**batch)
    # The loss the Trainer minimises is the cross-entropy over the answer tokens only.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    everything = torch.nn.functional.cross_entropy(logits[batch["attention_mask"][:, 1:] == 1], batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1])
    assert abs(everything.item() - manual.item()) > 1e-3  # the mask changes the loss


def test_assistant_and_stm_masks_reach_the_trainers_loss(tiny_model_dir, tmp_path):
    """End to end through `train_adapter`: the loss the Trainer logs at step 1 (a fresh LoRA adapter leaves the
    model unchanged) equals the cross-entropy of the base model over the first batch's answer tokens, less the
    tokens Selective Token Masking removed."""
    import torch

    from tasks.common.models import load_model, load_tokenizer
    from tasks.score import finish_scores, score_records
    from tasks.common.stm import masking_collator
    from tasks.train import LengthGroupedSampler, _encode_all, make_collator, train_adapter

    rows = demo_rows(24)
    cfg = FewtuneConfig(
        data={"train": "-"},
        model={"max_length": 64},
        score={"token_masking": {"enabled": True, "threshold": 20.0, "max_masked_fraction": 0.5}},
        train={"method": "lora", "max_steps": 1, "batch_size": 4, "evals_per_epoch": 20, "replay_fraction": 0},
    )
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    scored = score_records(rows, model, tok, max_length=64, batch_size=8, outlier_z=3.5, out_path=tmp_path / "s" / "scores.parquet")
    masks_path = finish_scores(scored, rows, cfg.score, tmp_path / "s")["token_masks_path"]

    masked = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "masked", token_masks=masks_path)
    plain = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "plain")

    train_rows, _ = split_train_eval(rows, cfg.train.validation_fraction, cfg.train.seed)
    encoded = _encode_all(tok, train_rows, 64)
    first = LengthGroupedSampler([e["length"] for e in encoded], 4, cfg.train.length_group_batches, cfg.train.seed).indices()[:4]
    features = [{k: encoded[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in first]

    def expected(collate) -> float:
        batch = collate([dict(f) for f in features])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        return torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep]).item()

    with_stm = expected(masking_collator(make_collator(tok), masks_path))
    without = expected(make_collator(tok))
    assert abs(with_stm - without) > 1e-3  # STM removed tokens from this batch
    logged = {name: next(h["loss"] for h in history(r) if "loss" in h) for name, r in (("masked", masked), ("plain", plain))}
    assert logged["masked"] == pytest.approx(with_stm, rel=1e-4)
    assert logged["plain"] == pytest.approx(without, rel=1e-4)


def test_row_without_trainable_token_is_a_clear_error(tiny_model_dir, tmp_path):
    from tasks.train import train_adapter

    rows = demo_rows(20)
    long_prompt = "Please read this carefully. " * 40
    rows[7] = {**rows[7], "id": "too-long-7", "messages": [{"role": "user", "content": long_prompt}, rows[7]["messages"][-1]]}
    with pytest.raises(EncodingError) as info:
        train_adapter(rows, make_cfg(replay_fraction=0), str(tiny_model_dir), tmp_path)
    assert "too-long-7" in str(info.value) and "model.max_length" in str(info.value)


def test_length_grouped_sampler_is_a_seeded_permutation_with_little_padding():
    import random

    from tasks.train import LengthGroupedSampler

    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(400)]
    s = LengthGroupedSampler(lengths, batch_size=8, group_batches=50, seed=3)
    s.set_epoch(1)
    first = s.indices()
    assert sorted(first) == list(range(400))
    assert LengthGroupedSampler(lengths, 8, 50, seed=3).indices() != first  # epoch 0 differs from epoch 1
    again = LengthGroupedSampler(lengths, 8, 50, seed=3)
    again.set_epoch(1)
    assert again.indices() == first  # depends only on (seed, epoch): a resumed run sees the same batches

    def padded(order):
        return sum(max(lengths[i] for i in order[k : k + 8]) * len(order[k : k + 8]) for k in range(0, len(order), 8))

    shuffled = list(range(400))
    random.Random(1).shuffle(shuffled)
    assert padded(first) < 0.75 * padded(shuffled)
    assert padded(first) < 1.15 * sum(lengths)


def test_probe_split_for_replay_is_deterministic_and_disjoint():
    from tasks.train import replay_rows, split_probe

    probe = probe_rows()
    cfg = make_cfg()
    pool, measure = split_probe(probe, cfg)
    assert {r["id"] for r in split_probe(list(reversed(probe)), cfg)[0]} == {r["id"] for r in pool}  # any order
    assert {r["id"] for r in pool}.isdisjoint({r["id"] for r in measure})
    assert len(pool) + len(measure) == len(probe) and len(pool) == 25
    mixed = replay_rows(pool, 0.1, 90, seed=42)
    assert len(mixed) == 10  # 10 of 100 rows in the mix
    assert all(r["id"].startswith("replay-") for r in mixed)


# ----------------------------------------------------------------------------------------------------------------
# Early stopping, the over-memorization guard, best checkpoint


def conflicting_rows() -> list[dict]:
    """The validation slice's answers contradict the training answers to the same question: validation loss first
    falls (the shared answer format is learnt), then rises as the training answer is memorised."""
    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": "Where is the shop?"}, {"role": "assistant", "content": ""}],
         "label": None, "source": "gold", "parent_id": None}
        for i in range(24)
    ]
    _, val = split_train_eval(rows, 0.25, 42)
    val_ids = {r["id"] for r in val}
    for r in rows:
        r["messages"][1]["content"] = "Next to the station." if r["id"] in val_ids else "On Main Street."
    return rows


def conflict_cfg(**extra) -> FewtuneConfig:
    train = dict(method="lora", epochs=8, batch_size=4, learning_rate=1e-2, evals_per_epoch=1, validation_fraction=0.25,
                 replay_fraction=0, warmup_ratio=0)
    return make_cfg(**(train | extra))


@pytest.fixture(scope="module")
def guard_run(tiny_model_dir, tmp_path_factory):
    from tasks.train import train_adapter

    cfg = conflict_cfg(early_stopping_patience=3, overmemorization_patience=2)
    return train_adapter(conflicting_rows(), cfg, str(tiny_model_dir), tmp_path_factory.mktemp("guard"))


def test_over_memorization_guard_stops_on_rising_validation_perplexity(guard_run):
    log = history(guard_run)
    losses = [h["eval_loss"] for h in log if "eval_loss" in h]
    assert guard_run.stop_reason == "over_memorization" and guard_run.stopped_early
    assert guard_run.steps < 8 * 5  # 8 epochs of 5 steps were planned
    assert losses[-1] > losses[-2] > losses[-3]  # risen at the last two evaluations
    stop = log[-1]
    assert stop["event"] == "stop" and stop["reason"] == "over_memorization"
    assert stop["validation_ppl"][-1] == pytest.approx(__import__("math").exp(losses[-1]), rel=1e-3)
    saved = json.loads((Path(guard_run.adapter_path).parent / "train_result.json").read_text())
    assert saved["stop_reason"] == "over_memorization"


def test_early_stopping_stops_when_validation_stops_improving(tiny_model_dir, tmp_path):
    from tasks.train import train_adapter

    cfg = conflict_cfg(early_stopping_patience=2, overmemorization_patience=8)
    result = train_adapter(conflicting_rows(), cfg, str(tiny_model_dir), tmp_path)
    losses = [h["eval_loss"] for h in history(result) if "eval_loss" in h]
    assert result.stop_reason == "early_stopping" and result.steps < 8 * 5
    assert min(losses[-2:]) > min(losses[:-2])  # the last two evaluations did not improve on the best


def test_best_adapter_reloaded_equals_the_best_evaluation(guard_run):
    import torch
    from safetensors.torch import load_file

    log = history(guard_run)
    evals = [h for h in log if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert guard_run.best_step == best["step"] and guard_run.best_val_loss == pytest.approx(best["eval_loss"])
    assert guard_run.best_step < guard_run.steps  # training went on past the best point
    ckpts = Path(guard_run.adapter_path).parent / "checkpoints"
    saved = load_file(str(Path(guard_run.adapter_path) / "adapter_model.safetensors"))
    at_best = load_file(str(ckpts / f"checkpoint-{best['step']}" / "adapter_model.safetensors"))
    at_end = load_file(str(ckpts / f"checkpoint-{guard_run.steps}" / "adapter_model.safetensors"))
    assert saved.keys() == at_best.keys() and saved
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert any(not torch.equal(saved[k], at_end[k]) for k in saved)


# ----------------------------------------------------------------------------------------------------------------
# Resume after kill -9, determinism


def _write_inputs(folder: Path, **train) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "rows.jsonl", demo_rows(40))
    cfg = {"name": "kill", "data": {"train": "-"}, "model": {"max_length": 64},
           "train": {"method": "lora", "epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "evals_per_epoch": 3,
                     "replay_fraction": 0, **train}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return ["--config", str(folder / "cfg.json"), "--train", str(folder / "rows.jsonl")]


def test_training_killed_mid_run_resumes_to_the_same_loss_curve(tiny_model_dir, tmp_path):
    from tasks.train import last_checkpoint

    args = _write_inputs(tmp_path) + ["--base", str(tiny_model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tasks.train", *args]
    straight = subprocess.run(cmd + ["--out", str(tmp_path / "straight")], cwd=REPO, env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while last_checkpoint(killed / "checkpoints") is None:
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = last_checkpoint(killed / "checkpoints")
    assert not (killed / "train_result.json").exists()

    again = subprocess.run(cmd + ["--out", str(killed)], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads((killed / "train_result.json").read_text())
    full = json.loads((tmp_path / "straight" / "train_result.json").read_text())
    assert resumed["resumed_from"] is not None
    assert int(Path(resumed["resumed_from"]).name.split("-")[1]) >= int(Path(at_kill).name.split("-")[1])
    assert resumed["resumed_from"] != str(killed / "checkpoints" / f"checkpoint-{full['steps']}")  # not already done
    assert resumed["steps"] == full["steps"] and resumed["best_val_loss"] == full["best_val_loss"]
    a = curve(json.loads((tmp_path / "straight" / "train_log.json").read_text()))
    b = curve(json.loads((killed / "train_log.json").read_text()))
    assert len(a) > 4 and a == b  # same data order, same dropout, same losses


def test_same_seed_same_loss_curve_and_replay_mix(tiny_model_dir, tmp_path):
    from tasks.train import train_adapter

    rows, probe = demo_rows(40), probe_rows()
    cfg = make_cfg(method="lora", max_steps=6, batch_size=4, learning_rate=1e-3, evals_per_epoch=4)
    one = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "one", probe=probe)
    two = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "two", probe=probe)
    other = train_adapter(rows, make_cfg(**(cfg.train.model_dump() | {"seed": 7})), str(tiny_model_dir), tmp_path / "other", probe=probe)
    assert curve(history(one)) == curve(history(two)) and len(curve(history(one))) >= 4
    assert curve(history(one)) != curve(history(other))

    # Replay: 10% of the mix from half of the probe set; the other half is left for measuring forgetting.
    plan = json.loads(Path(one.plan_path).read_text())
    assert one.replay_rows == plan["replay_rows"] == 4  # 36 training rows -> 4 replay rows = 10% of 40
    assert "data.probe" in plan["replay_source"] and "small data" in plan["reasons"]["replay_fraction"]
    assert set(plan["reasons"]) == {"method", "learning_rate", "epochs", "replay_fraction"}
    measured = {json.loads(line)["id"] for line in Path(one.probe_eval_path).read_text().splitlines()}
    from tasks.train import split_probe

    pool = {r["id"] for r in split_probe(probe, cfg)[0]}
    assert measured.isdisjoint(pool) and len(measured | pool) == len(probe)


# ----------------------------------------------------------------------------------------------------------------
# Incremental mode, several processes


def test_incremental_training_starts_from_the_champion(guard_run, tiny_model_dir, tmp_path):
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from tasks.common.registry import tracking_uri
    from tasks.train import resolve_init_adapter, train_adapter

    cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 64}, register={"model_name": "incremental-test"},
                        train={"init_adapter": "champion", "max_steps": 3, "batch_size": 4, "replay_fraction": 0})
    assert resolve_init_adapter(cfg) is None  # no champion yet: a fresh adapter

    class Answer(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return list(model_input["prompt"])

    mlflow.set_tracking_uri(tracking_uri(cfg))
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Answer(), artifacts={"adapter": guard_run.adapter_path},
                                       registered_model_name="incremental-test")
    MlflowClient(tracking_uri(cfg)).set_registered_model_alias("incremental-test", "champion", info.registered_model_version)

    init = resolve_init_adapter(cfg)
    assert init is not None and "champion" in init.source
    result = train_adapter(demo_rows(24), cfg, str(tiny_model_dir), tmp_path, init_adapter=init.path)
    plan = json.loads(Path(result.plan_path).read_text())
    assert plan["method"] == "lora" and "incremental" in plan["reasons"]["method"]
    assert plan["learning_rate"] == pytest.approx(2e-5)
    start = load_file(str(Path(init.path) / "adapter_model.safetensors"))
    end = load_file(str(Path(result.adapter_path) / "adapter_model.safetensors"))
    b_keys = [k for k in start if "lora_B" in k]
    assert b_keys and all(start[k].abs().max() > 0 for k in b_keys)  # a fresh adapter would start at B = 0
    for k in b_keys:
        assert (end[k] - start[k]).abs().max() < 0.1 * start[k].abs().max()  # continued, not restarted


def test_accelerate_launch_runs_data_parallel_processes(tiny_model_dir, tmp_path):
    from tasks.train import train_adapter_launched

    cfg = make_cfg(method="lora", max_steps=2, batch_size=4, num_processes=2, replay_fraction=0)
    result = train_adapter_launched(demo_rows(24), cfg, str(tiny_model_dir), tmp_path)
    assert result.steps == 2 and (Path(result.adapter_path) / "adapter_model.safetensors").is_file()
    # Two processes of 4 rows each per step: 8 rows a step, 20 training rows -> 3 steps an epoch.
    assert result.epochs_run == pytest.approx(2 / 3, abs=0.01)


# ----------------------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tiny_model_dir, tmp_path):
    from tasks.train import train_adapter

    result = train_adapter(demo_rows(40), make_cfg(method="qlora", max_steps=4, batch_size=4), str(tiny_model_dir), tmp_path)
    assert result.method == "qlora" and result.steps == 4
    assert json.loads((Path(result.adapter_path) / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.gpu
def test_cuda_out_of_memory_retries_with_half_the_micro_batch(tiny_model_dir, tmp_path):
    """Fill the GPU so that only a small micro-batch of long rows fits; training must finish with the same
    effective batch."""
    import torch

    from tasks.train import train_adapter

    long = " ".join(["The shop is open on weekdays and rents bikes by the day."] * 40)
    rows = [{"id": f"l{i}", "messages": [{"role": "user", "content": long}, {"role": "assistant", "content": long}],
             "label": None, "source": "gold", "parent_id": None} for i in range(80)]
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free - 600 * 2**20), dtype=torch.uint8, device="cuda")  # leave ~600 MiB
    try:
        cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 1024},
                            train={"method": "full", "max_steps": 2, "batch_size": 64, "replay_fraction": 0})
        result = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path)
    finally:
        del ballast
        torch.cuda.empty_cache()
    assert result.oom_retries >= 1 and result.batch_size < 64
    assert result.batch_size * result.gradient_accumulation == 64
