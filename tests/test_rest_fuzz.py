"""Hypothesis over REST requests: every route answers any body with a 2xx, or a 4xx in the one
error shape, never a 5xx, and never a connection closed without an answer.

One real daemon serves every example of a test, on a Trio loop in a thread of its own (a daemon
per example would cost more than the examples): most requests go to its app in process (the
Quart test client over the daemon's own services: its store, auth and limiters), a sample over
loopback to the daemon itself, through hypercorn. The routes come from the app's URL map, so a
new route is fuzzed as soon as it exists. Bodies mix what a careless or hostile client sends:
arbitrary bytes, JSON of any shape, the fields relayd reads with values of any type, strings
holding lone surrogates (escaped, and encoded as CESU-8), nesting deeper than the parser takes,
and literals that are not JSON. Each example acts as one of a pool of registered clients.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from relayd import Daemon
from relayd._api import canonical_uuid
from relayd._auth import Registration
from relayd._http import create_app

from .support import IO_DEADLINE, TEST_ENV, HttpClient, HttpResponse, make_config
from .test_rest import MillisecondClock, assert_error

T = TypeVar("T")

# Requests are drawn in batches (drawing them costs more than sending them, and a batch
# amortises hypothesis' cost per example): 2,000 in process and 200 over loopback per run.
BATCH = 10
# No shrinking: a failure names the one request and answer at fault, and shrinking a batch
# against a live daemon takes minutes.
IN_PROCESS = settings(
    max_examples=200,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OVER_LOOPBACK = settings(IN_PROCESS, max_examples=20)
# Clients registered at start; each example acts as one of them ("self"). Deleting or revoking
# one in an example only turns later examples' answers for it into 401s.
CLIENTS = 32
# Rate limits out of the way: a 429 would stop the request before its body is read.
UNLIMITED = {"http": {"register_burst": 10**9, "auth_burst": 10**9, "api_burst": 10**9}}
FIELDS = ("name", "uuid", "client_secret", "refresh_token", "access_token", "keys")
# Routes whose successes are not JSON: Prometheus' text, the browser client's files (and the
# redirect from /app to /app/).
NOT_JSON = frozenset({"/metrics", "/app", "/app/", "/app/<name>", "/docs"})

lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)
strings = st.text(max_size=20) | st.tuples(st.text(max_size=8), lone_surrogates).map("".join)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | strings
    | st.sampled_from(["6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10", "", " ", "x" * 300])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=6,
)
# The fields relayd reads, each absent or of any type, strings (with lone surrogates) likeliest.
field_documents = st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, strings | json_values))
# PUT /clients/{uuid}/keys: lists of key entries, each field absent, of any type, or nearly right.
key_entries = st.fixed_dictionaries(
    {},
    optional={
        "algorithm": st.sampled_from(["x25519", "ed25519", "X25519", "rsa"]) | strings,
        "key": st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode())
        | strings
        | json_values,
    },
)
key_documents = st.fixed_dictionaries({"keys": st.lists(key_entries, max_size=4) | json_values})
# And right ones, so that publishing gets past validation.
valid_key_documents = st.fixed_dictionaries(
    {
        "keys": st.lists(
            st.fixed_dictionaries(
                {
                    "algorithm": st.sampled_from(["x25519", "ed25519"]),
                    "key": st.binary(min_size=32, max_size=32).map(
                        lambda raw: base64.b64encode(raw).decode()
                    ),
                }
            ),
            min_size=1,
            max_size=2,
            unique_by=lambda entry: entry["algorithm"],
        )
    }
)


@st.composite
def json_bodies(draw: st.DrawFn, documents: st.SearchStrategy[Any]) -> bytes:
    doc = draw(documents)
    # json.dumps writes NaN and Infinity (not JSON) and escapes lone surrogates as \ud800.
    if draw(st.booleans()):
        return json.dumps(doc).encode()
    # Unescaped: surrogates become CESU-8 bytes, which are not UTF-8.
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(100, 30_000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = b"1" if opener != b"[" else b""
    body = opener * depth + inner + closer * depth
    return b'{"name": ' + body + b"}" if draw(st.booleans()) else body


bodies = st.one_of(
    json_bodies(field_documents),
    json_bodies(field_documents),
    json_bodies(json_values),
    json_bodies(key_documents),
    deep_bodies(),
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"",
            b"NaN",
            b'{"name": 1e400}',
            b'{"uuid": ' + b"9" * 5000 + b"}",
            b'\xef\xbb\xbf{"name": "bom"}',
            b'{"name": "a", "name": "\\ud800"}',
            b'{"refresh_token": "' + b"a" * 9000 + b'"}',
        ]
    ),
)
# A valid body for each route that reads one: a request may get it with one field replaced.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/register": {
        "name": "alice",
        "uuid": "6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10",
        "client_secret": "secret",
        "invite": "rinv_x",
    },
    "/clients/<client_uuid>/secret": {"client_secret": "secret", "revoke_tokens": False},
    "/admin/invites": {"ttl": 600},
    "/auth/token": {"uuid": "6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10", "client_secret": "secret"},
    "/auth/refresh": {"refresh_token": "token"},
    "/auth/revoke": {"refresh_token": "token"},
    "/clients/<client_uuid>/keys": {
        "keys": [{"algorithm": "x25519", "key": base64.b64encode(bytes(32)).decode()}]
    },
}


@st.composite
def one_field_replaced(draw: st.DrawFn, rule: str) -> bytes:
    base = VALID_BODIES[rule]
    key = draw(st.sampled_from(sorted(base)))
    return draw(json_bodies(st.just({**base, key: draw(strings | json_values)})))


def request_bodies(rule: str) -> st.SearchStrategy[bytes]:
    if rule == "/clients/<client_uuid>/keys":
        return json_bodies(valid_key_documents) | one_field_replaced(rule) | bodies
    return one_field_replaced(rule) | bodies if rule in VALID_BODIES else bodies


content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        None,
    ]
)
credentials = st.sampled_from(["none", "access", "refresh", "admin", "garbage"])


@attrs.frozen
class Fuzzed:
    method: str
    rule: str
    target: str  # which client a <client_uuid> names
    body: bytes
    content_type: str | None
    credential: str
    client: int  # which of the pre-registered clients "self" is


@st.composite
def requests(draw: st.DrawFn, rules: list[tuple[str, frozenset[str]]]) -> Fuzzed:
    # Every route, those that read a body (POST, PUT) as often as all the others together.
    with_body = [rule for rule in rules if {"POST", "PUT"} & rule[1]]
    rule, methods = draw(st.sampled_from(with_body) | st.sampled_from(rules))
    # Mostly a method the route serves (its body is read only then), sometimes another.
    served = sorted(methods - {"HEAD", "OPTIONS"})
    others = ["HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "POST", "GET"]
    method = draw(st.sampled_from(served) if draw(st.integers(0, 4)) else st.sampled_from(others))
    return Fuzzed(
        method=method,
        rule=rule,
        target=draw(st.sampled_from(["self", "other", "garbage"])),
        body=draw(request_bodies(rule)),
        content_type=draw(st.just("application/json") | content_types),
        credential=draw(credentials),
        client=draw(st.integers(0, CLIENTS - 1)),
    )


def routes(app: Any) -> list[tuple[str, frozenset[str]]]:
    """Every route of ``app``, with its methods."""
    return sorted((rule.rule, frozenset(rule.methods or ())) for rule in app.url_map.iter_rules())


@attrs.frozen
class Credentials:
    """What one example may present: a fresh client's tokens, an admin's, garbage."""

    tokens: Mapping[str, str | None]
    uuids: Mapping[str, str]

    def path(self, request: Fuzzed) -> str:
        return request.rule.replace("<client_uuid>", self.uuids[request.target])

    def headers(self, request: Fuzzed) -> dict[str, str]:
        headers = {}
        if request.content_type is not None:
            headers["Content-Type"] = request.content_type
        token = self.tokens[request.credential]
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers


class LiveRelayd:
    """A real daemon on a Trio loop in its own thread; :meth:`call` runs a coroutine there."""

    def __init__(self, tmp_path: Path) -> None:
        self._config = make_config(tmp_path, UNLIMITED)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzzed-relayd", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.app: Any = None
        self.http: HttpClient | None = None
        self.clients: list[Registration] = []
        self.admin = ""

    def __enter__(self) -> LiveRelayd:
        self._thread.start()
        assert self._ready.wait(IO_DEADLINE), "relayd did not start"
        if self._failure is not None:
            raise self._failure
        return self

    def __exit__(self, *_: object) -> None:
        assert self._token is not None
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(IO_DEADLINE)
        assert not self._thread.is_alive(), "relayd did not stop"
        if self._failure is not None:
            raise self._failure

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the daemon's loop, within ``IO_DEADLINE``."""

        async def bounded() -> T:
            with trio.fail_after(IO_DEADLINE):
                return await fn(*args)

        return trio.from_thread.run(bounded, trio_token=self._token)

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the test thread
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        daemon = Daemon(self._config, environ=TEST_ENV, clock=MillisecondClock())
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(daemon.run)
            services = daemon.services
            assert services is not None
            self.app = create_app(services)
            self.http = HttpClient(*addresses.http)
            self.clients = [
                await services.auth.register(f"client-{i}", None, source=None)
                for i in range(CLIENTS + 1)
            ]
            self.admin = services.auth.mint_operator_token("ops", ("admin",), 3600).token
            self._ready.set()
            await self._stop.wait()
            daemon.stop()

    def credentials(self, request: Fuzzed) -> Credentials:
        """The tokens of the client the request acts as, and the rest."""
        client, other = self.clients[request.client], self.clients[-1]
        return Credentials(
            tokens={
                "none": None,
                "access": client.tokens.access.token,
                "refresh": client.tokens.refresh.token,
                "admin": self.admin,
                "garbage": "not.a.token",
            },
            uuids={"self": client.client.uuid, "other": other.client.uuid, "garbage": "%ED%A0%80x"},
        )

    async def in_process(self, request: Fuzzed) -> HttpResponse:
        credentials = self.credentials(request)
        response = await self.app.test_client().open(
            credentials.path(request),
            method=request.method,
            data=request.body,
            headers=credentials.headers(request),
        )
        headers = {k.lower(): v for k, v in response.headers.items()}
        return HttpResponse(response.status_code, headers, await response.get_data())

    async def over_loopback(self, request: Fuzzed) -> HttpResponse:
        credentials = self.credentials(request)
        assert self.http is not None
        return await self.http.request(
            request.method,
            credentials.path(request),
            body=request.body,
            headers=credentials.headers(request),
        )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRelayd]:
    with LiveRelayd(tmp_path_factory.mktemp("fuzz")) as live:
        yield live


