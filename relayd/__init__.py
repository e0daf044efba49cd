"""relayd: a self-hosted message relay. Clients talk to each other by ID over WebSockets.

The public surface is what this module exports; everything else lives in private modules and
may change without notice.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._config import Config, load_config
from ._daemon import Addresses, Daemon
from ._errors import (
    ApiError,
    ConfigError,
    RelaydError,
    SchemaTooNewError,
    StoreError,
    TokenError,
)

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
