"""sd_notify(3) over ``$NOTIFY_SOCKET`` with the stdlib ``socket`` module.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the
service started, so ``systemctl start`` returns (and units ordered after
xmppd start) only once every listener is bound; ``RELOADING=1``/``READY=1``
bracket a SIGHUP reload and ``STOPPING=1`` announces shutdown.

The protocol is one datagram of ``KEY=value`` lines to an AF_UNIX socket, so
a few lines here replace a dependency on libsystemd or a Python binding.
Without ``NOTIFY_SOCKET`` (not started by systemd) every call is a no-op.
"""
from __future__ import annotations

import os
import socket
import time

from twisted.logger import Logger

from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)


class Notifier:
    """Sends state changes to the service manager named at start-up."""

    def __init__(self, address: str | None) -> None:
        # "@name" is a socket in the abstract namespace (leading NUL byte).
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        elif address and not address.startswith("/"):
            log.warn("NOTIFY_SOCKET={address!r} is not an AF_UNIX socket path; "
                     "not notifying the service manager", address=address)
            address = None
        self.address = address or None
        self._warned = False

    @classmethod
    def from_environ(cls) -> "Notifier":
        """Read ``$NOTIFY_SOCKET`` once, at start-up."""
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"`` ...) as one message; True if sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # Never block the reactor: a full queue loses one notification.
                s.setblocking(False)
                s.sendto(message, self.address)
        except OSError as e:
            if not self._warned:  # once: a broken socket stays broken
                self._warned = True
                log.warn("cannot notify the service manager via {address!r}: {err}",
                         address=self.address, err=e.strerror or e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # systemd >= 253 wants the CLOCK_MONOTONIC time of the reload request.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
