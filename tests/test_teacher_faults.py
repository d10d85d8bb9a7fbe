"""The rule: whatever the teacher does, the scoring route answers 200 from the student and the fault shows
in metrics. The teacher here is a real HTTP server on loopback that misbehaves on purpose, one way per case,
and the hard-case log's disk fails throughout."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from service.artifact import LABELS
from service.fallback import Fallback
from service.metrics import Metrics
from service.teacher import TeacherClient
from tests.conftest import metric, running_service

FAULTS = {
    "off-format logprobs": {"choices": [{"text": " positive", "logprobs": {"top_logprobs": [[1, 2]]}}]},
    "non-finite logprobs": {"choices": [{"text": " negative", "logprobs": {"top_logprobs": [
        {" negative": float("nan"), " positive": 1e308}]}}]},
    "logprobs of the wrong type": {"choices": [{"text": " neutral", "logprobs": "lots"}]},
    "no choices": {"choices": []},
    "choices not a list": {"choices": "positive"},
    "answer not a string": {"choices": [{"text": {"label": "positive"}}]},
    "label outside the set": {"choices": [{"text": " ecstatic"}]},
    "a JSON list": ["positive"],
}
RAW_FAULTS = ["not JSON", "HTTP 500", "HTTP 404", "hangs", "closes the connection"]


class FaultyTeacher(BaseHTTPRequestHandler):
    mode = "not JSON"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = FaultyTeacher.mode
        if mode == "hangs":
            time.sleep(2)
        if mode == "closes the connection":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        status = int(mode.split()[1]) if mode.startswith("HTTP") else 200
        body = b"<html>teapot</html>" if mode in ("not JSON", "hangs") or status != 200 else \
            json.dumps(FAULTS[mode]).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the service gave up on a hung answer, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def faulty_service(tiny_model, tmp_path_factory) -> Iterator:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyTeacher)
    blocker = tmp_path_factory.mktemp("disk") / "a-file"
    blocker.write_text("the hard-case log's directory is a file: every write fails")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"SENTIMENT_TEACHER_ENABLED": "true", "SENTIMENT_TEACHER_URL": f"http://127.0.0.1:{server.server_port}",
           "SENTIMENT_TEACHER_TIMEOUT_S": "0.5", "SENTIMENT_EXPLAIN_TIMEOUT_S": "0.5",
           "SENTIMENT_BREAKER_FAILURES": "1000", "SENTIMENT_FALLBACK_MAX_SHARE": "1.0",
           "SENTIMENT_HARD_CASES_PATH": str(blocker / "hard.jsonl"), "SENTIMENT_EXPLAIN_MAX_CONCURRENCY": "1"}
    try:
        with running_service(tiny_model, tmp_path_factory.mktemp("faulty"), **env) as svc:
            yield svc
    finally:
        server.shutdown()


@pytest.mark.parametrize("mode", [*FAULTS, *RAW_FAULTS])
def test_a_misbehaving_teacher_never_fails_the_scoring_route(faulty_service, mode) -> None:
    FaultyTeacher.mode = mode
    with faulty_service.client() as client:
        response = client.post("/v1/sentiment", json={"texts": ["where is my parcel", "great"], "fallback": "always"})
        assert response.status_code == 200, response.text
        for result in response.json()["results"]:
            assert result["label"] in LABELS and result["fallback"]["reason"] == "forced"
            if result["source"] == "teacher":  # the label parsed; the off-format part was dropped
                assert mode in FAULTS and result["fallback"]["outcome"] == "ok"
            else:
                assert result["fallback"]["outcome"] in ("unparseable", "error", "timeout")
        explain = client.post("/v1/sentiment/explain", json={"text": "where is my parcel"})
        assert explain.status_code in (200, 502, 503), explain.text
        assert explain.status_code == 200 or explain.json()["error"]["code"].startswith("teacher_")
        assert client.post("/v1/sentiment", json={"text": "still here"}).status_code == 200


def test_explanations_beyond_the_bound_are_refused_at_once_not_queued(faulty_service) -> None:
    FaultyTeacher.mode = "hangs"

    async def three_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=faulty_service.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/sentiment/explain", json={"text": f"late order {i}"})
                                          for i in range(3)))

    started = time.perf_counter()
    responses = asyncio.run(three_at_once())
    codes = sorted(r.json()["error"]["code"] for r in responses)
    assert codes == ["teacher_busy", "teacher_busy", "teacher_unavailable"]  # one call in flight, it times out
    assert all(r.status_code == 503 and r.headers["retry-after"] for r in responses)
    assert time.perf_counter() - started < 2.0  # nobody waited behind the hung call


def test_a_client_that_hangs_up_gets_its_teacher_call_cancelled(faulty_service) -> None:
    FaultyTeacher.mode = "hangs"  # the forced teacher call would take 2 s; the client leaves after 0.4 s
    host, port = faulty_service.url.removeprefix("http://").split(":")
    with faulty_service.client() as client:
        before = client.get("/metrics").text
        body = json.dumps({"text": "is anyone there", "fallback": "always"}).encode()
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"POST /v1/sentiment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.4)
        time.sleep(0.3)
        after = client.get("/metrics").text
        assert client.post("/v1/sentiment", json={"text": "next"}).status_code == 200
    hung_up = "sentiment_client_disconnects_total"
    assert metric(after, hung_up) == metric(before, hung_up) + 1
    # The abandoned call was never accounted as a teacher answer or failure.
    label_calls = 'sentiment_teacher_duration_seconds_count{task="label"}'
    assert metric(after, label_calls) == metric(before, label_calls)


def test_the_faults_show_in_metrics(faulty_service) -> None:
    with faulty_service.client() as client:
        metrics = client.get("/metrics").text
    for outcome in ("unparseable", "error", "timeout"):
        assert f'sentiment_teacher_errors_total{{outcome="{outcome}",task="label"}}' in metrics
    assert 'sentiment_hard_cases_total{outcome="disk"}' in metrics  # answered fallbacks, a failing disk
    assert "sentiment_request_duration_seconds_count" in metrics and 'status="500"' not in metrics


def test_a_cancelled_half_open_probe_frees_the_breaker() -> None:
    """The probe let through a half-open breaker is cancelled (its client hung up): the next call may probe."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FaultyTeacher.mode = "hangs"

    async def scenario() -> None:
        client = TeacherClient(f"http://127.0.0.1:{server.server_port}", "faulty", timeout=5)
        fallback = Fallback(client, Metrics(), threshold=0.5, max_concurrency=4, max_share=1.0, teacher_timeout=5,
                            breaker_failures=1, breaker_reset=0.05)
        fallback.breaker.record(False)  # open
        await asyncio.sleep(0.06)  # past the reset: the next call is the half-open probe
        probe = asyncio.create_task(fallback.ask("hello", time.perf_counter() + 5, forced=True))
        await asyncio.sleep(0.1)
        assert fallback.breaker.state == "half_open" and not fallback.breaker.allow()  # the probe is out
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
        assert fallback.breaker.allow()  # its slot came back: not half-open forever
        await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.shutdown()
