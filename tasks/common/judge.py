"""An optional LLM judge: is each answer correct, given the reference answer? (`evaluate.judge`, off by default.)

The judge is any OpenAI-compatible chat-completions endpoint (`POST {base_url}/chat/completions`: vLLM, llama.cpp's
server, Ollama, a hosted API), asked once per test row with `JUDGE_SYSTEM` and `JUDGE_USER` below, at temperature 0.
Its reply is read as a verdict: the first standalone 1 (correct) or 0 (wrong), after any `<think>...</think>` block.
A reply without one is left out of the score (and counted in the log). The verdicts are the per-row items of a
`Scored`, so the judge score gets a paired bootstrap interval like every metric.

A judge is a model too: it can be wrong, lenient or swayed by style. The key-fact metric (`fact_accuracy`) is exact
and free; the judge is for answers whose correctness is not a matter of stated facts.
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
from typing import Any

from tqdm.auto import tqdm

from tasks.common.measure import Scored
from tasks.common.models import ModelError
from tasks.config import FewtuneConfig
from tasks.config.evaluate import JudgeConfig

log = logging.getLogger("fewtune.evaluate")

JUDGE_SYSTEM = (
    "You grade answers. You get a question, a reference answer that is correct, and a candidate answer. The candidate "
    "is correct when it gives the same facts as the reference (numbers, times, prices, dates, names, contact details) "
    "and states nothing that contradicts it; wording, length and style do not matter. A candidate that leaves out a "
    "fact the question asks for, or gives a different one, is wrong. Reply with the single digit 1 if the candidate "
    "is correct and 0 if it is wrong, nothing else."
)
JUDGE_USER = "Question:\n{question}\n\nReference answer:\n{reference}\n\nCandidate answer:\n{answer}\n\nVerdict (1 or 0):"

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_VERDICT = re.compile(r"(?<![\w.])([01])(?!\w|\.\d)")


class JudgeError(ModelError):
    """The judge endpoint could not be used; the message names it and the fix."""


def parse_verdict(reply: str) -> float | None:
    """1.0 or 0.0 from the judge's reply (the first standalone 1 or 0 after any <think> block), None if it has none."""
    found = _VERDICT.search(_THINK.sub(" ", reply))
    return float(found.group(1)) if found else None


def judge_aggregate(items: list[Any]) -> float:
    """The judge score of a set of rows: the share judged correct among the rows with a verdict (NaN if none)."""
    judged = [float(x) for x in items if x is not None and not math.isnan(x)]
    return sum(judged) / len(judged) if judged else float("nan")


class _Endpoint:
    def __init__(self, j: JudgeConfig):
        self.j = j
        self.endpoint = str(j.base_url).rstrip("/") + "/chat/completions"
        self.key = os.environ.get(j.api_key_env)
        if not self.key:
            log.info("judge: %s is not set: requests to %s carry no API key", j.api_key_env, self.endpoint)

    def _fail(self, what: str, fix: str) -> JudgeError:
        return JudgeError(f"evaluate.judge: {self.endpoint} {what}; fix: {fix} (or set evaluate.judge.enabled=false)")

    def ask(self, messages: list[dict[str, str]]) -> str:
        body: dict[str, Any] = {"messages": messages, "temperature": 0, "max_tokens": self.j.max_tokens, "n": 1}
        if self.j.model:
            body["model"] = self.j.model
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode()
        delay = self.j.retry_delay_s
        for attempt in range(self.j.max_retries + 1):
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.j.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as exc:
                detail = " ".join(exc.read().decode("utf-8", "replace").split())[:200]
                if (exc.code == 429 or exc.code >= 500) and attempt < self.j.max_retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise self._fail(f"answered HTTP {exc.code}: {detail}", self._http_fix(exc.code)) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt < self.j.max_retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                reason = getattr(exc, "reason", exc)
                raise self._fail(
                    f"cannot be reached ({reason}) after {self.j.max_retries + 1} tries",
                    "start the server or correct evaluate.judge.base_url (the API's base URL, e.g. "
                    "http://127.0.0.1:8000/v1), or raise evaluate.judge.timeout_s",
                ) from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise self._fail("answered with something that is not JSON", "point evaluate.judge.base_url at an "
                                 "OpenAI-compatible /v1 API") from None
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise self._fail(
                f"answered {str(payload)[:120]!r}, not a chat completion (expected choices[0].message.content)",
                "point evaluate.judge.base_url at an OpenAI-compatible /v1 API",
            ) from None

    def _http_fix(self, code: int) -> str:
        if code in (401, 403):
            return f"put a valid API key in the environment variable {self.j.api_key_env} (evaluate.judge.api_key_env)"
        if code == 404:
            return "evaluate.judge.base_url must be the API's base URL ending in /v1 (`/chat/completions` is appended)"
        if code in (400, 422):
            return "check evaluate.judge.model (a model name the server serves)"
        return "check the server's log; retry later"


def judge_messages(prompt: str, answer: str, reference: str) -> list[dict[str, str]]:
    """The chat sent to the judge for one row."""
    user = JUDGE_USER.format(question=prompt.strip(), reference=reference.strip(), answer=answer.strip())
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judge_scores(prompts: list[str], answers: list[str], references: list[str], cfg: FewtuneConfig) -> Scored | None:
    """The judge's 0/1 verdict on each answer given its prompt and reference, as a `Scored` (None when
    `evaluate.judge.enabled` is false). Rows past `evaluate.judge.max_rows` and replies without a verdict are None
    (left out of the score). Raises `JudgeError`, naming the endpoint and the fix, when the endpoint fails."""
    j = cfg.evaluate.judge
    if not j.enabled:
        return None
    if not len(prompts) == len(answers) == len(references):
        raise ValueError(f"judge_scores: {len(prompts)} prompts, {len(answers)} answers, {len(references)} references")
    endpoint = _Endpoint(j)
    n = len(answers) if j.max_rows is None else min(j.max_rows, len(answers))
    items: list[float | None] = [None] * len(answers)
    unreadable: list[str] = []
    for i in tqdm(range(n), desc="evaluate: judge", unit="row", leave=False):
        reply = endpoint.ask(judge_messages(prompts[i], answers[i], references[i]))
        items[i] = parse_verdict(reply)
        if items[i] is None:
            unreadable.append(reply)
    if unreadable:
        log.warning(
            "judge: %d of %d replies held no verdict (1 or 0) and are left out, e.g. %r; raise evaluate.judge.max_tokens "
            "if the judge thinks aloud first", len(unreadable), n, unreadable[0][:80],
        )
    return Scored(judge_aggregate(items), items, judge_aggregate)
