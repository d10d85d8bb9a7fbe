"""Held-out evaluation of ONNX models and the release gate (int8 must agree with fp32)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.data import Example
from distill.metrics import evaluate_by_source, softmax
from service.runner import cpu_session
from service.tokenization import TextEncoder


@dataclass(frozen=True)
class GateLimits:
    min_agreement: float = 0.995
    max_accuracy_drop: float = 0.005


def onnx_logits(model: Path | str | bytes, encoder: TextEncoder, texts: Sequence[str],
                batch_size: int = 32) -> np.ndarray:
    """Logits for every text, batched by length (the order of `texts` is kept); `model`: a file, or a
    model's bytes (Artifact.model_source)."""
    session = cpu_session(model)
    inputs = {i.name for i in session.get_inputs()}
    encoded = encoder.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i].ids))
    out = np.zeros((len(texts), 3), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = session.run(None, encoder.feeds([encoded[i].ids for i in idx], inputs))[0]
    return out


def evaluation_table(logits: np.ndarray, examples: Sequence[Example], temperature: float) -> dict[str, Any]:
    return evaluate_by_source(softmax(logits, temperature), [ex.label for ex in examples],
                              [ex.source for ex in examples])


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


def gate(fp32_logits: np.ndarray, int8_logits: np.ndarray, examples: Sequence[Example],
         limits: GateLimits) -> dict[str, Any]:
    """Label agreement over all held-out texts and accuracy drop per source; `passed` says it all."""
    fp32 = evaluation_table(fp32_logits, examples, 1.0)
    int8 = evaluation_table(int8_logits, examples, 1.0)
    drops = {source: round(fp32[source]["accuracy"] - int8[source]["accuracy"], 4) for source in fp32}
    agree = agreement(fp32_logits, int8_logits)
    failures = []
    if agree < limits.min_agreement:
        failures.append(f"int8/fp32 label agreement {agree:.4f} < {limits.min_agreement}")
    failures += [f"{source}: accuracy drop {drop:.4f} > {limits.max_accuracy_drop}"
                 for source, drop in drops.items() if drop > limits.max_accuracy_drop]
    return {"passed": not failures, "failures": failures, "agreement": round(agree, 4),
            "accuracy_drop": drops, "limits": {"min_agreement": limits.min_agreement,
                                               "max_accuracy_drop": limits.max_accuracy_drop}}
