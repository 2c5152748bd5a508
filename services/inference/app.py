"""Inference service HTTP surface: OpenAI-compatible completions and models, health, admin, metrics.

Thin routes over `InferenceService`; errors are mapped once to OpenAI-style bodies
`{"error": {"message", "type", "param", "code"}}` so any OpenAI client reports the server's message.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from client.body_limit import BodyLimit
from client.schemas import CompletionResponse, ModelList, WeightsAnnouncement
from services.inference.engine import EngineClosed, InferenceEngine
from services.inference.service import CompletionBody, InferenceService, ServiceError
from services.inference.settings import InferenceSettings


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _readable(exc: RequestValidationError) -> str:
    """`field: message` per validation error, e.g. `n: Input should be greater than or equal to 1`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(dict.fromkeys(parts))


def create_app(settings: InferenceSettings, *, engine: InferenceEngine | None = None) -> FastAPI:
    """The inference app. `engine` given: served as is (the caller closes it); else built in the lifespan.

    Raises ValueError when admin endpoints would be open to the network (no admin token, not local_only
    on a loopback host).
    """
    service = InferenceService(settings, engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="r2vpo inference", lifespan=lifespan)
    app.state.service = service
    too_large = f"request body larger than this server's limit of {settings.max_body_bytes} bytes"
    app.add_middleware(  # 413 before anything parses (or tokenizes) it; the rest is not read
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        reject=lambda: _error(413, too_large, "invalid_request_error"),
        drain_factor=0,
    )

    def get_service() -> InferenceService:
        return service

    def authorize(request: Request) -> None:
        if settings.admin_open():
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ServiceError(401, "missing bearer token (Authorization: Bearer <admin_token>)",
                               kind="authentication_error")  # fmt: skip
        expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
        if not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise ServiceError(403, "invalid admin token", kind="permission_error")

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return _error(exc.status_code, exc.message, exc.kind, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _readable(exc), "invalid_request_error")

    @app.exception_handler(EngineClosed)
    async def engine_closed(request: Request, exc: EngineClosed) -> JSONResponse:
        return _error(503, str(exc), "service_unavailable")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette signature
        response = await call_next(request)
        if request.url.path == "/v1/completions":
            service.metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=False)
    async def completions(
        body: CompletionBody, svc: InferenceService = Depends(get_service)
    ) -> CompletionResponse:
        return await svc.complete(body)

    @app.get("/v1/models", response_model=ModelList)
    async def models(svc: InferenceService = Depends(get_service)) -> ModelList:
        return svc.models()

    @app.get("/healthz")
    async def healthz(svc: InferenceService = Depends(get_service)) -> JSONResponse:
        if svc.load_error is not None:
            return JSONResponse({"status": "error", "error": svc.load_error}, status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(svc: InferenceService = Depends(get_service)) -> JSONResponse:
        if not svc.ready:
            state = "engine loading" if svc.engine is None else "catching up with announced weights"
            return JSONResponse({"status": "not ready", "reason": svc.load_error or state}, status_code=503)
        return JSONResponse({"status": "ready", "policy_version": svc.engine.version})

    @app.post("/admin/load_weights", dependencies=[Depends(authorize)])
    async def load_weights(a: WeightsAnnouncement, svc: InferenceService = Depends(get_service)) -> dict:
        previous = svc.require_engine().version
        changed = await svc.apply_weights(a)
        return {"policy_version": svc.engine.version, "previous_version": previous, "changed": changed}

    @app.get("/metrics")
    async def metrics(svc: InferenceService = Depends(get_service)) -> Response:
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
