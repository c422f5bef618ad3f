"""Hugging Face hub ids in a config (`data.train: owner/name[:split]`, `model.base: owner/name`), fingerprinted by the
revision that will be read, so that a new commit on the hub is a new cache key and never a stale cache hit.

The revision is the commit hash the hub reports for the repository's default branch; offline (`HF_HUB_OFFLINE=1`)
it is the commit the local Hugging Face cache holds for that branch, which is what `datasets`/`transformers` then
load. When neither can be told, the fingerprint is unique to this call: the stages that depend on it run again
rather than reuse a result that may belong to another revision.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path
from typing import Literal

log = logging.getLogger("fewtune.hub")

RepoType = Literal["model", "dataset"]


def hub_repo(spec: str) -> str:
    """The repository of a hub spec: `owner/name:split` -> `owner/name`."""
    return spec.split(":", 1)[0].strip("/")


def hub_revision(spec: str, repo_type: RepoType) -> str | None:
    """The commit hash of `spec`'s repository that a load reads now; None when it cannot be told."""
    from huggingface_hub import constants, snapshot_download

    repo = hub_repo(spec)
    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            info = HfApi().repo_info(repo, repo_type=repo_type)
            if info.sha:
                return str(info.sha)
        except Exception as exc:  # noqa: BLE001 - unreachable hub, unknown repo: fall back to the local cache
            log.info("%s: hub revision not available (%s); using the local cache's", repo, type(exc).__name__)
    try:
        folder = snapshot_download(repo, repo_type=repo_type, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached either
        return None
    return Path(folder).name  # snapshots/<commit hash>


def hub_fingerprint(spec: str, repo_type: RepoType) -> str:
    """Hash of the spec and its resolved revision; unique per call when the revision cannot be resolved."""
    revision = hub_revision(spec, repo_type)
    if revision is None:
        log.warning("%s: the %s's revision cannot be resolved (hub unreachable and not in the local cache); "
                    "stages that read it will not reuse earlier results", spec, repo_type)
        revision = f"unresolved-{uuid.uuid4()}"
    return hashlib.sha256(f"{spec}@{revision}".encode()).hexdigest()[:16]
