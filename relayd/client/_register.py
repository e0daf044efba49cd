"""Registering a client and keeping its credentials."""

from __future__ import annotations

from ._credentials import Credentials, CredentialStore
from ._rest import RestClient


async def register(
    url: str,
    name: str,
    store: CredentialStore,
    *,
    uuid: str | None = None,
    admin_token: str | None = None,
    invite: str | None = None,
    timeout: float = 10.0,
) -> Credentials:
    """Register client ``name`` with relayd at ``url`` and save its credentials (secret and
    first tokens) in ``store``. relayd shows the secret only once: if saving fails, the
    client is registered but cannot log in again.

    >>> async def example() -> None:
    ...     from relayd.client import CredentialFile
    ...     await register("http://127.0.0.1:8000", "alice", CredentialFile("alice.json"))

    ``invite``: a one-time invite code (relayd's ``auth.registration = "invite"``).

    Raises:
        HttpError: 409 ``uuid_taken``, 403 ``registration_closed`` / ``invite_required`` /
            ``invite_invalid``, 422, 429.
        ServerUnreachable: relayd did not answer.
    """
    async with RestClient(url, timeout=timeout) as rest:
        credentials = await rest.register(name, uuid=uuid, admin_token=admin_token, invite=invite)
    await store.save(credentials)
    return credentials
