"""The scoring service: request-level logic between the thin routes and the engine / fallback / teacher.

It owns the lifetime of everything it builds (`async with Scorer.started(...)`): the student engine
(and its successor on a hot reload), the teacher client and, when no teacher URL is configured, the
supervised embedded teacher; it reports draining when the server is about to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.artifact import LABELS, Artifact, ArtifactError, load_artifact
from service.aspects import AspectClause, AspectModel, AspectOpinion, SentenceEncoder
from service.drain import install_drain_handler
from service.engine import Engine
from service.errors import ErrorKind, ServiceError
from service.fallback import BUSY, Fallback, FallbackDecision, teacher_prediction
from service.hard_cases import HardCaseLog
from service.layout import available_cores
from service.metrics import Metrics
from service.runner import ModelRunner, Prediction
from service.settings import Settings
from service.taxonomy import Taxonomy
from service.teacher import OK, TeacherAnswer, TeacherClient
from service.teacher_process import READY, STARTING, EmbeddedTeacher

log = logging.getLogger("sentiment.scoring")


@dataclass(frozen=True)
class Scored:
    decision: FallbackDecision
    truncated: bool
    aspects: list[AspectOpinion] | None = None  # None: not asked for


class Scorer:
    def __init__(self, settings: Settings, artifact: Artifact, metrics: Metrics,
                 taxonomy: Taxonomy | None = None) -> None:
        self.settings, self.artifact, self.metrics, self.taxonomy = settings, artifact, metrics, taxonomy
        self.aspects: AspectModel | None = None  # with a taxonomy: loaded beside the engine, before ready
        # Clauses run one per call (service/aspects.py), too short for intra-op threads to help: one ORT
        # thread per call, and one call in flight per core.
        self._aspect_executor = ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="aspects")
        self.engine: Engine | None = None
        self.teacher: TeacherClient | None = None
        self.fallback: Fallback | None = None
        self.ready = False
        self.draining = False
        self.embedded_teacher: EmbeddedTeacher | None = None  # when this process runs its own teacher
        self.teacher_missing: str | None = None  # why there is no teacher although one is enabled
        self.hard_cases: HardCaseLog | None = None
        self._engine_stack = contextlib.AsyncExitStack()
        self._reload_lock = asyncio.Lock()
        self._student_warm = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, settings: Settings, artifact: Artifact, metrics: Metrics,
                      taxonomy: Taxonomy | None = None) -> AsyncIterator[Scorer]:
        scorer = cls(settings, artifact, metrics, taxonomy)
        tasks: list[asyncio.Task[None]] = []
        stop = asyncio.Event()
        engine_task: asyncio.Task[None] | None = None
        try:
            scorer.teacher = scorer._teacher_client()
            scorer.fallback = scorer._fallback(scorer.teacher)
            metrics.teacher_enabled.set(int(settings.teacher_enabled))
            metrics.teacher_up.set(int(scorer.teacher is not None))
            if scorer.embedded_teacher:
                scorer._teacher_changed(scorer.embedded_teacher)
                tasks.append(asyncio.create_task(scorer._supervise_teacher(), name="teacher-supervisor"))
            scorer._publish_model_info()
            install_drain_handler(scorer.start_draining)
            engine_task = asyncio.create_task(scorer._serve_student(stop), name="student")
            yield scorer
        finally:
            scorer.ready, scorer.draining = False, True
            metrics.ready.set(0)
            stop.set()  # the engine drains its queue and closes
            if engine_task:
                if scorer.engine is None:
                    engine_task.cancel()  # still warming up: nothing to drain
                await asyncio.gather(engine_task, return_exceptions=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if scorer.teacher:
                await scorer.teacher.aclose()
            if scorer.embedded_teacher:
                await asyncio.to_thread(scorer.embedded_teacher.stop)
            if scorer.hard_cases:
                await scorer.hard_cases.aclose()
            scorer._aspect_executor.shutdown(wait=False, cancel_futures=True)

    def start_draining(self) -> None:
        """Readiness turns 503 so load balancers stop sending; requests are still served until shutdown."""
        if not self.draining:
            self.draining = True
            self.metrics.ready.set(0)
            log.info("draining: readiness is 503 from now on")

    def _publish_model_info(self) -> None:
        m, variant = self.artifact.manifest, self.artifact.variant
        self.metrics.model_info.info({"name": m.name, "version": m.version, "sha256": variant.sha256[:16],
                                      "variant": variant.name,
                                      "quantization": str(variant.quantization.get("mode", "none"))})
        log.info("model variant chosen", extra={"variant": variant.name, "file": variant.file,
                                                "reason": self.artifact.reason})

    async def _serve_student(self, stop: asyncio.Event) -> None:
        """Start the engine (layout, warm-up), report ready, and keep it (or its reloaded successor) until
        `stop`."""
        self._engine_stack = contextlib.AsyncExitStack()
        try:
            self.engine = await self._engine_stack.enter_async_context(
                Engine.started(self.artifact, self.settings, self.metrics))
            if self.taxonomy:
                self.aspects = await asyncio.to_thread(self._aspect_model, self.engine.runner)
            settle_heap()
            self.ready = True
            self.metrics.ready.set(1)
            self._student_warm.set()
            log.info("model ready", extra={"model": self.artifact.manifest.name})
            await stop.wait()
        except Exception:
            log.exception("the model could not be started; the service stays not ready")
            raise
        finally:
            await self._engine_stack.aclose()

    async def _supervise_teacher(self) -> None:
        """The embedded teacher starts once the student is warm. Loading it beside the layout's calibration
        skewed what it measured, unevenly, so noise chose the budget: on the AVX2 Zen 3 one start picked
        512-token batches, and the best measured was 309 texts/s against 538 in the next start, deferred."""
        assert self.embedded_teacher is not None
        await self._student_warm.wait()
        await self.embedded_teacher.supervise()

    async def reload(self, model_dir: Path) -> tuple[Artifact, Artifact]:
        """Swap in another model with no failed request: verify it, warm a new engine with the layout in
        use, switch to it, then retire the old engine once the requests holding it are done. A bad
        artefact is refused (INVALID_MODEL) and the old model keeps serving. Returns (old, new) artefacts."""
        async with self._reload_lock:
            current, _ = self._require_ready()
            try:
                artifact = await asyncio.to_thread(load_artifact, model_dir, True, self.settings.model_variant)
            except ArtifactError as exc:
                raise ServiceError(ErrorKind.INVALID_MODEL, str(exc)) from None
            layout = current.layout
            fixed = dataclasses.replace(self.settings, layout=layout.shape, max_batch_tokens=layout.batch_tokens,
                                        backlog_batch_tokens=layout.backlog_tokens)
            stack = contextlib.AsyncExitStack()
            try:
                engine = await stack.enter_async_context(Engine.started(artifact, fixed, self.metrics))
            except Exception as exc:  # ONNX Runtime could not load or run it: the admin's artefact, not a bug
                log.warning("reload refused", extra={"model_dir": str(model_dir), "error_type": type(exc).__name__})
                raise ServiceError(ErrorKind.INVALID_MODEL, f"{model_dir}: the model could not be loaded and run",
                                   {"error_type": type(exc).__name__}) from None
            aspects = await asyncio.to_thread(self._aspect_model, engine.runner) if self.aspects else None
            previous, retiring = self.artifact, self._engine_stack
            self.engine, self.artifact, self._engine_stack, self.aspects = engine, artifact, stack, aspects
            self._publish_model_info()
            log.info("model reloaded", extra={"model": artifact.manifest.name, "version": artifact.manifest.version})
            await retiring.aclose()
            settle_heap()
            return previous, artifact

    def _aspect_model(self, student: ModelRunner) -> AspectModel:
        """The encoder with the taxonomy's phrases embedded, and the student's polarity prior per aspect
        (measured on each aspect's own terms; remeasured when the student is reloaded)."""
        assert self.taxonomy is not None
        encoder = (self.aspects.encoder if self.aspects
                   else SentenceEncoder(self.settings.aspect_model_dir, threads=1))
        model = AspectModel(encoder, self.taxonomy)
        model.measure_priors(student)
        model.locate(["The parcel came late, but the support team was great."])  # warm the encoder
        for aspect in self.taxonomy.names:  # every series exists from the start: dashboards see zeros
            for label in ("negative", "positive"):
                self.metrics.aspect_predictions.labels(aspect, label)
        log.info("aspects ready", extra={"taxonomy": self.taxonomy.version, "aspects": len(self.taxonomy.aspects),
                                         "threshold": model.threshold,
                                         "encoder_weights": encoder.load_weights_as or "as stored"})
        return model

    def _teacher_client(self) -> TeacherClient | None:
        """The teacher client: to SENTIMENT_TEACHER_URL, or to an embedded teacher supervised in the
        background. The service does not wait for it: until it answers, the breaker is held open."""
        s = self.settings
        if not s.teacher_enabled:
            return None
        url, model, constraint = s.teacher_url, s.teacher_model, s.teacher_constraint
        if not url and importlib.util.find_spec("llama_cpp") is None:
            self.teacher_missing = "SENTIMENT_TEACHER_URL is empty and llama-cpp-python is not installed"
            log.warning("no teacher: %s (the service image carries no embedded teacher); fallback and explain "
                        "answer 503", self.teacher_missing)
            return None
        if not url:
            gguf = Path(s.teacher_gguf) if s.teacher_gguf else None
            self.embedded_teacher = EmbeddedTeacher(gguf, on_change=self._teacher_changed)
            url, model = self.embedded_teacher.url, model or self.embedded_teacher.model_name
        if constraint == "auto":
            constraint = "gbnf" if self.embedded_teacher else "none"
        return TeacherClient(url, model or "default", s.teacher_api_key or None, api=s.teacher_api,
                             constraint=constraint, timeout=max(s.teacher_timeout_s, s.explain_timeout_s),
                             max_connections=s.fallback_max_concurrency + s.explain_max_concurrency)

    def _teacher_changed(self, teacher: EmbeddedTeacher) -> None:
        """The supervisor's news: the breaker is held open while the embedded teacher is not ready."""
        up = teacher.state == READY
        self.metrics.teacher_up.set(int(up))
        if teacher.state == STARTING and teacher.restarts:
            self.metrics.teacher_restarts.inc()
        if self.fallback:
            self.fallback.breaker.hold_open(not up)

    def teacher_status(self) -> dict[str, object]:
        if self.embedded_teacher:
            return self.embedded_teacher.status()
        return {"state": "external" if self.teacher else "disabled", "restarts": None,
                "last_exit": None if self.teacher else self.teacher_missing}

    def _fallback(self, client: TeacherClient | None) -> Fallback:
        """Always present: without a teacher every fallback it is asked for has the outcome `disabled`."""
        s = self.settings
        if s.hard_cases_path:
            self.hard_cases = HardCaseLog(Path(s.hard_cases_path), int(s.hard_cases_max_mb * 1e6), self.metrics)
        return Fallback(client, self.metrics, threshold=s.fallback_threshold,
                        max_concurrency=s.fallback_max_concurrency, max_share=s.fallback_max_share,
                        explain_max_concurrency=s.explain_max_concurrency,
                        teacher_timeout=s.teacher_timeout_s, breaker_failures=s.breaker_failures,
                        breaker_reset=s.breaker_reset_s, hard_cases=self.hard_cases)

    def _require_ready(self) -> tuple[Engine, Fallback]:
        if not self.ready or not self.engine or not self.fallback:  # draining still serves: see drain.py
            raise ServiceError(ErrorKind.NOT_READY, "model is not ready yet", retry_after=1)
        return self.engine, self.fallback

    async def score(self, texts: list[str], policy: str, aspects: bool = False) -> list[Scored]:
        """The student's verdict per text (or the teacher's, by the fallback policy); with `aspects`, also
        the aspect opinions: the regions the aspect model finds are scored in the same batch as the texts."""
        current, fallback = self._require_ready()
        deadline = time.perf_counter() + self.settings.request_timeout_s
        located = await self._locate(texts, deadline) if aspects else None
        regions, where = _regions(texts, located) if located is not None else ([], [])
        if len(texts) + len(regions) > self.settings.queue_size:  # could never be queued: say so, not 503
            most = self.settings.queue_size - len(texts)
            message = (f"the texts hold {len(regions)} aspect clauses to score, at most {most} with "
                       f"{len(texts)} texts (SENTIMENT_QUEUE_SIZE); send fewer texts per request")
            raise ServiceError(ErrorKind.INVALID_REQUEST, f"aspects: {message}",
                               [{"field": "aspects", "message": message}])
        async with current.in_use() as engine:
            everything = await engine.encode([*texts, *regions])  # the regions ride in the request's batch
            encoded = everything[:len(texts)]
            try:
                predictions = await engine.infer(everything, deadline)
            except ServiceError as exc:
                if exc.kind is not ErrorKind.INTERNAL or self.teacher is None or aspects:
                    raise
                return await self._teacher_only(fallback, texts, encoded, deadline, exc)
        decisions = await fallback.decide(texts, predictions[:len(texts)], policy, deadline)
        for enc, decision in zip(encoded, decisions, strict=True):
            self._observe(enc.ids, enc.truncated, decision)
        if located is None:
            return [Scored(d, enc.truncated) for d, enc in zip(decisions, encoded, strict=True)]
        found = [self._opinions(clauses, [predictions[i] for i in rows]) for clauses, rows in zip(located, where,
                                                                                                  strict=True)]
        return [Scored(d, enc.truncated, opinions)
                for d, enc, opinions in zip(decisions, encoded, found, strict=True)]

    async def _locate(self, texts: list[str], deadline: float) -> list[list[AspectClause]]:
        model = self.aspects
        if model is None:
            raise ServiceError(ErrorKind.INVALID_REQUEST, "aspects: not available on this deployment "
                               "(SENTIMENT_ASPECTS_ENABLED=false)",
                               [{"field": "aspects", "message": "aspect sentiment is switched off here"}])
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(0.0, deadline - started)):
                located = await asyncio.get_running_loop().run_in_executor(self._aspect_executor, model.locate,
                                                                           texts, deadline)
        except TimeoutError:
            raise ServiceError(ErrorKind.DEADLINE, "request deadline exceeded while locating aspects") from None
        self.metrics.aspect_duration.observe(time.perf_counter() - started)
        return located

    def _opinions(self, clauses: list[AspectClause], predictions: list[Prediction]) -> list[AspectOpinion]:
        assert self.aspects is not None
        opinions = self.aspects.opinions(clauses, [np.array([p.scores[label] for label in LABELS])
                                                   for p in predictions])
        for opinion in opinions:
            self.metrics.aspect_predictions.labels(opinion.aspect, opinion.label).inc()
        return opinions

    async def _teacher_only(self, fallback: Fallback, texts, encoded, deadline, error: ServiceError) -> list[Scored]:
        """The student failed: the teacher answers each text, or the request fails with the student's error."""
        answers = await asyncio.gather(*(fallback.ask(text, deadline, forced=True) for text in texts))
        if any(outcome != OK for outcome, _ in answers):
            raise error
        out = []
        for (outcome, answer), enc in zip(answers, encoded, strict=True):
            assert answer is not None
            prediction = teacher_prediction(answer, list(self.artifact.manifest.labels))
            decision = FallbackDecision(prediction, "teacher", "student_failed", outcome)
            self.metrics.fallbacks.labels("student_failed", outcome).inc()
            self._observe(enc.ids, enc.truncated, decision)
            out.append(Scored(decision, enc.truncated))
        return out

    def _observe(self, ids: list[int], truncated: bool, decision: FallbackDecision) -> None:
        m = self.metrics
        m.input_tokens.observe(len(ids))
        m.predictions.labels(decision.prediction.label, decision.source).inc()
        if decision.source == "student":
            m.confidence.observe(decision.prediction.score)
        if truncated:
            m.truncations.inc()

    async def explain(self, text: str) -> tuple[TeacherAnswer, Scored]:
        """The teacher's label and rationale, beside the student's own verdict. The student answers first
        (milliseconds): if it cannot, no teacher call is spent."""
        _, fallback = self._require_ready()
        if fallback.client is None:
            raise ServiceError(ErrorKind.TEACHER_UNAVAILABLE, self.teacher_missing or "no teacher is configured",
                               retry_after=5)
        if fallback.breaker.held:
            status = self.teacher_status()
            raise ServiceError(ErrorKind.TEACHER_UNAVAILABLE, f"the embedded teacher is {status['state']}",
                               status, retry_after=5)
        scored = await self.score([text], "never")
        answer = await fallback.explain(text, self.settings.explain_timeout_s)
        if answer.outcome == "breaker_open":
            raise ServiceError(ErrorKind.TEACHER_UNAVAILABLE, "teacher circuit breaker is open",
                               retry_after=self.settings.breaker_reset_s)
        if answer.outcome == BUSY:
            raise ServiceError(ErrorKind.TEACHER_BUSY, "the teacher is busy with other explanations, retry shortly",
                               {"explanations_in_flight": self.settings.explain_max_concurrency}, retry_after=1)
        if answer.outcome != OK:
            unavailable = answer.outcome in ("timeout", "error")  # 503, retry later; else 502, a bad answer
            raise ServiceError(ErrorKind.TEACHER_UNAVAILABLE if unavailable else ErrorKind.TEACHER_FAILED,
                               f"teacher answer: {answer.outcome}",
                               {"outcome": answer.outcome, "detail": answer.detail},
                               retry_after=2 if unavailable else None)
        return answer, scored[0]


