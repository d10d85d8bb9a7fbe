"""Thin HTTP handlers: validate the contract, call the scorer, shape the response."""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Any

import msgspec
from litestar import Controller, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.dto import DTOConfig, MsgspecDTO
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import ResponseSpec

from service.direct import direct_json
from service.errors import ErrorKind, ServiceError
from service.schemas import (
    AspectResult,
    ErrorBody,
    ExplainRequest,
    ExplainResponse,
    FallbackInfo,
    Health,
    ModelRef,
    ModelVersion,
    ReloadRequest,
    ReloadResponse,
    SentimentRequest,
    SentimentResponse,
    SentimentResult,
    StudentVerdict,
    TeacherRef,
)
from service.scoring import Scorer
from service.settings import Settings


class SentimentRequestDTO(MsgspecDTO[SentimentRequest]):
    """Bodies decode straight into the Struct (typed msgspec): faster, and nesting depth cannot matter.
    POST /v1/sentiment's body is decoded the same way by `direct_json`; its DTO documents it."""

    config = DTOConfig(forbid_unknown_fields=True)


class ExplainRequestDTO(MsgspecDTO[ExplainRequest]):
    config = DTOConfig(forbid_unknown_fields=True)


class ReloadRequestDTO(MsgspecDTO[ReloadRequest]):
    config = DTOConfig(forbid_unknown_fields=True)


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """The documented error answers of a route, all with the one error body."""
    return {status: ResponseSpec(ErrorBody, description=ERROR_DESCRIPTIONS[status]) for status in statuses}


ERROR_DESCRIPTIONS = {
    400: "body is not JSON or not UTF-8", 401: "missing or invalid API key", 413: "body too large",
    422: "the body breaks the schema or a limit; the message names the field",
    502: "the teacher answered off-format", 503: "overloaded, not ready, or the teacher unavailable or busy",
    504: "past the request deadline",
}
SCORING_ERRORS = (400, 401, 413, 422, 503, 504)


def check_texts(data: SentimentRequest, settings: Settings) -> list[str]:
    """The request's texts, or a 422 naming the offending field."""
    if (data.texts is None) == (data.text is None):
        raise _invalid("texts", "give exactly one of 'texts' (a list) or 'text' (a string)")
    texts, name = ([data.text], "text") if data.text is not None else (data.texts or [], "texts")
    if not texts:
        raise _invalid("texts", "must contain at least one text")
    if len(texts) > settings.max_texts:
        raise _invalid("texts", f"at most {settings.max_texts} texts per request, got {len(texts)}")
    for i, text in enumerate(texts):
        where = name if data.text is not None else f"texts[{i}]"
        if not text.strip():
            raise _invalid(where, "must not be empty or whitespace-only")
        if len(text) > settings.max_text_chars:
            raise _invalid(where, f"longer than {settings.max_text_chars} characters ({len(text)})")
    return texts


def _invalid(field: str, message: str) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_REQUEST, f"{field}: {message}", [{"field": field, "message": message}])


async def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """With SENTIMENT_API_KEYS set, /v1 routes need `Authorization: Bearer KEY` or `X-API-Key: KEY`.

    Async on purpose, like every guard here: Litestar runs a sync guard in a worker thread, a thread
    hop on every request. Registered only where keys are set (`sentiment_router`): Litestar copies the
    route handler for every guard call, ~9 us per request even when the guard has nothing to check."""
    keys: tuple[str, ...] = connection.app.state.settings.api_keys
    auth = connection.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else connection.headers.get("x-api-key", "")
    if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise ServiceError(ErrorKind.UNAUTHORIZED, "missing or invalid API key")


def provide_scorer(state: State) -> Scorer:
    return state.scorer


@post("/sentiment", status_code=200, summary="Score one text or a list of texts", tags=["sentiment"],
      dto=SentimentRequestDTO, return_dto=None, responses=error_responses(*SCORING_ERRORS),
      middleware=[direct_json(SentimentRequest, scorer=provide_scorer)])
async def score(data: SentimentRequest, scorer: Scorer) -> SentimentResponse:
    """Called by `direct_json` (service/direct.py), not by Litestar: the hot route skips Litestar's
    per-request machinery. The decorator documents the route for OpenAPI."""
    texts = check_texts(data, scorer.settings)
    scored = await scorer.score(texts, data.fallback or scorer.settings.fallback, data.aspects)
    manifest = scorer.artifact.manifest
    results = [SentimentResult(
        label=s.decision.prediction.label, score=s.decision.prediction.score,
        scores=s.decision.prediction.scores, source=s.decision.source, truncated=s.truncated,
        fallback=FallbackInfo(s.decision.reason, s.decision.outcome or "") if s.decision.reason else None,
        aspects=msgspec.UNSET if s.aspects is None else [AspectResult(o.aspect, o.label, o.score, o.span)
                                                         for o in s.aspects],
    ) for s in scored]
    return SentimentResponse(model=ModelRef(manifest.name, manifest.version), results=results)


