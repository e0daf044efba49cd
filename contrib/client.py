"""A small relayd client, to try relayd from a terminal and to read as an example.

    python contrib/client.py NAME [--to UUID] [--url http://127.0.0.1:8000]

The first run registers a client called NAME and keeps its uuid and secret in
``var/clients/NAME.json`` (mode 0600); later runs log in with them, so NAME keeps its identity
and gets what was queued while it was away. It prints every frame relayd sends, acknowledges
every message that asks for it, refreshes its access token before it expires, and sends each
line typed on stdin to ``--to`` as a message with ``acknowledge: true``.

It needs nothing but relayd's own dependencies (trio, trio-websocket) and the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio
import trio_websocket


def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            doc: dict[str, Any] = json.load(response)
            return doc
    except urllib.error.HTTPError as exc:
        error = json.load(exc)["error"]
        sys.exit(f"{path}: {exc.code} {error['code']}: {error['message']}")


def log_in(base: str, name: str, store: Path) -> dict[str, Any]:
    """Register NAME on first use, else log in with its saved secret; return the tokens."""
    if store.exists():
        saved = json.loads(store.read_text())
        tokens = post(base, "/auth/token", saved)
    else:
        tokens = post(base, "/register", {"name": name})
        store.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"uuid": tokens["uuid"], "client_secret": tokens["client_secret"]}, fh)
    return tokens


async def run(base: str, name: str, to: str | None) -> None:
    store = Path("var/clients") / f"{name}.json"
    tokens = await trio.to_thread.run_sync(log_in, base, name, store)
    me = tokens["uuid"]
    print(f"# {name} is {me}", flush=True)
    url = base.replace("http", "ws", 1) + "/ws"
    headers = [(b"authorization", f"Bearer {tokens['access_token']}".encode())]
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:

        async def send(frame: dict[str, Any]) -> None:
            await ws.send_message(json.dumps(frame))

        async def read() -> None:
            nonlocal tokens
            while True:
                frame = json.loads(await ws.get_message())
                print(json.dumps(frame), flush=True)
                kind = frame.get("type")
                if kind == "message" and frame.get("acknowledge"):
                    await send({"type": "ack", "msgid": frame["msgid"]})
                elif kind == "token_expiring":
                    refresh = {"refresh_token": tokens["refresh_token"]}
                    tokens = await trio.to_thread.run_sync(post, base, "/auth/refresh", refresh)
                    await send({"type": "refresh", "token": tokens["access_token"]})

        async def write() -> None:
            stdin = trio.wrap_file(sys.stdin)
            async for line in stdin:
                if to is None:
                    print("# give --to UUID to send", file=sys.stderr)
                elif line.strip():
                    await send({"to": to, "content": line.rstrip("\n"), "acknowledge": True})

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(write)
        except* trio_websocket.ConnectionClosed as group:
            closed = group.exceptions[0]
            reason = closed.reason if isinstance(closed, trio_websocket.ConnectionClosed) else None
            print(f"# closed: {reason}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the client's name; its identity is kept in var/clients")
    parser.add_argument("--to", help="uuid to send stdin lines to")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="relayd's HTTP address")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run, args.url.rstrip("/"), args.name, args.to)


if __name__ == "__main__":
    main()
