"""Roles and permissions (issue 15): the ``[roles]`` config, the policy it resolves to, and the
permission matrix on a real relayd configured as seed 004's school (admin > teacher > student):
who may message whom over the WebSocket, who may read the directory and use the admin API, and
a role change applying at once to open sessions and to tokens already issued."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd import Config
from relayd._config import RolesConfig
from relayd._roles import RoleDirectory, RolePolicy

from .support import Engine, RunningRelayd, start_relayd
from .test_admin import cli, config_file, file_config
from .test_config import config_error, write
from .test_rest import admin_token, assert_error, assert_ok
from .ws_support import WsClient, ws_connect

SCHOOL: dict[str, Any] = {
    "default": "student",
    "define": {
        "student": ["message:teacher", "publish"],
        "teacher": [
            "message:student",
            "message:teacher",
            "directory",
            "create_topics",
            "publish",
            "presence",
        ],
        "admin": ["inherit:teacher", "message:*", "admin"],
    },
}
ROLES = ("student", "teacher", "admin")


def school() -> RolePolicy:
    config = Config(roles=RolesConfig(default="student", define=_tuples(SCHOOL["define"])))
    return RolePolicy.from_config(config.roles)


def _tuples(define: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    return {role: tuple(grants) for role, grants in define.items()}


# --- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "complaint"),
    [
        ('define = { a = ["fly"] }\ndefault = "a"', "'fly' is not a grant"),
        ('define = { a = ["inherit:b"] }\ndefault = "a"', "'inherit:b' is not a grant"),
        ('define = { a = ["message:b"] }\ndefault = "a"', "'message:b' is not a grant"),
        ('define = { a = ["inherit:a"] }\ndefault = "a"', "'inherit:a' is not a grant"),
        (
            'define = { a = ["inherit:b"], b = ["inherit:a"] }\ndefault = "a"',
            "roles inherit in a circle: a > b > a",
        ),
        ('define = { a = [] }\ndefault = "b"', "default: 'b' is not a role"),
        ('define = { A = [] }\ndefault = "A"', "a role name is"),
        # `$` matches before a final newline: "a\n" would pass, and be stored as "a".
        ('define = { "a\\n" = [] }\ndefault = "a\\n"', "a role name is"),
        ('define = { a = "directory" }\ndefault = "a"', "a: must be a list of grants"),
        ('define = ["a"]', "must be a table of roles"),
    ],
)
def test_a_bad_roles_table_is_refused_naming_it(tmp_path: Path, roles: str, complaint: str) -> None:
    message = config_error(write(tmp_path, f"[roles]\n{roles}\n"))
    assert "roles" in message
    assert complaint in message


def test_a_roles_table_can_be_written_as_a_section(tmp_path: Path) -> None:
    text = (
        '[roles]\ndefault = "student"\n[roles.define]\nstudent = ["message:teacher", "publish"]\n'
        'teacher = ["message:student", "message:teacher", "directory", "create_topics",'
        ' "publish", "presence"]\n'
        'admin = ["inherit:teacher", "message:*", "admin"]\n'
    )
    from relayd._config import load_config

    config = load_config(write(tmp_path, text), environ={})
    assert RolePolicy.from_config(config.roles) == school()


def test_the_policy_resolves_inheritance_and_admin_grants_everything() -> None:
    policy = school()
    assert policy.grants["admin"] >= policy.grants["teacher"]
    assert policy.allows(["teacher"], "directory")
    assert not policy.allows(["student"], "directory")
    assert policy.allows(["admin"], "directory")
    assert policy.allows(["admin"], "anything")
    assert not policy.allows(["nobody"], "directory")
    assert policy.may_message(["student"], ["teacher"])
    assert not policy.may_message(["student"], ["student"])
    assert not policy.may_message(["student"], ["admin"])
    assert policy.may_message(["student", "teacher"], ["student"])
    assert policy.may_message(["admin"], ["nobody"])
    assert not policy.messaging_is_open
    assert RolePolicy.from_config(RolesConfig()).messaging_is_open


def test_the_directory_follows_changes() -> None:
    directory = RoleDirectory(school(), {"s": ("student",), "t": ("teacher",)})
    assert directory.may_message("s", "t")
    assert not directory.may_message("t2", "t")  # an unknown sender holds no role
    assert directory.may_message("s", "nobody")  # the store refuses it as unknown
    directory.update("s2", ("student",))
    assert not directory.may_message("s", "s2")
    directory.update("s", ("teacher",))
    assert directory.may_message("s", "s2")
    directory.update("s2", None)
    assert directory.may_message("s", "s2")


# --- the permission matrix, end to end ----------------------------------------------------------


async def start_school(nursery: trio.Nursery, state: Path, engine: Engine) -> RunningRelayd:
    return await start_relayd(nursery, file_config(state, engine, roles=SCHOOL))


async def enrol(relayd: RunningRelayd, name: str, role: str) -> dict[str, Any]:
    doc = await relayd.http.register(name)
    if role != "student":  # registration gives roles.default
        path = f"/admin/clients/{doc['uuid']}/roles"
        changed = await relayd.http.request(
            "PUT", path, json_body={"roles": [role]}, token=admin_token(relayd)
        )
        assert assert_ok(changed)["roles"] == [role]
    return doc


async def outcome(socket: WsClient, to: str, msgid: str) -> str:
    """What relayd answers a message: ``accepted`` (its first receipt), or the error's code."""
    await socket.send({"to": to, "msgid": msgid, "content": "hello"})
    frame = await socket.next()
    while frame.get("type") not in ("delivery_status", "error"):
        frame = await socket.next()  # a message queued for this client, delivered now
    if frame["type"] == "error":
        assert frame["error"]["details"]["to"] == to
        return str(frame["error"]["code"])
    assert frame["status"] in ("queued_offline", "delivered"), frame  # to itself: delivered
    return "accepted"


