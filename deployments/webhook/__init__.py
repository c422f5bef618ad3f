"""`fewtune webhook`: the signed receiver for "a dataset has landed" notifications.

`POST /hooks/dataset-landed` accepts a small JSON body from the system that lands data (an ETL job, an object-store
notification relay, a CI job)::

    {"delivery_id": "3f1c9e0a-...", "dataset_uri": "/data/landing/2026-05-01.jsonl", "sha256": "<optional hex>",
     "retrigger": false}

and, when everything checks out, emits the Prefect event `fewtune.dataset.landed` (config `serve.event`). The
`dataset-landed` deployment (`fewtune serve`, or `deployments/prefect.yaml` with a worker) has a trigger on that
event and starts a flow run with `dataset` set to the payload's URI. Inbound webhooks of the open-source Prefect
server do not exist, which is why this receiver is part of fewtune.

Checks, in order (the first failure answers, and nothing is recorded or emitted):

==========================  ====  ===============================================================================
check                       code  rule
==========================  ====  ===============================================================================
body size                   413   at most `webhook.max_body_bytes`, enforced while reading (Content-Length or not)
signature headers           401   `X-Fewtune-Timestamp` (unix seconds) and `X-Fewtune-Signature: sha256=<hex>`
timestamp                   401   within `webhook.tolerance_s` of the receiver's clock (stale or future: refused)
signature                   401   HMAC-SHA256 over `<timestamp>.<raw body>` with the shared secret, or during a
                                  rotation the previous one (`webhook.previous_secret_env`); constant time
JSON                        400   the body parses as JSON
schema                      422   the fields above (`sha256`, `retrigger` optional); delivery_id 8-128 of
                                  [A-Za-z0-9._:-]; sha256 64 hex; retrigger a boolean
URI shape                   422   no `..` segment (also percent-encoded), no backslash/control characters; local
                                  paths absolute; object-store URIs without query, fragment, credentials or `::`
allow-list                  403   inside an absolute folder of `webhook.allowed_uris` (symlinks resolved, also
                                  those inside a dataset folder) or under one of its object-store prefixes
content                     422   local data must exist, be at most `webhook.max_dataset_bytes` (and match
                                  `sha256` when given); object-store URIs need `sha256` (the receiver cannot read
                                  the bucket; the flow checks their size before downloading)
replay                      409   a delivery id seen before (remembered `webhook.delivery_ttl_s` in SQLite)
==========================  ====  ===============================================================================

Then: content announced within `webhook.announce_ttl_s` (same SHA-256) → 200 `unchanged`, no event, and the answer
says how to start a run anyway; otherwise, or with `"retrigger": true`, the event is emitted → 202 `accepted`. The
decisions are atomic in SQLite, so concurrent duplicates collapse into one event. The URI, allow-list and size rules
are `tasks.common.landing`'s, which the flow applies again to its `dataset` parameter. The secret comes from the
environment variable named by `webhook.secret_env` and is never logged or echoed.

Senders sign like this (Python; `sign` in `security` does the same)::

    ts = str(int(time.time()))
    sig = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    headers = {"X-Fewtune-Timestamp": ts, "X-Fewtune-Signature": "sha256=" + sig, "Content-Type": "application/json"}

Modules: `security` (path, headers, signing, body schema, URI and allow-list checks), `store` (the SQLite delivery
store), `receiver` (the decisions and the Prefect event), `app` (the FastAPI app and `serve_webhook`).
"""

from deployments.webhook.app import create_app, serve_webhook
from deployments.webhook.receiver import Receiver, emit_dataset_landed, load_receiver
from deployments.webhook.security import (
    PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DatasetLanded,
    Location,
    Rejected,
    check_dataset_size,
    check_dataset_uri,
    content_sha256,
    data_files,
    sign,
    signed_headers,
)
from deployments.webhook.store import Claim, DeliveryStore

__all__ = [
    "PATH",
    "Claim",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DatasetLanded",
    "DeliveryStore",
    "Location",
    "Receiver",
    "Rejected",
    "check_dataset_size",
    "check_dataset_uri",
    "content_sha256",
    "create_app",
    "data_files",
    "emit_dataset_landed",
    "load_receiver",
    "serve_webhook",
    "sign",
    "signed_headers",
]
