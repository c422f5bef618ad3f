"""The plain recipe a user would otherwise write: transformers `Trainer` + `peft` LoRA, then greedy generation.

    python -m benchmarks.plain_lora --task-dir /tmp/fewtune-bench/tasks/clinc-banking-20pi-s0 [--threads 2]

On a task written by `benchmarks/clinc_tasks.py`: LoRA r=16, alpha 32, dropout 0.05 on every linear layer
(`target_modules="all-linear"`), learning rate 2e-4, 3 epochs, batch 8, fp32, loss on the assistant answer only (the
prompt tokens of the chat template are masked with -100); then greedy generation (8 new tokens) for every test query,
and exact match of the first generated line to the label (after strip and casefold). The prompt is the chat
template with a system prompt listing the labels (the same list fewtune's fair baselines get) and the query as the
user turn. The base model is the embedded SmolLM2-135M-Instruct folder (fewtune's alias resolution gives its path)
unless `--model` names another folder.

Writes `plain_result.json` (figures) and `predictions.jsonl` into `--out` (default: <task-dir>/plain).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.clinc_tasks import Task, score  # noqa: E402

LABEL_PROMPT = "Classify the user's message. Answer with exactly one of these labels:"  # fewtune's data.label_prompt
RECIPE = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "learning_rate": 2e-4,
          "epochs": 3, "batch_size": 8, "dtype": "float32", "max_new_tokens": 8, "generate_batch_size": 16, "seed": 0}


def system_prompt(labels: list[str]) -> str:
    return "\n".join([LABEL_PROMPT, *(f"- {label}" for label in labels)])


def messages(text: str, labels: list[str], answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system_prompt(labels)}, {"role": "user", "content": text}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def encode_train(tok, row: dict[str, Any], labels: list[str]) -> dict[str, list[int]]:
    """Chat template -> token ids; labels are -100 on the prompt, so the loss is on the assistant answer only."""
    prompt = tok.apply_chat_template(messages(row["text"], labels), tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages(row["text"], labels, row["label"]), tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n + ids[n:]}


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def matches(answer: str, label: str) -> bool:
    return first_line(answer).casefold() == label.strip().casefold()


def default_model_path() -> str:
    from tasks.common.models import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct").path


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    tok.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def run_plain(
    task: Task | str | Path,
    out_dir: str | Path,
    threads: int | None = None,
    model_path: str | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate the plain recipe on `task`; returns accuracy, macro_f1, predictions and the times.

    `model_path`: a model folder (default: the embedded SmolLM2-135M-Instruct); `max_steps`: stop training after this
    many optimizer steps (a smoke run; default: the recipe's 3 epochs)."""
    start = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    if threads:
        torch.set_num_threads(threads)
    task = task if isinstance(task, Task) else Task.load(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = model_path or default_model_path()
    train_rows, test_rows = task.rows("train"), task.rows("test")
    labels = task.labels

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=RECIPE["lora_r"], lora_alpha=RECIPE["lora_alpha"], lora_dropout=RECIPE["lora_dropout"],
                      target_modules=RECIPE["target_modules"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    dataset = Dataset.from_list([encode_train(tok, r, labels) for r in train_rows])
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        num_train_epochs=RECIPE["epochs"],
        max_steps=max_steps or -1,
        per_device_train_batch_size=RECIPE["batch_size"],
        learning_rate=RECIPE["learning_rate"],
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=RECIPE["seed"],
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    t0 = time.perf_counter()
    result = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    train_s = time.perf_counter() - t0

    model.eval()
    prompts = [tok.apply_chat_template(messages(r["text"], labels), tokenize=False, add_generation_prompt=True)
               for r in test_rows]
    t0 = time.perf_counter()
    answers = generate(model, tok, prompts, RECIPE["max_new_tokens"], RECIPE["generate_batch_size"])
    generate_s = time.perf_counter() - t0

    gold = [r["label"] for r in test_rows]
    by_key = {label.casefold(): label for label in labels}
    predictions = [by_key.get(first_line(a).casefold(), first_line(a)) for a in answers]
    figures = score(predictions, gold, labels)
    rows = [{"id": r["id"], "text": r["text"], "label": g, "answer": a, "prediction": p, "correct": p == g}
            for r, g, a, p in zip(test_rows, gold, answers, predictions)]
    (out / "predictions.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    summary = {
        "system": "plain_lora",
        "task": task.name,
        "accuracy": figures["accuracy"],
        "macro_f1": figures["macro_f1"],
        "outside_label_set": sum(p not in by_key.values() for p in predictions),
        "predictions": predictions,
        "gold": gold,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "wall_s": time.perf_counter() - start,
        "train_s": train_s,
        "generate_s": generate_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "threads": torch.get_num_threads(),
        "recipe": RECIPE,
        "model": model_path,
    }
    (out / "plain_result.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-dir", required=True, help="a task folder written by benchmarks.clinc_tasks.make_task")
    p.add_argument("--out", help="where plain_result.json and predictions.jsonl go (default: <task-dir>/plain)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--model", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-steps", type=int, help="stop training after N optimizer steps (smoke runs)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.task_dir) / "plain"
    r = run_plain(args.task_dir, out, threads=args.threads, model_path=args.model, max_steps=args.max_steps)
    print(f"plain LoRA on {r['task']}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, "
          f"{r['outside_label_set']} of {r['test_rows']} answers outside the label set; wall {r['wall_s']:.0f} s "
          f"(train {r['train_s']:.0f} s, generate {r['generate_s']:.0f} s), peak RSS {r['peak_rss_gb']:.2f} GiB")
    print(f"result: {out / 'plain_result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