async def test_the_school_permission_matrix(tmp_path: Path, engine: Engine) -> None:
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, tmp_path / "state", engine)
        people = {role: await enrol(relayd, role, role) for role in ROLES}
        expected_message = {
            ("student", "student"): "not_permitted",
            ("student", "teacher"): "accepted",
            ("student", "admin"): "not_permitted",
            ("teacher", "student"): "accepted",
            ("teacher", "teacher"): "accepted",
            ("teacher", "admin"): "not_permitted",
            ("admin", "student"): "accepted",
            ("admin", "teacher"): "accepted",
            ("admin", "admin"): "accepted",
        }
        seen_message = {}
        for sender in ROLES:
            async with ws_connect(relayd, people[sender]["access_token"]) as socket:
                assert (await socket.next())["type"] == "connection"
                for recipient in ROLES:
                    to = people[recipient]["uuid"]
                    msgid = f"{sender}-{recipient}"
                    seen_message[(sender, recipient)] = await outcome(socket, to, msgid)
        assert seen_message == expected_message

        seen_rest = {}
        for role in ROLES:
            token = people[role]["access_token"]
            directory = await relayd.http.get("/clients", token=token)
            one = await relayd.http.get(f"/clients/{people['admin']['uuid']}", token=token)
            admin = await relayd.http.get("/admin/clients", token=token)
            seen_rest[role] = (directory.status, one.status, admin.status)
        assert seen_rest == {
            "student": (403, 403, 403),
            "teacher": (200, 200, 403),
            "admin": (200, 200, 200),
        }
        refused = await relayd.http.get("/clients", token=people["student"]["access_token"])
        error = assert_error(refused, 403, "not_permitted")
        assert error["details"] == {"permission": "directory", "roles": ["student"]}
        listed = assert_ok(
            await relayd.http.get("/admin/clients", token=people["admin"]["access_token"])
        )
        assert {item["name"]: item["roles"] for item in listed["items"]} == {
            role: [role] for role in ROLES
        }
        relayd.daemon.stop()


