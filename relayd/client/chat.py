"""A terminal chat with another relayd client, on Textual (``pip install 'relayd[chat]'``).

    relayd chat --as alice bob          # or: python -m relayd.client.chat --as alice bob

Each line you type goes to the peer with ``acknowledge: true``; its receipts show beside it as
they arrive (sending, then queued / queued_offline / pending_ack, then delivered or
acknowledged). Messages from the peer show as they come and are acknowledged once shown. The
status line says whether the session is up; the client reconnects on its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import anyio

try:
    from textual.app import App, ComposeResult
    from textual.containers import VerticalScroll
    from textual.widgets import Input, Static
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("relayd chat needs Textual: pip install 'relayd[chat]'") from exc

from ._client import Client, SendHandle, State
from ._credentials import CredentialFile, CredentialStore
from ._errors import ClientError
from ._frames import Message, Receipt

# Shown on the line of a message you sent, by its latest receipt.
MARKS = {
    "": "sending…",
    "queued_offline": "sent (they are offline)",
    "queued": "sent",
    "pending_ack": "sent",
    "accepted": "sent",
    "delivered": "delivered ✓",
    "acknowledged": "acknowledged ✓✓",
    "failed": "failed ✗",
    "expired": "expired ✗",
    "rejected": "rejected ✗",
}


class ChatApp(App[int]):
    """The chat. ``store`` holds your identity; ``peer`` is a uuid or a unique name."""

    CSS = """
    #log { height: 1fr; }
    #status { height: 1; background: $boost; }
    """
    BINDINGS = [("ctrl+c", "quit", "Quit")]  # noqa: RUF012 (Textual's own convention)

    def __init__(self, store: CredentialStore, peer: str) -> None:
        super().__init__()
        self.store = store
        self.peer_query = peer
        self.peer = ""
        self.client: Client | None = None
        self.sent: dict[str, Static] = {}
        self.lines: list[str] = []
        self._changed = anyio.Event()
        self.exit_code = 0

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="log")
        yield Static("connecting…", id="status")
        yield Input(placeholder="type a message, Enter to send", id="input")

    def on_mount(self) -> None:
        self.query_one("#input", Input).focus()
        self.run_worker(self._run_client(), exclusive=True)

    # --- what the tests (and the screen) read ----------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait (at most ``timeout`` s) until ``predicate()`` holds after a screen update."""
        with anyio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    def _updated(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def status(self) -> str:
        return str(self.query_one("#status", Static).content)

    # --- the client ------------------------------------------------------------------------------

    async def _run_client(self) -> None:
        try:
            async with Client(
                self.store, on_state=self._on_state, on_receipt=self._on_receipt
            ) as c:
                self.client = c
                self.peer = await c.resolve(self.peer_query)
                self._show(f"— you are {c.name}; talking to {self.peer_query} ({self.peer})")
                async for message in c.messages():
                    self._show_message(message)  # acknowledged when the next one is asked for
        except ClientError as exc:
            self.exit_code = 3
            self._set_status(f"stopped: {exc}")
            self._show(f"— {exc}")

    def _on_state(self, state: State, detail: str) -> None:
        text = {
            State.CONNECTED: "connected",
            State.CONNECTING: "connecting…",
            State.WAITING: f"disconnected: {detail}",
            State.STOPPED: f"stopped: {detail}",
        }[state]
        self._set_status(text)

    def _on_receipt(self, receipt: Receipt, handle: SendHandle | None) -> None:
        line = self.sent.get(receipt.msgid)
        if line is not None and handle is not None:
            line.update(self._sent_text(handle))
            self._updated()

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        if not text or self.client is None or not self.peer:
            return
        try:
            handle = await self.client.send(self.peer, text, acknowledge=True)
        except ClientError as exc:
            self._show(f"— not sent: {exc}")
            return
        widget = Static("", markup=False)
        self.sent[handle.msgid] = widget
        widget.update(self._sent_text(handle))
        self._mount_line(widget, f"you: {text}")

    # --- the screen ------------------------------------------------------------------------------

    @staticmethod
    def _sent_text(handle: SendHandle) -> str:
        latest = handle.latest
        status = str(latest.status) if latest is not None else ""
        text = handle_text(handle)
        return f"you: {text}   [{MARKS.get(status, status)}]"

    def _show_message(self, message: Message) -> None:
        who = self.peer_query if message.sender == self.peer else message.sender
        again = " (again)" if message.redelivered else ""
        self._show(f"{who}: {message.content}{again}")

    def _show(self, text: str) -> None:
        self._mount_line(Static(text, markup=False), text)

    def _mount_line(self, widget: Static, text: str) -> None:
        log = self.query_one("#log", VerticalScroll)
        log.mount(widget)
        log.scroll_end(animate=False)
        self.lines.append(text)
        self._updated()

    def _set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)
        self._updated()


def handle_text(handle: SendHandle) -> str:
    content = handle._entry.frame.get("content", "")
    return str(content)


def run_chat(store: CredentialFile, peer: str) -> int:
    app = ChatApp(store, peer)
    app.run()
    return app.exit_code


def main() -> int:
    from ._cli import credential_file

    parser = argparse.ArgumentParser(prog="python -m relayd.client.chat", description=__doc__)
    parser.add_argument("--as", dest="as_name", required=True, metavar="NAME")
    parser.add_argument("--credentials-dir", metavar="DIR")
    parser.add_argument("peer")
    args = parser.parse_args()
    return run_chat(credential_file(args, args.as_name), args.peer)


if __name__ == "__main__":
    sys.exit(main())
