"""Message text never leaves the request: not in logs, not in metric labels, not in error bodies."""

from __future__ import annotations

from tests.conftest import running_service

MARKER = "zq-private-7f3a"  # a string no log line, metric or error message could contain by chance


def test_message_text_appears_in_no_log_metric_or_error(tiny_model, tmp_path) -> None:
    text = f"my card {MARKER} was charged twice"
    bodies = [
        {"text": text}, {"texts": [text, "ok"]}, {"text": text, "fallback": "always"},
        {"texts": [text] * 100}, {"text": text * 500}, {"texts": [text, "   "]}, {"texts": [text, 7]},
        {"text": text, "colour": "red"}, {"text": text, "texts": [text]}, {"texts": text},
    ]
    raw = [b'{"text": "' + text.encode() + b'"', b'{"text": "' + text.encode() + b'\xff"}']
    with running_service(tiny_model, tmp_path, SENTIMENT_LOG_LEVEL="DEBUG", SENTIMENT_MAX_TEXT_CHARS="2000",
                         SENTIMENT_MAX_TEXTS="16", SENTIMENT_MAX_BODY_BYTES="12000") as svc, svc.client() as client:
        answers = [client.post("/v1/sentiment", json=body) for body in bodies]
        answers += [client.post("/v1/sentiment", content=body, headers={"content-type": "application/json"})
                    for body in raw]
        answers.append(client.post("/v1/sentiment/explain", json={"text": text}))  # no teacher: 503
        metrics = client.get("/metrics").text
    assert {a.status_code for a in answers} >= {200, 400, 413, 422, 503}
    errors = [a.text for a in answers if a.status_code >= 400]
    assert errors and not [e for e in errors if MARKER in e]
    assert MARKER not in metrics
    assert MARKER not in svc.log.read_text()