async def test_the_school_topic_permission_matrix(tmp_path: Path, engine: Engine) -> None:
    """Who creates topics, reads presence, publishes and broadcasts: each grant's refusal is
    a 403 ``not_permitted`` (REST) or an error frame (WebSocket) naming the permission."""
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, tmp_path / "state", engine)
        people = {role: await enrol(relayd, role, role) for role in ROLES}
        http = relayd.http
        seen_create = {}
        for role in ROLES:
            made = await http.request(
                "POST",
                "/topics/create",
                json_body={"topic_id": f"room-{role}", "presence": True},
                token=people[role]["access_token"],
            )
            seen_create[role] = made.status
        assert seen_create == {"student": 403, "teacher": 200, "admin": 200}
        refused = await http.request(
            "POST",
            "/topics/create",
            json_body={"topic_id": "x"},
            token=people["student"]["access_token"],
        )
        assert assert_error(refused, 403, "not_permitted")["details"] == {
            "permission": "create_topics",
            "roles": ["student"],
        }
        for role in ROLES:  # everyone joins the teacher's room
            joined = await http.request(
                "POST",
                "/topics/subscribe",
                json_body={"topic_id": "room-teacher"},
                token=people[role]["access_token"],
            )
            assert_ok(joined)
        seen_presence = {
            role: (
                await http.get("/topics/room-teacher/presence", token=people[role]["access_token"])
            ).status
            for role in ROLES
        }
        assert seen_presence == {"student": 403, "teacher": 200, "admin": 200}

        seen_frames = {}
        for role in ROLES:
            async with ws_connect(relayd, people[role]["access_token"]) as socket:
                assert (await socket.next())["type"] == "connection"
                await socket.send({"topic_id": "room-teacher", "content": role})
                published = await socket.next_of("topic_sent")
                await socket.send({"type": "broadcast", "content": role})
                answer = await socket.next()
                while answer["type"] not in ("broadcast_sent", "error"):
                    answer = await socket.next()
                seen_frames[role] = (
                    published["subscribers"],
                    answer["type"] if answer["type"] != "error" else answer["error"]["code"],
                )
        assert seen_frames == {
            "student": (2, "not_permitted"),
            "teacher": (2, "not_permitted"),
            "admin": (2, "broadcast_sent"),
        }
        relayd.daemon.stop()


async def test_a_role_change_applies_at_once_and_survives_a_restart(
    tmp_path: Path, engine: Engine
) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, state, engine)
        pupil = await enrol(relayd, "pupil", "student")
        other = await enrol(relayd, "other", "student")
        token = pupil["access_token"]
        path = f"/admin/clients/{pupil['uuid']}/roles"
        async with ws_connect(relayd, token) as socket:
            assert (await socket.next())["type"] == "connection"
            assert await outcome(socket, other["uuid"], "m1") == "not_permitted"
            assert (await relayd.http.get("/clients", token=token)).status == 403
            promoted = await relayd.http.request(
                "PUT", path, json_body={"roles": ["teacher"]}, token=admin_token(relayd)
            )
            assert assert_ok(promoted)["roles"] == ["teacher"]
            # The same session and the same token, at once.
            assert await outcome(socket, other["uuid"], "m2") == "accepted"
            assert (await relayd.http.get("/clients", token=token)).status == 200
            demoted = await relayd.http.request(
                "PUT", path, json_body={"roles": ["student"]}, token=admin_token(relayd)
            )
            assert_ok(demoted)
            assert await outcome(socket, other["uuid"], "m3") == "not_permitted"
            promoted = await relayd.http.request(
                "PUT", path, json_body={"roles": ["teacher"]}, token=admin_token(relayd)
            )
            assert_ok(promoted)
        relayd.daemon.stop()

    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, state, engine)
        async with ws_connect(relayd, token) as socket:
            assert (await socket.next())["type"] == "connection"
            assert await outcome(socket, other["uuid"], "m4") == "accepted"
        # A deleted client is forgotten: messages to it are refused as unknown.
        assert_ok(await relayd.http.delete(f"/clients/{other['uuid']}", token=admin_token(relayd)))
        newcomer = await relayd.http.register("newcomer")
        async with ws_connect(relayd, token) as socket:
            assert (await socket.next())["type"] == "connection"
            assert await outcome(socket, newcomer["uuid"], "m5") == "accepted"
        relayd.daemon.stop()


