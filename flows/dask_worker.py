"""Imported by every worker of fewtune's local Dask cluster as it starts (Dask `preload`).

A shard task on a fresh worker would otherwise spend its first seconds importing Prefect, torch, transformers and
the stages (about 5-9 s on a 2-core CPU, more than scoring 5,000 rows with a small model takes); preloaded, the
imports happen while the cluster starts, once per worker, and every shard task starts with them in place.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (resolve transformers' lazy modules)

import flows.stages  # noqa: F401  (Prefect, torch and the stage functions the shard tasks call)
