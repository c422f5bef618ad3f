"""The current champion: compared with the challenger on the same test rows, and its history.

The comparison uses the champion's recorded row scores when it was evaluated on the same rows with the same settings,
else the champion's registered model answers the test prompts again. It fails closed: "no champion" only when the
registered model or its `champion` alias does not exist; a registry error, or a champion that can be neither read back
nor loaded, is an error the gate shows (not promoted). The registered model's tag `champion_history` lists every
champion in order, so `fewtune models rollback` can move the alias back.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from tasks.common.cache import hash_text
from tasks.common.generation import generate_answers, settings_from
from tasks.common.measure import Scored, metric_aggregator, paired_delta, score_answers
from tasks.common.records import prompt_and_response, read_jsonl
from tasks.common.registry import CHAMPION, HISTORY_TAG, tracking_uri
from tasks.config import FewtuneConfig

log = logging.getLogger("fewtune.register")


def generation_key(evaluation: dict[str, Any], eval_hash: str | None) -> str:
    """What must match for two evaluations' row scores to be comparable: rows, task, metric and decoding settings."""
    return hash_text(eval_hash, evaluation.get("task"), evaluation["primary_metric"], evaluation.get("generation"), evaluation["n_examples"])


def _row_items(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    return {str(r["id"]): r["scores"]["tuned"][metric] for r in rows if metric in r.get("scores", {}).get("tuned", {})}


class ChampionLookupError(RuntimeError):
    """The registry could not say which version is the champion (not the same as having none)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def current_champion(client, name: str):
    """The champion's model version, or None when the registered model or its `champion` alias genuinely does not
    exist. Any other registry error raises `ChampionLookupError` (the gate must not read it as "no champion")."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise ChampionLookupError(_one_line(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a store that cannot be reached, a broken database...
        raise ChampionLookupError(_one_line(exc)) from exc
    if CHAMPION not in (model.aliases or {}):
        return None
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception as exc:  # noqa: BLE001 - the alias exists, so any failure here is a registry error
        raise ChampionLookupError(_one_line(exc)) from exc


def _recorded_scores(version, key: str, primary: str, wanted: set[str]) -> dict[str, Any]:
    """The champion's recorded row scores when made on the same rows with the same settings and covering every row."""
    import mlflow

    if version.tags.get("generation_key") != key:
        return {}
    try:
        local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="predictions.jsonl")
        theirs = _row_items(read_jsonl(local), primary)
    except Exception as exc:  # noqa: BLE001 - fall back to answering the rows again
        log.info("champion version %s: recorded predictions unreadable (%s): answering the test prompts again", version.version, _one_line(exc))
        return {}
    return theirs if wanted <= set(theirs) else {}


def compare_with_champion(
    client,
    cfg: FewtuneConfig,
    evaluation: dict[str, Any],
    eval_records: list[dict[str, Any]],
    key: str,
) -> dict[str, Any] | None:
    """The challenger minus the current champion on the same test rows, with a paired bootstrap interval.

    None only when there is no champion (the registered model or its `champion` alias does not exist). Uses the
    champion's recorded row scores when they were made on the same rows with the same settings (`key`), else loads
    the champion's registered model and answers the test prompts again. Fails closed: any other failure (a registry
    error, a champion that can be neither read back nor loaded) returns {"error": one line naming the registry, the
    version and the fix}, which the gate turns into a criterion with status `error` (not promoted).
    """
    import mlflow.pyfunc

    name, uri = cfg.register_.model_name, tracking_uri(cfg)
    try:
        version = current_champion(client, name)
    except ChampionLookupError as exc:
        return {"error": f"could not read the champion of {name} at {uri}: {exc}; fix the registry (or "
                         "register.tracking_uri) and re-run, the challenger stays registered meanwhile"}
    if version is None:
        return None
    primary = evaluation["primary_metric"]
    mine = _row_items(read_jsonl(evaluation["predictions_path"]), primary)
    labels = (evaluation.get("labels") or sorted({str(r["label"]) for r in eval_records})
              if evaluation.get("task") == "classification" else None)
    theirs = _recorded_scores(version, key, primary, set(mine))
    how = "recorded row scores"
    if not theirs:
        records = [r for r in eval_records if str(r["id"]) in mine]
        where = f"champion version {version.version} of {name} at {uri}"
        if not records:
            return {"version": str(version.version), "error": f"{where}: no recorded row scores on these test rows and no "
                    "test rows to answer again; re-run the evaluation, or move the alias with `fewtune models promote "
                    "VERSION`"}
        log.info("champion version %s was evaluated on other rows or settings: answering the test prompts again", version.version)
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").unwrap_python_model()
            asked = [prompt_and_response(r)[0] for r in records]
            if labels:  # labelled data: the label of highest likelihood, as the evaluation does
                from tasks.common.label_scoring import score_labels

                answers = score_labels(model.model, model.tokenizer, asked, labels, max_length=cfg.model.max_length,
                                       batch_size=cfg.evaluate.label_batch_size, desc="evaluate: champion labels").predictions()
            else:
                answers = generate_answers(model.model, model.tokenizer, asked, settings_from(cfg),
                                           "evaluate: champion answers")
        except Exception as exc:  # noqa: BLE001 - missing artifacts, a base model moved away, out of memory...
            return {"version": str(version.version), "error": f"could not re-evaluate {where}: {_one_line(exc)}; restore "
                    "its artifacts and base model, or move the alias with `fewtune models promote VERSION` / "
                    "`fewtune models rollback`"}
        gold = [str(r["label"]) if labels else prompt_and_response(r)[1] for r in records]
        scored = score_answers(evaluation.get("task", "generation"), answers, gold, labels)[primary]
        theirs = {str(r["id"]): item for r, item in zip(records, scored.items)}
        how = "champion re-evaluated on these rows"
        del model
    ids = [i for i in mine if i in theirs]
    if not ids:
        return {"version": str(version.version), "error": f"champion version {version.version} of {name} at {uri} shares "
                "no test row with this run; re-run the evaluation"}
    aggregate = metric_aggregator(evaluation.get("task", "generation"), primary, labels)
    champ = Scored(aggregate([theirs[i] for i in ids]), [theirs[i] for i in ids], aggregate)
    chall = Scored(aggregate([mine[i] for i in ids]), [mine[i] for i in ids], aggregate)
    d = paired_delta(champ, chall, cfg)
    return {
        "version": str(version.version),
        "how": how,
        "n": len(ids),
        "champion": round(champ.value, 4),
        "challenger": round(chall.value, 4),
        "delta": round(d.value, 4),
        "low": round(d.low, 4),
        "high": round(d.high, 4),
    }


def champion_history(client, name: str) -> list[dict[str, str]]:
    model = client.get_registered_model(name)
    raw = (model.tags or {}).get(HISTORY_TAG)
    try:
        return list(json.loads(raw)) if raw else []
    except json.JSONDecodeError:
        return []


def set_champion(client, name: str, version: str, how: str) -> None:
    """Move the `champion` alias to `version` and append it to the champion history."""
    history = champion_history(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if not history or history[-1]["version"] != str(version):
        history.append({"version": str(version), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "how": how})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
