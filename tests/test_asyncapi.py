"""docs/asyncapi.yaml against the code (issue 15): the frame types relayd reads and sends, its
WebSocket error codes and its close codes must be exactly the ones the document lists, and
every reference in it must resolve. A frame, code or close added to the code without the
document (or the reverse) fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from relayd._relay import frames
from relayd._relay.frames import CloseCode

ROOT = Path(__file__).resolve().parent.parent
DOC: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
RELAY = ROOT / "relayd" / "_relay"


def source(*names: str) -> str:
    return "\n".join((RELAY / name).read_text() for name in names)


def types_of(operation: str) -> set[str]:
    """The ``type`` values of the messages of one operation (send or receive)."""
    found: set[str] = set()
    for ref in DOC["operations"][operation]["messages"]:
        name = ref["$ref"].rpartition("/")[2]
        kind = DOC["components"]["messages"][name]["payload"]
        if "$ref" in kind:
            kind = resolve(kind["$ref"])
        spec = kind["properties"]["type"]
        found |= {spec["const"]} if "const" in spec else set(spec["enum"])
    return found


def resolve(ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = DOC
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_the_frames_relayd_reads_are_the_documented_ones() -> None:
    dispatch = source("core.py")
    read = set(re.findall(r'\bkind == "(\w+)"', dispatch))
    for group in re.findall(r"\bkind in \(([^)]*)\)", dispatch):
        read |= set(re.findall(r'"(\w+)"', group))
    assert read == types_of("send")


def test_the_frames_relayd_sends_are_the_documented_ones() -> None:
    code = source("core.py", "frames.py")
    sent = set(re.findall(r'"type": "(\w+)"', code)) | set(re.findall(r'"(delivery_\w+)"', code))
    assert sent == types_of("receive")


def test_the_error_codes_are_the_documented_ones() -> None:
    documented = set(DOC["components"]["schemas"]["error_code"]["enum"])
    constants = {
        value
        for name, value in vars(frames).items()
        if name.isupper() and isinstance(value, str) and value in frames._RECOVERY
    }
    # Every part of the core may refuse a frame with a literal code (``_error`` in core.py,
    # ``Sessions.error`` elsewhere): all of them are read.
    parts = sorted(path.name for path in RELAY.glob("*.py"))
    literal = set(re.findall(r'\.?_?error\(\s*session,\s*"(\w+)"', source(*parts)))
    tokens = set(
        re.findall(r'TokenError\(\s*"(\w+)"', (ROOT / "relayd" / "_tokens.py").read_text())
    )
    tokens |= {"token_revoked"}  # the auth service's, for a revoked token on a live session
    assert constants, "the recovery table names the codes: the check would prove nothing"
    assert documented == constants | literal | tokens


def test_the_close_codes_are_the_documented_ones() -> None:
    documented = set(DOC["components"]["schemas"]["close_code"]["enum"])
    assert documented == {int(code) for code in CloseCode}


def test_every_reference_resolves() -> None:
    stack: list[Any] = [DOC]
    seen = 0
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "$ref" in item:
                assert resolve(item["$ref"]) is not None
                seen += 1
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    assert seen > 20
    assert DOC["asyncapi"].startswith("3.")
