"""The public surface of ``relayd`` is exactly what ``__all__`` says, and all of it imports."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

import relayd

EXPECTED_ALL = [
    "Addresses",
    "ApiError",
    "Config",
    "ConfigError",
    "Daemon",
    "RelaydError",
    "SchemaTooNewError",
    "StoreError",
    "TokenError",
    "__version__",
    "load_config",
]


def test_all_is_pinned_and_sorted() -> None:
    assert relayd.__all__ == EXPECTED_ALL
    assert sorted(relayd.__all__) == relayd.__all__
    assert len(set(relayd.__all__)) == len(relayd.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_name_is_importable_from_relayd(name: str) -> None:
    module = importlib.import_module("relayd")
    assert hasattr(module, name), name
    namespace: dict[str, object] = {}
    exec(f"from relayd import {name}", namespace)
    assert namespace[name] is getattr(relayd, name)


def test_star_import_exports_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from relayd import *", namespace)
    exported = sorted(k for k in namespace if k != "__builtins__")
    assert exported == EXPECTED_ALL


def test_version_matches_the_installed_distribution() -> None:
    assert isinstance(relayd.__version__, str)
    assert relayd.__version__ == importlib.metadata.version("relayd")
