"""Teacher fallback for low-confidence texts, kept inside a budget so the student path stays fast.

The budget: a cap on teacher calls in flight, a cap on the share of recent texts that may fall
back, a teacher deadline inside the request deadline, and a circuit breaker (opens after N
consecutive failures, lets one half-open probe through after a pause). Whatever happens to the
teacher, the caller gets the student's answer, marked with the fallback's outcome: never an error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

from service.hard_cases import HardCaseLog
from service.metrics import Metrics
from service.runner import Prediction
from service.teacher import OK, UNPARSEABLE, TeacherAnswer, TeacherClient

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
BUSY = "busy"  # an explanation refused at admission: as many are in flight as the teacher may take
BREAKER_GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    def __init__(self, failures: int, reset_after: float, metrics: Metrics) -> None:
        self.threshold, self.reset_after, self._metrics = failures, reset_after, metrics
        self.state, self.failures, self.opened_at = CLOSED, 0, 0.0
        self._probe_in_flight = False
        self.held = False

    def hold_open(self, held: bool) -> None:
        """While the supervisor knows the teacher is down, refuse every call; closed again once it answers."""
        if held == self.held:
            return
        self.held, self.failures, self._probe_in_flight = held, 0, False
        self._set(OPEN if held else CLOSED)

    def allow(self) -> bool:
        if self.held:
            return False
        if self.state == OPEN and time.monotonic() - self.opened_at >= self.reset_after:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN:
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        return self.state != OPEN

    def abandon(self) -> None:
        """A call that ended without an answer (cancelled): it frees the half-open probe's slot."""
        self._probe_in_flight = False

    def record(self, success: bool) -> None:
        self._probe_in_flight = False
        if self.held:
            return
        if success:
            self.failures = 0
            self._set(CLOSED)
            return
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            self._set(OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        self._metrics.breaker_state.set(BREAKER_GAUGE[state])


class ShareWindow:
    """Share of the last `size` texts that went to the teacher."""

    def __init__(self, max_share: float, size: int = 500) -> None:
        self.max_share = max_share
        self._window: deque[bool] = deque(maxlen=size)

    def observe(self, count: int) -> None:
        self._window.extend([False] * count)

    def try_take(self) -> bool:
        taken = sum(self._window)
        if taken + 1 > max(1.0, self.max_share * len(self._window)):
            return False
        # Mark one of the observed texts as a fallback (the newest unmarked one).
        for i in range(len(self._window) - 1, -1, -1):
            if not self._window[i]:
                self._window[i] = True
                break
        return True


def teacher_prediction(answer: TeacherAnswer, labels: list[str]) -> Prediction:
    """The teacher's answer as a prediction: its probabilities where it gave them, else one-hot."""
    assert answer.label is not None
    scores = answer.probs or {label: float(label == answer.label) for label in labels}
    return Prediction(label=answer.label, score=round(scores[answer.label], 6), scores=scores)


@dataclass(frozen=True)
class FallbackDecision:
    prediction: Prediction
    source: str
    reason: str | None = None
    outcome: str | None = None


class Fallback:
    def __init__(self, client: TeacherClient | None, metrics: Metrics, *, threshold: float, max_concurrency: int,
                 max_share: float, teacher_timeout: float, breaker_failures: int, breaker_reset: float,
                 explain_max_concurrency: int = 2, hard_cases: HardCaseLog | None = None) -> None:
        self.client, self._metrics = client, metrics
        self.threshold, self.teacher_timeout = threshold, teacher_timeout
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset, metrics)
        self.share = ShareWindow(max_share)
        self._slots, self._explain_slots = max_concurrency, explain_max_concurrency
        self._in_flight = self._explaining = 0
        self._hard_cases = hard_cases
        metrics.breaker_state.set(0)

    def reason_for(self, prediction: Prediction, policy: str) -> str | None:
        if policy == "always":
            return "forced"
        if policy == "auto" and prediction.score < self.threshold:
            return "low_confidence"
        return None

    async def decide(self, texts: list[str], predictions: list[Prediction], policy: str,
                     deadline: float) -> list[FallbackDecision]:
        """Student predictions in, final answers out (in order), each marked with its source."""
        self.share.observe(len(texts))
        reasons = [self.reason_for(p, policy) for p in predictions]
        decisions = [FallbackDecision(p, "student") for p in predictions]
        asked = [i for i, reason in enumerate(reasons) if reason]
        if asked:  # most requests ask nothing: no task and no extra turn of the event loop for them
            answers = await asyncio.gather(*(self._one(texts[i], predictions[i], reasons[i], deadline) for i in asked))
            for i, decision in zip(asked, answers, strict=True):
                decisions[i] = decision
        return decisions

    async def _one(self, text: str, student: Prediction, reason: str, deadline: float) -> FallbackDecision:
        outcome, answer = await self.ask(text, deadline, forced=reason == "forced")
        self._metrics.fallbacks.labels(reason, outcome).inc()
        if answer is None or outcome != OK:
            return FallbackDecision(student, "student", reason, outcome)
        self._record_hard_case(text, student, answer, reason)
        return FallbackDecision(teacher_prediction(answer, list(student.scores)), "teacher", reason, outcome)

    async def ask(self, text: str, deadline: float, forced: bool = False) -> tuple[str, TeacherAnswer | None]:
        """One budgeted label call: (outcome, answer). Budget refusals never reach the teacher."""
        if self.client is None:
            return "disabled", None
        if self._in_flight >= self._slots:
            self._metrics.budget_rejections.labels("concurrency").inc()
            return "over_budget", None
        if not forced and not self.share.try_take():
            self._metrics.budget_rejections.labels("share").inc()
            return "over_budget", None
        timeout = min(self.teacher_timeout, deadline - time.perf_counter() - 0.01)
        if timeout <= 0.01:
            self._metrics.budget_rejections.labels("deadline").inc()
            return "timeout", None
        if not self.breaker.allow():
            return "breaker_open", None
        self._in_flight += 1
        try:
            answer = await self._call("label", self.client.classify(text, timeout=timeout))
        finally:
            self._in_flight -= 1
        return answer.outcome, answer

    async def explain(self, text: str, timeout: float) -> TeacherAnswer:
        """An explanation call behind the same breaker and its own admission bound (no share budget: it is
        asked for explicitly). Refused at once when full, never queued: a queued call would time out."""
        if self.client is None:
            return TeacherAnswer(outcome="disabled")
        if self._explaining >= self._explain_slots:
            self._metrics.budget_rejections.labels("explain_concurrency").inc()
            return TeacherAnswer(outcome=BUSY)
        if not self.breaker.allow():
            return TeacherAnswer(outcome="breaker_open")
        self._explaining += 1
        try:
            return await self._call("explain", self.client.explain(text, timeout=timeout))
        finally:
            self._explaining -= 1

    async def _call(self, task: str, call: Awaitable[TeacherAnswer]) -> TeacherAnswer:
        """One teacher call the breaker allowed: its answer is accounted for, or its probe slot freed."""
        try:
            answer = await call
        except BaseException:
            self.breaker.abandon()
            raise
        self._metrics.teacher_duration.labels(task).observe(answer.seconds)
        # A teacher that answers off-label is reachable: only timeouts and errors count against it.
        self.breaker.record(answer.outcome in (OK, UNPARSEABLE))
        if answer.outcome != OK:
            self._metrics.teacher_errors.labels(task, answer.outcome).inc()
        return answer

    def _record_hard_case(self, text: str, student: Prediction, answer: TeacherAnswer, reason: str) -> None:
        """Opt-in (it stores customer text): distill/ reads this log as extra training data."""
        if self._hard_cases is None:
            return
        self._hard_cases.record({
            "time": time.time(), "text": text, "reason": reason,
            "student": {"label": student.label, "scores": student.scores},
            "teacher": {"model": self.client.model if self.client else None, "label": answer.label,
                        "probs": answer.probs}})
