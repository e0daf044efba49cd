"""The configuration: relayd.toml, strict structuring, errors that name file and key, env overrides.

Every call passes ``environ`` explicitly: these tests never read or touch ``os.environ``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from relayd import Config, ConfigError, RelaydError, load_config
from relayd._config import structure, to_toml

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO_ROOT / "relayd.toml"
LONG_SECRET = "a-secret-that-is-long-enough-for-hs256-0123456789"


def config_keys(cls: type[Any] = Config, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every leaf key of ``cls`` as ``(section, key)``; ``section`` is dotted, "" at top level."""
    hints = typing.get_type_hints(cls)
    for attribute in attrs.fields(cls):
        kind = hints[attribute.name]
        if attrs.has(kind):
            section = f"{prefix}.{attribute.name}" if prefix else attribute.name
            yield from config_keys(kind, section)
        else:
            yield prefix, attribute.name


ALL_KEYS = sorted(config_keys())

SECTION_RE = re.compile(r"^\[\s*([A-Za-z0-9_.]+)\s*\]\s*(#.*)?$")
KEY_RE = re.compile(r"^([A-Za-z0-9_]+)\s*=")


@attrs.frozen
class KeyLine:
    section: str
    key: str
    commented: bool


def scan_toml_keys(text: str) -> list[KeyLine]:
    """The key lines of a flat TOML file, with their section and whether a comment documents
    them: the nearest non-key line above the key (or above its group of keys) is a comment."""
    section = ""
    found: list[KeyLine] = []
    lines = text.splitlines()
    for index, raw in enumerate(lines):
        line = raw.strip()
        header = SECTION_RE.match(line)
        if header:
            section = header.group(1)
            continue
        key = KEY_RE.match(line)
        if not key:
            continue
        above = index - 1
        while above >= 0 and KEY_RE.match(lines[above].strip()):
            above -= 1
        commented = above >= 0 and lines[above].strip().startswith("#")
        found.append(KeyLine(section, key.group(1), commented))
    return found


