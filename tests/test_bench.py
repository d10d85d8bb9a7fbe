"""The serving benchmark runs end to end (a short smoke run, correctness only; figures come from make bench)."""

from __future__ import annotations

import json
import re

import pytest

from bench.serving import WRK
from service.artifact import cpu_flags, load_artifact, runs_exactly
from service.weights import S8_FLAGS
from tests.conftest import run_module


@pytest.mark.parametrize(("loader", "restart"), [("python", False), ("wrk", True)])
def test_the_serving_bench_prints_a_row_per_configuration_and_peer(tiny_model, loader, restart) -> None:
    if loader == "wrk" and WRK is None:
        pytest.skip("wrk not installed (apt-get install wrk; .ci/run installs it)")
    result = run_module("bench.serving", "--model", str(tiny_model), "--seconds", "1", "--rounds", "2",
                        "--servers", "granian", "--configs", "auto", "1x1:lone_spin=false", "--peers", "plain",
                        "--clients", "1", "8", "--loader", loader, *(["--restart"] if restart else []), timeout=300)
    table = result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1]
    figures = json.loads(table)
    pinned = "granian/1x1:lone_spin=false"  # a layout, and a setting for that row
    assert set(figures) == {"in_process", "granian/auto", "granian/auto +aspects", pinned, "peer/plain"}
    for key in ("granian/auto", "granian/auto +aspects", pinned, "peer/plain"):
        assert figures[key]["c1"]["texts_per_s"] > 0 and figures[key]["c8"]["errors"] == 0
        assert figures[key]["c8"]["p50_ms"] <= figures[key]["c8"]["p99_ms"]
    assert "medians of 2 interleaved rounds" in result.stdout and f"load from {loader}" in result.stdout
    assert f"{pinned}: 1x1, batches up to" in result.stdout  # the layout each service measured
    # Started once, or afresh for each of the two rounds (`auto` twice more: its aspects row has its own).
    assert result.stdout.count(f"{pinned}: 1x1") == (2 if restart else 1)
    assert result.stdout.count("granian/auto: ") == (4 if restart else 1)
    served = load_artifact(tiny_model).variant.name
    limit = figures["in_process"]
    tried = [v for k, v in limit.items() if k.startswith(f"{served}/") and " t" in k]  # layouts x budgets
    assert len(tried) >= 5 and limit[f"{served}/best_texts_per_s"] >= min(tried) > 0
    assert f"the limit below is {served}'s" in result.stdout
    found = re.findall(r"^  (\S.*?)\s+([\d.]+) ([\d.]+)   median ([\d.]+)$", result.stdout, re.M)  # two rounds
    paired = {label: (float(a), float(b), float(median)) for label, a, b, median in found}
    rows = ["granian/auto", "granian/auto +aspects", pinned, "peer/plain"]
    assert set(paired) == {f"{row} / limit" for row in rows} | {f"granian/auto / {row}" for row in rows[1:]}, paired
    for a, b, median in paired.values():
        assert a > 0 and b > 0 and median == pytest.approx((a + b) / 2, abs=0.006), paired


def test_the_breakdown_accounts_for_the_threads_and_the_batches(tiny_model) -> None:
    if WRK is None:
        pytest.skip("wrk not installed (apt-get install wrk; .ci/run installs it)")
    out = run_module("bench.breakdown", "--model", str(tiny_model), "--seconds", "1", "--rounds", "1",
                     "--shares", "0.5", timeout=300).stdout
    share = re.search(r"\n(open loop at (\d+)/s \(50% of 64 connections' (\d+)\))", out)
    assert share and abs(int(share.group(2)) - int(share.group(3)) / 2) <= 1, out
    for load in ("1 connection(s)", "64 connection(s)", share.group(1)):
        section = out[out.index(f"\n{load}: "):]
        head = re.match(rf"\n{re.escape(load)}: (\d+) texts/s, .*batches of ([\d.]+) texts, ([\d.]+) ms each\n"
                        r"  mean time in the app ([\d.]+) ms: ([\d.]+) queued, ([\d.]+) in a batch", section)
        assert head and float(head.group(2)) >= 1 and float(head.group(3)) > 0, out
        in_app, queued, batch = (float(head.group(k)) for k in (4, 5, 6))
        assert in_app >= queued + batch - 0.05, out  # a request's time in the app holds its wait and its batch
        loop = re.search(r"event loop\s+([\d.]+) cores\s+([\d.]+) ms CPU per request", section)
        assert loop and float(loop.group(1)) > 0 and float(loop.group(2)) > 0, out
        busy = re.search(r"streams busy (\d+)% of the time; batches like these would serve (\d+) texts/s", section)
        assert busy and 0 < int(busy.group(1)) <= 100 * 1.05 and int(busy.group(2)) > 0, out
    answered = int(re.search(rf"{re.escape(share.group(1))}: (\d+) texts/s", out).group(1))
    assert abs(answered - int(share.group(2))) <= 0.1 * int(share.group(2)) + 1, out  # the schedule's rate, answered
    assert "failed" not in out
    assert re.search(r"in-process, \d+x\d+, nothing else running: [\d.]+ ms each; in the service [\d.]+ ms", out)


def test_the_open_loop_generator_keeps_its_schedule_and_sees_every_answer(service) -> None:
    from bench.openloop import open_loop

    results = open_loop(service.url, rate=40, seconds=2, texts=["late again", "lovely staff", "é ✓ 表"],
                        connections=8)
    assert len(results) == 80 and {status for _, _, status in results} == {200}
    dues = [due for due, _, _ in results]
    assert dues == sorted(dues) and abs((dues[-1] - dues[0]) - 79 / 40) < 1e-3  # the schedule, not the answers
    assert all(0 < latency < 5 for _, latency, _ in results)