@pytest.mark.parametrize(
    ("body", "field_problem"),
    [
        ({"roles": []}, "must list 1 to 8 roles"),
        ({"roles": ["wizard"]}, "wizard: not a role"),
        ({"roles": "teacher"}, "must be a list of strings"),
        ({"roles": ["teacher", "teacher"]}, "must not repeat a role"),
        ({"roles": [1]}, None),
        ({}, "is required"),
    ],
)
async def test_bad_roles_are_422_naming_the_field(
    tmp_path: Path, body: dict[str, Any], field_problem: str | None, engine: Engine
) -> None:
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, tmp_path / "state", engine)
        pupil = await relayd.http.register("pupil")
        response = await relayd.http.request(
            "PUT",
            f"/admin/clients/{pupil['uuid']}/roles",
            json_body=body,
            token=admin_token(relayd),
        )
        error = assert_error(response, 422)
        assert error["details"]["field"].startswith("roles")
        if field_problem is not None:
            assert field_problem in error["message"]
        relayd.daemon.stop()


async def test_only_an_admin_changes_roles(tmp_path: Path, engine: Engine) -> None:
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, tmp_path / "state", engine)
        teacher = await enrol(relayd, "teacher", "teacher")
        path = f"/admin/clients/{teacher['uuid']}/roles"
        body = {"roles": ["admin"]}
        own = await relayd.http.request("PUT", path, json_body=body, token=teacher["access_token"])
        assert_error(own, 403, "admin_required")
        nobody = await relayd.http.request(
            "PUT",
            "/admin/clients/6b2b6c3e-6f5c-4a5b-9d1a-1f6e3c2a9b10/roles",
            json_body=body,
            token=admin_token(relayd),
        )
        assert_error(nobody, 404, "unknown_client")
        relayd.daemon.stop()


async def test_relayd_admin_roles_live_and_on_the_store(tmp_path: Path, engine: Engine) -> None:
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, state, engine)
        host, port = relayd.addresses.http
        config = config_file(tmp_path, state, f"{host}:{port}", engine)
        config.write_text(
            config.read_text()
            + '[roles]\ndefault = "student"\n[roles.define]\nstudent = ["message:teacher"]\n'
            'teacher = ["message:student", "message:teacher", "directory"]\n'
            'admin = ["inherit:teacher", "message:*", "admin"]\n'
        )
        pupil = await relayd.http.register("pupil")
        done = await cli("admin", "roles", pupil["uuid"], "teacher", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert (await relayd.http.get("/clients", token=pupil["access_token"])).status == 200
        relayd.daemon.stop()
    done = await cli("admin", "roles", pupil["uuid"], "admin", "--config", str(config))
    assert done.returncode == 0, done.stderr
    wizard = await cli("admin", "roles", pupil["uuid"], "wizard", "--config", str(config))
    assert (wizard.returncode, b"wizard: not a role" in wizard.stderr) == (1, True)
    listed = await cli("admin", "clients", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, state, engine)
        found = await relayd.http.get("/admin/clients", token=pupil["access_token"])
        assert [item["roles"] for item in assert_ok(found)["items"]] == [["admin"]]
        relayd.daemon.stop()


async def test_keys_are_read_by_those_who_may_message_their_owner(
    tmp_path: Path, engine: Engine
) -> None:
    async with trio.open_nursery() as nursery:
        relayd = await start_school(nursery, tmp_path / "state", engine)
        people = {role: await enrol(relayd, role, role) for role in ROLES}
        key = {"keys": [{"algorithm": "x25519", "key": base64.b64encode(bytes(32)).decode()}]}
        for doc in people.values():
            published = await relayd.http.request(
                "PUT", f"/clients/{doc['uuid']}/keys", json_body=key, token=doc["access_token"]
            )
            assert_ok(published)
        seen = {}
        for reader in ROLES:
            for owner in ROLES:
                response = await relayd.http.get(
                    f"/clients/{people[owner]['uuid']}/keys",
                    token=people[reader]["access_token"],
                )
                seen[(reader, owner)] = response.status
        assert seen == {
            ("student", "student"): 200,  # its own
            ("student", "teacher"): 200,
            ("student", "admin"): 403,
            ("teacher", "student"): 200,
            ("teacher", "teacher"): 200,
            ("teacher", "admin"): 403,
            ("admin", "student"): 200,
            ("admin", "teacher"): 200,
            ("admin", "admin"): 200,
        }
        classmate = await enrol(relayd, "classmate", "student")
        refused = await relayd.http.get(
            f"/clients/{classmate['uuid']}/keys", token=people["student"]["access_token"]
        )
        assert_error(refused, 403, "not_permitted")
        relayd.daemon.stop()
