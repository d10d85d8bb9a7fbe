"""Evaluation figures shared by training, export and the teacher report (numpy only).

A polarity flip (negative read as positive or the reverse) is counted apart from a confusion
with neutral: it is the worse error. Binary sets are scored over negative vs positive only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.artifact import LABELS

NEG, NEU, POS = (LABELS.index(name) for name in ("negative", "neutral", "positive"))
BINARY_SOURCES = frozenset({"imdb", "rotten_tomatoes"})  # human labels are negative / positive only


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def binary_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities renormalised over negative and positive (for binary-labelled sets)."""
    out = np.zeros_like(probs)
    pair = probs[:, [NEG, POS]]
    pair = pair / np.clip(pair.sum(axis=1, keepdims=True), 1e-12, None)
    out[:, NEG], out[:, POS] = pair[:, 0], pair[:, 1]
    return out


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error and the reliability curve (equal-width confidence bins)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, curve = 0.0, []
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if not inside.any():
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += inside.mean() * abs(conf - acc)
        curve.append({"bin": [round(float(low), 2), round(float(high), 2)], "n": int(inside.sum()),
                      "confidence": round(conf, 4), "accuracy": round(acc, 4)})
    return float(ece), curve


def macro_f1(gold: np.ndarray, pred: np.ndarray, classes: Sequence[int]) -> float:
    scores = []
    for cls in classes:
        tp = float(((pred == cls) & (gold == cls)).sum())
        fp = float(((pred == cls) & (gold != cls)).sum())
        fn = float(((pred != cls) & (gold == cls)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def evaluate(probs: np.ndarray, gold_labels: Sequence[str], binary: bool) -> dict[str, Any]:
    """Accuracy, macro-F1, flip and neutral-confusion rates, ECE and its curve."""
    gold = np.array([LABELS.index(label) for label in gold_labels])
    scored = binary_probs(probs) if binary else probs
    pred = scored.argmax(axis=1)
    correct = pred == gold
    polar = (gold != NEU) & (pred != NEU)
    ece, curve = calibration(scored.max(axis=1), correct)
    classes = (NEG, POS) if binary else range(len(LABELS))
    return {
        "n": len(gold),
        "accuracy": round(float(correct.mean()), 4),
        "macro_f1": round(macro_f1(gold, pred, classes), 4),
        "flip_rate": round(float((polar & (pred != gold)).mean()), 4),
        "neutral_confusion_rate": round(float(((gold == NEU) ^ (pred == NEU)).mean()), 4),
        # Read as 3-class, how often a binary set's text is called neutral (a softer miss than a flip).
        "neutral_predicted_rate": round(float((probs.argmax(axis=1) == NEU).mean()), 4),
        "ece": round(ece, 4),
        "calibration_curve": curve,
    }


def evaluate_by_source(probs: np.ndarray, labels: Sequence[str], sources: Sequence[str]) -> dict[str, Any]:
    """`evaluate` per data set, binary sets scored as binary."""
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        groups.setdefault(source, []).append(i)
    return {source: evaluate(probs[idx], [labels[i] for i in idx], source in BINARY_SOURCES)
            for source, idx in sorted(groups.items())}


def fit_temperature(logits: np.ndarray, gold_labels: Sequence[str]) -> float:
    """The temperature minimising negative log-likelihood on held-out logits (1-D golden search)."""
    gold = np.array([LABELS.index(label) for label in gold_labels])

    def nll(log_t: float) -> float:
        probs = softmax(logits, float(np.exp(log_t)))
        return float(-np.log(np.clip(probs[np.arange(len(gold)), gold], 1e-12, None)).mean())

    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return round(float(np.exp((low + high) / 2)), 4)
