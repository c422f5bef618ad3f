"""Registered versions from the registry's point of view: created whole, finished after a crash, never duplicated.

A version is created with every tag of its decision at once (`create`), so the registry never holds a fewtune
version without its `decision_key`. Its tag `registration` says how far the run got: `pending` (created; the aliases
its decision calls for may not be set yet) or `complete` (they were). A re-run on the same inputs that finds a pending
version finishes it (`finish`): `challenger` on it (unless a newer version took it meanwhile), `champion` when its
gate promoted it and the champion is still the one it was decided against. A gate that did not promote never moves
`champion`.

Two runs at once on the same inputs: against a local SQLite registry, one lock file per database and registered
model (`registration_lock`) serializes them, so the second finds and reuses the first's version. Against a tracking
server, each run creates its version, then looks for versions with the same `decision_key` and `champion_before`
created since it looked (`settle`): the lowest version number wins; the other run deletes its own version before
touching any alias and returns the winner.

Earlier fewtune releases created the version first and then wrote its tags one at a time (`base_model`, then the
`gate.<criterion>` tags last) before moving the aliases. A version of a fewtune run (its run carries `fewtune.gate`)
without that whole set of tags was left by such a run interrupted before its gate decision was recorded: it is tagged
`registration: incomplete` (`mark_unfinished`), `fewtune models list` shows it as unfinished, and neither the gate nor
`fewtune models promote` ever gives it an alias. Whole versions of earlier releases are used as they are.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.common.registry import CHALLENGER, CHAMPION, RegistryError
from tasks.register.champion import ChampionLookupError, current_champion, set_champion

log = logging.getLogger("fewtune.register")

NO_CHAMPION = "none"  # the `champion_before` tag of a version decided when there was no champion
REGISTRATION = "registration"  # version tag: how far the run that created the version got
PENDING, COMPLETE, INCOMPLETE = "pending", "complete", "incomplete"
UNFINISHED_NOTE = ("registration was interrupted before its gate decision was recorded: not usable; run fewtune again "
                   "on the same inputs to register them")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for any other store (a server, an in-memory database)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


@contextmanager
def registration_lock(uri: str, name: str) -> Iterator[None]:
    """Hold the lock file `<database>.register-<name>.lock` for a SQLite registry (nothing for a server): one
    registration of `name` at a time on this machine. The operating system releases it when the process dies."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock, Timeout

    db.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(db.parent / f"{db.name}.register-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another fewtune run is registering %s at %s: waiting for it to finish", name, uri)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _tags(version) -> dict[str, str]:
    return dict(version.tags or {})


def all_versions(client, name: str) -> list[Any]:
    """Every version of `name` (with tags; no aliases), oldest first; [] when the registered model does not exist."""
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _started_by_fewtune(client, version) -> bool:
    """Whether the version's model was logged by a fewtune run (its run carries the gate's run tags)."""
    try:
        return "fewtune.gate" in (client.get_run(version.run_id).data.tags or {})
    except Exception:  # noqa: BLE001 - no run, or a deleted one: not ours to judge
        return False


def _whole_earlier_version(tags: dict[str, str]) -> bool:
    """Whether a version registered by an earlier release (no `registration` tag) has every tag its run wrote: the
    first releases wrote the lineage, `gate`, `promoted` and `base_model` last; later ones `gate_json` early and the
    `gate.<criterion>` tags of every criterion it names last."""
    if "base_model" not in tags:
        return False
    if "gate_json" not in tags:
        return "promoted" in tags
    try:
        names = [c["name"] for c in json.loads(tags["gate_json"])["criteria"]]
    except (ValueError, KeyError, TypeError):  # cut at an older server's tag limit: the last-written tags still tell
        names = []
    written = {k[len("gate."):] for k in tags if k.startswith("gate.")}
    return "primary_value" in tags and (set(names) <= written if names else bool(written))


def unfinished(client, version) -> bool:
    """A version a fewtune run created but never gave its gate decision (an interrupted earlier fewtune)."""
    tags = _tags(version)
    if REGISTRATION in tags:
        return tags[REGISTRATION] == INCOMPLETE
    return not _whole_earlier_version(tags) and _started_by_fewtune(client, version)


def mark_unfinished(client, name: str, versions: list[Any]) -> list[str]:
    """Tag every unfinished version `registration: incomplete` (with a note); returns their numbers."""
    marked = []
    for v in versions:
        if REGISTRATION not in _tags(v) and unfinished(client, v):
            client.set_model_version_tag(name, v.version, REGISTRATION, INCOMPLETE)
            client.set_model_version_tag(name, v.version, "registration_note", UNFINISHED_NOTE)
            marked.append(str(v.version))
    if marked:
        log.warning("%s: versions %s were left without a gate decision by an interrupted run: marked incomplete, "
                    "never aliased", name, ", ".join(marked))
    return marked


