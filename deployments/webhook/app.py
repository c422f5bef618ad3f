"""The web side of the receiver: the FastAPI app (`POST /hooks/dataset-landed`, `GET /healthz`) and
`serve_webhook`, which runs it under uvicorn."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from deployments.webhook.receiver import Receiver, load_receiver
from deployments.webhook.security import PATH, SIGNATURE_HEADER, TIMESTAMP_HEADER, Rejected
from tasks.config import FewtuneConfig

log = logging.getLogger("fewtune.webhook")


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Rejected(400, "invalid Content-Length")
        if int(declared) > limit:
            raise Rejected(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(receiver: Receiver) -> FastAPI:
    """The FastAPI app: `POST /hooks/dataset-landed` and `GET /healthz`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        from prefect.events.worker import EventsWorker

        await run_in_threadpool(EventsWorker.drain_all, 10)  # send events still queued before exiting
        receiver.store.close()

    app = FastAPI(title="fewtune webhook", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(PATH)
    async def dataset_landed(request: Request) -> JSONResponse:
        try:
            body = await _read_limited(request, receiver.settings.max_body_bytes)
        except Rejected as exc:
            log.warning("refused (%d): %s", exc.status, exc.detail)
            return JSONResponse({"status": "rejected", "detail": exc.detail}, status_code=exc.status)
        status, answer = await run_in_threadpool(
            receiver.handle, request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER), body
        )
        return JSONResponse(answer, status_code=status)

    return app


def serve_webhook(cfg: FewtuneConfig, host: str | None = None, port: int | None = None) -> None:
    """Run the receiver until interrupted (uvicorn, one process)."""
    import uvicorn

    # A plain handler: one short line per decision, cheap enough for bursts of deliveries.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)
    receiver = load_receiver(cfg)
    host = host or cfg.webhook.host
    port = port or cfg.webhook.port
    log.info("listening on http://%s:%d%s; allowed: %s", host, port, PATH, ", ".join(cfg.webhook.allowed_uris))
    uvicorn.run(create_app(receiver), host=host, port=port, log_level="info", access_log=False)
