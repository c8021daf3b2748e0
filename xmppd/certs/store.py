"""
The certificate store: resolves each host's sources in priority order (see
the package docstring), swaps the whole host -> context table on reload
(the file watching is in xmppd.certs.watch), and hands out contexts for
STARTTLS (by stream-header host) and direct TLS (by SNI).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from datetime import datetime
from typing import Callable, Iterable, Iterator, Mapping

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from xmppd.certs.checks import EXPIRY_WARNING, _config_key, _mismatch_note, _Pass, _status
from xmppd.certs.clientcerts import (
    _CLIENT_VERIFY,
    ClientCertPolicy,
    _client_context,
    _load_client_trust,
    _request_client_certs,
)
from xmppd.certs.contexts import TLSPolicy, _build_context, _check_policy
from xmppd.certs.identity import (
    _coverage,
    _display_names,
    _identity_for,
    _normalise,
    _san,
    _short_name,
)
from xmppd.certs.model import (
    CERTS_DIR,
    DEFAULT,
    EXPLICIT,
    GENERATED,
    LETSENCRYPT,
    WILDCARD,
    _Entry,
    _Loaded,
    _now,
    _Source,
    _State,
)
from xmppd.certs.pem import CertificateError, _stat_key
from xmppd.certs.selfsigned import SELF_SIGNED_RENEW, _generate_self_signed
from xmppd.certs.table import CertInfo
from xmppd.certs.watch import _FileWatch
from xmppd.logfilter import log_observer

# The namespace of the single module this package was split from, so log
# lines read as before.
log = Logger(namespace="xmppd.certs", observer=log_observer)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class _StartTLSCreator:
    """What ``transport.startTLS()`` gets: the context of one vhost, looked up
    when the handshake starts so a reload in between is honoured."""

    def __init__(self, store: CertificateStore, host: str) -> None:
        self._store = store
        self._host = host

    def getContext(self) -> SSL.Context:
        return self._store.context_for(self._host)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)


@implementer(IOpenSSLServerConnectionCreator)
class _DirectTLSCreator:
    """Direct TLS: start on the default host's context; SNI switches it."""

    def __init__(self, store: CertificateStore) -> None:
        self._store = store

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._store._current().front, None)


