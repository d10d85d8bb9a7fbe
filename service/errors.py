"""One application error type, one kind→status map, one handler.

Built-in exceptions are never turned into 4xx: an unexpected error is a 500 with a generic body,
logged with its type (never the request's text).
"""

from __future__ import annotations

import enum
import logging
import re
from typing import Any, NamedTuple

import msgspec
import orjson
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.utils.empty import value_or_default
from litestar.utils.scope.state import ScopeState

log = logging.getLogger("sentiment.errors")


class ErrorKind(enum.Enum):
    MALFORMED_JSON = ("malformed_json", 400)
    INVALID_REQUEST = ("invalid_request", 422)
    INVALID_MODEL = ("invalid_model", 422)
    UNAUTHORIZED = ("unauthorized", 401)
    NOT_FOUND = ("not_found", 404)
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405)
    BODY_TIMEOUT = ("body_timeout", 408)
    TOO_LARGE = ("payload_too_large", 413)
    UNSUPPORTED_MEDIA = ("unsupported_media_type", 415)
    OVERLOADED = ("overloaded", 503)
    NOT_READY = ("not_ready", 503)
    DEADLINE = ("deadline_exceeded", 504)
    TEACHER_UNAVAILABLE = ("teacher_unavailable", 503)
    TEACHER_BUSY = ("teacher_busy", 503)
    TEACHER_FAILED = ("teacher_failed", 502)
    INTERNAL = ("internal_error", 500)

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


class ServiceError(Exception):
    def __init__(self, kind: ErrorKind, message: str, details: Any = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.message, self.details, self.retry_after = kind, message, details, retry_after


_HTTP_STATUS_KIND = {
    400: ErrorKind.MALFORMED_JSON,
    401: ErrorKind.UNAUTHORIZED,
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED,
    413: ErrorKind.TOO_LARGE,
    415: ErrorKind.UNSUPPORTED_MEDIA,
}


class ErrorAnswer(NamedTuple):
    """An error as the client sees it: status, the JSON body of DESIGN.md and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


def error_answer(kind: ErrorKind, message: str, details: Any = None, retry_after: float | None = None) -> ErrorAnswer:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return ErrorAnswer(kind.status, {"error": {"code": kind.code, "message": message, "details": details}}, headers)


def handle_exception(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    """Litestar's exception handler: every exception that reaches it becomes the JSON error body."""
    body = value_or_default(ScopeState.from_scope(request.scope).body, None)
    answer = answer_for(exc, request.url.path, body, request.headers.get("content-encoding"))
    return Response(answer.body, status_code=answer.status, headers=answer.headers)


def answer_for(exc: Exception, path: str, body: bytes | None = None,
               content_encoding: str | None = None) -> ErrorAnswer:
    """The answer to a request that raised `exc` (also used by routes Litestar does not answer itself);
    `body`, where it was read, lets an undecodable one be explained (`malformed_body`)."""
    if isinstance(exc, ServiceError):
        return error_answer(exc.kind, exc.message, exc.details, exc.retry_after)
    decode_error = _body_decode_error(exc)
    if body is not None and not body.strip() and isinstance(exc, ValidationException):
        return malformed_body(body, content_encoding, str(exc))  # Litestar's "missing `data`" for an empty body
    if isinstance(decode_error, msgspec.ValidationError):
        return _schema_violation(str(decode_error))
    if decode_error is not None or isinstance(exc, UnicodeDecodeError):
        return malformed_body(body, content_encoding, str(decode_error or exc))
    if isinstance(exc, ValidationException):
        return _validation_answer(exc, body, content_encoding)
    if isinstance(exc, HTTPException):
        kind = _HTTP_STATUS_KIND.get(exc.status_code, ErrorKind.INTERNAL)
        if kind is ErrorKind.INTERNAL and exc.status_code < 500:
            return ErrorAnswer(exc.status_code, {"error": {"code": "http_error", "message": exc.detail,
                                                           "details": None}})
        return error_answer(kind, exc.detail, exc.extra or None)
    log.exception("unhandled error", extra={"error_type": type(exc).__name__, "path": path})
    return error_answer(ErrorKind.INTERNAL, "internal error")


def malformed_body(body: bytes | None, content_encoding: str | None, reason: str) -> ErrorAnswer:
    """Why a body is not a JSON document, in terms a client can act on: a compressed body (the service
    takes none), an empty one, bytes that are not UTF-8 (which byte), or orjson's reason with line and
    column (msgspec's own is vaguer: a lone surrogate escape is 'Input data was truncated').
    `reason` is the decoder's message, kept where the body is not at hand."""
    if content_encoding and content_encoding.strip().lower() != "identity":
        return error_answer(ErrorKind.UNSUPPORTED_MEDIA,
                            f"Content-Encoding {content_encoding!r} is not supported: send the JSON body uncompressed")
    if body is None:
        return error_answer(ErrorKind.MALFORMED_JSON, "request body is not valid JSON (or not UTF-8)", reason)
    if not body.strip():
        return error_answer(ErrorKind.MALFORMED_JSON, 'request body is empty: send a JSON object (see /schema)')
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return error_answer(ErrorKind.MALFORMED_JSON, "request body is not valid UTF-8",
                            f"{exc.reason} at byte {exc.start}")
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
    return error_answer(ErrorKind.MALFORMED_JSON, "request body is not valid JSON", reason)


def _body_decode_error(exc: BaseException) -> msgspec.DecodeError | None:
    """The msgspec error behind Litestar's wrapping of a request body that did not decode, if any.
    Bodies are decoded straight into the request's Struct, so nesting depth never matters."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, msgspec.DecodeError):
            return seen
        seen = seen.__cause__
    return None


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def _schema_violation(message: str) -> ErrorAnswer:
    """msgspec's 'Expected `str`, got `int` - at `$.texts[0]`' as a 422 naming the field."""
    match = _PATH.search(message)
    field = match.group(1) or None if match else None
    text = _PATH.sub("", message)
    details = [{"field": field, "message": text}]
    return error_answer(ErrorKind.INVALID_REQUEST, f"{field}: {text}" if field else text, details)


def _validation_answer(exc: ValidationException, body: bytes | None, content_encoding: str | None) -> ErrorAnswer:
    """Litestar raises ValidationException both for unparseable bodies and for schema violations."""
    detail = str(exc.detail or "")
    extra = exc.extra if isinstance(exc.extra, list) else []
    if "malformed" in detail.lower() or ("json" in detail.lower() and not extra):
        return malformed_body(body, content_encoding, detail)
    fields = [{"field": item.get("key"), "message": item.get("message")} for item in extra if isinstance(item, dict)]
    message = fields[0]["message"] if fields else detail
    if fields and fields[0]["field"]:
        message = f"{fields[0]['field']}: {message}"
    return error_answer(ErrorKind.INVALID_REQUEST, message, fields or None)