def check(response: HttpResponse, request: Fuzzed) -> None:
    """No 5xx and an answer (status 0: the connection closed without one); an error is JSON in
    the one shape; a success of a GET/POST is JSON."""
    assert 0 < response.status < 500, (request, response)
    if request.method in ("HEAD", "OPTIONS") and response.status < 400:
        return
    if response.status >= 400:
        if request.method != "HEAD":
            assert_error(response, response.status)
    elif request.rule not in NOT_JSON:
        assert response.headers.get("content-type", "").startswith("application/json")
        assert isinstance(response.json(), dict)


def batches(live: LiveRelayd) -> st.SearchStrategy[list[Fuzzed]]:
    return st.lists(requests(routes(live.app)), min_size=BATCH, max_size=BATCH)


@IN_PROCESS
@given(data=st.data())
def test_every_route_answers_any_body_without_a_5xx(live: LiveRelayd, data: st.DataObject) -> None:
    for request in data.draw(batches(live)):
        check(live.call(live.in_process, request), request)


@OVER_LOOPBACK
@given(data=st.data())
def test_over_loopback_too(live: LiveRelayd, data: st.DataObject) -> None:
    for request in data.draw(batches(live)):
        check(live.call(live.over_loopback, request), request)


def test_the_fuzz_covers_every_route(live: LiveRelayd) -> None:
    """The URL map is read, not listed by hand: every route relayd serves is fuzzed."""
    assert {rule for rule, _ in routes(live.app)} >= {
        "/",
        "/register",
        "/auth/token",
        "/auth/refresh",
        "/auth/revoke",
        "/clients",
        "/clients/<client_uuid>",
        KEYS_RULE,
        "/admin/clients",
        "/admin/clients/<client_uuid>/revoke",
        "/admin/clients/<client_uuid>/reset-secret",
        "/admin/invites",
        "/clients/<client_uuid>/secret",
        "/health/live",
        "/health/ready",
        "/metrics",
    }