class CertificateStore(_FileWatch):
    """
    Certificates of all virtual hosts; see the package docstring for the
    sources and docs/certificates.rst for the operator's view.
    """

    def __init__(
        self,
        hosts: list[str],
        data_dir: str,
        certs_dir: str | None = None,
        letsencrypt_dir: str | None = None,
        explicit: dict[str, tuple[str, str | None]] | None = None,
        default_cert: tuple[str, str | None] | None = None,
        policy: TLSPolicy = TLSPolicy(),
        default_host: str | None = None,
        client_certs: Mapping[str, ClientCertPolicy] | None = None,
        generate: bool = True,
        names: Iterable[str] = (),
    ) -> None:
        if not hosts:
            raise ValueError("CertificateStore needs at least one host")
        self.hosts: list[str] = list(dict.fromkeys(hosts))
        self._keys = {_normalise(h): h for h in self.hosts}
        #: Names that are not hosts but may have their own certificate file
        #: (public component domains: their s2s streams present it).
        self.names: list[str] = [n for n in dict.fromkeys(_normalise(x) for x in names)
                                 if n and n not in self._keys]
        self.data_dir = data_dir
        # False for operator tools (``xmppctl certs``/``check``): a missing
        # self-signed certificate is previewed in memory, never written to the
        # server's data dir (it would be owned by the tool's user).
        self.generate = generate
        self.certs_dir = certs_dir
        self.letsencrypt_dir = letsencrypt_dir
        self.explicit = {_normalise(h): paths for h, paths in (explicit or {}).items()}
        self.default_cert = default_cert
        self.policy = policy
        self.default_host = _normalise(default_host or self.hosts[0])
        #: host -> client-certificate policy; hosts not named do not ask for one.
        self.client_certs = {_normalise(h): p for h, p in (client_certs or {}).items()
                             if p.enabled}
        if self.default_host not in self._keys:
            raise ValueError(f"default host {default_host!r} is not one of the hosts")
        self._state: _State | None = None
        self._signature: dict[str, tuple] = {}
        self._poller: LoopingCall | None = None
        self._warned_expiry: dict[str, tuple[int, str]] = {}

    # -- configuration-derived paths

    @property
    def letsencrypt_live(self) -> str | None:
        """certbot's ``live`` dir: accept both /etc/letsencrypt and .../live."""
        d = self.letsencrypt_dir
        if d and os.path.isdir(os.path.join(d, "live")) and not os.path.exists(
                os.path.join(d, "fullchain.pem")):
            return os.path.join(d, "live")
        return d

    def generated_path(self, host: str) -> str:
        """Where the self-signed certificate of ``host`` lives."""
        name = _normalise(host)
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise CertificateError("", f"host name {host!r} cannot be used as a file name")
        return os.path.join(self.data_dir, "certs", f"{name}.pem")

    # -- candidates in priority order

    def _candidates(self, host: str, run: _Pass) -> Iterator[_Source]:
        """Every existing source for ``host``, best first (never the generated one)."""
        key = _normalise(host)
        names = list(dict.fromkeys([self._keys.get(key, host).lower(), key]))
        seen: set[str] = set()
        if key in self.explicit:
            cert, keyfile = self.explicit[key]
            yield _Source(EXPLICIT, cert, keyfile)
        yield from self._named_files(CERTS_DIR, names, seen)
        if key.count(".") >= 2:
            parent = key.split(".", 1)[1]
            yield from self._named_files(
                WILDCARD, [f"{star}.{parent}" for star in ("*", "_")], seen)
        yield from self._covering(run.certs_dir_index(), key, seen, self._dir_source)
        live = self.letsencrypt_live
        if live:
            for name in names:
                lineage = os.path.join(live, name)
                if os.path.exists(os.path.join(lineage, "fullchain.pem")):
                    seen.add(lineage)
                    yield self._le_source(lineage)
            yield from self._covering(run.le_index(), key, seen, self._le_source)
        if self.default_cert is not None:
            yield _Source(DEFAULT, *self.default_cert)

    def _named_files(self, origin: str, names: Iterable[str], seen: set[str]
                     ) -> Iterator[_Source]:
        if not self.certs_dir:
            return
        for name in names:
            for suffix in (".pem", ".crt"):
                path = os.path.join(self.certs_dir, name + suffix)
                if path not in seen and os.path.lexists(path):
                    seen.add(path)
                    yield _Source(origin, path, None)

    @staticmethod
    def _dir_source(path: str, how: str = "exact") -> _Source:
        return _Source(CERTS_DIR if how == "exact" else WILDCARD, path, None)

    @staticmethod
    def _le_source(lineage: str, how: str = "exact") -> _Source:
        return _Source(LETSENCRYPT, os.path.join(lineage, "fullchain.pem"),
                       os.path.join(lineage, "privkey.pem"))

    @staticmethod
    def _covering(index: list[tuple[str, x509.Certificate]], host: str, seen: set[str],
                  make: Callable[[str, str], _Source]) -> Iterator[_Source]:
        """Indexed certificates whose DNS names cover ``host``: exact names first."""
        found = {"exact": [], "wildcard": []}  # type: dict[str, list[str]]
        for path, leaf in index:
            how = _coverage(leaf, host)
            if how and path not in seen:
                found[how].append(path)
        for how in ("exact", "wildcard"):
            for path in found[how]:
                seen.add(path)
                yield make(path, how)

    # -- resolution

    def _resolve(self, host: str, run: _Pass) -> tuple[_Loaded | None, list[tuple[_Source, CertificateError]]]:
        """The first candidate that loads, and the ones refused on the way."""
        refused = []
        for source in self._candidates(host, run):
            try:
                return run.load(source), refused
            except CertificateError as e:
                refused.append((source, e))
        return None, refused

    def _self_signed(self, host: str, run: _Pass, create: bool) -> tuple[_Loaded | None, bool]:
        """
        The generated certificate of ``host``: reused while it is valid for the
        host and has a month left, otherwise (if ``create``) written anew.
        Returns (loaded or None, whether a new one was written).
        """
        source = _Source(GENERATED, self.generated_path(host), None)
        try:
            loaded = run.load(source)
            if (loaded.leaf.not_valid_after_utc - run.now > SELF_SIGNED_RENEW
                    and _identity_for(loaded.leaf, host)):
                return loaded, False
        except CertificateError:
            pass
        if not create:
            return None, False
        if not self.generate:
            # The file holds a private key: it lives only while it is read
            # (the directory goes whatever happens), and the preview is shown
            # under the path the server itself would use.
            with tempfile.TemporaryDirectory(prefix="xmppd-cert-preview-") as tmp:
                preview = _Source(GENERATED, os.path.join(tmp, os.path.basename(source.cert_path)))
                _generate_self_signed(_normalise(host), preview.cert_path)
                loaded = run.load(preview)
            return replace(loaded, source=source, files=(source.cert_path,)), True
        _generate_self_signed(_normalise(host), source.cert_path)
        run.written.append(source.cert_path)
        run._cache.pop(source, None)
        return run.load(source), True

    @staticmethod
    def _entry(host: str, loaded: _Loaded) -> _Entry:
        """Attach the host-specific findings (RFC 6125 identity) to a loaded source."""
        identity = _identity_for(loaded.leaf, host)
        notes = list(loaded.notes)
        if identity is None:
            notes.insert(0, _mismatch_note(loaded, host))
        return _Entry(host, loaded, identity, tuple(notes))

    def _pass_host(self, host: str, run: _Pass, old: _Entry | None,
                   messages: list[str]) -> tuple[_Entry, bool, list[str]]:
        """
        Decide what ``host`` serves after this pass.  Returns the entry, whether
        it is the old one kept because its replacement was refused, and the
        per-host problems to show in ``describe()``.
        """
        loaded, refused = self._resolve(host, run)
        if old is None:
            _raise_if_fatal(host, refused)
        else:
            replaced = [err for source, err in refused if source == old.loaded.source]
            if replaced:  # the file in service turned bad: the old certificate stays
                return old, True, _keep_old(host, old, f"refused {replaced[0]}", messages)
        problems = [f"skipped {err}" for _, err in refused]
        for _, err in refused:
            log.warn("{message}", message=f"{host}: skipped {err}", host=host, path=err.path)
            messages.append(f"{host}: skipped {err}")
        if loaded is None:
            if old is not None and old.loaded.source.origin != GENERATED:
                # files vanished: a real certificate beats a new self-signed one
                reason = "no usable certificate file found any more"
                return old, True, problems + _keep_old(host, old, reason, messages)
            loaded, created = self._self_signed(host, run, create=True)
            assert loaded is not None
            self._announce_self_signed(host, loaded, created, messages)
        return self._entry(host, loaded), False, problems

    @staticmethod
    def _announce_self_signed(host: str, loaded: _Loaded, created: bool,
                              messages: list[str]) -> None:
        verb = "generated" if created else "reusing"
        msg = (f"WARNING: {host} has no certificate; {verb} a SELF-SIGNED certificate "
               f"{loaded.source.cert_path} -- clients will not trust it; install a real "
               f"certificate (see docs/certificates.rst)")
        log.warn("{message}", message=msg, host=host, path=loaded.source.cert_path)
        messages.append(msg)

    def _run(self, initial: bool) -> list[str]:
        """One full pass: resolve every host, then swap the state in one assignment."""
        _check_policy(self.policy)
        signature = self._watch_signature()
        previous = None if initial else self._state
        run = _Pass(self, previous, _now())
        messages: list[str] = []
        self._warn_config(messages)
        entries: dict[str, _Entry] = {}
        stale: set[str] = set()
        problems: dict[str, tuple[str, ...]] = {}
        for key, host in self._keys.items():
            old = previous.entries.get(key) if previous else None
            entry, kept, host_problems = self._pass_host(host, run, old, messages)
            entries[key] = entry
            problems[key] = tuple(host_problems)
            if kept:
                stale.add(key)
            else:
                self._report_entry(entry, old, messages, run.now)
        entries = self._with_client_certs(entries, run)
        names = self._pass_names(run, previous, messages)
        default = self._load_default(run, previous, messages)
        # Direct TLS decides on resumption before SNI names the vhost, so a
        # session made without a client certificate could otherwise be resumed
        # for a vhost that requires one.
        resumes = _single_certificate(entries, default) and not self.client_certs
        front = self._front(entries[self.default_host], previous, resumes)
        self._state = _State(entries, default, front, *self._name_indexes(entries),
                             frozenset(stale), problems, resumes, names)
        # Taken before reading, so a change during the pass triggers another;
        # files the pass wrote itself are not a change.
        signature.update((path, _stat_key(path)) for path in run.written)
        self._signature = signature
        return messages

    def _pass_names(self, run: _Pass, previous: _State | None,
                    messages: list[str]) -> dict[str, _Entry]:
        """Certificates of the other names: certs_dir, wildcard and certbot sources only.

        Never fatal and never generated: a name without a usable file of its
        own is served like any name that is not a host (see :meth:`_lookup`).
        A file that turned bad keeps the certificate it replaced.
        """
        out: dict[str, _Entry] = {}
        for name in self.names:
            found = None
            for source in self._candidates(name, run):
                if source.origin == DEFAULT:
                    break
                try:
                    loaded = run.load(source)
                except CertificateError as e:
                    message = f"{name}: skipped {e}"
                    log.warn("{message}", message=message, host=name, path=e.path)
                    messages.append(message)
                    continue
                if _identity_for(loaded.leaf, name):
                    found = self._entry(name, loaded)
                    break
            if found is None and previous is not None and name in previous.names:
                old = previous.names[name]
                if os.path.exists(old.loaded.source.cert_path):
                    found = old
            if found is not None:
                out[name] = found
        return out

    def _with_client_certs(self, entries: dict[str, _Entry], run: _Pass) -> dict[str, _Entry]:
        """
        Give every vhost that asks for client certificates its own context.
        Rebuilt on every pass (CRLs change), also for a host that keeps its old
        server certificate.  A client CA or CRL that cannot be read raises
        CertificateError: it stops the start, and a reload keeps everything.
        """
        out = dict(entries)
        for key, policy in self.client_certs.items():
            entry = out.get(key)
            if entry is None:
                continue
            trust = _load_client_trust(entry.host, policy, run.client_files)
            out[key] = replace(entry, client=trust,
                               client_context=_client_context(self.policy, entry.loaded, trust))
        return out

    def _config_problems(self) -> list[str]:
        """Configuration that cannot do what it says, but need not stop the server."""
        found = [f"[tls] {key} {path} is not a readable directory"
                 for key, path in (("certs_dir", self.certs_dir),
                                   ("letsencrypt_dir", self.letsencrypt_dir))
                 if path and not os.path.isdir(path)]
        found += [f'[hosts."{host}".tls] names a host that is not in [server] hosts; ignored'
                  for host in self.explicit if host not in self._keys]
        found += [f'[hosts."{host}".tls] client_cert names a host that is not in [server] '
                  f'hosts; ignored' for host in self.client_certs if host not in self._keys]
        return found

    def _warn_config(self, messages: list[str]) -> None:
        for msg in self._config_problems():
            log.warn("{message}", message=msg)
            messages.append(msg)

    def _report_entry(self, entry: _Entry, old: _Entry | None, messages: list[str],
                      now: datetime) -> None:
        """Log what changed and what the operator should look at."""
        leaf = entry.loaded.leaf
        if old is not None and old.loaded.fingerprint != entry.loaded.fingerprint:
            msg = (f"{entry.host}: now serving serial {leaf.serial_number:#x} from "
                   f"{entry.loaded.source.cert_path} (was serial "
                   f"{old.loaded.leaf.serial_number:#x})")
            log.info("{message}", message=msg, host=entry.host)
            messages.append(msg)
        left = leaf.not_valid_after_utc - now
        if left < EXPIRY_WARNING:
            msg = (f"{entry.host}: certificate {entry.loaded.source.cert_path} expires "
                   f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (in {left.days} days)")
            log.warn("{message}", message=msg, host=entry.host)
            messages.append(msg)
        for note in entry.notes:
            msg = f"{entry.host}: {note}"
            log.warn("{message}", message=msg, host=entry.host)
            messages.append(msg)

    def _load_default(self, run: _Pass, previous: _State | None,
                      messages: list[str]) -> _Entry | None:
        """The default certificate also answers SNI names that are no vhost."""
        if self.default_cert is None:
            return None
        source = _Source(DEFAULT, *self.default_cert)
        try:
            return _Entry("*", run.load(source), "default")
        except CertificateError as e:
            if previous is not None and previous.default is not None:
                return previous.default  # the refusal was already reported per host
            if e.fatal:
                raise CertificateError(e.path, f"{e.problem} (default certificate)") from None
            msg = f"default certificate refused: {e}"
            log.warn("{message}", message=msg)
            messages.append(msg)
            return None

    def _front(self, entry: _Entry, previous: _State | None, resumes: bool) -> SSL.Context:
        """
        The context a direct-TLS handshake starts on.  It must carry the policy
        (OpenSSL takes versions, options and ciphers from the first context,
        not the one SNI switches to) and the default host's certificate for
        clients without SNI.  Kept across reloads when nothing it depends on
        changed, so TLS sessions survive a SIGHUP.

        Session resumption: OpenSSL decides to resume *before* the SNI
        callback runs, against this context's session cache, tickets and
        session-id context, so a session made for one vhost would be resumed
        under another vhost's SNI (RFC 6066 section 3 forbids that; the fix,
        switching in a ClientHello callback, is not exposed by pyOpenSSL).
        So when more than one certificate is served, direct TLS does full
        handshakes only.  STARTTLS contexts are per vhost and keep resumption.
        """
        if previous is not None:
            old = previous.entries[self.default_host]
            if old.context is entry.context and previous.front_resumes == resumes:
                return previous.front
        loaded = entry.loaded
        ctx = _build_context(self.policy, loaded.chain, loaded.key, loaded.source.cert_path)
        if entry.client is not None:  # clients without SNI get the default host's settings
            _request_client_certs(ctx, entry.client)
        if not resumes:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_tlsext_servername_callback(self._on_servername)
        return ctx

    @staticmethod
    def _name_indexes(entries: Mapping[str, _Entry]
                      ) -> tuple[dict[str, _Entry], dict[str, _Entry]]:
        """DNS names of served certificates, for SNI names that are not hosts."""
        by_name: dict[str, _Entry] = {}
        by_parent: dict[str, _Entry] = {}
        for entry in entries.values():
            san = _san(entry.loaded.leaf)
            for name in san.get_values_for_type(x509.DNSName) if san else []:
                name = name.lower()
                if name.startswith("*.") and name.count(".") >= 2:
                    by_parent.setdefault(name[2:], entry)
                elif "*" not in name:
                    by_name.setdefault(name, entry)
        return by_name, by_parent

    # -- public interface

    def load(self) -> list[str]:
        """
        Initial load.  Returns warnings (also logged).  Raises CertificateError
        only when the configuration itself is wrong: an explicitly configured
        certificate or default certificate that is missing, unreadable,
        unparsable or does not match its key, a cipher string OpenSSL rejects,
        or a self-signed certificate that cannot be written.  An expired file
        never stops the start: it is refused and the next source is used.
        """
        if self._state is not None:
            return self.reload()
        return self._run(initial=True)

    def reload(self) -> list[str]:
        """
        Re-read every source.  A host whose file is now broken keeps serving
        the certificate it had (and is reported), so a bad deploy never takes
        TLS down.  Established connections keep their context; only new
        handshakes see the new table.  Returns the messages it logged.
        """
        if self._state is None:
            return self.load()
        try:
            return self._run(initial=False)
        except CertificateError as e:
            log.error("reload failed, keeping all certificates: {error}", error=str(e))
            return [f"reload failed, keeping all certificates: {e}"]

    def _current(self) -> _State:
        state = self._state
        if state is None:
            raise RuntimeError("CertificateStore.load() has not been called")
        return state

    def _lookup(self, name: str) -> _Entry:
        state = self._current()
        key = _normalise(name)
        entry = (state.entries.get(key) or state.names.get(key) or state.by_name.get(key)
                 or (state.by_parent.get(key.split(".", 1)[1]) if "." in key else None)
                 or state.default)
        return entry or state.entries[self.default_host]

    def context_for(self, host: str) -> SSL.Context:
        """
        The context for a name (stream-header host for STARTTLS, or SNI):
        exact host, then a served certificate naming it (wildcards included),
        then the default certificate, then the default host.
        """
        return self._lookup(host).context

    def credentials(self, host: str) -> tuple[tuple[x509.Certificate, ...], object, str]:
        """Chain, key and file of the certificate served for ``host`` (the s2s contexts reuse them)."""
        loaded = self._lookup(host).loaded
        return loaded.chain, loaded.key, loaded.source.cert_path

    def starttls_options(self, host: str) -> _StartTLSCreator:
        """Argument for ``transport.startTLS()`` on the server side of a stream to ``host``."""
        return _StartTLSCreator(self, host)

    def direct_tls_factory(self, wrapped_factory: IProtocolFactory,
                           clock: IReactorTime | None = None) -> IProtocolFactory:
        """
        Wrap a factory for direct TLS (XEP-0368).  The handshake starts on the
        default host's certificate; the client's SNI switches to the vhost's.
        ``clock`` is TLSMemoryBIOFactory's write-coalescing clock (tests).
        """
        creator = _DirectTLSCreator(self)
        if clock is None:
            return TLSMemoryBIOFactory(creator, False, wrapped_factory)
        return TLSMemoryBIOFactory(creator, False, wrapped_factory, clock=clock)

    def _on_servername(self, conn: SSL.Connection) -> None:
        """SNI callback of the front context; never raises (that would abort the handshake)."""
        try:
            name = conn.get_servername()
            if name:
                ctx = self._lookup(name.decode("ascii", "replace")).context
                if ctx is not conn.get_context():
                    conn.set_context(ctx)
                    # OpenSSL keeps the first context's verify mode and
                    # callback: carry the vhost's client-certificate settings
                    # over (its CA store and CA names come with the context).
                    mode, callback = _CLIENT_VERIFY.get(ctx, (SSL.VERIFY_NONE, None))
                    conn.set_verify(mode, callback)
        except Exception:
            log.failure("while selecting the certificate for SNI")

    def describe(self, now: datetime | None = None) -> list[CertInfo]:
        """One CertInfo per host, in configuration order."""
        state = self._current()
        now = now or _now()
        return [self._info(state, key, state.entries[key], now) for key in self._keys]

    def _info(self, state: _State, key: str, entry: _Entry, now: datetime) -> CertInfo:
        leaf = entry.loaded.leaf
        return CertInfo(
            host=entry.host,
            status=_status(entry, key in state.stale, now),
            subject=_short_name(leaf.subject),
            sans=_display_names(leaf),
            issuer=_short_name(leaf.issuer),
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            fingerprint=entry.loaded.fingerprint.hex(":").upper(),
            origin=entry.loaded.source.origin,
            sources=entry.loaded.files,
            notes=tuple(state.problems.get(key, ())) + entry.notes,
        )


def _raise_if_fatal(host: str, refused: list[tuple[_Source, CertificateError]]) -> None:
    """At start, a configured file that is wrong (not merely expired) stops the server."""
    for source, err in refused:
        if source.fatal_when_broken and err.fatal:
            what = "default certificate" if source.origin == DEFAULT else "certificate"
            raise CertificateError(
                err.path, f"{err.problem} ({what} of host {host}, set by {_config_key(source, host, err)})")


def _keep_old(host: str, old: _Entry, reason: str, messages: list[str]) -> list[str]:
    """Log that ``old`` stays in service; returns the note for describe()."""
    note = (f"{reason}; still serving serial {old.loaded.leaf.serial_number:#x} loaded "
            f"earlier from {old.loaded.source.cert_path}")
    log.error("{message}", message=f"{host}: {note}", host=host)
    messages.append(f"{host}: {note}")
    return [note]


def _single_certificate(entries: Mapping[str, _Entry], default: _Entry | None) -> bool:
    """True when every name is served the same certificate (resumption is then safe)."""
    served = [*entries.values()] + ([default] if default is not None else [])
    return len({entry.loaded.fingerprint for entry in served}) == 1
