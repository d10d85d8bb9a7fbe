"""Aspect-level sentiment: which part of the experience (delivery, price, support, ...) each opinion in a
message is about, and its polarity.

The method (README, "Aspects"; chosen by measurement on distill/aspects/dev.tsv):
1. split the message into clauses: sentences, contrast words (but, however, although, ...), commas, and
   `and` before a new subject ("... and the driver was rude", "... and delivery was fast", "... and
   arrived on time");
2. embed each clause with a sentence encoder (all-MiniLM-L6-v2, int8, mean pooling) and compare it
   with the taxonomy's phrases (name, description terms, examples) and with phrases that name no
   aspect ("thanks", "great job"); a clause carries the aspect whose phrases it is closest to, when
   that similarity reaches the threshold and beats the no-aspect phrases;
3. the student scores each aspect clause's region: the clause with the aspect-less clauses around it
   ("My parcel came early, great job!" is one region), so short verdicts lend their polarity;
4. the student's polarity prior for the aspect (its verdict on the aspect's own opinion-free terms) is
   divided out (`calibrated`); polar regions become `{aspect, label, score, span}`, span = the clause;
   neutral regions mention an aspect without an opinion about it and are left out. Per aspect the most
   confident opinion wins.
A new taxonomy file changes steps 2 and 4 only: no retraining.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.artifact import (
    LABELS,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    ArtifactError,
    cpu_flags,
    runs_exactly,
    sha256_of,
)
from service.runner import ModelRunner, cpu_session
from service.taxonomy import Taxonomy, load_taxonomy
from service.tokenization import TextEncoder
from service.weights import S8_FLAGS, U8_WEIGHTS, shifted_to_s8

# Phrases that name no aspect: a clause closer to these than to any aspect carries none.
NO_ASPECT = ("thank you", "thanks", "great job", "well done", "very impressed", "much appreciated", "love it",
             "I am disappointed", "again", "never again", "I have a question", "hello", "please help",
             "everything was fine", "happy customer", "nothing special", "highly recommend", "awful experience",
             "I love this shop", "you are the best", "worst company ever", "I will never shop here again",
             "happy new year", "have a nice day", "keep up the good work", "I placed an order", "my order number is",
             "I want to return an item", "can you help me", "good morning", "I have an issue with my order")
_CLAUSE_BREAK = re.compile(
    r"(?<=[.!?;:])\s+"  # after a sentence or a semicolon
    r"|\s*,?\s+(?=(?:but|however|although|though|whereas|yet)\b)"  # before a contrast word
    r"|,\s+"  # at a comma
    r"|\s+(?=and\s+(?:the|my|your|their|it|i|we|they|he|she|his|her|our|then|nobody|no)\b)"  # and + new subject
    r"|\s+(?=and\s+(?:\w+\s+)?(?:was|were|is|are|has|had|have|came|arrived|took|kept|broke|stopped|works|worked"
    r"|got|never|still|didn't|doesn't|isn't|wasn't)\b)",  # and + a bare noun and a verb, or a verb alone
    re.IGNORECASE)
_TRIM = ".!?,;:"  # and whitespace


def clauses(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the text's clauses, trimmed of spaces and end punctuation."""
    spans, start = [], 0
    for match in _CLAUSE_BREAK.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for start, end in spans:
        while start < end and (text[start].isspace() or text[start] in _TRIM):
            start += 1
        while end > start and (text[end - 1].isspace() or text[end - 1] in _TRIM):
            end -= 1
        if end > start and any(ch.isalnum() for ch in text[start:end]):
            out.append((start, end))
    return out


@dataclass(frozen=True)
class EncoderManifest:
    name: str
    version: str
    sha256: str
    max_tokens: int
    threshold: float  # cosine similarity an aspect needs (tuned on the dev set for this encoder)
    top_k: int  # an aspect's similarity: the mean of its top-k phrase similarities
    weights: str  # how the int8 file stores its MatMul weights (U8_WEIGHTS, or s8 ones); "" for none (fp32)


