"""
Checking certificates: a chain and key that belong together and are in
date, one pass over the disk that loads and checks each source once, and
the report of ``xmppctl check``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from xmppd.certs.clientcerts import ClientCertPolicy, _load_client_trust
from xmppd.certs.contexts import _build_context, _check_policy
from xmppd.certs.identity import _display_names, _identity_for, _normalise, _short_name
from xmppd.certs.model import DEFAULT, _Entry, _Loaded, _now, _Source, _State
from xmppd.certs.pem import (
    _CERT_SUFFIXES,
    CertificateError,
    _first_leaf,
    _listdir,
    _load_material,
)

if TYPE_CHECKING:  # annotations only: the store imports this module
    from xmppd.certs.store import CertificateStore

#: Warn when a certificate in service expires within this time.
EXPIRY_WARNING = timedelta(days=14)


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, InvalidSignature):
        return False
    except TypeError:  # key type cryptography cannot verify: judge by names only
        return child.issuer == parent.subject
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _issued_by(cert, cert)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_key(chain: list[x509.Certificate], key: object, files: Sequence[str]) -> None:
    key_spki = _spki(key.public_key())  # type: ignore[attr-defined]
    if _spki(chain[0].public_key()) == key_spki:
        return
    where = files[-1]
    against = f" in {files[0]}" if len(files) > 1 else ""
    for i, cert in enumerate(chain[1:], start=2):
        if _spki(cert.public_key()) == key_spki:
            raise CertificateError(
                where, f"private key belongs to certificate {i} of the chain "
                       f"({_short_name(cert.subject)}); the server certificate must come first")
    raise CertificateError(
        where, f"private key does not match the certificate{against} "
               f"({_short_name(chain[0].subject)}, serial {chain[0].serial_number:#x})")


def _check_chain(chain: list[x509.Certificate], path: str) -> None:
    """Each certificate must be issued by the next one, as TLS sends them in order."""
    for i in range(len(chain) - 1):
        if not _issued_by(chain[i], chain[i + 1]):
            raise CertificateError(
                path, f"chain out of order: certificate {i + 1} "
                      f"({_short_name(chain[i].subject)}) is not issued by certificate {i + 2} "
                      f"({_short_name(chain[i + 1].subject)}); put the server certificate "
                      f"first, then each issuer")


def _check_dates(leaf: x509.Certificate, path: str, now: datetime) -> None:
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            path, f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                  f"(serial {leaf.serial_number:#x})", fatal=False)
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            path, f"certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                  f"UTC (check the clock)", fatal=False)


def _file_notes(chain: list[x509.Certificate], files: Sequence[str]) -> tuple[str, ...]:
    notes = []
    if len(chain) == 1 and not _is_self_signed(chain[0]):
        notes.append(f"{files[0]}: holds only the server certificate, no intermediate; "
                     f"clients may fail to build the chain (use the full chain, e.g. "
                     f"fullchain.pem)")
    try:
        mode = stat.S_IMODE(os.stat(files[-1]).st_mode)
    except OSError:
        mode = 0
    if mode & stat.S_IROTH:
        notes.append(f"{files[-1]}: private key is readable by every user (mode {mode:04o}); "
                     f"use 0600 or 0640")
    return tuple(notes)


class _Pass:
    """
    One load/reload/check run: lists each directory once, loads each source
    once (a wildcard or default certificate serves several hosts with one
    context) and reuses the previous context when a file did not change, so
    SIGHUP does not throw away TLS session caches for untouched hosts.
    """

    def __init__(self, store: CertificateStore, previous: _State | None, now: datetime) -> None:
        self.store = store
        self.now = now
        self._cache: dict[_Source, _Loaded | CertificateError] = {}
        self._previous: dict[_Source, _Loaded] = {}
        if previous is not None:
            for entry in [*previous.entries.values(), *previous.names.values(), previous.default]:
                if entry is not None:
                    self._previous[entry.loaded.source] = entry.loaded
        self._certs_dir_index: list[tuple[str, x509.Certificate]] | None = None
        self._le_index: list[tuple[str, x509.Certificate]] | None = None
        self.written: list[str] = []  # files this pass wrote (generated certificates)
        self.client_files: dict[tuple[str, str], list] = {}  # client CA / CRL files read

    def load(self, source: _Source) -> _Loaded:
        """Read and check a source, or raise CertificateError (cached both ways)."""
        cached = self._cache.get(source)
        if cached is None:
            try:
                cached = self._load(source)
            except CertificateError as e:
                cached = e
            self._cache[source] = cached
        if isinstance(cached, CertificateError):
            raise cached
        return cached

    def _load(self, source: _Source) -> _Loaded:
        files, chain, key = _load_material(source)
        _check_key(chain, key, files)
        _check_chain(chain, source.cert_path)
        _check_dates(chain[0], source.cert_path, self.now)
        notes = _file_notes(chain, files)
        old = self._previous.get(source)
        if (old is not None and old.chain == tuple(chain)
                and _spki(old.key.public_key()) == _spki(key.public_key())):  # type: ignore[attr-defined]
            return replace(old, files=files, notes=notes)
        context = _build_context(self.store.policy, chain, key, source.cert_path)
        return _Loaded(source, files, tuple(chain), key, context, notes)

    def certs_dir_index(self) -> list[tuple[str, x509.Certificate]]:
        """(path, leaf) of every non-CA certificate file in certs_dir."""
        if self._certs_dir_index is None:
            directory = self.store.certs_dir
            index = []
            for name in _listdir(directory):
                path = os.path.join(directory, name)  # type: ignore[arg-type]
                if name.startswith(".") or not name.endswith(_CERT_SUFFIXES):
                    continue
                leaf = _first_leaf(path)
                if leaf is not None and not _is_ca(leaf):
                    index.append((path, leaf))
            self._certs_dir_index = index
        return self._certs_dir_index

    def le_index(self) -> list[tuple[str, x509.Certificate]]:
        """(lineage dir, leaf) of every certbot lineage."""
        if self._le_index is None:
            live = self.store.letsencrypt_live
            index = []
            for name in _listdir(live):
                lineage = os.path.join(live, name)  # type: ignore[arg-type]
                leaf = _first_leaf(os.path.join(lineage, "fullchain.pem"))
                if leaf is not None:
                    index.append((lineage, leaf))
            self._le_index = index
        return self._le_index


def _config_key(source: _Source, host: str, err: CertificateError) -> str:
    """The config key that named a configured (explicit or default) file."""
    if source.origin == DEFAULT:
        table, names = "tls", ("default_cert", "default_key")
    else:
        table, names = f'hosts."{host}".tls', ("cert", "key")
    name = names[1] if source.key_path is not None and err.path == source.key_path else names[0]
    return f"{table}.{name}"


def _mismatch_note(loaded: _Loaded, host: str) -> str:
    names = ", ".join(_display_names(loaded.leaf)) or "none"
    return f"{loaded.source.cert_path}: certificate is not valid for {host} (names: {names})"


def _status(entry: _Entry, stale: bool, now: datetime) -> str:
    leaf = entry.loaded.leaf
    if leaf.not_valid_after_utc <= now:
        return "expired"
    if entry.identity is None:
        return "mismatch"
    if stale:
        return "stale"
    if leaf.not_valid_after_utc - now < EXPIRY_WARNING:
        return "expiring"
    if _is_self_signed(leaf):
        return "self-signed"
    return "ok"


def check_certificates(store: CertificateStore, now: datetime | None = None) -> list[str]:
    """
    Problems for ``xmppctl check``, one line each, starting with ``error:`` or
    ``warning:``; ``has_errors()`` tells whether the command should fail.

    Reads the files afresh (the store need not be loaded and is not changed;
    nothing is generated).  Errors: a candidate file for a host that cannot be
    used (broken, unreadable, key mismatch, chain order, expired), a served
    certificate not valid for its host, an unusable TLS policy.  Warnings:
    expiring within 14 days, self-signed, missing intermediates, a key readable
    by everyone, a host that would get a generated certificate.
    """
    try:
        _check_policy(store.policy)
    except CertificateError as e:
        return [f"error: {e}"]
    problems = [f"warning: {p}" for p in store._config_problems()]
    run = _Pass(store, None, now or _now())
    for host in store.hosts:
        problems.extend(_check_host(store, host, run))
        policy = store.client_certs.get(_normalise(host))
        if policy is not None:
            problems.extend(_check_client_trust(host, policy, run))
    return problems


def _check_client_trust(host: str, policy: ClientCertPolicy, run: _Pass) -> list[str]:
    """Client CA / CRL files of a vhost: unreadable is an error, expired a warning."""
    try:
        trust = _load_client_trust(host, policy, run.client_files)
    except CertificateError as e:
        return [f"error: {host}: {e}"]
    out = []
    for ca in trust.cas:
        if ca.not_valid_after_utc <= run.now:
            out.append(f"warning: {host}: client CA {_short_name(ca.subject)} expired on "
                       f"{ca.not_valid_after_utc:%Y-%m-%d}")
    for crl in trust.crls:
        if crl.next_update_utc is not None and crl.next_update_utc <= run.now:
            out.append(f"warning: {host}: CRL of {_short_name(crl.issuer)} is past its next "
                       f"update ({crl.next_update_utc:%Y-%m-%d %H:%M} UTC); OpenSSL refuses "
                       f"client certificates with an expired CRL")
    return out


def _check_host(store: CertificateStore, host: str, run: _Pass) -> list[str]:
    out = []
    loaded, refused = store._resolve(host, run)
    fatal = False
    for source, err in refused:
        if source.fatal_when_broken and err.fatal:
            # what start-up refuses: name the key, and promise no fallback
            fatal = True
            out.append(f"error: {host}: {_config_key(source, host, err)}: {err}; "
                       f"the server does not start")
        else:
            out.append(f"error: {host}: {err}")
    if loaded is None and fatal:
        return out
    if loaded is None:
        loaded, _ = store._self_signed(host, run, create=False)
        if loaded is None:
            out.append(f"warning: {host}: no certificate; a self-signed one will be generated "
                       f"at {store.generated_path(host)}")
            return out
    if _identity_for(loaded.leaf, host) is None:
        # A default certificate is a deliberate catch-all; anything else is a mistake.
        severity = "warning" if loaded.source.origin == DEFAULT else "error"
        out.append(f"{severity}: {host}: {_mismatch_note(loaded, host)}")
    out.extend(f"warning: {host}: {note}" for note in loaded.notes)
    left = loaded.leaf.not_valid_after_utc - run.now
    if left < EXPIRY_WARNING:
        out.append(f"warning: {host}: {loaded.source.cert_path}: expires "
                   f"{loaded.leaf.not_valid_after_utc:%Y-%m-%d} (in {left.days} days)")
    if _is_self_signed(loaded.leaf):
        out.append(f"warning: {host}: {loaded.source.cert_path}: self-signed certificate; "
                   f"clients will not trust it")
    return out


def has_errors(problems: Iterable[str]) -> bool:
    """True when ``check_certificates()`` found something that must fail ``xmppctl check``."""
    return any(p.startswith("error:") for p in problems)
