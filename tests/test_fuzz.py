"""Fuzz every operation of the OpenAPI document (schemathesis): no request may produce a 500."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.integration


def test_no_request_produces_a_server_error(api, tenant_key: str) -> None:  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    headers = {"Authorization": f"Bearer {tenant_key}"}
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def no_server_error(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(headers=headers)
            assert response.status_code < 500, (response.status_code, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] and error["message"], "every error has a code and a message"

        try:
            no_server_error()
        except AssertionError as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n".join(failures)


def test_every_request_field_is_described(api) -> None:  # type: ignore[no-untyped-def]
    """The OpenAPI document (and so the API docs) describes every request and response field."""
    document = api.get("/openapi.json").json()
    missing = []
    for name, component in document["components"]["schemas"].items():
        if name in ("HTTPValidationError", "ValidationError") or name.startswith("Body_"):
            continue
        for field, spec in component.get("properties", {}).items():
            if field != "object" and "description" not in spec:
                missing.append(f"{name}.{field}")
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                described = "description" in parameter or "description" in parameter.get("schema", {})
                if not described and parameter["in"] != "path":
                    missing.append(f"{method.upper()} {path} ?{parameter['name']}")
    assert not missing, missing
