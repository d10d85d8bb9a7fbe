"""The real service over real HTTP with a real (tiny) ONNX model: routes, ordering, errors, limits."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.artifact import LABELS, load_artifact, sha256_of
from service.runner import ModelRunner
from tests.conftest import ROOT, metric, rehash, running_service, served_file

TEXTS = ["I love it", "This is terrible", "Where is my parcel?", "meh", "Fantastic support, thank you!",
         "The app crashed again and I lost my work", "ok", "Refund me now."]


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> ModelRunner:
    return ModelRunner(load_artifact(tiny_model))


@pytest.fixture(scope="module")
def batch_noise(runner: ModelRunner) -> float:
    """How far a text's scores move with the company it is batched with, on this CPU and this model.

    Dynamic int8 quantizes activations with one scale per batch, and how much that moves a score depends
    on the CPU's int8 kernels (VNNI or not) and on the model, so it is measured here, not assumed: each
    text alone against the batches the service can form from these texts (random mixes of 2 to 32, the
    service's batch size). A handful of fixed batchings once missed the widest shift and failed CI.
    """
    alone = {text: runner.predict([text])[0] for text in TEXTS}
    rng = random.Random(0)
    batches = [TEXTS, *(rng.choices(TEXTS, k=rng.randint(2, 32)) for _ in range(60))]
    return max(abs(alone[text].scores[label] - got.scores[label])
               for batch in batches for text, got in zip(batch, runner.predict(batch), strict=True)
               for label in LABELS)


def assert_matches_runner(results: list[dict], texts: list[str], runner: ModelRunner, noise: float) -> None:
    """Each result is the model's own answer for that text, in order, within the batch noise."""
    tolerance = 2 * noise + 2e-6  # twice the widest shift measured across batchings, plus the 6-digit rounding
    for got, want in zip(results, runner.predict(texts), strict=True):
        for label in LABELS:
            assert abs(got["scores"][label] - want.scores[label]) <= tolerance, (label, got, want, tolerance)
        top = sorted(want.scores.values())
        if top[-1] - top[-2] > 2 * tolerance:
            assert got["label"] == want.label


def test_scores_in_input_order_and_match_the_model(service, runner, batch_noise) -> None:
    with service.client() as client:
        response = client.post("/v1/sentiment", json={"texts": TEXTS})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == {"name": "tiny-test", "version": "0.0.1"}
    assert len(body["results"]) == len(TEXTS)
    for result in body["results"]:
        assert result["label"] in LABELS and result["source"] == "student" and result["fallback"] is None
        assert abs(sum(result["scores"].values()) - 1.0) < 1e-4
        assert result["score"] == max(result["scores"].values())
    assert_matches_runner(body["results"], TEXTS, runner, batch_noise)


def test_single_text_form(service, runner, batch_noise) -> None:
    with service.client() as client:
        body = client.post("/v1/sentiment", json={"text": "Fantastic support, thank you!"}).json()
    assert len(body["results"]) == 1
    assert_matches_runner(body["results"], ["Fantastic support, thank you!"], runner, batch_noise)


def test_without_a_teacher_a_requested_fallback_is_marked_disabled(service) -> None:
    with service.client() as client:
        result = client.post("/v1/sentiment", json={"text": "hmm", "fallback": "always"}).json()["results"][0]
        explain = client.post("/v1/sentiment/explain", json={"text": "hmm"})
    assert result["source"] == "student" and result["fallback"] == {"reason": "forced", "outcome": "disabled"}
    assert explain.status_code == 503 and explain.json()["error"]["code"] == "teacher_unavailable"


def test_truncation_is_flagged_per_text(service) -> None:
    long_text = "the delivery was late and the box was damaged " * 20  # far over the 48-token budget
    with service.client() as client:
        results = client.post("/v1/sentiment", json={"texts": ["short one", long_text]}).json()["results"]
    assert [r["truncated"] for r in results] == [False, True]


def test_concurrent_requests_each_get_their_own_results(service, runner, batch_noise) -> None:
    rng = random.Random(7)
    requests = [rng.sample(TEXTS, rng.randint(1, 6)) for _ in range(40)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/sentiment", json={"texts": t}) for t in requests))

    responses = asyncio.run(fire())
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        assert_matches_runner(response.json()["results"], texts, runner, batch_noise)
    with service.client() as client:
        metrics = client.get("/metrics").text
    # Concurrent texts really were batched together at least once.
    assert "sentiment_batch_size_bucket" in metrics
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line[:1] != "#"}
    assert values["sentiment_batch_size_sum"] / values["sentiment_batch_size_count"] > 1.0


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    (b'{"texts": [', 400, "malformed_json", None),
    (b'{"text": "\xff\xfe bad"}', 400, "malformed_json", None),
    (b'{"texts": "not a list"}', 422, "invalid_request", "texts"),
    (b'{"texts": [1, 2]}', 422, "invalid_request", "texts[0]"),
    (b"{}", 422, "invalid_request", "texts"),
    (b'{"texts": []}', 422, "invalid_request", "texts"),
    (b'{"texts": ["fine", "   "]}', 422, "invalid_request", "texts[1]"),
    (b'{"text": ""}', 422, "invalid_request", "text"),
    (b'{"texts": ["a"], "text": "b"}', 422, "invalid_request", "texts"),
    (b'{"texts": ["a","b","c","d","e","f","g","h","i"]}', 422, "invalid_request", "texts"),
    (b'{"text": "' + b"x" * 2001 + b'"}', 422, "invalid_request", "text"),
    (b'{"texts": ["a"], "fallback": "sometimes"}', 422, "invalid_request", "fallback"),
    (b'{"texts": ["a"], "colour": "red"}', 422, "invalid_request", None),
    (b'{"text": "' + b"y" * 30000 + b'"}', 413, "payload_too_large", None),
])
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(service, body, status, code, field) -> None:
    with service.client() as client:
        response = client.post("/v1/sentiment", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["message"]
        if field:
            assert field in error["message"]
        if status == 413:  # answered before the body was read: the client must not reuse the connection
            assert response.headers.get("connection") == "close"
        assert client.post("/v1/sentiment", json={"text": "still here"}).status_code == 200


def chunks(body: bytes, size: int) -> Iterator[bytes]:
    """A body sent chunked, with no Content-Length: the service gets it in several pieces."""
    yield from (body[i:i + size] for i in range(0, len(body), size))


def test_a_chunked_body_is_read_whole_and_held_to_the_size_limit(service, runner, batch_noise) -> None:
    texts = [f"{text} " * (1500 // (len(text) + 1)) for text in TEXTS]  # ~12 kB: a dozen chunks of 1,000 bytes
    body = json.dumps({"texts": texts}).encode()
    too_large = b'{"text": "' + b"y" * 30000 + b'"}'
    with service.client() as client:
        whole = client.post("/v1/sentiment", content=chunks(body, 1000), headers={"content-type": "application/json"})
        refused = client.post("/v1/sentiment", content=chunks(too_large, 4096),
                              headers={"content-type": "application/json"})
        assert client.post("/v1/sentiment", json={"text": "still here"}).status_code == 200
    assert whole.status_code == 200, whole.text
    assert_matches_runner(whole.json()["results"], texts, runner, batch_noise)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "payload_too_large"
    assert "20000 bytes" in refused.json()["error"]["message"]


def test_a_client_that_hangs_up_mid_body_is_counted_and_the_server_keeps_serving(service) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    hung_up = 'sentiment_request_duration_seconds_count{method="POST",route="/v1/sentiment",status="499"}'
    with service.client() as client:
        before = client.get("/metrics").text
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"POST /v1/sentiment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 5000\r\n\r\n" + b'{"text": "half a bo')
            time.sleep(0.2)
        time.sleep(0.3)
        assert client.post("/v1/sentiment", json={"text": "next"}).status_code == 200
        after = client.get("/metrics").text
    assert metric(after, hung_up) == metric(before, hung_up) + 1


def test_a_client_that_stalls_mid_body_gets_408_at_the_deadline_and_the_server_keeps_serving(service) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    with service.client() as client:
        before = client.get("/metrics").text
        stalled = [socket.create_connection((host, int(port))) for _ in range(2)]
        started = time.monotonic()
        for raw, route in zip(stalled, [b"/v1/sentiment", b"/v1/sentiment/explain"], strict=True):
            raw.sendall(b"POST " + route + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 5000\r\n\r\n" + b'{"text": "half a bo')
        answers = []
        for raw in stalled:
            raw.settimeout(15)
            answers.append(raw.recv(65536))  # the whole short answer, or b"" if the server just closed
            raw.close()
        waited = time.monotonic() - started
        assert client.post("/v1/sentiment", json={"text": "next"}).status_code == 200
        after = client.get("/metrics").text
    assert 4.5 <= waited < 10  # the service's request deadline is 5 s
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), head
        assert json.loads(body)["error"]["code"] == "body_timeout"
        assert b"within 5 s" in body
    for route in ("/v1/sentiment", "/v1/sentiment/explain"):
        timed_out = f'sentiment_request_duration_seconds_count{{method="POST",route="{route}",status="408"}}'
        assert metric(after, timed_out) == metric(before, timed_out) + 1


HOSTILE_BODIES = {  # each with what its error must say (the test service takes bodies up to 20,000 bytes)
    "deep array": (b"[" * 5000 + b"]" * 5000, "Expected `object`, got `array`"),
    "deep object": (b'{"a":' * 3000 + b"1" + b"}" * 3000, "unknown field `a`"),
    "deep inside texts": (b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}", "texts[0]: Expected `str`"),
    "lone surrogate escape": (b'{"text": "\\ud800 hi"}', "no low surrogate in string: line 1 column 11"),
    "invalid utf-8": (b'{"text": "\xc3\x28"}', "invalid continuation byte at byte 10"),
    "byte order mark": (b'\xef\xbb\xbf{"text": "good"}', "byte order mark"),
    "trailing bytes": (b'{"text": "good"} x', "unexpected content after document"),
    "10,000 texts": (b'{"texts": [' + b",".join([b'"a"'] * 10_000) + b"]}", "larger than 20000 bytes"),
    "1 MB text": (b'{"text": "' + b"z" * 1_000_000 + b'"}', "larger than 20000 bytes"),
    "not an object": (b'"just a string"', "Expected `object`, got `str`"),
    "null": (b"null", "Expected `object`, got `null`"),
    "empty body": (b"", "request body is empty"),
    "blank body": (b" \r\n", "request body is empty"),
}
# What decoding says is the same on every route that takes a body; explain is answered by Litestar, not
# by service/direct.py, and an empty body reaches it as a missing `data` argument.
DECODING_ERRORS = ["lone surrogate escape", "invalid utf-8", "byte order mark", "trailing bytes", "not an object",
                   "empty body", "blank body"]
HARMLESS_TEXTS = ["nul\x00byte", "\u202eright-to-left override", "zero\u200bwidth\u200djoiner\ufeff", "😀👍🏽",
                  "\t\n x"]


def assert_named(response: httpx.Response, expected: str) -> None:
    error = response.json()["error"]
    assert error["code"] and expected in f"{error['message']} {error['details']}", (response.status_code, error)


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_get_a_json_4xx_naming_the_problem(service, name) -> None:
    body, expected = HOSTILE_BODIES[name]
    with service.client() as client:
        response = client.post("/v1/sentiment", content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:200])
        assert_named(response, expected)
        assert client.post("/v1/sentiment", json={"text": "still here"}).status_code == 200


@pytest.mark.parametrize("name", DECODING_ERRORS)
def test_the_explain_route_names_an_undecodable_body_the_same_way(service, name) -> None:
    body, expected = HOSTILE_BODIES[name]
    with service.client() as client:
        response = client.post("/v1/sentiment/explain", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422) and response.status_code < 500
    assert_named(response, expected)


@pytest.mark.parametrize("route", ["/v1/sentiment", "/v1/sentiment/explain"])
def test_a_compressed_body_is_refused_with_415_naming_the_encoding(service, route) -> None:
    with service.client() as client:
        response = client.post(route, content=gzip.compress(b'{"text": "good"}'),
                               headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert_named(response, "Content-Encoding 'gzip' is not supported")


def test_unusual_but_valid_text_is_scored(service) -> None:
    with service.client() as client:
        response = client.post("/v1/sentiment", json={"texts": HARMLESS_TEXTS})
    assert response.status_code == 200
    assert [r["label"] in LABELS for r in response.json()["results"]] == [True] * len(HARMLESS_TEXTS)


def test_unknown_route_and_wrong_method(service) -> None:
    with service.client() as client:
        missing = client.get("/v2/nothing")
        wrong = client.get("/v1/sentiment")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_model_health_docs_and_metrics_routes(service, tiny_model) -> None:
    with service.client() as client:
        manifest = client.get("/v1/model").json()
        assert manifest["sha256"] == load_artifact(tiny_model).manifest.sha256
        served = load_artifact(tiny_model)
        assert manifest["variant"]["name"] == served.variant.name and manifest["variant"]["reason"] == served.reason
        assert manifest["variant"]["sha256"] == sha256_of(served.model_path)
        assert manifest["labels"] == list(LABELS)
        assert client.get("/health/live").json()["status"] == "ok"
        assert client.get("/health/ready").status_code == 200
        spec = client.get("/schema/openapi.json").json()
        assert "/v1/sentiment" in spec["paths"] and "/v1/sentiment/explain" in spec["paths"]
        scoring = spec["paths"]["/v1/sentiment"]["post"]  # answered by service/direct.py, documented as ever
        assert scoring["requestBody"]["content"]["application/json"]["schema"]
        assert {"200", "413", "422", "503"} <= set(scoring["responses"])
        client.post("/v1/sentiment", json={"texts": ["good", "bad"]})
        metrics = client.get("/metrics").text
    for name in ("sentiment_request_duration_seconds_bucket", "sentiment_queue_wait_seconds_bucket",
                 "sentiment_inference_duration_seconds_bucket", "sentiment_batch_tokens_bucket",
                 "sentiment_input_tokens_bucket", "sentiment_queue_depth", "sentiment_predictions_total",
                 "sentiment_confidence_bucket", "sentiment_truncations_total", "sentiment_model_info"):
        assert name in metrics, name
    assert 'route="/v1/sentiment"' in metrics and 'name="tiny-test"' in metrics
    assert metric(metrics, 'sentiment_gc_pause_seconds_count{generation="0"}') > 0  # collections are timed
    assert metric(metrics, 'sentiment_gc_pause_seconds_count{generation="2"}') >= 1  # the heap settled when ready
    assert "still here" not in metrics  # no message text in any label


def test_api_keys_guard_the_v1_routes(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path, SENTIMENT_API_KEYS="k1,k2") as svc, svc.client() as client:
        assert client.post("/v1/sentiment", json={"text": "hi"}).status_code == 401
        assert client.post("/v1/sentiment", json={"text": "hi"}, headers={"x-api-key": "nope"}).status_code == 401
        assert client.post("/v1/sentiment", json={"text": "hi"}, headers={"x-api-key": "k2"}).status_code == 200
        ok = client.post("/v1/sentiment", json={"text": "hi"}, headers={"authorization": "Bearer k1"})
        assert ok.status_code == 200
        assert client.get("/v1/model").status_code == 401
        assert client.get("/v1/model", headers={"x-api-key": "k1"}).status_code == 200
        assert client.get("/health/ready").status_code == 200  # probes need no key


def test_full_queue_answers_503_with_retry_after(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path, SENTIMENT_QUEUE_SIZE="4", SENTIMENT_MAX_TEXTS="4") as svc:
        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
                body = {"texts": ["a fairly long customer message about a late delivery " * 4] * 4}
                return await asyncio.gather(*(client.post("/v1/sentiment", json=body) for _ in range(30)))

        tokenised = "sentiment_tokenize_duration_seconds_count"
        with svc.client() as client:
            before = metric(client.get("/metrics").text, tokenised)
            responses = asyncio.run(flood())
            after = metric(client.get("/metrics").text, tokenised)
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 503} and 503 in statuses and 200 in statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "overloaded"
        # Refused before tokenising: under overload a refusal costs the event loop as little as it can.
        # (These texts are tokenised inline, so no request can find room, tokenise, and then be refused.)
        assert after - before == sum(r.status_code == 200 for r in responses)


def test_deadline_exceeded_is_504(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path, SENTIMENT_REQUEST_TIMEOUT_S="0.000001") as svc, svc.client() as client:
        response = client.post("/v1/sentiment", json={"text": "hello"})
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"


def test_readiness_is_503_until_warm_up_finishes(tiny_model, tmp_path) -> None:
    env = {"SENTIMENT_WARMUP_ROUNDS": "400"}
    with running_service(tiny_model, tmp_path, wait_ready=False, **env) as svc, svc.client() as client:
        early = client.get("/health/ready")
        assert early.status_code == 503 and early.json()["details"]["warmed"] is False
        scored = client.post("/v1/sentiment", json={"text": "too early"})
        assert scored.status_code == 503 and scored.json()["error"]["code"] == "not_ready"
        for _ in range(600):
            if client.get("/health/ready").status_code == 200:
                break
            time.sleep(0.1)
        assert client.get("/health/ready").status_code == 200
        assert client.post("/v1/sentiment", json={"text": "now"}).status_code == 200


@pytest.mark.parametrize("damage", ["missing", "hash", "labels"])
def test_a_broken_artefact_stops_the_start_with_one_line_naming_the_file(tiny_model, tmp_path, damage) -> None:
    import json
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    if damage == "missing":
        (broken / "tokenizer.json").unlink()
        named = "tokenizer.json"
    elif damage == "hash":
        with served_file(broken).open("ab") as handle:
            handle.write(b"\0")
        named = served_file(broken).name
    else:
        manifest = json.loads((broken / "manifest.json").read_text())
        manifest["labels"] = ["bad", "good"]
        (broken / "manifest.json").write_text(json.dumps(manifest))
        named = "manifest.json"
    result = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                             "SENTIMENT_MODEL_DIR": str(broken)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("error:")


def test_a_model_that_fails_its_warm_up_is_logged_and_never_ready(tiny_model, tmp_path) -> None:
    """A model file that passes the hash check but that ONNX Runtime cannot run: the service stays up,
    answers 503 not_ready, and says why in one log line."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    served_file(broken).write_bytes(b"this is no ONNX graph")
    rehash(broken)
    with running_service(broken, tmp_path, wait_ready=False) as svc, svc.client() as client:
        for _ in range(100):
            if "could not be started" in svc.log.read_text():
                break
            time.sleep(0.1)
        ready = client.get("/health/ready")
        scored = client.post("/v1/sentiment", json={"text": "hello"})
    assert "the model could not be started" in svc.log.read_text()
    assert ready.status_code == 503 and ready.json()["details"]["model_loaded"] is False
    assert scored.status_code == 503 and scored.json()["error"]["code"] == "not_ready"
