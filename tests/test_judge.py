"""The optional LLM judge against a real OpenAI-compatible endpoint: a chat-completions server started in the test.

The server is a deterministic judge: it reads the reference and the candidate from the user message (the layout of
`JUDGE_USER`) and answers "1" when the candidate holds every number of the reference, else "0". It records what it
received, and can be told to fail the next requests (HTTP 503, 401) or to answer slowly or without a verdict.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.common.judge import JUDGE_SYSTEM, JudgeError, judge_scores, parse_verdict
from tasks.common.measure import paired_delta
from tasks.config import FewtuneConfig


class _Judge(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        state = self.server.state  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state["requests"].append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if state["fail"]:
            code = state["fail"].pop(0)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b'{"error": "scripted failure"}')
            return
        time.sleep(state["delay"])
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        reference = user.split("Reference answer:\n", 1)[1].split("\n\nCandidate answer:", 1)[0]
        answer = user.split("Candidate answer:\n", 1)[1].split("\n\nVerdict", 1)[0]
        numbers = re.findall(r"\d+", reference)
        verdict = "1" if all(n in re.findall(r"\d+", answer) for n in numbers) else "0"
        reply = state["reply"].format(verdict=verdict)
        payload = {"object": "chat.completion", "model": body.get("model", "judge"),
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}
        data = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (the timeout test)
            pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    httpd.daemon_threads = True
    httpd.state = {"requests": [], "fail": [], "delay": 0.0, "reply": "{verdict}"}  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _cfg(url: str | None, **judge) -> FewtuneConfig:
    settings = {"enabled": url is not None, "base_url": url, "model": "judge-7b", "retry_delay_s": 0.0, **judge}
    return FewtuneConfig(data={"train": "-"}, evaluate={"bootstrap_samples": 200, "judge": settings})


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


PROMPTS = ["When do you open on Sundays?", "What does a city bike cost per day?", "Is there parking?"]
REFS = ["On Sundays we're open from 11:00 to 16:00.", "A city bike costs €18 per day.", "We have 6 free spaces."]
RIGHT = ["Sundays 11:00 to 16:00.", "It's €18 a day.", "Yes, 6 spaces."]
WRONG = ["We're closed on Sundays.", "It's €20 a day.", "Yes, 6 spaces."]


def test_off_by_default_returns_none() -> None:
    cfg = FewtuneConfig(data={"train": "-"})
    assert cfg.evaluate.judge.enabled is False
    assert judge_scores(PROMPTS, WRONG, REFS, cfg) is None


def test_enabled_needs_a_url() -> None:
    with pytest.raises(ValueError, match="evaluate.judge.enabled needs evaluate.judge.base_url"):
        FewtuneConfig(data={"train": "-"}, evaluate={"judge": {"enabled": True}})


def test_verdicts_per_row_and_what_the_endpoint_receives(server, monkeypatch) -> None:
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-test")
    cfg = _cfg(_url(server), api_key_env="JUDGE_KEY_FOR_TEST")
    scored = judge_scores(PROMPTS, WRONG, REFS, cfg)
    assert scored is not None and scored.items == [0.0, 0.0, 1.0]
    assert scored.value == pytest.approx(1 / 3) and scored.on([2, 2]) == 1.0
    first = server.state["requests"][0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    body = first["body"]
    assert body["model"] == "judge-7b" and body["temperature"] == 0 and body["max_tokens"] == 16
    assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert "When do you open on Sundays?" in body["messages"][1]["content"]

    right = judge_scores(PROMPTS, RIGHT, REFS, cfg)
    delta = paired_delta(scored, right, cfg)
    assert right.items == [1.0, 1.0, 1.0] and delta.value == pytest.approx(2 / 3)


def test_no_key_sent_when_the_variable_is_unset(server, monkeypatch) -> None:
    monkeypatch.delenv("FEWTUNE_JUDGE_API_KEY", raising=False)
    judge_scores(PROMPTS[:1], RIGHT[:1], REFS[:1], _cfg(_url(server)))
    assert server.state["requests"][0]["auth"] is None


def test_max_rows_leaves_the_rest_out(server) -> None:
    scored = judge_scores(PROMPTS, WRONG, REFS, _cfg(_url(server), max_rows=2))
    assert scored.items == [0.0, 0.0, None] and scored.value == 0.0
    assert len(server.state["requests"]) == 2


def test_transient_errors_are_retried(server) -> None:
    server.state["fail"] = [503, 429]
    scored = judge_scores(PROMPTS[:1], RIGHT[:1], REFS[:1], _cfg(_url(server), max_retries=2))
    assert scored.items == [1.0] and len(server.state["requests"]) == 3


def test_a_reply_without_verdict_is_left_out(server) -> None:
    server.state["reply"] = "I cannot say."
    scored = judge_scores(PROMPTS[:2], RIGHT[:2], REFS[:2], _cfg(_url(server)))
    assert scored.items == [None, None] and math.isnan(scored.value)
    server.state["reply"] = "<think>0 or 1? the times match</think>\nVerdict: {verdict}"
    assert judge_scores(PROMPTS[:2], WRONG[:2], REFS[:2], _cfg(_url(server))).items == [0.0, 0.0]


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("1", 1.0), ("0", 0.0), (" 1.\n", 1.0), ("**0**", 0.0), ("Verdict: 1", 1.0), ("<think>1</think>0", 0.0),
     ("10", None), ("1.5", None), ("yes", None), ("", None)],
)
def test_parse_verdict(reply: str, verdict: float | None) -> None:
    assert parse_verdict(reply) == verdict


def test_authentication_failure_names_the_endpoint_and_the_fix(server) -> None:
    server.state["fail"] = [401]
    with pytest.raises(JudgeError) as caught:
        judge_scores(PROMPTS, RIGHT, REFS, _cfg(_url(server), api_key_env="MY_JUDGE_KEY"))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{_url(server)}/chat/completions answered HTTP 401" in message
    assert "environment variable MY_JUDGE_KEY" in message


def test_wrong_base_url_names_the_fix(server) -> None:
    with pytest.raises(JudgeError, match=r"answered HTTP 404.*must be the API's base URL ending in /v1"):
        judge_scores(PROMPTS, RIGHT, REFS, _cfg(f"http://127.0.0.1:{server.server_address[1]}"))


def test_unreachable_and_slow_endpoints_fail_with_one_line(server) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError) as caught:
        judge_scores(PROMPTS, RIGHT, REFS, _cfg(f"http://127.0.0.1:{port}/v1", max_retries=1))
    message = str(caught.value)
    assert "\n" not in message and f"http://127.0.0.1:{port}/v1/chat/completions cannot be reached" in message
    assert "after 2 tries" in message and "evaluate.judge.base_url" in message

    server.state["delay"] = 1.0
    with pytest.raises(JudgeError, match="cannot be reached .* raise evaluate.judge.timeout_s"):
        judge_scores(PROMPTS[:1], RIGHT[:1], REFS[:1], _cfg(_url(server), timeout_s=0.2, max_retries=0))
