"""The HTTP routes of ``attentionseg serve`` (FastAPI): token check, body limits, packets in and out.

Every route is under ``/v1`` and needs ``Authorization: Bearer <token>`` when the server has a token (401
otherwise). Bodies larger than ``max_upload_bytes`` are refused with 413 before they are read. Every refusal
is ``{"detail": "<what is wrong>"}`` with a 4xx status; an unexpected failure is a 500 without a traceback.
The routes only decode and encode; the work is :class:`~.service.Service`'s, run off the event loop.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import API_PREFIX, PACKET_TYPE
from .calls import CallError
from .codec import Limits, PacketError, decode, encode
from .config import ServerConfig
from .patches import StalePatch
from .service import MAX_WAIT_S, Service
from .store import StoreError

log = logging.getLogger("attentionseg.server")
DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read and dropped so the client sees the 413


class BodyLimit:
    """Refuses bodies over ``max_bytes`` with 413: by their Content-Length before reading, else as they
    arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            if length.isdigit() and int(length) <= DRAIN_LIMIT:
                await self._drain(receive, 0)
            await JSONResponse({"detail": self._message(length.decode("latin-1"))}, 413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, received)
                raise HTTPException(413, self._message(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: str) -> str:
        return (f"the request body ({size} bytes) exceeds the server's limit of {self.max_bytes} bytes "
                "(attentionseg serve --max-upload-mb)")

    @staticmethod
    async def _drain(receive: Receive, length: int) -> None:
        """Read and drop the rest of the body (up to ``DRAIN_LIMIT``), so that the client, still sending,
        reads the 413 instead of a reset connection."""
        more = True
        while more and length <= DRAIN_LIMIT:
            message = await receive()
            length += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)


def token_checker(token: str | None):
    """The dependency every route has: the bearer token, compared in constant time."""
    expected = token.encode() if token is not None else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise HTTPException(401, "missing token: this server needs 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
            raise HTTPException(401, "wrong token: the server refused the 'Authorization: Bearer' token",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(config: ServerConfig, service: Service) -> FastAPI:
    """The FastAPI application over ``service``; the service is stopped when the application shuts down."""
    limits = Limits(max_decoded_bytes=max(config.max_memory_bytes, config.max_upload_bytes))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.stop()

    app = FastAPI(title="AttentionSeg server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(token_checker(config.token))])
    wait_query = Query(0.0, ge=0.0, le=MAX_WAIT_S, description="seconds to wait for the job to finish")
    preview_query = Query(None, ge=0, description="send the running job's preview when newer than this "
                                                  "version (and stop waiting when one comes)")

    async def packet(request: Request) -> Any:
        kind = request.headers.get("content-type", "")
        if kind.split(";")[0].strip() != PACKET_TYPE:
            raise HTTPException(415, f"send the body as {PACKET_TYPE} (an AttentionSeg packet), not {kind!r}")
        body = await request.body()
        return await run_in_threadpool(decode, body, limits)

    async def reply(function: Any, *args: Any) -> Response:
        payload = await run_in_threadpool(function, *args)
        return Response(await run_in_threadpool(encode, payload), media_type=PACKET_TYPE)

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"models": await run_in_threadpool(service.models)}

    @router.post("/sessions")
    async def open_session(request: Request, wait: float = wait_query) -> Response:
        session, job = await run_in_threadpool(service.open_session, await packet(request))
        return await reply(service.render, session, job, wait)

    @router.get("/sessions/{session_id}")
    async def session_info(session_id: str) -> dict[str, Any]:
        return service.session_info(session_id)

    @router.delete("/sessions/{session_id}")
    async def close_session(session_id: str) -> dict[str, Any]:
        await run_in_threadpool(service.close_session, session_id)
        return {"closed": session_id}

    @router.get("/sessions/{session_id}/mask")
    async def mask(session_id: str) -> Response:
        return await reply(service.mask, session_id)

    @router.post("/sessions/{session_id}/jobs")
    async def submit(session_id: str, request: Request, wait: float = wait_query) -> Response:
        session, job = await run_in_threadpool(service.submit, session_id, await packet(request))
        return await reply(service.render, session, job, wait)

    @router.get("/jobs/{job_id}")
    # Optional, not "int | None": FastAPI evaluates the annotation, and Python 3.9 cannot
    async def job_status(job_id: str, wait: float = wait_query,
                         preview_after: Optional[int] = preview_query) -> Response:  # noqa: UP045
        return await reply(service.wait, job_id, wait, preview_after)

    @router.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict[str, Any]:
        return await run_in_threadpool(service.cancel, job_id)

    app.include_router(router)
    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    def detail(status: int):
        async def handler(request: Request, error: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(error)}, status)

        return handler

    async def stale(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error), "code": "stale_patch"}, 409)

    app.add_exception_handler(PacketError, detail(400))
    app.add_exception_handler(StalePatch, stale)
    app.add_exception_handler(CallError, detail(422))
    app.add_exception_handler(ValueError, detail(422))  # request threads only check inputs; the engine's
    # own errors happen in jobs and reach the client as a failed job

    async def store_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, getattr(error, "status", 400))

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal server error ({type(error).__name__}); see the server's "
                                       "log"}, 500)

    app.add_exception_handler(StoreError, store_error)
    app.add_exception_handler(Exception, unexpected)
