"""
Watching the certificate store's files: the polling half of
:class:`~xmppd.certs.store.CertificateStore`, kept apart because noticing a
change is a job of its own (what is served is decided by the store).
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xmppd.certs.pem import CertificateError, _listdir, _stat_key
from xmppd.logfilter import log_observer

# The namespace of the single module this package was split from, so log
# lines read as before.
log = Logger(namespace="xmppd.certs", observer=log_observer)


class _FileWatch:
    """
    Mixin of CertificateStore: reloads it when a source file changes and
    re-warns about expiry.  Uses the store's configuration (``explicit``,
    ``default_cert``, ``certs_dir``, ``letsencrypt_live``, ``hosts``,
    ``generated_path()``, ``client_certs``), its ``_state``, ``_signature``,
    ``_poller`` and ``_warned_expiry``, and its ``reload()`` and ``describe()``.
    """

    def _watch_paths(self) -> set[str]:
        """
        Every file that could change what is served.  It depends only on the
        configuration and directory listings, never on what is loaded, so two
        signatures are always comparable.
        """
        paths: set[str] = set()
        for cert, key in list(self.explicit.values()) + (
                [self.default_cert] if self.default_cert else []):
            paths.update([cert, key or os.path.splitext(cert)[0] + ".key"])
        if self.certs_dir:
            paths.add(self.certs_dir)
            paths.update(os.path.join(self.certs_dir, n) for n in _listdir(self.certs_dir))
        live = self.letsencrypt_live
        if live:
            paths.add(live)
            for name in _listdir(live):
                for f in ("fullchain.pem", "privkey.pem"):
                    paths.add(os.path.join(live, name, f))
        for host in self.hosts:
            try:
                paths.add(self.generated_path(host))
            except CertificateError:
                pass
        for policy in self.client_certs.values():  # a new CRL must take effect
            for path in policy.ca + policy.crl:
                paths.add(path)
                if os.path.isdir(path):
                    paths.update(os.path.join(path, n) for n in _listdir(path))
        return paths

    def _watch_signature(self) -> dict[str, tuple]:
        """stat() results (inode, size, mtime, ctime) of the watched files."""
        return {path: _stat_key(path) for path in self._watch_paths()}

    def start_polling(self, interval: float = 30.0, clock: IReactorTime | None = None) -> None:
        """
        Check the source files every ``interval`` seconds and reload when one
        changed (inode, size, mtime or ctime); certbot renewals and copied
        files are picked up without SIGHUP.  Also re-warns about expiry.
        """
        self.stop_polling()
        poller = LoopingCall(self._poll)
        if clock is not None:
            poller.clock = clock
        self._poller = poller
        poller.start(interval, now=False).addErrback(
            lambda f: log.failure("certificate polling stopped", f))

    def stop_polling(self) -> None:
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None

    def _poll(self) -> None:
        try:
            if self._state is not None and self._watch_signature() != self._signature:
                log.info("certificate files changed; reloading")
                self.reload()
            self._warn_expiry()
        except Exception:
            log.failure("certificate poll failed")

    def _warn_expiry(self) -> None:
        """Log once per certificate when it enters 'expiring' or 'expired'."""
        for info in self.describe():
            if info.status in ("expiring", "expired"):
                mark = (info.serial, info.status)
                if self._warned_expiry.get(info.host) != mark:
                    self._warned_expiry[info.host] = mark
                    log.warn("{host}: certificate {status}: serial {serial:#x} not after "
                             "{not_after}", host=info.host, status=info.status,
                             serial=info.serial, not_after=info.not_after.isoformat())
