"""Service settings from SENTIMENT_* environment variables; every field has a documented default.

README's configuration table is this class: `python -m service --print-settings` prints it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service.layout import parse_shape
from service.taxonomy import DEFAULT_TAXONOMY

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "sentiment-minilm-int8"
DEFAULT_ASPECT_MODEL_DIR = REPO_ROOT / "models" / "aspect-minilm-int8"


def _doc(default: Any, text: str) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class Settings:
    host: str = _doc("127.0.0.1", "address to bind")
    port: int = _doc(8000, "port to bind")
    server: str = _doc("granian", "ASGI server: granian or uvicorn")
    model_dir: Path = _doc(DEFAULT_MODEL_DIR, "model artefact directory (model.onnx, tokenizer.json, manifest.json)")
    model_variant: str = _doc("auto", "int8 build to serve: auto (the fastest this CPU runs exactly) or a name "
                              "from the manifest's variants, e.g. portable")
    layout: str = _doc("auto", "inference streams x ORT threads, e.g. 2x1; auto: measured at warm-up on this CPU")
    warmup_rounds: int = _doc(3, "warm-up passes over every padded width before the service reports ready")
    lone_spin: bool = _doc(True, "the every-core session's threads spin between operators while a lone "
                           "request runs (10 us at most, never between runs): ~0.6-1.1 ms off a one-at-a-time "
                           "client; false: they sleep between operators")
    max_batch_size: int = _doc(64, "most texts in one inference call")
    max_batch_tokens: int = _doc(0, "most padded tokens (texts x longest) in one inference call; 0: measured")
    max_batch_ms: float = _doc(25.0, "with batch tokens measured: only budgets whose batches run within this many "
                               "ms on this CPU (a text may wait for one batch, then run in the next); 0: any")
    backlog_batch_tokens: int = _doc(0, "most padded tokens in one call while the queue holds four batches "
                                     "for every stream; 0: measured (twice the budget where it runs as fast here and "
                                     "within twice SENTIMENT_MAX_BATCH_MS; none beside a fixed "
                                     "SENTIMENT_MAX_BATCH_TOKENS); at or below the budget (e.g. 1): batches never grow")
    max_wait_ms: float = _doc(0.0, "longest a batch waits for company while another runs; 0: never (README, "
                                   "Execution layout: waiting 2 ms lengthened the open-loop tail and served no more)")
    queue_size: int = _doc(512, "texts waiting for inference before new requests get 503 + Retry-After")
    drain_delay_s: float = _doc(3.0, "on SIGTERM: seconds of serving with /health/ready at 503 before new "
                                 "connections are refused (SIGINT: none)")
    worker_stop_timeout_s: int = _doc(15, "granian: seconds a stopping worker gets (finishing its queue, stopping "
                                      "the teacher) before the master kills it, so no stop can hang")
    request_timeout_s: float = _doc(5.0, "request deadline; past it the answer is 504 (408: the body did not arrive)")
    max_texts: int = _doc(64, "most texts in one request")
    max_text_chars: int = _doc(10_000, "longest text in characters")
    max_body_bytes: int = _doc(1_048_576, "largest request body")
    api_keys: tuple[str, ...] = _doc((), "comma-separated API keys; empty: no authentication")
    admin_key: str = _doc("", "bearer key for /admin routes (model reload); empty: no admin routes")
    teacher_url: str = _doc("", "OpenAI-compatible base URL of the teacher; empty: start the embedded one")
    teacher_model: str = _doc("", "teacher model name (empty: the embedded teacher's)")
    teacher_api_key: str = _doc("", "bearer token for the teacher")
    teacher_gguf: str = _doc("", "GGUF file for the embedded teacher (empty: the packaged SmolLM2-135M-Instruct)")
    teacher_api: str = _doc("completions", "teacher API: completions (few-shot) or chat")
    teacher_constraint: str = _doc("auto", "label constraint: gbnf (llama.cpp), vllm, none; auto: gbnf if embedded")
    teacher_enabled: bool = _doc(True, "false: no teacher at all (fallback and explain answer 503)")
    teacher_timeout_s: float = _doc(2.0, "teacher deadline inside the request deadline")
    explain_timeout_s: float = _doc(20.0, "deadline of an explanation call")
    fallback: str = _doc("never", "default fallback policy: auto, never or always")
    fallback_threshold: float = _doc(0.6, "auto: below this student confidence the teacher decides")
    fallback_max_concurrency: int = _doc(2, "teacher calls in flight at once")
    explain_max_concurrency: int = _doc(2, "explanations in flight at once; more get 503 + Retry-After at once")
    fallback_max_share: float = _doc(0.2, "most share of recent texts that may go to the teacher")
    breaker_failures: int = _doc(3, "consecutive teacher failures that open the circuit breaker")
    breaker_reset_s: float = _doc(10.0, "seconds the breaker stays open before one half-open probe")
    hard_cases_path: str = _doc("", "JSONL file to append fallback texts and teacher answers to (stores customer text)")
    hard_cases_max_mb: float = _doc(64.0, "size at which the hard-case file is rotated to <path>.1 (two files kept)")
    aspects_enabled: bool = _doc(True, "load the aspect encoder and taxonomy; false: `aspects: true` answers 422")
    aspect_model_dir: Path = _doc(DEFAULT_ASPECT_MODEL_DIR, "sentence encoder for aspect assignment (model.onnx, "
                                  "tokenizer.json, manifest.json)")
    aspect_taxonomy: Path = _doc(DEFAULT_TAXONOMY, "TOML file of aspect names, descriptions and examples")
    log_level: str = _doc("INFO", "log level")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"SENTIMENT_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.default)
        values.update(overrides)
        return cls(**values).validated()

    def validated(self) -> Settings:
        if self.fallback not in ("auto", "never", "always"):
            raise ValueError(f"SENTIMENT_FALLBACK must be auto, never or always, not {self.fallback!r}")
        if self.server not in ("granian", "uvicorn"):
            raise ValueError(f"SENTIMENT_SERVER must be granian or uvicorn, not {self.server!r}")
        parse_shape(self.layout)
        problems = [
            (self.queue_size < self.max_texts,
             f"SENTIMENT_QUEUE_SIZE ({self.queue_size}) is below SENTIMENT_MAX_TEXTS ({self.max_texts}): "
             "a full request could never be queued"),
            (not 0 <= self.fallback_threshold <= 1, "SENTIMENT_FALLBACK_THRESHOLD must be within 0..1"),
            (not 0 <= self.fallback_max_share <= 1, "SENTIMENT_FALLBACK_MAX_SHARE must be within 0..1"),
            (min(self.request_timeout_s, self.teacher_timeout_s, self.explain_timeout_s) <= 0,
             "request, teacher and explain timeouts must be positive"),
            (not 0 <= self.port <= 65535, f"SENTIMENT_PORT {self.port} is not a port number"),
            (self.max_wait_ms < 0 or self.hard_cases_max_mb <= 0,
             "SENTIMENT_MAX_WAIT_MS must be at least 0 and SENTIMENT_HARD_CASES_MAX_MB positive"),
            (self.max_batch_ms < 0, "SENTIMENT_MAX_BATCH_MS must be at least 0"),
            (self.backlog_batch_tokens < 0, "SENTIMENT_BACKLOG_BATCH_TOKENS must be at least 0"),
            (self.worker_stop_timeout_s < 1, "SENTIMENT_WORKER_STOP_TIMEOUT_S must be at least 1"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)
        if self.max_batch_tokens < 0 or min(self.max_batch_size, self.queue_size, self.max_texts,
                                            self.max_text_chars) < 1:
            raise ValueError("batch size, queue size, max texts and max text chars must be at least 1, "
                             "batch tokens at least 0")
        return self

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        return [(f"SENTIMENT_{f.name.upper()}", str(f.default) if f.default != () else "", f.metadata["doc"])
                for f in fields(cls)]


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            word = raw.strip().lower()
            if word not in _BOOLEANS:
                raise ValueError
            return _BOOLEANS[word]
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, tuple):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"SENTIMENT_{name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
    return raw
