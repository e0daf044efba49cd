"""The public surface of ``relayd.client`` is exactly what ``__all__`` says; importing it does
not load the daemon's stack; the examples in its docstrings hold."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest

import relayd
import relayd.client

EXPECTED_ALL = [
    "Action",
    "AuthenticationError",
    "Client",
    "ClientError",
    "ClientOptions",
    "ConnectTimeout",
    "CredentialFile",
    "CredentialStore",
    "Credentials",
    "CredentialsError",
    "CredentialsInUse",
    "Decision",
    "DecryptError",
    "DirectoryEntry",
    "E2EError",
    "E2EUnavailable",
    "EndToEnd",
    "HttpError",
    "InvalidMessage",
    "KeyChange",
    "KeyFile",
    "KeyMismatch",
    "MemoryCredentials",
    "Message",
    "MessageStream",
    "NoPeerKey",
    "PeerKey",
    "PeerKeys",
    "PublicKey",
    "Receipt",
    "ReceiptTimeout",
    "ReconnectPolicy",
    "RestClient",
    "SendHandle",
    "ServerUnreachable",
    "SessionEnded",
    "State",
    "Status",
    "TokenPair",
    "is_encrypted",
    "register",
]

ERRORS = [
    "AuthenticationError",
    "ClientError",
    "ConnectTimeout",
    "CredentialsError",
    "CredentialsInUse",
    "DecryptError",
    "E2EError",
    "E2EUnavailable",
    "HttpError",
    "InvalidMessage",
    "KeyMismatch",
    "NoPeerKey",
    "ReceiptTimeout",
    "ServerUnreachable",
    "SessionEnded",
]


def test_all_is_pinned_and_sorted() -> None:
    assert relayd.client.__all__ == EXPECTED_ALL
    assert sorted(relayd.client.__all__) == relayd.client.__all__


def test_star_import_exports_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from relayd.client import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED_ALL


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_is_a_relayd_error(name: str) -> None:
    error = getattr(relayd.client, name)
    assert issubclass(error, relayd.client.ClientError)
    assert issubclass(error, relayd.RelaydError)


def test_importing_the_sdk_does_not_load_the_daemon() -> None:
    # A fresh interpreter: this one has loaded everything already. PyNaCl (the e2e extra)
    # loads on first use only, so that the SDK works without it.
    probe = (
        "import sys, relayd.client\n"
        "print(sorted(m for m in ('relayd._daemon', 'relayd._config', 'quart', 'hypercorn',"
        " 'trio', 'sqlite3', 'nacl') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_the_daemons_names_load_on_first_use() -> None:
    assert relayd.Daemon is importlib.import_module("relayd._daemon").Daemon
    assert relayd.load_config is importlib.import_module("relayd._config").load_config
    with pytest.raises(AttributeError, match="no attribute 'Deamon'"):
        _ = relayd.Deamon  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "module",
    [
        "relayd.client._client",
        "relayd.client._credentials",
        "relayd.client._policy",
        "relayd.client._register",
        "relayd.client._rest",
        "relayd.client._tokens",
        "relayd.client._ws",
    ],
)
def test_docstring_examples_hold(module: str) -> None:
    failed, attempted = doctest.testmod(importlib.import_module(module))
    assert attempted > 0
    assert failed == 0
