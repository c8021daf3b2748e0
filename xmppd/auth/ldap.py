"""The ``ldap`` connector: simple binds against a directory, with ldaptor.

Two ways to find the user's entry:

* **bind-DN template** -- ``bind_dn_template = "uid={user},ou=people,dc=example,dc=org"``:
  the DN is built from the localpart (RFC 4514-escaped) and bound to directly.
* **search, then bind** -- a service account (or an anonymous bind, when
  ``service_dn`` is not set) searches ``search_base`` with
  ``search_filter = "(&(objectClass=inetOrgPerson)(uid={user}))"`` (the value
  RFC 4515-escaped); exactly one entry must match, and its DN is bound with
  the offered password.  More than one match refuses the login.

Templates may use ``{user}`` (the prepared localpart), ``{domain}`` and
``{jid}``; each value is escaped for the place it goes to, so a username
like ``*``, ``)(uid=*`` or ``a,ou=admins`` is only ever a value.

Transport: ``ldaps://`` or ``ldap://`` with ``starttls = true``; the
server's certificate is verified against ``ca_file`` (or the system's
trust store) and its name against the URI's host (or ``tls_hostname``).
A clear-text ``ldap://`` without StartTLS is refused unless
``allow_plaintext = true`` says so (it would send passwords in clear).

Connections: the service account's connection is opened once and reused
for searches (reopened when the server drops it, and retried once when a
reused connection turns out dead); each password check binds on a
connection of its own, closed right after, so the shared connection is never
re-bound as a user.

Failure: an empty password is refused before any network traffic (an LDAP
"unauthenticated bind" with an empty password *succeeds* on many servers).
A directory that is down, slow (``timeout``), or answering with a server
error gives TemporaryAuthFailure, logged once per outage.

Read-only: ``add_user``, ``remove_user``, ``set_password`` and
``count_users`` raise NotSupported; SCRAM is not offered (PLAIN only).
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionClosed, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xmppd.auth.base import IAuthConnector, NotSupported, TemporaryAuthFailure
from xmppd.auth.health import BackendHealth
from xmppd.config import ConfigError
from xmppd.logfilter import log_observer

log = Logger(namespace="xmppd.auth.ldap", observer=log_observer)

TEMPLATE_FIELDS = ("user", "domain", "jid")
_FIELD = re.compile(r"\{([^{}]*)\}")

# Bind outcomes that mean "these credentials do not log in" rather than
# "the directory has a problem": invalidCredentials, noSuchObject,
# invalidDNSyntax, inappropriateAuthentication, insufficientAccessRights.
_REFUSED_CODES = frozenset({49, 32, 34, 48, 50})


# -- escaping (RFC 4515 filters, RFC 4514 DNs) ------------------------------------

_FILTER_SPECIALS = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}


def escape_filter_value(value: str) -> str:
    """An assertion value for an RFC 4515 filter: ``* ( ) \\ NUL`` as ``\\XX``.

    Other characters, including non-ASCII ones (UTF-8 on the wire), are
    legal as they are.
    """
    return "".join(_FILTER_SPECIALS.get(c, c) for c in value)


_DN_SPECIALS = set('"+,;<>\\=')


def escape_dn_value(value: str) -> str:
    """An attribute value for an RFC 4514 DN string.

    Backslash-escapes ``" + , ; < > \\ =``, a leading ``#`` or space and a
    trailing space; control characters (including NUL) become ``\\XX``.
    """
    out = []
    last = len(value) - 1
    for i, c in enumerate(value):
        if c in _DN_SPECIALS:
            out.append("\\" + c)
        elif ord(c) < 0x20 or c == "\x7f":
            out.append("\\%02x" % ord(c))
        elif c == " " and (i == 0 or i == last):
            out.append("\\ ")
        elif c == "#" and i == 0:
            out.append("\\#")
        else:
            out.append(c)
    return "".join(out)


def render(template: str, values: dict, escape) -> str:
    """Fill ``{field}`` slots with escaped values (no str.format: no attribute access)."""
    return _FIELD.sub(lambda m: escape(values[m.group(1)]), template)


def template_fields(template: str) -> list[str]:
    return _FIELD.findall(template)


_ATTR = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+")


def split_dn(dn: str) -> list[list[tuple[str, str]]]:
    """Parse an RFC 4514 DN string into RDNs of (type, raw value); ValueError if bad.

    Strict enough to catch typos in configured DNs (empty RDNs, missing
    ``=``, dangling escapes); values are returned still escaped.
    """
    rdns: list[list[tuple[str, str]]] = []
    avas: list[tuple[str, str]] = []
    buf: list[str] = []
    attr: str | None = None
    i, n = 0, len(dn)
    if not dn.strip():
        raise ValueError("empty DN")

    def finish_ava():
        nonlocal attr
        value = "".join(buf)
        if attr is None:
            raise ValueError(f"RDN component {value!r} has no '='")
        if not _ATTR.fullmatch(attr.strip()):
            raise ValueError(f"bad attribute type {attr.strip()!r}")
        avas.append((attr.strip(), value.strip()))
        attr = None
        buf.clear()

    while i < n:
        c = dn[i]
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("DN ends with a lone backslash")
            nxt = dn[i + 1]
            if nxt in '"+,;<>\\=# ':
                buf.append(dn[i : i + 2])
                i += 2
                continue
            if re.fullmatch(r"[0-9A-Fa-f]{2}", dn[i + 1 : i + 3]):
                buf.append(dn[i : i + 3])
                i += 3
                continue
            raise ValueError(f"bad escape at position {i}")
        if c == "=" and attr is None:
            attr = "".join(buf)
            buf.clear()
        elif c in ",;":
            finish_ava()
            rdns.append(avas)
            avas = []
        elif c == "+":
            finish_ava()
        else:
            buf.append(c)
        i += 1
    finish_ava()
    rdns.append(avas)
    for rdn in rdns:
        for a, v in rdn:
            if not v:
                raise ValueError(f"empty value for {a}")
    return rdns


# -- the protocol -------------------------------------------------------------------


def _ldap_client_class():
    from ldaptor.protocols.ldap.ldapclient import LDAPClient

    @implementer(IHandshakeListener)
    class Client(LDAPClient):
        """ldaptor's client plus a way to wait for the TLS handshake."""

        def __init__(self) -> None:
            super().__init__()
            self._handshake_waiters: list[defer.Deferred] = []
            self.handshake_done = False
            self.lost_reason: Failure | None = None

        def handshakeCompleted(self) -> None:
            self.handshake_done = True
            waiters, self._handshake_waiters = self._handshake_waiters, []
            for d in waiters:
                d.callback(self)

        def wait_handshake(self) -> defer.Deferred:
            if self.handshake_done:
                return defer.succeed(self)
            if not self.connected:
                return defer.fail(self.lost_reason or ConnectionLost("connection closed"))
            d = defer.Deferred()
            self._handshake_waiters.append(d)
            return d

        def connectionLost(self, reason=None):
            self.lost_reason = reason
            super().connectionLost(reason)
            waiters, self._handshake_waiters = self._handshake_waiters, []
            for d in waiters:
                d.errback(reason)

        def close(self) -> None:
            if self.connected and self.transport is not None:
                self.transport.abortConnection()

    return Client


