"""A tiny stand-in for the real base model (SmolLM2-135M-Instruct), built offline in a few seconds.

It has the same shape as the real one where the code depends on it: Llama architecture, a fast byte-level BPE
tokenizer, ChatML chat template with `<|im_start|>` / `<|im_end|>` special tokens, eos and pad `<|im_end|>`,
bos `<|im_start|>`, unk `<|endoftext|>`, and no special tokens added by `tokenizer(text)`. Unlike the real
template, it adds no default system message. The weights are random, so its answers are noise; it exists so that
tokenization, masking, training and generation code paths run quickly.

The build is deterministic: the same files come out every time.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
VOCAB_SIZE = 1000

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DEMO_DATA = Path(__file__).resolve().parents[1] / "examples" / "support" / "train.jsonl"

_SENTENCES = [
    "You are the customer support assistant of Kestrel Cycles.",
    "You are a helpful assistant. Be brief.",
    "Where is the shop?",
    "On Main Street, next to the station.",
    "What are your opening hours?",
    "We are open Monday to Saturday, 9:00 to 18:00, and Sunday 11:00 to 16:00.",
    "Can I return a bike I bought online?",
    "Yes, you can return it within 30 days with the receipt.",
    "How much does it cost to rent an e-bike for a day?",
    "A day of e-bike rental costs 45 euros, helmet and lock included.",
    "Do you repair bikes bought somewhere else?",
    "Yes, our workshop repairs any bike; a basic service takes two working days.",
    "My order has not arrived yet. What should I do?",
    "Please send us your order number and we will check the delivery status.",
    "Is there a deposit for rentals?",
    "We ask for a deposit of 200 euros, refunded when the bike comes back.",
    "Can I change my booking?",
    "You can change or cancel a booking up to 24 hours before pick-up at no cost.",
    "Do you sell gift cards?",
    "Gift cards are available in the shop and online, from 10 to 500 euros.",
    "Thank you for your help!",
    "You're welcome. Have a nice ride!",
    "I'm sorry to hear that. Let me look into it for you.",
    "Could you tell me your name and email address?",
    "Your refund will be processed within five working days.",
    "The warranty covers the frame for five years and parts for two years.",
    "Please bring the bike and the invoice to the workshop.",
    "We accept cash, card and bank transfer.",
    "Children's bikes are available in three sizes.",
    "Free delivery applies to orders over 100 euros.",
]

_SUBJECTS = ["my bike", "the e-bike", "my order", "the helmet", "the rental", "my booking", "the invoice", "the lock"]
_QUESTIONS = [
    "Can you help me with {}?",
    "What is the status of {}?",
    "I have a problem with {}.",
    "How long does it take to fix {}?",
    "Is {} covered by the warranty?",
    "Who do I contact about {}?",
]
_ANSWERS = [
    "Of course, we can help with {}.",
    "We will check {} and reply within one working day.",
    "Please describe the problem with {} in a few words.",
    "Yes, {} is covered for two years.",
    "Our support team handles {} by phone and email.",
]


def corpus() -> list[str]:
    """Training text for the tokenizer: built-in support sentences, chat role names, and the demo training set."""
    lines = list(_SENTENCES)
    for subject in _SUBJECTS:
        lines += [q.format(subject) for q in _QUESTIONS]
        lines += [a.format(subject) for a in _ANSWERS]
    lines += ["system\nuser\nassistant\n"] * 50  # role names of the chat template, as whole tokens
    lines += ["0 1 2 3 4 5 6 7 8 9 10 25 30 45 100 200 500"]
    if _DEMO_DATA.exists():
        for raw in _DEMO_DATA.read_text(encoding="utf-8").splitlines():
            if raw.strip():
                lines += [m["content"] for m in json.loads(raw).get("messages", [])]
    return lines


def build_tokenizer():
    """A fast byte-level BPE tokenizer with SmolLM2's special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(target: Path) -> Path:
    """Write a tokenizer and a randomly initialised 2-layer Llama (fp32, safetensors) into `target`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(target)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    return target


def build_chatty_model(source: Path, target: Path, steps: int = 150) -> Path:
    """The tiny model of `source` after `steps` steps of next-token training on the demo's chat rows (every token,
    template included), written to `target`. The random model's greedy answer is a repeated newline (its tied
    embeddings echo the last prompt token), which decodes to ""; this one answers with shop-like sentences, so tests
    that compare greedy answers compare text. A few seconds on one thread; deterministic."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    rows = [json.loads(line) for line in _DEMO_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:96] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = [ids[i] for i in torch.randperm(len(ids), generator=order)[:16].tolist()]
        width = max(map(len, batch))
        x = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(x)
        for row, seq in enumerate(batch):
            x[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    target = Path(target)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


# Relative tolerance when a quantity computed in one dtype (per-token NLL, a loss) is compared with the same
# quantity computed another way (other batching, other dtype): bf16 keeps 8 significant bits (relative rounding
# 2**-8 ~ 0.4% per operation, a few operations deep in a 2-layer model), fp16 11 bits, fp32 24 bits.
REL_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def rel_tolerance(*dtypes: str) -> float:
    """The tolerance of a comparison between results computed in `dtypes` (the loosest of them)."""
    return max(REL_TOLERANCE[d] for d in dtypes)
