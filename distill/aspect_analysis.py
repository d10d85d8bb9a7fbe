"""The student-side aspect method in one process (evaluation, export, benchmarks): the service's own
`AspectModel.locate` and `opinions`, with the student runner called directly instead of the batcher."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from distill.aspect_eval import Pairs
from service.aspects import AspectModel, SentenceEncoder
from service.runner import ModelRunner
from service.taxonomy import Taxonomy


def student_aspects(encoder: SentenceEncoder, taxonomy: Taxonomy, student: ModelRunner,
                    threshold: float | None = None) -> Callable[[list[str]], list[Pairs]]:
    if threshold is not None:
        taxonomy = dataclasses.replace(taxonomy, threshold=threshold)
    model = AspectModel(encoder, taxonomy)
    model.measure_priors(student)

    def predict(texts: list[str]) -> list[Pairs]:
        out = []
        for text, located in zip(texts, model.locate(texts), strict=True):
            regions = [text[start:end] for start, end in (clause.region for clause in located)]
            probs = list(student.probabilities([e.ids for e in student.encode(regions)])) if regions else []
            out.append({o.aspect: o.label for o in model.opinions(located, probs)})
        return out

    return predict