def _group(version) -> tuple[str | None, str]:
    tags = _tags(version)
    return tags.get("decision_key"), tags.get("champion_before", NO_CHAMPION)


def reusable(client, name: str, key: str):
    """The version decided on exactly these inputs (`decision_key`) while the champion was the one there is now
    (or is that version itself); among copies of one decision, the lowest number. None when there is none, or when
    the registry cannot tell (the run then decides again, failing closed)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.decision_key = '{key}'")
        now = current_champion(client, name)
    except (MlflowException, ChampionLookupError):
        return None
    now_version = str(now.version) if now is not None else NO_CHAMPION
    usable = [v for v in found if _tags(v).get("gate.champion") != "error"  # not compared then: decide again
              and now_version in (_tags(v).get("champion_before", NO_CHAMPION), str(v.version))]
    if not usable:
        return None
    newest = max(usable, key=lambda v: int(v.version))
    first = min((v for v in usable if _group(v) == _group(newest)), key=lambda v: int(v.version))
    for v in usable:  # copies left by a run killed before it deleted its own: never aliased, safe to remove
        if _group(v) == _group(first) and int(v.version) > int(first.version) and _tags(v).get(REGISTRATION) == PENDING:
            delete_version(client, name, str(v.version))
    return client.get_model_version(name, first.version)


def create(client, name: str, model_uri: str, tags: dict[str, str]):
    """Register the logged model as a new version carrying all of `tags` in one registry call; returns it as the
    registry holds it (with its tags)."""
    import mlflow

    created = mlflow.register_model(model_uri, name, tags={**tags, REGISTRATION: PENDING})
    return created if _tags(created).get("decision_key") else client.get_model_version(name, created.version)


def settle(client, name: str, mine, floor: int):
    """The version that stands for this decision: the lowest-numbered version with the same `decision_key` and
    `champion_before` created after `floor` (the highest version number there was when this run looked). When it is
    another run's, this run's own version is deleted (before any alias touches it) and the winner returned."""
    key, before = _group(mine)
    found = client.search_model_versions(f"name = '{name}' and tags.decision_key = '{key}'")
    copies = [v for v in found if int(v.version) > floor and _group(v) == (key, before)]
    winner = min([*copies, mine], key=lambda v: int(v.version))
    if str(winner.version) == str(mine.version):
        return mine
    log.info("%s: version %s holds the same decision (registered at the same time): deleting version %s",
             name, winner.version, mine.version)
    delete_version(client, name, str(mine.version))
    return client.get_model_version(name, winner.version)


def delete_version(client, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # already deleted by the run it belongs to
            raise


def finish(client, name: str, version: str) -> list[str]:
    """Set the aliases a pending version's decision calls for, then mark it complete; returns its aliases.

    `challenger` goes to it unless a newer decided version exists (that one's run moves it); `champion` only when the
    gate promoted it and the champion is still the one it was decided against (a version that is already champion
    keeps it). Each step can be repeated: a run killed halfway is finished by the next run on the same inputs."""
    v = client.get_model_version(name, version)
    tags = _tags(v)
    if tags.get(REGISTRATION) == PENDING:
        newer = [o for o in all_versions(client, name) if int(o.version) > int(version) and "decision_key" in _tags(o)
                 and _group(o) != _group(v) and _tags(o).get(REGISTRATION) != INCOMPLETE]
        if not newer and CHALLENGER not in (v.aliases or []):
            client.set_registered_model_alias(name, CHALLENGER, version)
        if tags.get("promoted") == "true":
            try:
                now = current_champion(client, name)
            except ChampionLookupError as exc:  # fail closed: `champion` stays; the next run on these inputs finishes
                raise RegistryError(f"{name} version {version} is registered and passed its gate, but the registry "
                                    f"could not say which version is the champion ({exc}), so `champion` was not "
                                    "moved; fix the registry and run fewtune again on the same inputs to finish "
                                    "it") from exc
            now_version = str(now.version) if now is not None else NO_CHAMPION
            if now_version in (tags.get("champion_before", NO_CHAMPION), version):
                set_champion(client, name, version, "gate")
            else:
                log.warning("%s version %s passed its gate against champion %s, but the champion is now version %s: "
                            "left as it is (run again to compare with it)", name, version,
                            tags.get("champion_before", NO_CHAMPION), now_version)
                client.set_model_version_tag(name, version, "promotion_skipped", f"champion moved to {now_version}")
        client.set_model_version_tag(name, version, REGISTRATION, COMPLETE)
        v = client.get_model_version(name, version)
    return [a for a in (CHALLENGER, CHAMPION) if a in (v.aliases or [])]
