"""Augment the training rows (self-distillation / paraphrase with the base model).

With `augment.enabled: false` (the default) this stage passes the validated training rows through unchanged and
says so in the log. Augmented rows never reach the eval set: the split is made before this stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import FewtuneConfig
from tasks.data import write_jsonl

log = logging.getLogger("fewtune.augment")


@dataclass
class AugmentResult:
    records: list[dict[str, Any]]
    added: int
    path: Path
    note: str


def augment_records(records: list[dict[str, Any]], cfg: FewtuneConfig, out_dir: Path) -> AugmentResult:
    if cfg.augment.enabled:
        raise NotImplementedError(
            "augment.enabled: true is not available in this version of fewtune; set augment.enabled=false"
        )
    note = "augmentation disabled (augment.enabled=false): training rows passed through unchanged"
    log.info("%s (%d rows)", note, len(records))
    path = write_jsonl(Path(out_dir) / "train.jsonl", records)
    return AugmentResult(records=records, added=0, path=path, note=note)
