"""The only wiring point: `create_app(settings)` builds the Litestar app; nothing is built at import."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable

from litestar import Litestar, MediaType, Response, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.artifact import load_artifact
from service.aspects import check_aspect_config
from service.disconnect import cancel_on_disconnect, closing
from service.errors import handle_exception
from service.lifetime import MASTER_PID_VARIABLE, exit_with_parent, is_server_worker
from service.metrics import Metrics
from service.routes import AdminController, HealthController, provide_scorer, sentiment_router
from service.scoring import Scorer
from service.settings import Settings


def timing_middleware(metrics: Metrics, draining: Callable[[], bool]):  # -> Callable[[ASGIApp], ASGIApp]
    """Request duration by route template (bounded), method and status, for every HTTP request; while
    draining, `Connection: close` on every response, so no client reuses a connection that is about to go."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started, status = time.perf_counter(), 499  # no answer started: the client hung up first

            async def send_with_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    if draining():
                        message = closing(message)
                await send(message)

            try:
                await app(scope, receive, send_with_status)
            except BaseException:
                status = 500 if status == 499 else status
                raise
            finally:
                route = scope.get("path_template") or "unmatched"
                metrics.request_duration.labels(route, scope["method"], str(status)).observe(
                    time.perf_counter() - started)

        return middleware

    return wrap


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    # Fails fast, naming the file, before anything binds.
    artifact = load_artifact(settings.model_dir, variant=settings.model_variant)
    taxonomy = (check_aspect_config(settings.aspect_model_dir, settings.aspect_taxonomy)
                if settings.aspects_enabled else None)
    metrics = Metrics()

    @get("/metrics", media_type=MediaType.TEXT, include_in_schema=False, sync_to_thread=False)
    def prometheus_metrics() -> Response[bytes]:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        with metrics.observing_gc():
            async with Scorer.started(settings, artifact, metrics, taxonomy) as scorer:
                app.state.scorer = scorer
                yield

    app = Litestar(
        route_handlers=[sentiment_router(settings), HealthController, AdminController, prometheus_metrics],
        dependencies={"scorer": Provide(provide_scorer, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        middleware=[timing_middleware(metrics, lambda: app.state.get("scorer") is not None
                                      and app.state.scorer.draining),
                    cancel_on_disconnect(metrics, settings.request_timeout_s)],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Sentiment inference service", version="1.0.0",
                                     description="Distilled int8 student with a teacher-LLM fallback."),
        logging_config=None,
        debug=False,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    return app


def app_from_env() -> Litestar:
    """Factory for ASGI servers (`granian --factory service.app:app_from_env`)."""
    if is_server_worker():
        exit_with_parent(int(os.environ[MASTER_PID_VARIABLE]))
    return create_app(Settings.from_env())