class _Refused(Exception):
    """Internal: the directory said no to these credentials."""


def _describe(failure: Failure, timeout: float) -> str:
    from ldaptor.protocols.ldap import ldaperrors

    err = failure.value
    if isinstance(err, (defer.TimeoutError, defer.CancelledError)):
        return f"no answer within {timeout:g}s"
    if isinstance(err, SSL.Error):
        return f"TLS handshake failed ({_ssl_text(err)})"
    if isinstance(err, ldaperrors.LDAPException):
        code = getattr(err, "resultCode", "?")
        name = getattr(err, "name", type(err).__name__)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        message = getattr(err, "message", "") or ""
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        return f"LDAP result {code} ({name}){': ' + message if message else ''}"
    if isinstance(err, ConnectError):
        return f"cannot connect ({' '.join(str(err).split())})"
    if isinstance(err, (ConnectionLost, ConnectionClosed)):
        return "connection lost"
    return f"{type(err).__name__}: {err}"


def _ssl_text(err: SSL.Error) -> str:
    try:
        return "; ".join(":".join(str(x) for x in e if x) for e in err.args[0]) or str(err)
    except Exception:
        return str(err)


def _is_tls_failure(failure: Failure) -> bool:
    return failure.check(SSL.Error) is not None


@implementer(IAuthConnector)
class LDAPConnector:
    """Authenticate by LDAP simple bind; see the module docstring."""

    name = "ldap"

    def __init__(
        self, *, uri: str, path: str = "<config>", key: str = "auth.ldap",
        starttls: bool = False, ca_file: str | None = None, tls_hostname: str | None = None,
        bind_dn_template: str | None = None, search_base: str | None = None,
        search_filter: str | None = None, service_dn: str | None = None,
        service_password: str | None = None, timeout: float = 5.0,
        allow_plaintext: bool = False, reactor=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.path, self.key = path, key
        self.timeout = timeout
        self.health = BackendHealth("ldap", clock=reactor)
        self._client_class = _ldap_client_class()

        def err(name, value, allowed):
            return ConfigError(path, f"{key}.{name}", value, allowed)

        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in ("ldap", "ldaps"):
            raise err("uri", uri, "must be ldap://host[:port] or ldaps://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise err("uri", uri, "only scheme, host and port (the DNs have keys of their own)")
        try:
            port = parts.port
        except ValueError:
            raise err("uri", uri, "bad port") from None
        if not parts.hostname:
            raise err("uri", uri, "names no host")
        self.uri = uri
        self.host = parts.hostname
        self.ldaps = scheme == "ldaps"
        self.port = port or (636 if self.ldaps else 389)
        if self.ldaps and starttls:
            raise err("starttls", starttls, "must be false with ldaps:// (TLS from the first byte)")
        self.starttls = starttls
        if not (self.ldaps or starttls or allow_plaintext):
            raise err("uri", uri, "sends passwords in clear: use ldaps://, starttls = true, "
                      "or say allow_plaintext = true")
        self.ca_file = ca_file
        self.tls_hostname = tls_hostname or self.host
        self._trust = None
        if ca_file is not None:
            try:
                with open(ca_file, "rb") as f:
                    pem = f.read()
                certs = [
                    Certificate.loadPEM(block)
                    for block in re.findall(
                        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S
                    )
                ]
            except OSError as e:
                raise err("ca_file", ca_file, f"cannot read ({e.strerror})") from None
            except Exception as e:
                raise err("ca_file", ca_file, f"not PEM certificates ({e})") from None
            if not certs:
                raise err("ca_file", ca_file, "holds no PEM certificate")
            self._trust = trustRootFromCertificates(certs)

        if (bind_dn_template is None) == (search_filter is None):
            raise err("bind_dn_template", bind_dn_template,
                      "set either bind_dn_template or search_base + search_filter (not both)")
        if bind_dn_template is not None and search_base is not None:
            raise err("search_base", search_base, "only with search_filter (not with bind_dn_template)")
        self.bind_dn_template = bind_dn_template
        self.search_base = search_base
        self.search_filter = search_filter
        sample = {"user": "xmppd-sample", "domain": "example.org", "jid": "xmppd-sample@example.org"}
        if bind_dn_template is not None:
            self._check_template("bind_dn_template", bind_dn_template, err)
            try:
                split_dn(render(bind_dn_template, sample, escape_dn_value))
            except ValueError as e:
                raise err("bind_dn_template", bind_dn_template, f"not a DN ({e})") from None
        else:
            if search_base is None:
                raise err("search_base", None, "required with search_filter")
            try:
                split_dn(search_base)
            except ValueError as e:
                raise err("search_base", search_base, f"not a DN ({e})") from None
            self._check_template("search_filter", search_filter, err)
            try:
                self._parse_filter(render(search_filter, sample, escape_filter_value))
            except Exception as e:
                raise err("search_filter", search_filter, f"not an RFC 4515 filter ({e})") from None
        if service_dn is not None:
            try:
                split_dn(service_dn)
            except ValueError as e:
                raise err("service_dn", service_dn, f"not a DN ({e})") from None
            if not service_password:
                raise err("service_password", None, "required (non-empty) with service_dn")
        elif service_password:
            raise err("service_password", "***", "given without service_dn")
        self.service_dn = service_dn
        self.service_password = service_password
        self._service = None
        self._service_waiters: list[defer.Deferred] | None = None

    @staticmethod
    def _check_template(name, template, err):
        fields = template_fields(template)
        for f in fields:
            if f not in TEMPLATE_FIELDS:
                raise err(name, template, f"unknown field {{{f}}}; allowed: {{user}}, {{domain}}, {{jid}}")
        if not any(f in ("user", "jid") for f in fields):
            raise err(name, template, "must contain {user} or {jid}")
        # Values are escaped for value positions only: a field must come after
        # the '=' of its filter item (``(uid={user})``) or RDN (``uid={user},``).
        separators = "(" if name == "search_filter" else ",+;"
        for m in _FIELD.finditer(template):
            before = template[: m.start()]
            start = max(before.rfind(c) for c in separators)
            if "=" not in before[start + 1 :]:
                raise err(name, template, f"{{{m.group(1)}}} must stand in a value (after '=')")

    @staticmethod
    def _parse_filter(text: str):
        from ldaptor import ldapfilter

        return ldapfilter.parseFilter(text)

    # -- connections ---------------------------------------------------------------

    def _tls_options(self):
        trust = self._trust if self._trust is not None else platformTrust()
        return optionsForClientTLS(self.tls_hostname, trustRoot=trust)

    @defer.inlineCallbacks
    def _open(self):
        """A connected client, TLS verified where configured."""
        endpoint = HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        if self.ldaps:
            endpoint = wrapClientTLS(self._tls_options(), endpoint)
        client = yield connectProtocol(endpoint, self._client_class())
        try:
            if self.ldaps:
                yield client.wait_handshake()
            elif self.starttls:
                yield client.startTLS(self._tls_options())
                yield client.wait_handshake()
        except BaseException:
            client.close()
            raise
        return client

    def _service_client(self) -> defer.Deferred:
        """The shared (service-bound or anonymous) connection; opened on demand."""
        if self._service is not None and self._service.connected:
            return defer.succeed((self._service, True))
        d = defer.Deferred()
        if self._service_waiters is not None:
            self._service_waiters.append(d)
            return d
        self._service_waiters = [d]

        @defer.inlineCallbacks
        def connect():
            client = yield self._open()
            try:
                if self.service_dn is not None:
                    yield client.bind(self.service_dn, self.service_password)
            except BaseException:
                client.close()
                raise
            return client

        def done(result):
            waiters, self._service_waiters = self._service_waiters, None
            if isinstance(result, Failure):
                for w in waiters:
                    w.errback(result)
            else:
                self._service = result
                for w in waiters:
                    w.callback((result, False))

        connect().addBoth(done)
        return d

    def _drop_service(self) -> None:
        if self._service is not None:
            self._service.close()
            self._service = None

    def _search(self, client, base: str, scope: int, filter_text: str, size_limit: int):
        """Deferred[list of DNs]; LDAP errors as ldaptor exceptions."""
        from ldaptor.protocols import pureldap
        from ldaptor.protocols.ldap import ldaperrors

        request = pureldap.LDAPSearchRequest(
            baseObject=base, scope=scope, derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=size_limit, timeLimit=max(1, int(self.timeout)), typesOnly=0,
            filter=self._parse_filter(filter_text), attributes=["1.1"],
        )
        result = defer.Deferred()
        found: list = []

        def handler(msg):
            if isinstance(msg, pureldap.LDAPSearchResultEntry):
                name = msg.objectName
                found.append(name.decode("utf-8") if isinstance(name, bytes) else str(name))
                return False
            if isinstance(msg, pureldap.LDAPSearchResultReference):
                return False
            if isinstance(msg, pureldap.LDAPSearchResultDone):
                if result.called:
                    return True
                if msg.resultCode == 0:
                    result.callback(found)
                else:
                    result.errback(ldaperrors.get(msg.resultCode, msg.errorMessage))
                return True
            return False

        lost = client.send_multiResponse(request, handler)

        def connection_lost(failure):
            if not result.called:
                result.errback(failure)

        lost.addErrback(connection_lost)
        return result

    @defer.inlineCallbacks
    def _service_search(self, base: str, scope: int, filter_text: str, size_limit: int):
        """Search on the shared connection; one retry when a reused one is dead."""
        for attempt in (1, 2):
            client, reused = yield self._service_client()
            try:
                return (yield self._search(client, base, scope, filter_text, size_limit))
            except (ConnectionLost, ConnectionClosed) + _lost_exceptions():
                self._drop_service()
                if not reused or attempt == 2:
                    raise
            except BaseException:
                self._drop_service_if_broken(client)
                raise

    def _drop_service_if_broken(self, client) -> None:
        if not client.connected:
            self._drop_service()

    @defer.inlineCallbacks
    def _bind(self, dn: str, password: str):
        """True when ``dn``/``password`` bind; False when refused; raises on trouble."""
        from ldaptor.protocols.ldap import ldaperrors

        client = yield self._open()
        try:
            yield client.bind(dn, password)
            return True
        except ldaperrors.LDAPException as e:
            if getattr(e, "resultCode", None) in _REFUSED_CODES:
                return False
            raise
        finally:
            if client.connected:
                try:
                    client.unbind()
                except Exception:
                    client.close()

    def _values(self, username: str, domain: str) -> dict:
        return {"user": username, "domain": domain, "jid": f"{username}@{domain}"}

    @defer.inlineCallbacks
    def _find_dn(self, username: str, domain: str):
        """The user's DN, or None (no entry, or ambiguous)."""
        from ldaptor.protocols import pureldap
        from ldaptor.protocols.ldap import ldaperrors

        values = self._values(username, domain)
        if self.bind_dn_template is not None:
            return render(self.bind_dn_template, values, escape_dn_value)
        filter_text = render(self.search_filter, values, escape_filter_value)
        try:
            dns = yield self._service_search(
                self.search_base, pureldap.LDAP_SCOPE_wholeSubtree, filter_text, 2
            )
        except ldaperrors.LDAPSizeLimitExceeded:
            dns = [None, None]
        if len(dns) > 1:
            log.error("ldap: several entries match {filter} under {base}; login refused",
                      filter=filter_text, base=self.search_base)
            return None
        return dns[0] if dns else None

    def _guard(self, d: defer.Deferred) -> defer.Deferred:
        """Deadline, outage logging, and the fail-closed mapping of every error."""
        d.addTimeout(self.timeout, self.reactor)

        def ok(result):
            self.health.success()
            return result

        def failed(failure):
            if failure.check(NotSupported):
                return failure
            if failure.check(defer.TimeoutError, defer.CancelledError):
                self._drop_service()
            raise self.health.failure(_describe(failure, self.timeout)) from None

        return d.addCallbacks(ok, failed)

    # -- IAuthConnector ------------------------------------------------------------

    def mechanisms(self) -> frozenset:
        return frozenset({"PLAIN"})

    def check_password(self, username: str, domain: str, password: str):
        # Never send an empty password: RFC 4513 5.1.2 "unauthenticated"
        # binds succeed without checking anything on many servers.
        if not password or not username:
            return defer.succeed(False)

        @defer.inlineCallbacks
        def work():
            dn = yield self._find_dn(username, domain)
            if dn is None:
                return False
            return (yield self._bind(dn, password))

        return self._guard(work())

    def get_scram_credentials(self, username: str, domain: str, mechanism: str):
        return defer.succeed(None)

    def user_exists(self, username: str, domain: str):
        from ldaptor.protocols import pureldap
        from ldaptor.protocols.ldap import ldaperrors

        @defer.inlineCallbacks
        def work():
            if self.bind_dn_template is None:
                return (yield self._find_dn(username, domain)) is not None
            dn = render(self.bind_dn_template, self._values(username, domain), escape_dn_value)
            try:
                found = yield self._service_search(
                    dn, pureldap.LDAP_SCOPE_baseObject, "(objectClass=*)", 1
                )
            except ldaperrors.LDAPNoSuchObject:
                return False
            return bool(found)

        return self._guard(work())

    def add_user(self, username: str, domain: str, password: str):
        return defer.fail(NotSupported("LDAP accounts are managed in the directory"))

    def remove_user(self, username: str, domain: str):
        return defer.fail(NotSupported("LDAP accounts are managed in the directory"))

    def set_password(self, username: str, domain: str, password: str):
        return defer.fail(NotSupported("LDAP passwords are changed in the directory"))

    def count_users(self, domain: str):
        return defer.fail(NotSupported("the LDAP connector does not count accounts"))

    def check(self):
        """Problems for ``xmppctl check``: connect, TLS, service bind, base, filter."""
        from ldaptor.protocols import pureldap
        from ldaptor.protocols.ldap import ldaperrors

        def problem(name, value, text):
            return str(ConfigError(self.path, f"{self.key}.{name}", value, text))

        @defer.inlineCallbacks
        def work():
            try:
                client = yield self._open()
            except Exception:
                f = Failure()
                if _is_tls_failure(f):
                    name, value = ("ca_file", self.ca_file) if self.ca_file else ("uri", self.uri)
                    return [problem(name, value, f"cannot verify the server: {_describe(f, self.timeout)}")]
                return [problem("uri", self.uri, f"cannot reach the directory: {_describe(f, self.timeout)}")]
            problems = []
            try:
                if self.service_dn is not None:
                    try:
                        yield client.bind(self.service_dn, self.service_password)
                    except ldaperrors.LDAPException:
                        f = Failure()
                        return [problem("service_dn", self.service_dn,
                                        f"service bind failed: {_describe(f, self.timeout)}")]
                if self.search_filter is not None:
                    try:
                        yield self._search(client, self.search_base, pureldap.LDAP_SCOPE_baseObject,
                                           "(objectClass=*)", 1)
                    except ldaperrors.LDAPException:
                        f = Failure()
                        problems.append(problem("search_base", self.search_base,
                                                f"cannot search it: {_describe(f, self.timeout)}"))
                        return problems
                    values = self._values("xmppd-check-nonexistent", "example.invalid")
                    try:
                        yield self._search(
                            client, self.search_base, pureldap.LDAP_SCOPE_wholeSubtree,
                            render(self.search_filter, values, escape_filter_value), 2,
                        )
                    except ldaperrors.LDAPException:
                        f = Failure()
                        problems.append(problem("search_filter", self.search_filter,
                                                f"the directory rejects it: {_describe(f, self.timeout)}"))
            finally:
                client.close()
            return problems

        d = work()
        d.addTimeout(self.timeout * 3, self.reactor)

        def failed(f):
            return [problem("uri", self.uri, f"check failed: {_describe(f, self.timeout)}")]

        return d.addErrback(failed)

    def close(self) -> None:
        self._drop_service()


def _lost_exceptions() -> tuple:
    from ldaptor.protocols.ldap.ldapclient import LDAPClientConnectionLostException

    return (LDAPClientConnectionLostException,)


# TemporaryAuthFailure is what callers catch; re-exported for convenience.
__all__ = [
    "LDAPConnector", "TemporaryAuthFailure", "escape_dn_value", "escape_filter_value",
    "render", "split_dn",
]
