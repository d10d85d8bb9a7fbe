"""One client for the teacher LLM over the OpenAI-compatible API (llama.cpp, vLLM, Ollama, OpenAI).

Used by the service (fallback, explanations) and by distill/ (labelling, rewrites). It never
raises for a teacher's failure: every call returns an outcome (ok, unparseable, timeout, error),
so callers decide what a failure means. Answers are parsed strictly: an off-set label is
"unparseable", never a guess.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from service.artifact import LABELS
from service.prompts import (
    DEFAULT_EXPLAIN_PROMPT,
    DEFAULT_LABEL_PROMPT,
    DEFAULT_REWRITE_PROMPT,
    Prompt,
    parse_aspects,
    parse_label,
    parse_reason,
    quote,
)

OK, UNPARSEABLE, TIMEOUT, ERROR = "ok", "unparseable", "timeout", "error"
# What a well-formed JSON answer of the wrong shape raises when read: caught, never a 500.
OFF_FORMAT = (KeyError, IndexError, TypeError, AttributeError, ValueError, ArithmeticError)
# Grammars for llama.cpp servers: the label (and the explanation's shape) cannot leave the set.
_LABEL_ALTERNATIVES = " | ".join(f'"{label}"' for label in LABELS)
GBNF = {
    "label": f'root ::= " " ({_LABEL_ALTERNATIVES})',
    "explain": f'root ::= " " ({_LABEL_ALTERNATIVES}) "\\nReason: " [^\\n]{{8,300}}',
}


def aspects_grammar(names: list[str]) -> str:
    """llama.cpp grammar for the aspect answer: ` none`, or one to len(names) lines `aspect: label - reason`."""
    aspects = " | ".join(f'"{name}"' for name in names)
    return (f'root ::= " none" | line{{1,{len(names)}}}\n'
            f'line ::= "\\n" ({aspects}) ": " ({_LABEL_ALTERNATIVES}) " - " [^\\n]{{3,100}}')


@dataclass(frozen=True)
class TeacherAnswer:
    outcome: str
    label: str | None = None
    probs: dict[str, float] | None = None
    rationale: str | None = None
    rewrite: str | None = None  # a rewritten text (never logged)
    aspects: dict[str, list[str | None]] | None = None  # aspect -> [label, reason]
    seconds: float = 0.0
    detail: str | None = None


def label_probs(positions: list[list[tuple[str, float]]]) -> dict[str, float] | None:
    """Label distribution from the top logprobs at the first position that starts a label."""
    for candidates in positions:
        mass: dict[str, float] = {}
        for token, logprob in candidates:
            word = str(token).strip().lower()
            if not (isinstance(logprob, int | float) and -math.inf < logprob <= 0):
                continue  # a log probability is finite and at most 0; anything else is off-format
            for label in LABELS:
                if len(word) >= 3 and label.startswith(word):
                    mass[label] = mass.get(label, 0.0) + math.exp(logprob)
        total = sum(mass.values())
        if total > 0:
            return {label: round(mass.get(label, 0.0) / total, 6) for label in LABELS}
    return None


def _positions(choice: dict[str, Any]) -> list[list[tuple[str, float]]]:
    """Top logprobs per generated token, from either the completions or the chat format."""
    logprobs = choice.get("logprobs") or {}
    if logprobs.get("top_logprobs"):
        return [list(top.items()) for top in logprobs["top_logprobs"] if top]
    return [[(c["token"], c["logprob"]) for c in item.get("top_logprobs") or []]
            for item in logprobs.get("content") or []]


class TeacherClient:
    """Async OpenAI-compatible client with timeouts and one retry. Callers bound their own concurrency
    (the service's fallback admission, distill's labelling semaphore): one limit, held where it is known."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, api: str = "completions",
                 constraint: str = "none", timeout: float = 10.0, retries: int = 1,
                 max_connections: int = 8) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api, self.constraint, self.timeout, self.retries = api, constraint, timeout, retries
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        try:
            response = await self._http.get("/v1/models", timeout=2.0)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def classify(self, text: str, prompt: Prompt = DEFAULT_LABEL_PROMPT,
                       timeout: float | None = None) -> TeacherAnswer:
        return await self._ask(prompt, text, prompt.task, timeout)

    async def explain(self, text: str, prompt: Prompt = DEFAULT_EXPLAIN_PROMPT,
                      timeout: float | None = None) -> TeacherAnswer:
        return await self._ask(prompt, text, prompt.task, timeout)

    async def aspects(self, text: str, prompt: Prompt, names: list[str],
                      timeout: float | None = None) -> TeacherAnswer:
        """The teacher's aspect-level analysis: {aspect: [label, reason]}, parsed strictly."""
        reply = await self._complete(prompt, text, timeout, {"grammar": aspects_grammar(names)}
                                     if self.constraint == "gbnf" else {})
        if isinstance(reply, TeacherAnswer):
            return reply
        _, answer, seconds = reply
        parsed = parse_aspects(answer.strip().removeprefix(prompt.answer_prefix), names)
        if parsed is None:
            return TeacherAnswer(outcome=UNPARSEABLE, seconds=seconds, detail="answer is not aspect lines or none")
        return TeacherAnswer(outcome=OK, aspects={a: [lab, why] for a, (lab, why) in parsed.items()}, seconds=seconds)

    async def rewrite(self, text: str, label: str, prompt: Prompt = DEFAULT_REWRITE_PROMPT,
                      timeout: float | None = None) -> TeacherAnswer:
        """The text rewritten with its sentiment made clearer (an augmented training example)."""
        messages = [{"role": "system", "content": prompt.system.format(label=label)},
                    {"role": "user", "content": quote(text)}]
        started = time.perf_counter()
        body = {"messages": messages, "max_tokens": prompt.max_tokens, "temperature": 0.0}
        data, failure = await self._post("/v1/chat/completions", body, timeout)
        seconds = time.perf_counter() - started
        if failure:
            return TeacherAnswer(outcome=failure[0], detail=failure[1], seconds=seconds)
        try:
            answer = " ".join(str(data["choices"][0]["message"].get("content") or "").split()).strip('"')
        except OFF_FORMAT:
            return TeacherAnswer(outcome=UNPARSEABLE, seconds=seconds, detail="response without a message")
        if len(answer) < 3 or answer.lower() == text.lower().strip() or len(answer) > 4 * len(text) + 200:
            return TeacherAnswer(outcome=UNPARSEABLE, seconds=seconds, detail="empty, unchanged or runaway")
        return TeacherAnswer(outcome=OK, label=label, rewrite=answer, seconds=seconds)

    async def _complete(self, prompt: Prompt, text: str, timeout: float | None, extra: dict[str, Any],
                        logprobs: bool = False) -> tuple[dict[str, Any], str, float] | TeacherAnswer:
        """One few-shot call in the configured API: (choice, answer text, seconds), or the failure."""
        started = time.perf_counter()
        body: dict[str, Any] = {"max_tokens": prompt.max_tokens, "temperature": 0.0, **extra}
        if self.api == "chat":
            path, body["messages"] = "/v1/chat/completions", prompt.chat(text)
            if logprobs:
                body["logprobs"], body["top_logprobs"] = True, 5
        else:
            path, body["prompt"], body["stop"] = "/v1/completions", prompt.completion(text), ["\n\n", "\nMessage:"]
            if logprobs:
                body["logprobs"] = 5
        data, failure = await self._post(path, body, timeout)
        seconds = time.perf_counter() - started
        if failure:
            return TeacherAnswer(outcome=failure[0], detail=failure[1], seconds=seconds)
        try:
            choice = data["choices"][0]
            answer = str((choice["text"] if self.api != "chat" else choice["message"]["content"]) or "")
        except OFF_FORMAT:
            return TeacherAnswer(outcome=UNPARSEABLE, seconds=seconds, detail="response without choices")
        return choice, answer, seconds

    async def _ask(self, prompt: Prompt, text: str, task: str, timeout: float | None) -> TeacherAnswer:
        extra: dict[str, Any] = {}
        if self.constraint == "gbnf":
            extra["grammar"] = GBNF[task]
        elif self.constraint == "vllm" and task == "label":
            extra["guided_choice"] = [f" {label}" for label in LABELS]
        reply = await self._complete(prompt, text, timeout, extra, logprobs=True)
        if isinstance(reply, TeacherAnswer):
            return reply
        choice, answer, seconds = reply
        label = parse_label(answer)
        if label is None:
            return TeacherAnswer(outcome=UNPARSEABLE, seconds=seconds, detail="answer outside the label set")
        try:
            probs = label_probs(_positions(choice))
        except OFF_FORMAT:  # the label stands; only its probabilities were off-format
            probs = None
        rationale = parse_reason(answer) if task == "explain" else None
        return TeacherAnswer(outcome=OK, label=label, probs=probs, rationale=rationale, seconds=seconds)

    async def _post(self, path: str, body: dict[str, Any],
                    timeout: float | None) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """POST with one retry on connection errors and 5xx; (data, None) or ({}, (outcome, detail))."""
        body = {"model": self.model, **body}
        deadline = time.perf_counter() + (timeout or self.timeout)
        failure = (ERROR, "not attempted")
        for attempt in range(self.retries + 1):
            left = deadline - time.perf_counter()
            if left <= 0.005:
                return {}, (TIMEOUT, "deadline passed")
            try:
                response = await self._http.post(path, json=body, timeout=left)
            except httpx.TimeoutException:
                return {}, (TIMEOUT, f"no answer within {timeout or self.timeout:.3f}s")
            except httpx.HTTPError as exc:
                failure = (ERROR, f"{type(exc).__name__}")
            else:
                if response.status_code < 400:
                    try:
                        return response.json(), None
                    except ValueError:
                        return {}, (UNPARSEABLE, "response is not JSON")
                failure = (ERROR, f"HTTP {response.status_code}")
                if response.status_code < 500:
                    return {}, failure
            if attempt < self.retries:
                await asyncio.sleep(min(0.05 * (attempt + 1), max(0.0, deadline - time.perf_counter())))
        return {}, failure