def write(tmp_path: Path, text: str, name: str = "relayd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return str(info.value)


# --- (a) the shipped relayd.toml ----------------------------------------------------------------


def test_config_keys_walks_every_section() -> None:
    """The walker itself: it must see nested keys, or the checks below would prove nothing."""
    assert ("", "state_dir") in ALL_KEYS
    assert ("http", "listen") in ALL_KEYS
    assert ("auth", "kdf_cost") in ALL_KEYS
    assert ("log", "level") in ALL_KEYS
    assert ("", "http") not in ALL_KEYS
    assert all(
        not attrs.has(type(getattr(Config(), key))) for section, key in ALL_KEYS if not section
    )


def test_shipped_config_parses_and_equals_the_embedded_defaults() -> None:
    assert load_config(SHIPPED_CONFIG, environ={}) == Config()


def test_shipped_config_structures_without_help_from_defaults() -> None:
    data = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    assert structure(data, str(SHIPPED_CONFIG)) == Config()


# --- (b) every key is in relayd.toml, with a comment ---------------------------------------------


def test_scanner_sees_comments_and_groups() -> None:
    text = "# doc\na = 1\nb = 2\n\nc = 3\n[s]\n# doc\nd = 4\n[t]\ne = 5\n"
    assert scan_toml_keys(text) == [
        KeyLine("", "a", True),
        KeyLine("", "b", True),
        KeyLine("", "c", False),
        KeyLine("s", "d", True),
        KeyLine("t", "e", False),
    ]


def test_shipped_config_sets_every_key_exactly_where_it_belongs() -> None:
    scanned = scan_toml_keys(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    in_file = sorted((k.section, k.key) for k in scanned)
    assert len(in_file) == len(set(in_file)), "a key appears twice"
    missing = sorted(set(ALL_KEYS) - set(in_file))
    extra = sorted(set(in_file) - set(ALL_KEYS))
    assert not missing, f"keys missing from relayd.toml: {missing}"
    assert not extra, f"relayd.toml has keys Config does not: {extra}"


@pytest.mark.parametrize(
    ("section", "key"), ALL_KEYS, ids=[f"{s}.{k}".strip(".") for s, k in ALL_KEYS]
)
def test_shipped_config_documents_key(section: str, key: str) -> None:
    scanned = {(k.section, k.key): k for k in scan_toml_keys(SHIPPED_CONFIG.read_text("utf-8"))}
    line = scanned.get((section, key))
    assert line is not None, f"{section}.{key} is not in relayd.toml"
    assert line.commented, f"{section}.{key} has no comment above it (or above its group)"


# --- (c) errors name the file and the dotted key ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        # unknown keys, with a hint when one is close
        ('[http]\nlsiten = "127.0.0.1:1"\n', "http.lsiten", "did you mean 'listen'?"),
        ("[htpp]\n", "htpp", "did you mean 'http'?"),
        ("[auth]\nkdf_costs = 1024\n", "auth.kdf_costs", "did you mean 'kdf_cost'?"),
        ("colour = 1\n", "colour", "unknown key"),
        # wrong types: no coercion
        ("[http]\nlisten = 8000\n", "http.listen", "must be a string"),
        ('[auth]\nleeway = "5"\n', "auth.leeway", "must be a number"),
        ('drain_timeout = "10"\n', "drain_timeout", "must be a number"),
        ("[http]\nmax_body_bytes = true\n", "http.max_body_bytes", "not a boolean"),
        ("[auth]\naccess_ttl = false\n", "auth.access_ttl", "not a boolean"),
        ("[auth]\nkdf_cost = 1024.0\n", "auth.kdf_cost", "must be an integer"),
        ("state_dir = 3\n", "state_dir", "must be a string"),
        ('[log]\nlevel = ["info"]\n', "log.level", "must be one of"),
        # out of range
        ("[auth]\naccess_ttl = -1\n", "auth.access_ttl", "positive"),
        ("[auth]\nleeway = -0.5\n", "auth.leeway", "zero or a positive"),
        ("drain_timeout = 0\n", "drain_timeout", "positive"),
        ("[http]\nkeep_alive_timeout = inf\n", "http.keep_alive_timeout", "finite"),
        ("[http]\nrequest_timeout = nan\n", "http.request_timeout", "positive"),
        ("[http]\nmax_body_bytes = 0\n", "http.max_body_bytes", "positive"),
        ("[auth]\nkdf_cost = 1000\n", "auth.kdf_cost", "power of two"),
        ("[auth]\nkdf_cost = 1\n", "auth.kdf_cost", "power of two"),
        ("[auth]\nkdf_cost = -1024\n", "auth.kdf_cost", "power of two"),
        # invalid Literal values
        ('[log]\nlevel = "verbose"\n', "log.level", "must be one of"),
        ('[log]\nlevel = "INFO"\n', "log.level", "must be one of"),
        ('[log]\nformat = "xml"\n', "log.format", "must be one of"),
        ('[auth]\nregistration = "maybe"\n', "auth.registration", "'open', 'closed'"),
        ('[store]\nsynchronous = "off"\n', "store.synchronous", "must be one of"),
        # invalid listen addresses
        ('[http]\nlisten = "localhost"\n', "http.listen", "not host:port"),
        ('[http]\nlisten = ":8000"\n', "http.listen", "not host:port"),
        ('[http]\nlisten = "127.0.0.1:65536"\n', "http.listen", "no valid port"),
        ('[http]\nlisten = "127.0.0.1:http"\n', "http.listen", "no valid port"),
        ('[http]\nlisten = "127.0.0.1:-1"\n', "http.listen", "no valid port"),
        # origins: a list of what browsers send in Origin, or "*"
        ('[http]\ncors_origins = "https://a.example"\n', "http.cors_origins", "must be a list"),
        ("[websocket]\nallowed_origins = [1]\n", "websocket.allowed_origins", "must be a string"),
        ('[websocket]\nallowed_origins = ["a.example"]\n', "websocket.allowed_origins", "origin"),
        ('[http]\ncors_origins = ["ftp://a.example"]\n', "http.cors_origins", "not an origin"),
        ('[http]\ncors_origins = ["https://a.example/"]\n', "http.cors_origins", "trailing"),
        ('[http]\ncors_origins = ["https://a.example/app"]\n', "http.cors_origins", "no path"),
        ('[http]\ncors_origins = ["https://A.example"]\n', "http.cors_origins", "lowercase"),
        ('[http]\ncors_origins = ["https://a.example:443"]\n', "http.cors_origins", "default"),
        ('[http]\ncors_origins = ["null"]\n', "http.cors_origins", "not an origin"),
        ('[http]\ncors_origins = ["https://a.example:x"]\n', "http.cors_origins", "origin"),
        # a section that is not a table
        ("http = 5\n", "http", "must be a table"),
        ('auth = "x"\n', "auth", "must be a table"),
    ],
)
def test_error_names_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert f"{path}: {key}:" in message
    assert fragment in message


