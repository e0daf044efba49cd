"""relayd: a self-hosted message relay. Clients talk to each other by ID over WebSockets.

The public surface is what this module exports; everything else lives in private modules and
may change without notice.

The daemon's names (:class:`Daemon`, :class:`Config`, ...) are imported on first use: a program
that uses only the client SDK (``relayd.client``) does not load the server's stack (Quart,
Hypercorn, Trio, SQLite) with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ._errors import (
    ApiError,
    ConfigError,
    RelaydError,
    SchemaTooNewError,
    StoreError,
    TokenError,
)

if TYPE_CHECKING:
    from ._config import Config, load_config
    from ._daemon import Addresses, Daemon

# Name -> the private module that defines it; imported by __getattr__ when first asked for.
_LAZY = {
    "Addresses": "._daemon",
    "Config": "._config",
    "Daemon": "._daemon",
    "load_config": "._config",
}

__all__ = [
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


if not TYPE_CHECKING:  # hidden from mypy, which would take every unknown name for Any

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'relayd' has no attribute {name!r}")
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups find it without coming here
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY})
