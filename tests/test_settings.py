"""Settings: every SENTIMENT_* value is parsed strictly, and contradictions stop the start with one line."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.conftest import run_module


def test_the_defaults_are_consistent() -> None:
    assert Settings.from_env({}).validated() == Settings()


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("0", False), (" Off ", False), ("YES", True)])
def test_booleans_read_the_usual_words(raw, value) -> None:
    assert Settings.from_env({"SENTIMENT_TEACHER_ENABLED": raw}).teacher_enabled is value


@pytest.mark.parametrize(("env", "named"), [
    ({"SENTIMENT_TEACHER_ENABLED": "flase"}, "SENTIMENT_TEACHER_ENABLED"),  # a typo must not read as false
    ({"SENTIMENT_PORT": "eighty"}, "SENTIMENT_PORT"),
    ({"SENTIMENT_QUEUE_SIZE": "8", "SENTIMENT_MAX_TEXTS": "64"}, "SENTIMENT_QUEUE_SIZE"),
    ({"SENTIMENT_FALLBACK_THRESHOLD": "1.5"}, "SENTIMENT_FALLBACK_THRESHOLD"),
    ({"SENTIMENT_FALLBACK_MAX_SHARE": "-0.1"}, "SENTIMENT_FALLBACK_MAX_SHARE"),
    ({"SENTIMENT_REQUEST_TIMEOUT_S": "0"}, "timeouts"),
    ({"SENTIMENT_FALLBACK": "sometimes"}, "SENTIMENT_FALLBACK"),
    ({"SENTIMENT_PORT": "70000"}, "SENTIMENT_PORT"),
    ({"SENTIMENT_MAX_BATCH_MS": "-1"}, "SENTIMENT_MAX_BATCH_MS"),
    ({"SENTIMENT_BACKLOG_BATCH_TOKENS": "-1"}, "SENTIMENT_BACKLOG_BATCH_TOKENS"),
    ({"SENTIMENT_WORKER_STOP_TIMEOUT_S": "0"}, "SENTIMENT_WORKER_STOP_TIMEOUT_S"),
])
def test_bad_or_contradictory_settings_are_refused_naming_the_variable(env, named) -> None:
    with pytest.raises(ValueError, match=named):
        Settings.from_env(env)


def test_the_service_refuses_to_start_with_bad_settings(monkeypatch) -> None:
    monkeypatch.setenv("SENTIMENT_TEACHER_ENABLED", "ture")
    result = run_module("service", check=False, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: SENTIMENT_TEACHER_ENABLED='ture'")
