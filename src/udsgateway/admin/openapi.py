"""The OpenAPI 3 document served at ``/api/v1/openapi.json``.

Built from the routes themselves (path, method, role, request schema), so it
cannot leave a route out; the texts around them are written here.
"""

from __future__ import annotations

import re
from typing import Any

from udsgateway import __version__
from udsgateway.admin.http import Route

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}


def _error(text: str) -> dict[str, Any]:
    return {"description": text, "content": {"application/json": {"schema": _ERROR}}}


def operation(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK (JSON)"}}
    if route.response is not None:
        responses["200"]["content"] = {"application/json": {"schema": route.response}}
    entry: dict[str, Any] = {
        "summary": route.summary,
        "tags": [route.tag],
        "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', route.path.lower())}",
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"\{(\w+)\}", route.path)
    ]
    if parameters:
        entry["parameters"] = parameters
    if route.role is None:
        entry["security"] = []
        entry["description"] = "No credentials needed."
    else:
        needs = f"Needs the `{route.role}` role"
        if route.content:
            needs += " and the `view_content` permission; every call is audited"
        entry["description"] = needs + "."
        responses["401"] = _error("no or unknown credentials (answered before the body is read)")
        responses["403"] = _error("the caller's role is too low, or a cross-site request")
    if route.schema is not None:
        entry["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": route.schema}},
        }
        responses["400"] = _error("the body is not JSON, or does not match the schema")
        responses["413"] = _error("the body is over the size limit")
        responses["415"] = _error("the body is not application/json")
    entry["responses"] = responses
    return entry


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "udsgateway admin API",
            "version": __version__,
            "description": (
                "JSON over HTTP. Authenticate with an API token "
                "(`Authorization: Bearer udsgw_...`) or, from the console, a session "
                "cookie with an Origin check and the X-CSRF-Token header."
            ),
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "udsgw_session"},
            }
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
    }
