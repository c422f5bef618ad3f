"""The cache key of each stage: what its result depends on, in one place.

Every key hashes the content of the stage's input rows, the config sections it reads, the base model's fingerprint
and the stage's code (`flows.keys.stage_code_hash`: the stage package and its whole import closure). A key that is
unchanged means the stage's earlier result is still right, so it is reused.
"""

from __future__ import annotations

from flows.keys import stage_code_hash
from flows.results import AugmentOutput, ScoreOutput, ValidateOutput
from tasks.common.cache import hash_text, source_fingerprint
from tasks.common.models import ResolvedModel, resolve_base_model
from tasks.config import FewtuneConfig


def data_fingerprints(cfg: FewtuneConfig) -> list[str | None]:
    """Content hashes of the train, eval and probe files as given (before validation). The probe that ships with
    fewtune (`tasks/common/general/`) is data of `tasks.common`, so it is part of every stage's code hash."""
    return [source_fingerprint(s) for s in (cfg.data.train, cfg.data.eval, cfg.data.probe)]


def validate_key(cfg: FewtuneConfig, base: ResolvedModel, data: list[str | None]) -> str:
    """The input files, the data and validate sections, the base model (token checks) and the prompt length."""
    return hash_text(data, cfg.section_hash("data", "validate"), base.fingerprint, cfg.model.max_length,
                     stage_code_hash("validate"))


def score_key(cfg: FewtuneConfig, validated: ValidateOutput, base: ResolvedModel) -> str:
    """The validated training rows, the base model, the model and score sections."""
    return hash_text(validated.train_hash, base.fingerprint, cfg.section_hash("model", "score"),
                     stage_code_hash("score"))


def augment_key(cfg: FewtuneConfig, train_hash: str, eval_hash: str, base: ResolvedModel, outlier_key: str | None) -> str:
    """Cache key of the augment stage: training and eval rows (leakage re-check), base model, the augment section
    (generator settings included), model and validate sections (prompt length, duplicate and leakage rules), a local
    generator's weights, the score outliers sent to augment, and the code."""
    generator, gen_key = cfg.augment.generator, None
    used = cfg.augment.enabled or cfg.score.outlier_action == "augment"
    if used and generator.kind == "local" and generator.model:  # a local generator's weights
        gen_key = resolve_base_model(generator.model).fingerprint
    return hash_text(train_hash, eval_hash, base.fingerprint,
                     cfg.section_hash("augment", "model", "validate"), gen_key, outlier_key, stage_code_hash("augment"))


def outlier_key(cfg: FewtuneConfig, score_key: str) -> str | None:
    """What augment's input depends on beyond the validated rows: the score result, when outliers are dropped or
    sent to augment."""
    return score_key if cfg.score.outlier_action != "keep" else None


def train_key(cfg: FewtuneConfig, augmented: AugmentOutput, scored: ScoreOutput, base: ResolvedModel,
              data: list[str | None], init_fingerprint: str | None) -> str:
    """The rows training receives, the base model, the model and train sections, the data.probe rows (replay that
    nearly repeats them stops training) and the data.replay rows (without them, on-policy replay from the shipped
    prompts, which the code hash covers), the adapter training starts from (incremental mode) and the STM token
    masks. The near-duplicate settings of the replay/probe overlap check (validate.shingle_size and
    validate.minhash_permutations) are part of it: they decide which replay prompts are used."""
    replay = [data[2], source_fingerprint(cfg.data.replay), init_fingerprint, cfg.validate_.shingle_size,
              cfg.validate_.minhash_permutations]
    return hash_text(augmented.train_hash, base.fingerprint, cfg.section_hash("model", "train"), replay,
                     scored.token_masks_hash, stage_code_hash("train"))


def cv_key(cfg: FewtuneConfig, train_key: str) -> str:
    """Everything training depends on, plus the cv, evaluate and score sections."""
    return hash_text(train_key, cfg.section_hash("cv", "evaluate", "score"), stage_code_hash("cv"))


def evaluate_key(cfg: FewtuneConfig, train_key: str, validated: ValidateOutput, data: list[str | None]) -> str:
    """The trained adapter (its train key, which covers the validation slice), the eval rows, the data.probe rows
    (added to the shipped probe), the model, evaluate and score sections."""
    return hash_text(train_key, validated.eval_hash, data[2], cfg.section_hash("model", "evaluate", "score"),
                     stage_code_hash("evaluate"))