@given(st.uuids(), st.sampled_from([str, lambda u: str(u).upper(), lambda u: u.hex]))
def test_canonical_uuid_agrees_with_the_uuid_module(value: Any, spell: Any) -> None:
    """The fast path for already-canonical spellings gives what parsing gives."""
    text = spell(value)
    assert canonical_uuid(text) == str(uuid_module.UUID(text))


@given(st.text(alphabet="0123456789abcdefABCDEF-{}urn:", max_size=45))
def test_canonical_uuid_refuses_what_the_uuid_module_refuses(text: str) -> None:
    try:
        expected: str | None = str(uuid_module.UUID(text))
    except ValueError:
        expected = None
    try:
        got: str | None = canonical_uuid(text)
    except ValueError:
        got = None
    assert got == expected


KEYS_RULE = "/clients/<client_uuid>/keys"


@IN_PROCESS
@given(
    bodies=st.lists(
        json_bodies(valid_key_documents | key_documents), min_size=BATCH, max_size=BATCH
    )
)
def test_publishing_keys_answers_any_document_without_a_5xx(
    live: LiveRelayd, bodies: list[bytes]
) -> None:
    """The requests above rarely get a key document past authentication: these all do, each
    from a client of its own (the examples above delete and revoke the pool's)."""

    async def publish_and_read(body: bytes) -> tuple[HttpResponse, HttpResponse]:
        client = live.app.test_client()
        registered = await client.post("/register", json={"name": "keys"})
        doc = await registered.get_json()
        path = f"/clients/{doc['uuid']}/keys"
        auth = {"Authorization": f"Bearer {doc['access_token']}"}
        put = await client.put(
            path, data=body, headers={**auth, "Content-Type": "application/json"}
        )
        get = await client.get(path, headers=auth)
        answers = []
        for response in (put, get):
            headers = {k.lower(): v for k, v in response.headers.items()}
            answers.append(HttpResponse(response.status_code, headers, await response.get_data()))
        return answers[0], answers[1]

    for body in bodies:
        put, get = live.call(publish_and_read, body)
        check(put, Fuzzed("PUT", KEYS_RULE, "self", body, "application/json", "access", 0))
        assert get.status == 200, get
        listed = get.json()["keys"]
        if put.status == 200:
            assert listed == put.json()["keys"]
        else:
            assert listed == [], (put, get)