# Python collects its youngest objects every 700 allocations by default: at 64 clients on the AVX2 Zen 3
# that was a collection every 18 requests, each surviving request promoted, and 0.10 ms of collector per
# request. At 10,000: 0.05 ms; 390 against 374 texts/s, one client 7.57 against 8.04 ms and open loop at
# 230/s p99 86 against 105 ms (bench/rates.py, 3 rounds, every round the same way).
YOUNG_COLLECTION_ALLOCATIONS = 10_000


def settle_heap() -> None:
    """Take what start-up built (libraries, the app, the models) out of the cyclic collector's reach, so a
    full collection walks only what requests left behind, and collect the young less often. Under
    open-loop load on the AVX2 Zen 3 a full collection held the GIL, and so the event loop, for 85-120 ms
    (about one every 30 s at 230 requests/s); once frozen, 5 ms. Called again after a reload: the retired
    engine is unfrozen first, so whatever cycles it left can still be collected."""
    gc.set_threshold(YOUNG_COLLECTION_ALLOCATIONS, *gc.get_threshold()[1:])
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _regions(texts: Sequence[str], located: Sequence[list[AspectClause]]) -> tuple[list[str], list[list[int]]]:
    """The region texts to score beyond the request's own texts, and per text the prediction rows of its
    aspect clauses (rows below len(texts) are the texts themselves: a region that is the whole text
    is not scored twice)."""
    rows = {text: i for i, text in reversed(list(enumerate(texts)))}  # a region identical to a text: reused
    extra: list[str] = []
    where = []
    for text, clauses in zip(texts, located, strict=True):
        own = []
        for clause in clauses:
            region = text[clause.region[0]:clause.region[1]]
            if region not in rows:
                rows[region] = len(texts) + len(extra)
                extra.append(region)
            own.append(rows[region])
        where.append(own)
    return extra, where
