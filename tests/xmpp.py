"""slixmpp helpers: connect real clients to the test daemon.

Every test drives asyncio itself through :func:`run`; clients accept the
daemon's self-signed certificate.
"""
from __future__ import annotations

import asyncio
import ssl

import slixmpp


def run(coro, timeout: float = 30.0):
    """Run one test coroutine on a fresh event loop, with a time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that records what it receives."""

    def __init__(self, jid: str, password: str, mech: str | None = None) -> None:
        super().__init__(jid, password, sasl_mech=mech)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.ssl_context = ctx
        self.enable_direct_tls = False
        self.messages: asyncio.Queue = asyncio.Queue()
        self.presences: asyncio.Queue = asyncio.Queue()
        self.failed_auth: asyncio.Future = asyncio.get_event_loop().create_future()
        self.session: asyncio.Future = asyncio.get_event_loop().create_future()
        self.stream_errors: list = []
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("message", lambda m: self.messages.put_nowait(m))
        self.add_event_handler("presence", lambda p: self.presences.put_nowait(p))
        self.add_event_handler("failed_all_auth", self._failed)
        self.add_event_handler("stream_error", lambda e: self.stream_errors.append(e))

    def _started(self, _event) -> None:
        if not self.session.done():
            self.session.set_result(True)

    def _failed(self, event) -> None:
        if not self.failed_auth.done():
            self.failed_auth.set_result(event)

    async def next_message(self, timeout: float = 5.0):
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def next_presence(self, timeout: float = 5.0):
        return await asyncio.wait_for(self.presences.get(), timeout)


async def connect(jid: str, password: str, port: int, mech: str | None = None,
                  plugins=(), presence: bool = True, timeout: float = 10.0) -> Client:
    """A logged-in client (initial presence sent unless ``presence=False``)."""
    client = Client(jid, password, mech)
    for p in plugins:
        client.register_plugin(p)
    client.connect("127.0.0.1", port)
    done, _ = await asyncio.wait(
        [client.session, client.failed_auth], timeout=timeout,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if client.session not in done:
        client.disconnect()
        raise AssertionError(f"{jid} could not log in")
    if presence:
        client.send_presence()
    return client


async def login_fails(jid: str, password: str, port: int, mech: str | None = None,
                      timeout: float = 10.0):
    """Try to log in; return the SASL failure condition seen by the client."""
    client = Client(jid, password, mech)
    failures = []
    client.add_event_handler("failed_auth", lambda f: failures.append(f))
    client.connect("127.0.0.1", port)
    done, _ = await asyncio.wait(
        [client.session, client.failed_auth], timeout=timeout,
        return_when=asyncio.FIRST_COMPLETED,
    )
    client.disconnect()
    assert client.session not in done, f"{jid} logged in unexpectedly"
    return failures
