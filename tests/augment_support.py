"""Shared helpers of the augment tests: demo rows, a config for the tiny model, a generator that replays prepared
candidates, and a real OpenAI-compatible chat server that answers with the tiny model."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tasks.augment import Generated, LocalGenerator
from tasks.common.records import load_records
from tasks.config import FewtuneConfig

REPO = Path(__file__).resolve().parent.parent


def demo_rows(n: int | None = None) -> list[dict]:
    return load_records(REPO / "examples/support/train.jsonl").records[:n]


def demo_eval() -> list[dict]:
    return load_records(REPO / "examples/support/test.jsonl").records


def config(model_dir: Path, tmp_path: Path, **augment) -> FewtuneConfig:
    return FewtuneConfig.model_validate({
        "data": {"train": "unused.jsonl"},
        "model": {"base": str(model_dir), "max_length": 160},
        "augment": {"enabled": True, "score_rewrites": False, **augment},
        "run": {"runs_dir": str(tmp_path / "runs")},
    })


class ReplayGenerator:
    """Hands back prepared candidates: for the conversation whose instruction holds `key`, `replies[key]` in turn."""

    description = "replay of prepared candidates"

    def __init__(self, replies: dict[str, list[str]], delay_s: float = 0.0):
        self.replies = replies
        self.delay_s = delay_s
        self.calls: list[int] = []

    def generate(self, conversations, max_new_tokens, *, n, temperature, seed):
        self.calls.append(len(conversations))
        time.sleep(self.delay_s)
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            # The longest matching key: a gold answer's key also matches the rewrite instruction of another row.
            key = max((k for k in self.replies if k in prompt), key=len, default=None)
            texts = self.replies.get(key, [""]) if key else [""]
            out.append([Generated(texts[k % len(texts)], True) for k in range(n if temperature > 0 else 1)])
        return out


GOOD_REWRITES = {
    # gold answer (as it appears in the rewrite instruction) -> the generator's rewrite
    "On Sundays we're open from 11:00 to 16:00": ["Every Sunday we open 11:00 to 16:00, for rentals and sales only, and the workshop is closed."],
    "liability is capped at €250": ["If a rental bike is stolen while it was locked with our lock, you pay at most €250, as long as you hand back the keys."],
    "We're closed on 25 and 26 December": ["We close on 25 and 26 December and on 1 January; other public holidays follow Sunday hours, 11:00 to 16:00."],
    "Email us at help@kestrelcycles.example": ["Write to help@kestrelcycles.example and you will get an answer within 2 working days."],  # invents a figure
}


def stage_rows():
    rows = demo_rows(12)
    assert any("On Sundays we're open" in r["messages"][-1]["content"] for r in rows)
    return rows


class TinyChatServer:
    """A real OpenAI-compatible chat-completions server on 127.0.0.1 that answers with the tiny model."""

    def __init__(self, generator: LocalGenerator, key: str | None):
        server = self
        self.requests: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 - http.server's naming
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                with server.lock:  # one generate at a time on the shared model
                    g = generator.generate([body["messages"]], body["max_tokens"], n=1,
                                           temperature=body.get("temperature", 0.0), seed=body.get("seed", 0))[0][0]
                self._send(200, {"object": "chat.completion", "model": body.get("model"), "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": g.text},
                     "finish_reason": "stop" if g.finished else "length"}]})

        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
