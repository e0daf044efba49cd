"""Roles and what they permit (``[roles]`` in relayd.toml; see :class:`RolesConfig`).

A client holds one or more roles (registration gives it ``roles.default``; an admin changes
them). Each role grants permissions (``directory``, ``admin``), whom its holders may message
(``message:<role>``, ``message:*``), and everything another role grants (``inherit:<role>``).
Decisions read the client's roles as stored now, never the roles a token was issued with, so a
change applies at once to every route and every live session.

:class:`RoleDirectory` keeps every client's roles in memory when some role may not message
everyone: the relay checks a message against it without a store read. It is fed by the auth
service's announcements (registration, role change, deletion).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from attrs import frozen

from ._config import RolesConfig


@frozen
class RolePolicy:
    """The effective grants of each role, inheritance resolved."""

    default: str
    grants: Mapping[str, frozenset[str]]

    @classmethod
    def from_config(cls, config: RolesConfig) -> RolePolicy:
        """Resolve ``inherit:`` grants (the config was checked: no circles, no unknown role)."""
        resolved: dict[str, frozenset[str]] = {}

        def resolve(role: str) -> frozenset[str]:
            if role not in resolved:
                own = config.define[role]
                parents = [g.removeprefix("inherit:") for g in own if g.startswith("inherit:")]
                inherited = [resolve(parent) for parent in parents]
                direct = {g for g in own if not g.startswith("inherit:")}
                resolved[role] = frozenset(direct.union(*inherited))
            return resolved[role]

        for role in config.define:
            resolve(role)
        return cls(config.default, resolved)

    def known(self, role: str) -> bool:
        return role in self.grants

    def _held(self, roles: Iterable[str]) -> frozenset[str]:
        held: frozenset[str] = frozenset()
        for role in roles:
            held |= self.grants.get(role, frozenset())  # unknown roles grant nothing
        return held

    def allows(self, roles: Iterable[str], permission: str) -> bool:
        """Whether ``roles`` grant ``permission``; ``admin`` grants every permission."""
        held = self._held(roles)
        return permission in held or "admin" in held

    def may_message(self, sender: Iterable[str], recipient: Iterable[str]) -> bool:
        """Whether a holder of ``sender`` may message a holder of ``recipient``."""
        held = self._held(sender)
        if "message:*" in held or "admin" in held:
            return True
        return any(f"message:{role}" in held for role in recipient)

    @property
    def messaging_is_open(self) -> bool:
        """Every role may message anyone: no check is needed."""
        return all(g & {"message:*", "admin"} for g in self.grants.values())


class RoleDirectory:
    """Every live client's roles, in memory (see the module's docstring)."""

    def __init__(self, policy: RolePolicy, roles: Mapping[str, tuple[str, ...]]) -> None:
        self.policy = policy
        # Role sets are few: each distinct one is kept once.
        self._sets: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._roles: dict[str, tuple[str, ...]] = {}
        for client, held in roles.items():
            self.update(client, held)

    def update(self, client: str, roles: tuple[str, ...] | None) -> None:
        """``client`` now holds ``roles`` (``None``: it was deleted)."""
        if roles is None:
            self._roles.pop(client, None)
        else:
            self._roles[client] = self._sets.setdefault(roles, roles)

    def allows(self, client: str, permission: str) -> bool:
        """Whether ``client``'s roles grant ``permission`` now (an unknown client: nothing)."""
        return self.policy.allows(self._roles.get(client, ()), permission)

    def may_message(self, sender: str, recipient: str) -> bool:
        """Whether ``sender`` may message ``recipient``; ``True`` for a recipient it does not
        know (the store refuses it as ``unknown_recipient``, as for anyone)."""
        held = self._roles.get(recipient)
        if held is None:
            return True
        return self.policy.may_message(self._roles.get(sender, ()), held)
