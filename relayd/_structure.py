"""Strict cattrs structuring, shared by the config loader, the REST API and the wire protocol.

cattrs coerces by default (``int("8000")``, ``str(8000)``, ``bool("false") is True``); relayd
never wants that from a config file or a client. :func:`strict_converter` refuses any value
whose JSON/TOML type is not the declared one (an int is accepted where a float is declared).
:func:`iter_errors` flattens cattrs' nested error groups into ``(dotted path, error)`` pairs so
each caller can word them for its audience.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any, Literal

import cattrs

_LITERAL: Any = Literal
KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _strict(kind: type[Any]) -> Any:
    def structure(value: Any, _: type[Any]) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"must be {KIND_NAMES[kind]}, not a boolean")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise TypeError(f"must be {KIND_NAMES[kind]}, not {type(value).__name__}")
        return value

    return structure


def strict_scalar(value: Any, kind: type[Any]) -> Any:
    """Check one scalar the strict way (for hooks on ``NewType`` s of scalars)."""
    return _strict(kind)(value, kind)


def strict_strings(value: Any, noun: str = "strings") -> tuple[str, ...]:
    """A JSON/TOML list of strings, as a tuple. cattrs alone would take a string as a sequence
    of one-character strings (and an object as the sequence of its keys)."""
    if not isinstance(value, list | tuple):
        raise TypeError(f"must be a list of {noun}, not {type(value).__name__}")
    return tuple(strict_scalar(item, str) for item in value)


def _literal(value: Any, kind: Any) -> Any:
    allowed = typing.get_args(kind)
    if isinstance(value, bool) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"must be one of {choices}, not {value!r}")
    return value


class FieldError(ValueError):
    """Raised by attrs validators, so the error names the field even though it comes from
    ``__init__``, where cattrs can no longer tell which field failed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def field_error(attribute: Any, message: str) -> FieldError:
    return FieldError(attribute.name, message)


def strict_converter(*, forbid_extra_keys: bool) -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=forbid_extra_keys)
    for kind in KIND_NAMES:
        converter.register_structure_hook(kind, _strict(kind))
    converter.register_structure_hook_func(lambda t: typing.get_origin(t) is _LITERAL, _literal)
    return converter


def iter_errors(exc: BaseException, path: str = "") -> Iterator[tuple[str, BaseException]]:
    """Every leaf error of a cattrs validation error, with the dotted path of its field."""
    if isinstance(exc, cattrs.ClassValidationError | cattrs.IterableValidationError):
        with_notes, without_notes = exc.group_exceptions()
        for inner, note in with_notes:
            name = getattr(note, "name", None)
            if name is None:
                name = getattr(note, "index", "")
            yield from iter_errors(inner, f"{path}.{name}" if path else str(name))
        for inner in without_notes:
            yield from iter_errors(inner, path)
    elif isinstance(exc, FieldError):
        yield (f"{path}.{exc.field}" if path else exc.field), exc
    else:
        yield path, exc