def test_the_open_loop_generator_records_each_answers_status(service) -> None:
    from bench.openloop import open_loop

    results = open_loop(service.url, rate=20, seconds=1, texts=["fine"], path="/v1/no-such-route")
    assert len(results) == 20 and {status for _, _, status in results} == {404}


@pytest.mark.parametrize("restart", [False, True])
def test_the_rates_bench_prints_a_row_per_rate_and_configuration(tiny_model, restart) -> None:
    configs = ["1x1", "1x1:lone_spin=false"]
    out = run_module("bench.rates", "--model", str(tiny_model), "--configs", *configs, "--rates", "20", "40",
                     "--seconds", "1", "--rounds", "2", *(["--restart"] if restart else []), timeout=300).stdout
    assert ("every service started afresh" in out) == restart
    for config in configs:  # the layout each start measured: once, or afresh for each of the two rounds
        assert len(re.findall(rf"^{re.escape(config)}: 1x1, batches up to", out, re.M)) == (2 if restart else 1), out
    loads = ["20/s", "40/s"] + (["1 client"] if WRK else [])
    for load in loads:
        for config in configs:
            row = re.search(rf"^{re.escape(load)}\s+{re.escape(config)}\s+([\d.]+)\s+([\d.]+)\s+0\s+(.+)$", out, re.M)
            assert row, out
            assert 0 < float(row.group(1)) <= float(row.group(2)) and row.group(3).count("/") == 2  # two rounds


def test_the_floor_bench_times_a_bare_app_on_both_servers_inline_and_handed_to_a_thread() -> None:
    out = run_module("bench.floor", "--work-ms", "0", "3", "--rounds", "1", "--seconds", "1",
                     "--loader", "wrk" if WRK else "python", timeout=300).stdout
    rows = re.findall(r"^(granian|uvicorn)\s+([\d.]+)ms (inline|thread)\s+([\d.]+)\s+(-?[\d.]+) ms$", out, re.M)
    assert {(server, float(work), where) for server, work, where, _, _ in rows} == {
        (server, work, where) for server in ("granian", "uvicorn") for work in (0.0, 3.0)
        for where in ("inline", "thread")}, out
    for _, work, _, p50, beyond in rows:
        assert float(p50) >= float(work) and abs(float(p50) - float(work) - float(beyond)) < 0.002  # the work was done


def test_the_in_app_bench_drives_each_configuration_without_http(tiny_model) -> None:
    configs = ["1x1:max_batch_tokens=32", "1x1:max_batch_tokens=128"]
    out = run_module("bench.inapp", "--model", str(tiny_model), "--configs", *configs, "--clients", "8",
                     "--seconds", "1", "--rounds", "2", timeout=300).stdout
    assert "8 callers over raw ASGI, no HTTP; medians of 2 interleaved rounds" in out
    for config in configs:
        row = re.search(rf"^{re.escape(config)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s+0$", out, re.M)
        assert row, out
        texts_per_s, per_batch, _, busy = (float(value) for value in row.groups())
        assert texts_per_s > 0 and 1 <= per_batch <= 8 and 0 < busy <= 105, out  # 8 callers: at most 8 a batch


def test_the_overload_bench_counts_answers_and_refusals_for_both_kinds_of_client(tiny_model) -> None:
    if WRK is None:
        pytest.skip("wrk not installed (apt-get install wrk; .ci/run installs it)")
    # A queue of 8 texts against 200 connections of 5 texts each: most requests must be refused.
    out = run_module("bench.overload", "--model", str(tiny_model), "--configs", "1x1:queue_size=8,max_texts=5",
                     "--connections", "200", "--seconds", "1", "--rounds", "1", timeout=300).stdout
    assert "200 connections, 5 texts per request" in out
    for client in ("no back-off", "Retry-After"):
        cells = r"(\d+) \| (\d+) \((\d+) ms\) \| (\d+) \((\d+) ms\) \|"
        row = re.search(rf"^\| 1x1:queue_size=8,max_texts=5 \| {client} \| {cells}", out, re.M)
        assert row, out
        served, answered, _, refused, _ = map(int, row.groups())
        assert answered > 0 and refused > 0 and served == pytest.approx(answered * 5, abs=5)


def test_the_builds_bench_times_each_build_against_the_first(tiny_model, tmp_path) -> None:
    second = tmp_path / "second.onnx"
    second.write_bytes((tiny_model / "model.onnx").read_bytes())
    out = run_module("bench.builds", str(tiny_model / "model.onnx"), str(second), "--rounds", "1",
                     timeout=300).stdout
    cell = r"\s+batch \d+:\s+[\d.]+ ms \(([\d.]+)x\)"
    rows = {m[1]: m.groups()[1:] for m in re.finditer(rf"^(\S+){cell}{cell}{cell}$", out, re.M)}
    assert set(rows) == {str(tiny_model / "model.onnx"), str(second)}, out
    assert rows[str(tiny_model / "model.onnx")] == ("1.00", "1.00", "1.00"), out
    assert all(float(ratio) > 0 for ratio in rows[str(second)]), out


def test_the_aspects_bench_times_the_encoder_as_stored_and_as_s8_where_that_is_exact() -> None:
    out = run_module("bench.aspects", "--rounds", "1", "--set", "distill/aspects/dev.tsv", timeout=300).stdout
    rows = dict(re.findall(r"^(as stored \(u8\)|s8)\s+[\d.]+\s+[\d.]+\s+([\d.]+)x$", out, re.M))
    s8 = runs_exactly(S8_FLAGS, cpu_flags())
    assert set(rows) == ({"as stored (u8)", "s8"} if s8 else {"as stored (u8)"}), out
    assert rows["as stored (u8)"] == "1.00", out
    if s8:
        assert "identical to u8 on every clause: True" in out, out
