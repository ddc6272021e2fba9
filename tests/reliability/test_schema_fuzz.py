"""Property-based fuzzing of the OpenAPI schema (schemathesis) against the running server: whatever the schema
allows, or nearly allows, gets a documented status and a response matching the schema; never a 500.

One check is left out: "schema-valid data is accepted". The schema can say "binary", not "a decodable image",
so most generated bodies are rightly refused (415/422); the corpus tests cover what is accepted."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis

pytestmark = pytest.mark.e2e  # against real server processes on loopback


def test_the_schema_holds_for_generated_requests(server, record):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    calls = 0

    @hypothesis.settings(
        max_examples=150, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
    )
    @hypothesis.given(data=hypothesis.strategies.data())
    def check(data):
        nonlocal calls
        operation = data.draw(hypothesis.strategies.sampled_from(operations))
        data.draw(operation.as_strategy()).call_and_validate(
            excluded_checks=[schemathesis.checks.positive_data_acceptance]
        )
        calls += 1

    check()
    record("schema_fuzz", operations=len(operations), generated_requests=calls)
