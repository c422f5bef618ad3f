"""Section `augment`: self-distillation, paraphrases, the generator and the equivalence filter."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import _Section


class GeneratorConfig(_Section):
    kind: Literal["base", "local", "http"] = Field(
        "base",
        description="Which model writes rewrites and paraphrases: base (the base model itself: self-distillation "
        "proper), local (`model`: any causal LM folder, .gguf file or hub id, run in-process) or http (an "
        "OpenAI-compatible chat-completions endpoint at `url`, e.g. a larger model behind vLLM or llama.cpp).",
    )
    model: str | None = Field(
        None,
        description="kind local: the model (a folder, a .gguf file, a hub id or `smollm2-135m-instruct`); kind http: "
        "the `model` name sent to the endpoint.",
    )
    url: str | None = Field(
        None,
        description="kind http: base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
        "(`/chat/completions` is appended).",
    )
    api_key_env: str = Field(
        "FEWTUNE_AUGMENT_API_KEY",
        description="kind http: environment variable holding the API key (sent as `Authorization: Bearer`; never "
        "put keys in config files). Unset: no key is sent (local servers often need none).",
    )
    timeout_s: float = Field(120.0, gt=0, description="kind http: seconds to wait for one completion.")
    max_retries: int = Field(
        2, ge=0, description="kind http: retries of a request that failed with a connection error, 429 or 5xx."
    )
    retry_delay_s: float = Field(2.0, ge=0, description="kind http: wait before the first retry (doubled for each next one).")
    concurrency: int = Field(4, ge=1, description="kind http: requests in flight at once.")
    batch_size: int = Field(
        16,
        ge=1,
        description="Conversations per generation batch (local models: one left-padded `generate` call; http: "
        "requests per round). Budgets are checked between batches.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="kind base/local: CPU threads while generating (None: torch's setting, one per core). Decoding "
        "is a long series of small matrix products whose threads wait on each other; on a CPU shared with other "
        "work, 1 thread generated 4-6x faster than 2 on a 2-core machine (docs/benchmarks.md).",
    )

    @model_validator(mode="after")
    def _needs(self) -> "GeneratorConfig":
        if self.kind == "local" and not self.model:
            raise ValueError("generator kind local needs `model`: a model folder, a .gguf file or a hub id")
        if self.kind == "http" and not self.url:
            raise ValueError("generator kind http needs `url`, e.g. http://127.0.0.1:8000/v1")
        return self


class ParaphraseConfig(_Section):
    n: int | Literal["auto"] = Field(
        "auto",
        description="Paraphrases generated per training prompt (its last user message); 0: off. auto, by training "
        "rows: under `auto_small_rows` 3, under `auto_off_from` 1, from there 0 (large sets already vary their "
        "phrasing, and generation time grows with rows). See docs/augmentation.md.",
    )
    auto_small_rows: int = Field(100, ge=1, description="n auto: below this many training rows, `auto_small_n` paraphrases per prompt.")
    auto_small_n: int = Field(3, ge=0, description="n auto: paraphrases per prompt for small sets (under auto_small_rows).")
    auto_n: int = Field(1, ge=0, description="n auto: paraphrases per prompt from auto_small_rows to auto_off_from rows.")
    auto_off_from: int = Field(1000, ge=1, description="n auto: from this many training rows, no paraphrases.")
    max_rows: int | None = Field(
        None,
        ge=0,
        description="At most this many training rows get paraphrased (spread over distinct answers first); None: all.",
    )
    min_similarity: float = Field(
        0.75,
        ge=-1,
        le=1,
        description="A paraphrase is kept only when its all-MiniLM-L6-v2 cosine similarity to the original prompt is "
        "at least this (it still asks the same thing).",
    )
    max_similarity: float = Field(
        0.97,
        ge=-1,
        le=1,
        description="... and below this (it is not a near-identical copy; character n-gram copies are also caught by "
        "validate.near_dup_threshold).",
    )
    temperature: float = Field(
        0.8, ge=0, description="Sampling temperature of paraphrases (0: greedy, which gives one variant at most)."
    )
    max_length_ratio: float = Field(
        2.5, gt=0, description="Longest accepted paraphrase, in tokens, as a multiple of the original prompt's."
    )
    prompt: str = Field(
        "Rewrite the following question so that it asks exactly the same thing in different words. Keep every "
        "name, number, date and time. Reply with the rewritten question only.\n\nQuestion: {question}",
        description="Instruction sent to the generator; `{question}` is the training prompt.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ParaphraseConfig":
        if self.min_similarity >= self.max_similarity:
            raise ValueError(f"min_similarity ({self.min_similarity}) must be below max_similarity ({self.max_similarity})")
        if "{question}" not in self.prompt:
            raise ValueError("prompt must contain {question} (where the training prompt goes)")
        return self


class AugmentConfig(_Section):
    enabled: bool = Field(
        False,
        description="Self-distillation and paraphrase of training rows (off: pass-through, and the log says so). "
        "Generation takes minutes on a CPU, so it is switched on explicitly; `self_distill` and `paraphrase.n` then "
        "choose by dataset size. Rows sent by score.outlier_action=augment are rewritten either way.",
    )
    self_distill: Literal["auto", "on", "off", "replace", "add"] = Field(
        "auto",
        description="Self-distillation: the generator rewrites each gold answer in its own words; an equivalent "
        "rewrite replaces the gold row (replace) or joins it as a new row (add); otherwise the gold row stays. auto, "
        "by training rows: off when every row has a label (the answers are labels), add under "
        "`self_distill_add_below` rows, replace under `self_distill_off_from`, off from there. on: add or replace "
        "as auto chooses, never off. See docs/augmentation.md.",
    )
    self_distill_add_below: int = Field(
        1000, ge=1, description="self_distill auto: add rewrites as new rows below this many training rows (else replace)."
    )
    self_distill_off_from: int = Field(
        20_000, ge=1, description="self_distill auto: no self-distillation from this many training rows (generation time)."
    )
    self_distill_max_rows: int | None = Field(
        None,
        ge=0,
        description="At most this many training rows get a rewrite attempt (score outliers first, then spread over "
        "distinct answers); None: all.",
    )
    self_distill_temperature: float = Field(0.0, ge=0, description="Sampling temperature of rewrites (0: greedy).")
    self_distill_max_length_ratio: float = Field(
        1.5,
        gt=0,
        description="Longest accepted rewrite, in tokens, as a multiple of the gold answer's (a rewrite that rambles "
        "on has usually stopped rewriting); generation stops there, which also bounds its time.",
    )
    length_slack_tokens: int = Field(
        8,
        ge=0,
        description="Tokens allowed beyond the length ratios (self_distill_max_length_ratio, paraphrase.max_length_ratio) (short answers and labels need room to be rephrased); "
        "generation stops there, and a rewrite cut off by it is rejected.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest generation for any row, in new tokens.")
    self_distill_prompt: str = Field(
        "Here is a question and a reference answer.\n\nQuestion: {question}\n\nReference answer: {answer}\n\n"
        "Rewrite the reference answer in your own words. Keep every fact, number, name, date and time exactly as "
        "given, and add nothing new. Reply with the rewritten answer only.",
        description="Instruction sent to the generator for a rewrite; `{question}` is the last user message, "
        "`{answer}` the gold answer. The row's system message (if any) is kept.",
    )
    short_answer_words: int = Field(
        40,
        ge=1,
        description="Equivalence: a gold answer of at most this many words that holds key facts (numbers, prices, "
        "times, dates, names) is a short factual answer: its rewrite must keep every key fact and add no figure the "
        "gold answer and prompt lack.",
    )
    similarity_threshold: float = Field(
        0.85,
        ge=-1,
        le=1,
        description="Equivalence for text answers (all but labelled rows): the rewrite's all-MiniLM-L6-v2 cosine "
        "similarity to the gold answer must be at least this. Labelled rows instead keep their label.",
    )
    reject_phrases: list[str] = Field(
        ["reference answer", "rewritten", "rephrased", "paraphrase", "rewrite", "the question", "your question",
         "original question", "as an ai", "i'm sorry"],
        description="A rewrite or paraphrase that contains one of these (ignoring case) while its original does not "
        "is rejected: it talks about the instruction instead of carrying it out, as small models often do.",
    )
    paraphrase: ParaphraseConfig = Field(ParaphraseConfig(), description="Paraphrases of training prompts.")
    generator: GeneratorConfig = Field(GeneratorConfig(), description="The model that writes rewrites and paraphrases.")
    max_new_rows: int = Field(
        5000,
        ge=0,
        description="Budget: augmented rows in the output (replacing rewrites included); generation stops once this "
        "many have passed every filter.",
    )
    max_seconds: float = Field(
        1800.0,
        gt=0,
        description="Budget: generation time of the stage; no batch is started that would end past it (judged from "
        "the batches before); what passed is kept, and the report says where it stopped.",
    )
    score_rewrites: bool = Field(
        True,
        description="Report the base model's perplexity of kept rewrites against their gold rows (one forward pass "
        "over them).",
    )
    seed: int = Field(0, description="Seed of sampled generation.")
    examples_in_report: int = Field(3, ge=0, description="Kept and rejected examples per technique in the report.")

    @field_validator("self_distill", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans

    @model_validator(mode="after")
    def _prompt_fields(self) -> "AugmentConfig":
        if "{answer}" not in self.self_distill_prompt:
            raise ValueError("self_distill_prompt must contain {answer} (where the gold answer goes; {question} is optional)")
        return self
