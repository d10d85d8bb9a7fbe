"""The model runner: tokenise (pre), ONNX Runtime (core), softmax (post). Synchronous; it knows
nothing of asyncio or HTTP, so the batcher can run it off the event loop and tests can call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.artifact import Artifact
from service.layout import (
    TOKEN_BUDGETS,
    Layout,
    available_cores,
    calibrate,
    calibration_sequences,
    candidate_shapes,
    parse_shape,
)
from service.tokenization import Encoded, TextEncoder
from service.weights import s8_weights


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


# Longest an idle thread of a spinning session spins before it sleeps: the gap between two operators of
# one run is shorter (in-process, 10 us kept the whole gain of spinning: lone text 2.13 against 2.53 ms).
SPIN_US = 10


def session_options(threads: int, spin: bool = False) -> ort.SessionOptions:
    """`threads` ORT threads for one inference (0: one per available core).

    Spinning threads on a shared core doubled latency, so by default they block when idle. `spin` is
    for the session that has every core to itself (a lone request): its threads spin between operators,
    at most SPIN_US before they sleep, and stop when the run ends (`session.force_spinning_stop`), so
    nothing burns CPU between requests. ORT's own spin time held the cores through the gaps the event
    loop needs: open loop at 200 requests/s (2 cores) p99 11.5 ms against 5.8-6.8 ms with 10 us, one
    client ~3.0 ms either way. Against sleeping threads (bench/rates.py, two runs of 3 and 6 rounds) it
    took 0.6-1.1 ms off one client's p50 and moved the open-loop p99 at 50-450/s by less than the rounds
    varied, so it is on by default (SENTIMENT_LONE_SPIN=false turns it off).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    return options


def cpu_session(model: Path | str | bytes, threads: int = 0, spin: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with `session_options`, on a model file or a model's bytes
    (Artifact.model_source: a variant whose weights are re-encoded at load)."""
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, session_options(threads, spin), providers=["CPUExecutionProvider"])
    # ONNX Runtime's Python wrapper keeps a model's bytes for the session's life only to rebuild it when its
    # providers change, which a CPU session never does; the native session holds its own copy. Dropping the
    # reference returns the bytes (34 MB for the student's s8 form) once nothing else holds them.
    session._model_bytes = None
    return session


class ModelRunner:
    def __init__(self, artifact: Artifact, threads: int = 0, spin: bool = False) -> None:
        manifest = artifact.manifest
        self.manifest = manifest
        self.labels = manifest.labels
        self.encoder = TextEncoder(artifact.tokenizer_path, manifest.max_tokens, manifest.head_tokens)
        self.session = cpu_session(artifact.model_source(), threads, spin)
        self._inputs = {item.name for item in self.session.get_inputs()}
        self._temperature = manifest.temperature

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return self.encoder.encode(texts)

    def logits(self, sequences: Sequence[list[int]]) -> np.ndarray:
        return self.session.run(None, self.encoder.feeds(sequences, self._inputs))[0]

    def probabilities(self, sequences: Sequence[list[int]]) -> np.ndarray:
        logits = self.logits(sequences).astype(np.float64) / self._temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predictions(self, probs: np.ndarray) -> list[Prediction]:
        out = []
        for row in probs:
            best = int(row.argmax())
            scores = {label: round(float(p), 6) for label, p in zip(self.labels, row, strict=True)}
            out.append(Prediction(label=self.labels[best], score=scores[self.labels[best]], scores=scores))
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Whole path for one list (warm-up, benchmarks, tests); the service goes through the batcher."""
        return self.predictions(self.probabilities([enc.ids for enc in self.encode(texts)]))

    def warm_up(self) -> None:
        """Run every padded width class once so the first real request pays no allocation cost."""
        for width in (8, 32, 128, self.manifest.max_tokens):
            self.logits([[self.encoder.pad_id] * width] * 2)


def choose_layout(artifact: Artifact, shape: str = "auto", batch_tokens: int = 0, spin_alone: bool = True,
                  max_batch_ms: float = 0, backlog_tokens: int = 0) -> tuple[Layout, dict[int, ModelRunner]]:
    """The layout for this machine and runners by thread count: the layout's own, and one with every core
    for a batch that runs alone (it has the cores to itself, so it spins during its runs unless
    `spin_alone` is false).
    What the settings fix is kept; what they leave open (shape 'auto', batch tokens 0) is measured on
    this CPU (service/layout.py), budgets whose batches take longer than `max_batch_ms` (0: no bound) left out;
    `backlog_tokens` likewise (0: measured with the budget, none beside a fixed one)."""
    cores = available_cores()
    fixed = parse_shape(shape)
    shapes = [fixed] if fixed else candidate_shapes(cores)
    runners = {t: ModelRunner(artifact, threads=t, spin=spin_alone and t == cores)
               for t in sorted({t for _, t in shapes} | {cores})}
    s8_weights.cache_clear()  # the runners' sessions shared the derived bytes, and each holds its own copy
    if fixed and batch_tokens:
        layout = Layout(*fixed, batch_tokens)
    else:
        budgets = (batch_tokens,) if batch_tokens else TOKEN_BUDGETS
        sequences = calibration_sequences(runners[cores].encoder.vocab_size)
        layout = calibrate(runners, shapes, sequences, budgets, max_batch_ms=0 if batch_tokens else max_batch_ms)
    if backlog_tokens:
        grows = backlog_tokens > layout.batch_tokens
        layout = dataclasses.replace(layout, backlog_tokens=backlog_tokens if grows else 0,
                                     backlog_reason="configured (SENTIMENT_BACKLOG_BATCH_TOKENS)")
    return layout, runners