def check_aspect_config(model_dir: Path, taxonomy_path: Path) -> Taxonomy:
    """Fail fast, before anything binds: the encoder's files and hash, and the taxonomy file."""
    load_encoder_manifest(model_dir)
    return load_taxonomy(taxonomy_path)


def load_encoder_manifest(directory: Path) -> EncoderManifest:
    for name in (MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory / name}: required file of the aspect encoder is missing")
    try:
        raw = json.loads((directory / MANIFEST_FILE).read_text())
        manifest = EncoderManifest(str(raw["name"]), str(raw["version"]), str(raw["sha256"]), int(raw["max_tokens"]),
                                   float(raw["threshold"]), int(raw["top_k"]),
                                   str(raw.get("quantization", {}).get("weights", "")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{directory / MANIFEST_FILE}: not an aspect encoder manifest ({exc!r})") from None
    actual = sha256_of(directory / MODEL_FILE)
    if actual != manifest.sha256:
        raise ArtifactError(f"{directory / MODEL_FILE}: sha256 {actual[:12]}… does not match the manifest's "
                            f"{manifest.sha256[:12]}…")
    return manifest


class SentenceEncoder:
    """Texts to unit-length sentence embeddings: ONNX Runtime, mean pooling over real tokens.

    One text per ONNX Runtime call: dynamic int8 quantizes activations with one scale per batch tensor,
    so a batched clause's embedding would depend on its neighbours and their padding (on dev that cost a
    point of pair F1 and made answers vary with the request around them). Clauses are short: 1.1 ms each
    on one thread (AMD EPYC Zen 4), where u8 weights are loaded as s8 (service/weights.py): the same
    embeddings to the last bit, against 1.8 ms as stored (bench/aspects.py).
    """

    def __init__(self, directory: Path, threads: int = 0, flags: set[str] | None = None) -> None:
        self.directory = directory
        self.manifest = load_encoder_manifest(directory)
        self.tokens = TextEncoder(directory / TOKENIZER_FILE, self.manifest.max_tokens)
        s8 = self.manifest.weights in U8_WEIGHTS and runs_exactly(S8_FLAGS, cpu_flags() if flags is None else flags)
        self.load_weights_as = "s8" if s8 else ""  # as for the student's variants: "" is as stored
        self.session = cpu_session(shifted_to_s8(directory / MODEL_FILE) if s8 else directory / MODEL_FILE, threads)
        self._inputs = {item.name for item in self.session.get_inputs()}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts) × dim) unit vectors; each text alone through the model (see the class docstring)."""
        rows = [self._embed_one(enc.ids) for enc in self.tokens.encode(texts)]
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def _embed_one(self, ids: list[int]) -> np.ndarray:
        pooled = self.session.run(None, self.tokens.feeds([ids], self._inputs))[0][0].mean(axis=0)
        return pooled / max(float(np.linalg.norm(pooled)), 1e-12)


@dataclass(frozen=True)
class AspectClause:
    """One clause that carries an aspect: its span, and the region the student scores for it."""

    aspect: str
    span: tuple[int, int]
    region: tuple[int, int]
    similarity: float


@dataclass(frozen=True)
class AspectOpinion:
    aspect: str
    label: str
    score: float
    span: tuple[int, int]


class AspectModel:
    """A sentence encoder and a taxonomy's phrase embeddings (computed once, at start-up)."""

    def __init__(self, encoder: SentenceEncoder, taxonomy: Taxonomy) -> None:
        self.encoder, self.taxonomy = encoder, taxonomy
        self.threshold = taxonomy.threshold if taxonomy.threshold is not None else encoder.manifest.threshold
        self.top_k = encoder.manifest.top_k
        groups = [aspect.phrases() for aspect in taxonomy.aspects]
        groups.append(list(dict.fromkeys([*NO_ASPECT, *taxonomy.no_aspect_examples])))  # the last group: none
        phrases = [phrase for group in groups for phrase in group]
        self._phrases = encoder.embed(phrases)
        self._owner = np.repeat(np.arange(len(groups)), [len(group) for group in groups])
        self._groups = len(groups)
        self._priors: dict[str, np.ndarray] = {}

    def measure_priors(self, student: ModelRunner) -> None:
        """Per aspect, the student's mean (negative, neutral, positive) over the aspect's opinion-free terms
        (its name and description terms): the polarity prior `opinions` divides out."""
        for aspect in self.taxonomy.aspects:
            terms = [aspect.name.replace("_", " "), *filter(None, (t.strip() for t in re.split(r"[,;:]",
                                                                                         aspect.description)))]
            self._priors[aspect.name] = student.probabilities([e.ids for e in student.encode(terms)]).mean(axis=0)

    def opinions(self, located: Sequence[AspectClause], probs: Sequence[np.ndarray]) -> list[AspectOpinion]:
        """Polar opinions, one per aspect (the most confident), in text order; `probs` are the student's
        (negative, neutral, positive) for each clause's region, calibrated here per aspect."""
        best: dict[str, AspectOpinion] = {}
        for clause, row in zip(located, probs, strict=True):
            prior = self._priors.get(clause.aspect)
            row = calibrated(row, prior) if prior is not None else row
            index = int(row.argmax())
            if LABELS[index] == "neutral":
                continue
            score = round(float(row[index]), 6)
            if clause.aspect not in best or score > best[clause.aspect].score:
                best[clause.aspect] = AspectOpinion(clause.aspect, LABELS[index], score, clause.span)
        return sorted(best.values(), key=lambda opinion: opinion.span)

    def similarities(self, embeddings: np.ndarray) -> np.ndarray:
        """(clauses × aspects+1): per group, the mean of the clause's top-k phrase similarities."""
        sims = embeddings @ self._phrases.T
        out = np.empty((len(embeddings), self._groups), dtype=np.float32)
        for group in range(self._groups):
            columns = np.sort(sims[:, self._owner == group], axis=1)
            out[:, group] = columns[:, -self.top_k:].mean(axis=1)
        return out

    def locate(self, texts: Sequence[str], deadline: float = math.inf) -> list[list[AspectClause]]:
        """Per text, its aspect clauses with their regions (step 1-3 of the method, without the student).
        Past `deadline` (time.perf_counter()) it stops between texts with TimeoutError: a request already
        answered 504 does not keep an encoder thread busy."""
        out = []
        for text in texts:
            if time.perf_counter() > deadline:
                raise TimeoutError("aspect deadline passed")
            spans = clauses(text)
            if not spans:
                out.append([])
                continue
            scores = self.similarities(self.encoder.embed([text[s:e] for s, e in spans]))
            found: list[tuple[int, int, float]] = []  # (clause index, aspect index, similarity)
            for i in range(len(spans)):
                best = int(scores[i, :-1].argmax())
                similarity = float(scores[i, best])
                if similarity >= self.threshold and similarity > scores[i, -1]:
                    found.append((i, best, similarity))
            out.append([self._clause(spans, found, n) for n in range(len(found))])
        return out

    def _clause(self, spans: list[tuple[int, int]], found: list[tuple[int, int, float]], n: int) -> AspectClause:
        """The n-th aspect clause, its region reaching over the aspect-less clauses on both sides (trimmed
        like a clause: on dev, the text's end punctuation in the region cost a point of pair F1)."""
        index, aspect, similarity = found[n]
        first = found[n - 1][0] + 1 if n else 0
        last = found[n + 1][0] - 1 if n + 1 < len(found) else len(spans) - 1
        return AspectClause(self.taxonomy.aspects[aspect].name, spans[index],
                            (spans[first][0], spans[last][1]), similarity)


def calibrated(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The student's (negative, neutral, positive) with its polarity prior for the aspect divided out.

    The prior is the student's own verdict on the aspect's opinion-free terms ("refunds", "shipping"):
    trained on reviews and tweets, it reads "refund" as negative before any opinion is expressed. Negative
    and positive are rescaled by it and keep their joint mass; neutral is left as it is, so a calibrated
    clause is no more likely to be called an opinion than before (contextual calibration, label-free)."""
    out = probs.astype(np.float64).copy()
    polar = out[[0, 2]] / np.maximum(prior[[0, 2]], 1e-6)
    out[[0, 2]] = polar * (out[[0, 2]].sum() / max(polar.sum(), 1e-12))
    return out / out.sum()