def sentiment_router(settings: Settings) -> Router:
    """/v1: the scoring routes, behind the API-key guard where keys are configured."""
    guards = [api_key_guard] if settings.api_keys else []
    return Router("/v1", route_handlers=[score, SentimentController], guards=guards)


class SentimentController(Controller):
    path = "/"
    tags = ["sentiment"]

    @post("/sentiment/explain", status_code=200, summary="The teacher's label and rationale for one text",
          dto=ExplainRequestDTO, return_dto=None, responses=error_responses(*SCORING_ERRORS, 502))
    async def explain(self, data: ExplainRequest, scorer: Scorer) -> ExplainResponse:
        text = check_texts(SentimentRequest(text=data.text), scorer.settings)[0]
        answer, student = await scorer.explain(text)
        assert scorer.teacher is not None and answer.label is not None
        return ExplainResponse(label=answer.label, scores=answer.probs, rationale=answer.rationale,
                               teacher=TeacherRef(scorer.teacher.model),
                               student=StudentVerdict(student.decision.prediction.label,
                                                      student.decision.prediction.score))

    @get("/model", summary="The served model's manifest, and the execution layout chosen on this machine")
    async def model(self, scorer: Scorer) -> dict[str, Any]:
        layout = scorer.engine.layout.to_json() if scorer.engine else None
        aspects = None
        if scorer.aspects:
            encoder = scorer.aspects.encoder.manifest
            aspects = {"encoder": {"name": encoder.name, "version": encoder.version, "sha256": encoder.sha256,
                                   "load_weights_as": scorer.aspects.encoder.load_weights_as},
                       "taxonomy": scorer.aspects.taxonomy.to_json(), "threshold": scorer.aspects.threshold}
        variant = {**scorer.artifact.variant.to_json(), "reason": scorer.artifact.reason}
        return {**scorer.artifact.manifest.to_json(), "variant": variant, "serving": layout, "aspects": aspects}


async def admin_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """/admin needs `Authorization: Bearer SENTIMENT_ADMIN_KEY`; without a key configured it does not exist."""
    key: str = connection.app.state.settings.admin_key
    if not key:
        raise ServiceError(ErrorKind.NOT_FOUND, "no admin routes: SENTIMENT_ADMIN_KEY is not set")
    auth = connection.headers.get("authorization", "")
    if not (auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].encode(), key.encode())):
        raise ServiceError(ErrorKind.UNAUTHORIZED, "missing or invalid admin key")


class AdminController(Controller):
    path = "/admin"
    guards = [admin_key_guard]
    include_in_schema = False  # not advertised in the public API document

    @post("/reload", status_code=200, dto=ReloadRequestDTO, return_dto=None)
    async def reload(self, data: ReloadRequest, scorer: Scorer) -> ReloadResponse:
        started = time.perf_counter()
        old, new = await scorer.reload(Path(data.model_dir) if data.model_dir else scorer.settings.model_dir)
        return ReloadResponse(model=ModelVersion(new.manifest.name, new.manifest.version, new.variant.sha256),
                              previous=ModelVersion(old.manifest.name, old.manifest.version, old.variant.sha256),
                              seconds=round(time.perf_counter() - started, 3))


class HealthController(Controller):
    path = "/health"
    tags = ["health"]

    @get("/live", summary="The process is up")
    async def live(self) -> Health:
        return Health(status="ok")

    @get("/ready", summary="503 until the model is loaded and warmed, and while draining",
         responses={503: ResponseSpec(Health, description="not ready: details say why")})
    async def ready(self, scorer: Scorer) -> Response[Health]:
        teacher = scorer.teacher_status()
        details = {"model_loaded": scorer.engine is not None, "warmed": scorer.ready, "draining": scorer.draining,
                   "teacher": scorer.teacher is not None, "queue_depth": scorer.engine.depth if scorer.engine else 0,
                   "teacher_restarts": scorer.embedded_teacher.restarts if scorer.embedded_teacher else None,
                   "teacher_state": teacher["state"], "teacher_last_exit": teacher["last_exit"]}
        if scorer.ready and not scorer.draining:
            return Response(Health("ready", details))
        return Response(Health("not_ready", details), status_code=503, headers={"Retry-After": "1"})