def test_origins_are_read_from_the_file(tmp_path: Path) -> None:
    origins = '["https://app.example.com", "http://localhost:3000", "*"]'
    path = write(tmp_path, f"[http]\ncors_origins = {origins}\n[websocket]\nallowed_origins = []\n")
    config = load_config(path, environ={})
    assert config.http.cors_origins == ("https://app.example.com", "http://localhost:3000", "*")
    assert config.websocket.allowed_origins == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "https://a.example, http://localhost:3000",
            ("https://a.example", "http://localhost:3000"),
        ),
        ('["https://a.example", "*"]', ("https://a.example", "*")),
        ("", ()),
        ("[]", ()),
    ],
)
def test_env_sets_a_list_as_json_or_commas(
    tmp_path: Path, raw: str, expected: tuple[str, ...]
) -> None:
    environ = {"RELAYD_WEBSOCKET__ALLOWED_ORIGINS": raw}
    assert load_config(write(tmp_path, ""), environ=environ).websocket.allowed_origins == expected


@pytest.mark.parametrize("raw", ["[not json", '["a.example"'])
def test_env_list_that_is_no_json_names_the_variable(tmp_path: Path, raw: str) -> None:
    message = config_error(write(tmp_path, ""), {"RELAYD_HTTP__CORS_ORIGINS": raw})
    assert message.startswith("RELAYD_HTTP__CORS_ORIGINS: expected a JSON array")


@pytest.mark.parametrize(("raw", "fragment"), [("[1]", "must be a string"), ("x", "not an origin")])
def test_env_list_of_bad_items_names_the_key(tmp_path: Path, raw: str, fragment: str) -> None:
    message = config_error(write(tmp_path, ""), {"RELAYD_HTTP__CORS_ORIGINS": raw})
    assert "(with RELAYD_* overrides): http.cors_origins: " in message
    assert fragment in message


def test_config_error_is_a_relayd_error() -> None:
    assert issubclass(ConfigError, RelaydError)


def test_every_error_of_a_file_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[http]\nlisten = 8000\nmax_body_bytes = "big"\n[auth]\nkdf_cost = 3\n[log]\nfmt = 1\n',
    )
    lines = config_error(path).splitlines()
    for key in ("http.listen", "http.max_body_bytes", "auth.kdf_cost", "log.fmt"):
        assert any(line.startswith(f"{path}: {key}:") for line in lines), (key, lines)


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[http]\nlisten = "127.0.0.1:1"\n[auth\n')
    message = config_error(path)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 3" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "relayd.toml"
    assert config_error(path) == f"{path}: no such file"


def test_unreadable_path_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path)  # a directory
    assert message.startswith(f"{tmp_path}: cannot read")


def test_valid_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'drain_timeout = 3\n[http]\nlisten = "[::1]:9000"\n[log]\nformat = "json"\n'
    )
    config = load_config(path, environ={})
    assert config.drain_timeout == 3.0
    assert isinstance(config.drain_timeout, float)
    assert config.http.listen == "[::1]:9000"
    assert config.log.format == "json"
    assert config.http.max_body_bytes == Config().http.max_body_bytes
    assert config.auth == Config().auth


# --- (d) environment overrides ------------------------------------------------------------------


def test_env_overrides_a_string_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[http]\nlisten = "127.0.0.1:1"\n')
    config = load_config(path, environ={"RELAYD_HTTP__LISTEN": "0.0.0.0:9000"})
    assert config.http.listen == "0.0.0.0:9000"


