"""Generators: a causal LM run in-process (`LocalGenerator`) or an OpenAI-compatible HTTP endpoint (`HttpGenerator`)."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tasks.common.generation import left_padded
from tasks.common.models import ModelError, encode_prompt, load_base, load_tokenizer, resolve_base_model
from tasks.config import FewtuneConfig, GeneratorConfig

log = logging.getLogger("fewtune.augment")


class GeneratorError(ModelError):
    """The configured generator cannot be reached or refuses requests; the message says what to change."""


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

        tok = self.tokenizer
        encoded = [encode_prompt(tok, c, self.max_prompt_tokens) for c in conversations]
        ids, mask = left_padded(encoded, tok.pad_token_id)
        width = ids.shape[1]
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

    def __init__(self, g: GeneratorConfig):
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


def make_generator(cfg: FewtuneConfig, base_path: str, base_model=None, base_tokenizer=None) -> Generator:
    """The configured generator; kind base reuses an already loaded base model."""
    g = cfg.augment.generator
    if g.kind == "http":
        return HttpGenerator(g)
    if g.kind == "local":
        model, tokenizer = load_base(resolve_base_model(g.model).path, cfg.model.dtype)
        return LocalGenerator(model, tokenizer, cfg.model.max_length, f"local {g.model}", g.threads)
    if base_model is None:
        base_model, loaded = load_base(base_path, cfg.model.dtype)
        base_tokenizer = base_tokenizer if base_tokenizer is not None else loaded
    tokenizer = base_tokenizer if base_tokenizer is not None else load_tokenizer(base_path)
    return LocalGenerator(base_model, tokenizer, cfg.model.max_length, f"base model {cfg.model.base}", g.threads)
