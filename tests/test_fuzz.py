"""Generated requests against the service's own OpenAPI schema (schemathesis), valid and invalid alike:
never a 500, every error a JSON error body, every answer documented and shaped as the schema says. The
service runs without a teacher, so explain's documented answer is 503 `teacher_unavailable`."""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

CASES = 1_200


def test_generated_requests_get_documented_answers_and_never_a_500(service) -> None:
    schema = schemathesis.openapi.from_url(f"{service.url}/schema/openapi.json")
    calls: Counter[str] = Counter()
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        response = case.call(timeout=30)
        calls[f"{case.method} {case.path} {response.status_code}"] += 1
        assert response.status_code != 500, response.text[:300]
        if response.status_code >= 400 and case.path != "/health/ready":
            error = response.json()["error"]
            assert error["code"] and error["message"]
        # Not checked: that every schema-valid body is accepted. Blank texts and the deployment's limits on
        # text count and length are refused with a 422 naming the field, which the schema cannot state.
        case.validate_response(response, excluded_checks=[schemathesis.checks.not_a_server_error,
                                                          schemathesis.checks.positive_data_acceptance])

    check()
    print(dict(sorted(calls.items())))
    assert sum(calls.values()) >= 1_000
    assert {key.split()[1] for key in calls} >= {"/v1/sentiment", "/v1/sentiment/explain", "/v1/model"}