def test_env_int_is_parsed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), environ={"RELAYD_HTTP__MAX_BODY_BYTES": "1234"})
    assert config.http.max_body_bytes == 1234
    assert type(config.http.max_body_bytes) is int


@pytest.mark.parametrize(("raw", "expected"), [("2.5", 2.5), ("3", 3.0), ("0", 0.0)])
def test_env_float_is_parsed(tmp_path: Path, raw: str, expected: float) -> None:
    config = load_config(write(tmp_path, ""), environ={"RELAYD_AUTH__LEEWAY": raw})
    assert config.auth.leeway == expected
    assert type(config.auth.leeway) is float


def test_env_overrides_a_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir = "/from/file"\n')
    config = load_config(path, environ={"RELAYD_STATE_DIR": "/srv/relayd"})
    assert config.state_dir == "/srv/relayd"


def test_env_literal_is_accepted_when_valid(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), environ={"RELAYD_LOG__FORMAT": "json"})
    assert config.log.format == "json"


def test_env_overrides_leave_the_rest_of_the_file_alone(tmp_path: Path) -> None:
    path = write(tmp_path, '[http]\nlisten = "127.0.0.1:1"\nmax_body_bytes = 10\n')
    config = load_config(path, environ={"RELAYD_HTTP__MAX_BODY_BYTES": "20"})
    assert config.http.listen == "127.0.0.1:1"
    assert config.http.max_body_bytes == 20


def test_env_invalid_literal_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    message = config_error(path, {"RELAYD_LOG__LEVEL": "loud"})
    assert "log.level" in message
    assert "'loud'" in message
    assert str(path) in message
    assert "RELAYD_" in message


def test_env_out_of_range_names_the_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, ""), {"RELAYD_AUTH__KDF_COST": "1000"})
    assert "auth.kdf_cost" in message
    assert "power of two" in message


@pytest.mark.parametrize(
    ("section", "key"), ALL_KEYS, ids=[f"{s}.{k}".strip(".") for s, k in ALL_KEYS]
)
def test_every_key_can_be_set_from_the_environment(section: str, key: str) -> None:
    """relayd.toml promises it; the default, written as a string, must parse back to itself."""
    default = getattr(getattr(Config(), section) if section else Config(), key)
    var = f"RELAYD_{section.upper()}__{key.upper()}" if section else f"RELAYD_{key.upper()}"
    if isinstance(default, bool):
        raw = str(default).lower()
    elif isinstance(default, tuple):
        raw = ",".join(default)
    elif isinstance(default, dict):
        raw = json.dumps(default)  # a table: JSON
    else:
        raw = str(default)
    assert load_config(SHIPPED_CONFIG, environ={var: raw}) == Config()


@pytest.mark.parametrize(
    "var",
    ["RELAYD_FOO__BAR", "RELAYD_NOPE", "RELAYD_HTTP__NOPE", "RELAYD_HTTP", "RELAYD_HTTP__"],
)
def test_env_naming_no_key_is_an_error(tmp_path: Path, var: str) -> None:
    message = config_error(write(tmp_path, ""), {var: "x"})
    assert message.startswith(f"{var}:")


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("RELAYD_HTTP__MAX_BODY_BYTES", "lots"),
        ("RELAYD_HTTP__MAX_BODY_BYTES", "1.5"),
        ("RELAYD_HTTP__MAX_BODY_BYTES", ""),
        ("RELAYD_AUTH__LEEWAY", "soon"),
        ("RELAYD_DRAIN_TIMEOUT", "10s"),
    ],
)
def test_env_non_numeric_value_names_the_variable(tmp_path: Path, var: str, raw: str) -> None:
    message = config_error(write(tmp_path, ""), {var: raw})
    assert message.startswith(f"{var}:")
    assert repr(raw) in message


@pytest.mark.parametrize("var", ["RELAYD_SECRET", "RELAYD_CONFIG", "RELAYD_VENV"])
def test_reserved_variables_are_not_config_keys(tmp_path: Path, var: str) -> None:
    path = write(tmp_path, '[http]\nlisten = "127.0.0.1:1"\n')
    other = write(tmp_path, "drain_timeout = 99\n", name="other.toml")
    value = str(other) if var == "RELAYD_CONFIG" else LONG_SECRET
    config = load_config(path, environ={var: value})
    # The explicit path wins over $RELAYD_CONFIG; nothing else changes the config.
    assert config == load_config(path, environ={})
    assert config.http.listen == "127.0.0.1:1"


