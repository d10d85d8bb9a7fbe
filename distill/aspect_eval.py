"""The aspect evaluation sets and their scoring.

Sets are hand-written TSV files in distill/aspects/: `text<TAB>gold`, gold = space-separated
`aspect+` (positive), `aspect-` (negative), `aspect~` (neutral); empty gold: no opinion about any aspect.
`dev.tsv` is for tuning (thresholds, prompts, taxonomy examples); `eval.tsv` is held out; `probe.tsv`, in
another style (chat, e-mails), was written after the method was frozen.

Pair scores count an (aspect, label) pair right only when both match; neutral pairs, gold or
predicted, are not counted (a mention without an opinion is not a finding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ASPECT_SETS = Path(__file__).resolve().parent / "aspects"
_POLARITY = {"+": "positive", "-": "negative", "~": "neutral"}

Pairs = dict[str, str]  # aspect -> label


@dataclass(frozen=True)
class AspectExample:
    text: str
    gold: Pairs


def load_aspect_set(path: Path | str) -> list[AspectExample]:
    path = Path(path)
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        text, _, gold = line.partition("\t")
        pairs: Pairs = {}
        for token in gold.split():
            if token[-1:] not in _POLARITY or len(token) < 2:
                raise ValueError(f"{path}:{number}: gold token {token!r} is not aspect+, aspect- or aspect~")
            pairs[token[:-1]] = _POLARITY[token[-1]]
        out.append(AspectExample(text.strip(), pairs))
    return out


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": tp + fn}


def score_pairs(gold: Sequence[Pairs], predicted: Sequence[Pairs]) -> dict[str, object]:
    """Pair precision/recall/F1 overall, per aspect and per label; aspect detection F1 (labels ignored)."""
    counts: Counter[tuple[str, str, str]] = Counter()  # (group, key, tp|fp|fn)
    for want, got in zip(gold, predicted, strict=True):
        want_pairs = {(a, lab) for a, lab in want.items() if lab != "neutral"}
        got_pairs = {(a, lab) for a, lab in got.items() if lab != "neutral"}
        for kind, pairs in (("tp", want_pairs & got_pairs), ("fp", got_pairs - want_pairs),
                            ("fn", want_pairs - got_pairs)):
            for aspect, label in pairs:
                counts["all", "", kind] += 1
                counts["aspect", aspect, kind] += 1
                counts["label", label, kind] += 1
        want_aspects, got_aspects = {a for a, _ in want_pairs}, {a for a, _ in got_pairs}
        counts["detect", "", "tp"] += len(want_aspects & got_aspects)
        counts["detect", "", "fp"] += len(got_aspects - want_aspects)
        counts["detect", "", "fn"] += len(want_aspects - got_aspects)

    def prf(group: str, key: str) -> dict[str, float]:
        return _prf(counts[group, key, "tp"], counts[group, key, "fp"], counts[group, key, "fn"])

    aspects = sorted({key for group, key, _ in counts if group == "aspect"})
    labels = sorted({key for group, key, _ in counts if group == "label"})
    empty = [not {lab for lab in want.values() if lab != "neutral"} for want in gold]
    quiet = sum(1 for e, got in zip(empty, predicted, strict=True)
                if e and not {lab for lab in got.values() if lab != "neutral"})
    return {"pairs": prf("all", ""), "aspect_detection": prf("detect", ""),
            "per_aspect": {a: prf("aspect", a) for a in aspects},
            "per_label": {lab: prf("label", lab) for lab in labels},
            "no_opinion_messages": {"n": sum(empty), "answered_empty": quiet}, "n": len(gold)}


def evaluate(examples: Sequence[AspectExample], predict: Callable[[list[str]], list[Pairs]]) -> dict[str, object]:
    return score_pairs([ex.gold for ex in examples], predict([ex.text for ex in examples]))
