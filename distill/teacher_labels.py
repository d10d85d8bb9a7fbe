"""Teacher labelling with a resumable JSONL cache.

Each answer is stored under a key of (teacher model, prompt version, text hash), so a run that
stopped resumes where it was and never pays for an answer twice. Terminal outcomes (ok,
unparseable) are kept; errors and timeouts are retried on the next run. Lines are appended and
flushed one by one: an interrupted run loses at most the answer in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.prompts import Prompt
from service.teacher import OK, UNPARSEABLE, TeacherAnswer, TeacherClient

TERMINAL = frozenset({OK, UNPARSEABLE})


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def cache_key(teacher: str, prompt_version: str, text: str) -> str:
    return f"{teacher}|{prompt_version}|{text_hash(text)}"


class LabelCache:
    """Append-only JSONL of teacher answers; the last line for a key wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        # A run killed mid-write leaves a torn last line: start the next record on a fresh line.
        self._torn_tail = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        if path.exists():
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    try:
                        record = json.loads(line)
                        self.records[record["key"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        # A line cut off by an interrupted run: skip it, keep everything else.
                        print(f"{path}:{number}: skipping an unreadable cache line")

    def get(self, key: str) -> dict[str, Any] | None:
        record = self.records.get(key)
        return record if record and record["outcome"] in TERMINAL else None

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            if self._torn_tail:
                handle.write("\n")
                self._torn_tail = False
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
        self.records[record["key"]] = record


async def label_texts(client: TeacherClient, cache: LabelCache, items: Sequence[tuple[str, str | None]],
                      prompt: Prompt, concurrency: int = 2, aspects: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Ask the teacher about each (text, human label) not yet cached; returns every record, in order.

    For a rewrite prompt the human label (or the teacher's) names the sentiment to make clearer; an
    aspect prompt is answered with the taxonomy's `aspects` (its version names the taxonomy).
    """
    slots = asyncio.Semaphore(concurrency)

    async def one(text: str, label: str | None) -> dict[str, Any]:
        key = cache_key(client.model, prompt.version, text)
        cached = cache.get(key)
        if cached:
            return cached
        async with slots:
            if prompt.task == "rewrite":
                answer = await client.rewrite(text, label or "its")
            elif prompt.task == "aspects":
                answer = await client.aspects(text, prompt, list(aspects))
            elif prompt.task == "explain":
                answer = await client.explain(text, prompt)
            else:
                answer = await client.classify(text, prompt)
        record = {"key": key, "teacher": client.model, "prompt_version": prompt.version,
                  "task": prompt.task, "input": text, "human_label": label, **asdict(answer)}
        cache.append(record)
        return record

    return list(await asyncio.gather(*(one(text, label) for text, label in items)))


def summarise(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Outcome counts and, where human labels exist, the teacher's accuracy on the parsed answers."""
    records = list(records)
    outcomes: dict[str, int] = {}
    for record in records:
        outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
    judged = [r for r in records if r.get("human_label")]
    correct = sum(r["outcome"] == OK and r["label"] == r["human_label"] for r in judged)
    return {"n": len(records), "outcomes": outcomes,
            "accuracy_all": round(correct / len(judged), 4) if judged else None,
            "seconds_mean": round(sum(r["seconds"] for r in records) / max(1, len(records)), 3)}


def answer_from(record: dict[str, Any]) -> TeacherAnswer:
    fields = TeacherAnswer.__dataclass_fields__
    return TeacherAnswer(**{k: v for k, v in record.items() if k in fields})