def test_relayd_config_names_the_file_when_no_path_is_given(tmp_path: Path) -> None:
    path = write(tmp_path, "drain_timeout = 42\n", name="custom.toml")
    config = load_config(None, environ={"RELAYD_CONFIG": str(path)})
    assert config.drain_timeout == 42.0


def test_relayd_config_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert config_error(None, {"RELAYD_CONFIG": str(path)}) == f"{path}: no such file"


def test_without_any_file_the_cwd_relayd_toml_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, environ={}) == Config()
    write(tmp_path, "drain_timeout = 7\n")
    assert load_config(None, environ={}).drain_timeout == 7.0


# --- the effective config as TOML (what check-config prints) ------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"RELAYD_STATE_DIR": 'C:\\relayd\\"state" é', "RELAYD_HTTP__MAX_BODY_BYTES": "7"},
        {"RELAYD_STATE_DIR": "/srv/relayd\twith a tab"},
        # A control character must be escaped, or the printed config is not TOML.
        {"RELAYD_AUTH__ISSUER": "line one\nline two"},
        {"RELAYD_HTTP__CORS_ORIGINS": "https://a.example,http://[::1]:8080,*"},
    ],
    ids=["defaults", "backslash-quote-unicode", "tab", "newline", "a list"],
)
def test_to_toml_round_trips(environ: dict[str, str]) -> None:
    config = load_config(None, environ={"RELAYD_CONFIG": str(SHIPPED_CONFIG), **environ})
    parsed = tomllib.loads(to_toml(config))
    assert structure(parsed, "<to_toml>") == config


# --- the Redis engine's settings ---------------------------------------------------------------


def test_a_lease_shorter_than_three_timeouts_is_refused(tmp_path: Path) -> None:
    """A node must notice it cannot renew its lease before the lease can have expired."""
    path = write(tmp_path, '[store]\nengine = "redis"\ntimeout = 2.0\nlease = 5.0\n')
    assert "lease: must be at least 3 times timeout (6.0 s)" in config_error(path)
    ok = write(tmp_path, '[store]\nengine = "redis"\ntimeout = 2.0\nlease = 6.0\n', "ok.toml")
    assert load_config(ok, environ={}).store.lease == 6.0


def test_a_store_url_that_is_not_redis_is_refused_without_showing_its_password(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, '[store]\nengine = "redis"\nurl = "valkey://:hunter2@db:6379/0"\n')
    error = config_error(path)
    assert "url: scheme 'valkey' is not a Redis URL's" in error
    assert "hunter2" not in error


def test_the_sqlite_engine_does_not_load_the_redis_client() -> None:
    """coredis costs ~12 MiB of RSS: a daemon on SQLite never imports it (a fresh
    interpreter, since this one has loaded everything already)."""
    probe = (
        "import sys, relayd._cli, relayd._daemon\n"
        "print(sorted(m for m in ('coredis', 'relayd._cluster', 'relayd._redis')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


# --- history ------------------------------------------------------------------------------------


def test_history_retention_is_zero_or_at_least_the_dedupe_window(tmp_path: Path) -> None:
    """A message's record is deduplication's memory for relay.dedupe_window: content kept for
    less would need its own sweep, which relayd does not run."""
    short = write(tmp_path, "[history]\nretention = 60.0\n")
    assert "history.retention: must be 0 or at least relay.dedupe_window (600 s)" in config_error(
        short
    )
    negative = write(tmp_path, "[history]\nretention = -1.0\n", "negative.toml")
    assert "retention" in config_error(negative)
    fitted = "[history]\nretention = 60.0\n[relay]\ndedupe_window = 60.0\n"
    assert load_config(write(tmp_path, fitted, "fitted.toml"), environ={}).history.retention == 60
    assert load_config(write(tmp_path, "", "default.toml"), environ={}).history.retention == 0
