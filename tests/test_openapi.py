"""The REST API's OpenAPI description (issue 15): generated from the code, it names every route
relayd serves, each request body the routes parse, the error shape, and who needs a token; and
a human page renders it under its own Content-Security-Policy."""

from __future__ import annotations

import re
from typing import Any

import attrs
import msgspec
import pytest

from relayd._api import (
    InviteRequest,
    LoginRequest,
    ReadReceiptsRequest,
    RefreshRequest,
    RegisterRequest,
    RevokeRequest,
    RolesRequest,
    RotateSecretRequest,
)
from relayd._http import create_app
from relayd._http_topics import CreateTopicRequest, TopicRequest, TopicSettings
from relayd._keys import PublishKeysRequest
from relayd._openapi import DOCS_CSP, OutgoingMessage

from .support import RunningRelayd

# Served, but not the API: the description itself, its page, the browser client's files.
NOT_API = {"/openapi.json", "/docs", "/app", "/app/", "/app/<name>"}
BODIES = {
    ("/register", "post"): RegisterRequest,
    ("/auth/token", "post"): LoginRequest,
    ("/auth/refresh", "post"): RefreshRequest,
    ("/auth/revoke", "post"): RevokeRequest,
    ("/clients/{client_uuid}/secret", "post"): RotateSecretRequest,
    ("/admin/invites", "post"): InviteRequest,
    ("/admin/clients/{client_uuid}/roles", "put"): RolesRequest,
    ("/clients/{client_uuid}/keys", "put"): PublishKeysRequest,
    ("/clients/{client_uuid}/read-receipts", "put"): ReadReceiptsRequest,
    ("/messages", "post"): OutgoingMessage,
    ("/topics/create", "post"): CreateTopicRequest,
    ("/topics/subscribe", "post"): TopicRequest,
    ("/topics/unsubscribe", "post"): TopicRequest,
    ("/topics/{topic_id}", "patch"): TopicSettings,
}
# Routes anyone may call without a token.
OPEN = {"/", "/health/live", "/health/ready", "/metrics", "/register", "/auth/token"}
OPEN |= {"/auth/refresh", "/auth/revoke", "/clients/{client_uuid}/secret"}


@pytest.fixture
async def description(relayd: RunningRelayd) -> dict[str, Any]:
    response = await relayd.http.get("/openapi.json")
    assert response.status == 200, response
    doc: dict[str, Any] = response.json()
    return doc


def served(relayd: RunningRelayd) -> set[tuple[str, str]]:
    """(path, method) of every route the app serves, in OpenAPI's path syntax."""
    services = relayd.daemon.services
    assert services is not None
    app = create_app(services)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule in NOT_API:
            continue
        path = re.sub(r"<(?:[^:>]*:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((path, method.lower()))
    return routes


async def test_every_route_is_described(relayd: RunningRelayd, description: dict[str, Any]) -> None:
    assert description["openapi"].startswith("3.1")
    described = {(path, method) for path, ops in description["paths"].items() for method in ops}
    assert described == served(relayd)
    for path, ops in description["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("summary") or op.get("description"), f"{where}: no summary"
            assert op.get("tags"), f"{where}: no tag"
            assert "429" in op["responses"], f"{where}: the rate limit's answer"


def fields_of(cls: type[Any]) -> set[str]:
    """The JSON keys of a body class: an attrs class, or a msgspec Struct (the message
    envelope, whose ``from`` is no Python name)."""
    if issubclass(cls, msgspec.Struct):
        return {f.encode_name for f in msgspec.structs.fields(cls)}
    return {a.name for a in attrs.fields(cls)}


async def test_request_bodies_are_the_classes_the_routes_parse(
    description: dict[str, Any],
) -> None:
    paths = description["paths"]
    with_body = {
        (path, method)
        for path, ops in paths.items()
        for method, op in ops.items()
        if "requestBody" in op
    }
    assert with_body == set(BODIES)
    for (path, method), cls in BODIES.items():
        schema = paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema["properties"]) == fields_of(cls), (path, cls)
        for status in ("400", "413", "415", "422"):
            assert status in paths[path][method]["responses"], (path, status)


async def test_errors_have_the_one_shape_and_tokens_are_named(
    description: dict[str, Any],
) -> None:
    assert description["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, ops in description["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema["title"] == "ErrorAnswer", (path, method, status)
                    ref = schema["properties"]["error"]["$ref"].rpartition("/")[2]
                    detail = description["components"]["schemas"][ref]
                    assert set(detail["properties"]) == {"code", "message", "details"}
            needs_token = path not in OPEN
            assert (op.get("security") == [{"bearer": []}]) == needs_token, (path, method)
            assert ("401" in op["responses"]) or path in OPEN - {"/register"}, (path, method)


async def test_the_docs_page_renders_the_description_under_its_own_policy(
    relayd: RunningRelayd,
) -> None:
    page = await relayd.http.get("/docs")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert b'data-url="/openapi.json"' in page.body
    assert page.headers["content-security-policy"] == DOCS_CSP
    assert "script-src https://cdn.jsdelivr.net;" in DOCS_CSP
    # Every other answer keeps the policy that allows nothing.
    api = await relayd.http.get("/openapi.json")
    assert api.headers["content-security-policy"].startswith("default-src 'none'")


async def test_every_reference_resolves(description: dict[str, Any]) -> None:
    """quart-schema's msgspec path drops the schemas of nested classes; relayd adds them back."""
    refs: list[str] = []
    stack: list[Any] = [description]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                refs.append(item["$ref"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    assert refs  # the error detail, at least
    schemas = description["components"]["schemas"]
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rpartition("/")[2] in schemas, ref
