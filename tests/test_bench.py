"""The serving benchmark runs end to end (a short smoke run, correctness only; figures come from make bench)."""

from __future__ import annotations

import json

from tests.conftest import run_module


def test_the_serving_bench_prints_a_row_per_configuration(tiny_model) -> None:
    result = run_module("bench.serving", "--model", str(tiny_model), "--seconds", "0.3", "--rounds", "2",
                        "--servers", "granian", "--configs", "auto", "1x1", timeout=300)
    table = result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1]
    figures = json.loads(table)
    assert set(figures) == {"in_process", "granian/auto", "granian/1x1"}
    for key in ("granian/auto", "granian/1x1"):
        assert figures[key]["c1"]["texts_per_s"] > 0 and figures[key]["c64"]["errors"] == 0
        assert figures[key]["c64"]["p50_ms"] <= figures[key]["c64"]["p99_ms"]
    assert "medians of 2 interleaved rounds" in result.stdout
    assert "granian/1x1: 1x1, batches up to" in result.stdout  # the layout each service measured
