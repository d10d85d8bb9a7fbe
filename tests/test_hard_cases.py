"""The hard-case log: private, rotated, off the event loop, and harmless when the disk fails."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

from distill.__main__ import hard_cases as hard_cases_for_training
from service.hard_cases import HardCaseLog, rotated
from service.metrics import Metrics


def entry(i: int) -> dict:
    return {"text": f"message {i}", "teacher": {"label": "negative", "probs": None}}


def write_all(log: HardCaseLog, count: int) -> None:
    async def scenario() -> None:
        for i in range(count):
            log.record(entry(i))
        await log.aclose()

    asyncio.run(scenario())


def counted(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("sentiment_hard_cases_total", {"outcome": outcome}) or 0.0


def test_entries_are_written_private_and_rotated_past_the_cap(tmp_path: Path) -> None:
    metrics = Metrics()
    path = tmp_path / "cases" / "hard.jsonl"
    write_all(HardCaseLog(path, max_bytes=600, metrics=metrics), 40)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and rotated(path).is_file()
    assert path.stat().st_size <= 600 and rotated(path).stat().st_size <= 600
    lines = rotated(path).read_text().splitlines() + path.read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert texts == [f"message {i}" for i in range(40 - len(texts), 40)]  # the newest, in order
    assert counted(metrics, "written") == 40
    examples, _ = hard_cases_for_training(path)  # distill reads both halves
    assert [ex.text for ex in examples] == texts


def test_a_failing_disk_is_counted_and_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    metrics = Metrics()
    write_all(HardCaseLog(blocker / "hard.jsonl", max_bytes=10_000, metrics=metrics), 5)
    assert counted(metrics, "disk") == 5 and counted(metrics, "written") == 0
