"""The HTTP contract (msgspec Structs). Internal types live with the code that uses them."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FallbackPolicy = Literal["auto", "never", "always"]


class SentimentRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Either `texts` (a list) or `text` (one string)."""

    texts: list[str] | None = None
    text: str | None = None
    fallback: FallbackPolicy | None = None
    aspects: bool = False  # true: each result carries the aspect opinions it expresses


class ExplainRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class FallbackInfo(msgspec.Struct):
    reason: str  # low_confidence | forced | student_failed
    outcome: str  # ok | unparseable | timeout | error | breaker_open | over_budget | disabled


class AspectResult(msgspec.Struct):
    """One aspect the text expresses an opinion about; span: [start, end) in Unicode code points."""

    aspect: str
    label: Literal["negative", "neutral", "positive"]
    score: float
    span: tuple[int, int]


class SentimentResult(msgspec.Struct):
    label: str
    score: float
    scores: dict[str, float]
    source: Literal["student", "teacher"]
    truncated: bool
    fallback: FallbackInfo | None = None
    aspects: list[AspectResult] | msgspec.UnsetType = msgspec.UNSET  # present only when asked for


class ModelRef(msgspec.Struct):
    name: str
    version: str


class SentimentResponse(msgspec.Struct):
    model: ModelRef
    results: list[SentimentResult]


class TeacherRef(msgspec.Struct):
    model: str


class StudentVerdict(msgspec.Struct):
    label: str
    score: float


class ExplainResponse(msgspec.Struct):
    label: str
    scores: dict[str, float] | None
    rationale: str | None
    teacher: TeacherRef
    student: StudentVerdict


class Health(msgspec.Struct):
    status: str
    details: dict[str, Any] | None = None


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    details: Any = None


class ErrorBody(msgspec.Struct):
    """Every error the service answers: `{"error": {"code", "message", "details"}}`."""

    error: ErrorDetail


class ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A model directory to swap in; none: the configured one, read again."""

    model_dir: str | None = None


class ModelVersion(msgspec.Struct):
    name: str
    version: str
    sha256: str


class ReloadResponse(msgspec.Struct):
    model: ModelVersion
    previous: ModelVersion
    seconds: float
