"""
Reading certificate and key files: PEM blocks, certificates, private keys.

Every OS or parse problem becomes a one-line :class:`CertificateError` naming
the file, so it can go to the operator as it is.  An unreadable key is
explained (owner, mode, the user xmppd runs as), because a root-owned 0600
key is the usual cause.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from xmppd.certs.model import _Source

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)
_CERT_SUFFIXES = (".pem", ".crt", ".cer")


class CertificateError(Exception):
    """
    A certificate or key file that cannot be used.

    ``str()`` is one line naming the file and the problem, so it can go to the
    operator as it is (no stack trace).  ``path`` and ``problem`` keep the
    parts; ``fatal`` is False for problems that come with time (expired, not
    yet valid) rather than from the configuration, which never stop a start.
    """

    def __init__(self, path: str, problem: str, *, fatal: bool = True) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem
        self.fatal = fatal


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _access_problem(path: str, what: str) -> str:
    """
    Explain why ``path`` cannot be read, in one line: the usual cause is a
    key owned by root with mode 0600 while xmppd runs as its own user.
    """
    user = _user_name(os.geteuid())
    try:
        st = os.stat(path)
    except PermissionError:
        return (f"cannot reach the {what}: a parent directory is not searchable "
                f"by user {user}")
    except FileNotFoundError:
        return f"{what} file does not exist"
    mode = stat.S_IMODE(st.st_mode)
    return (f"{what} is not readable by user {user}: owner "
            f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}, mode {mode:04o} "
            f"({stat.filemode(st.st_mode)})")


def _read(path: str, what: str) -> bytes:
    """Read a whole (small) file, turning OS errors into one-line CertificateErrors."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except PermissionError:
        raise CertificateError(path, _access_problem(path, what)) from None
    except FileNotFoundError:
        raise CertificateError(path, f"{what} file does not exist") from None
    except IsADirectoryError:
        raise CertificateError(path, f"{what} path is a directory") from None
    except OSError as e:
        raise CertificateError(path, f"cannot read {what}: {e.strerror}") from None


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _parse_certs(blocks: list[tuple[str, bytes]], path: str) -> list[x509.Certificate]:
    certs = []
    for label, block in blocks:
        if label != "CERTIFICATE":
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise CertificateError(
                path, f"certificate {len(certs) + 1} in the file is not a valid certificate ({e})"
            ) from None
    return certs


def _parse_key(blocks: list[tuple[str, bytes]], path: str) -> object | None:
    keys = [block for label, block in blocks if label.endswith("PRIVATE KEY")]
    if not keys:
        return None
    if len(keys) > 1:
        raise CertificateError(path, f"holds {len(keys)} private keys; expected one")
    try:
        return serialization.load_pem_private_key(keys[0], password=None)
    except TypeError:
        raise CertificateError(
            path, "private key is encrypted with a passphrase; xmppd needs an unencrypted "
                  "key protected by file permissions (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(path, f"private key cannot be parsed ({e})") from None


def _first_leaf(path: str) -> x509.Certificate | None:
    """The first certificate of a file, for indexing a directory; None if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        for label, block in _pem_blocks(data):
            if label == "CERTIFICATE":
                return x509.load_pem_x509_certificate(block)
    except (OSError, ValueError):
        pass
    return None


def _stat_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as e:
        return ("error", e.errno)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _listdir(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _load_material(source: _Source) -> tuple[tuple[str, ...], list[x509.Certificate], object]:
    """Read a source's files; the key is taken from the cert file or its sibling .key."""
    data = _read(source.cert_path, "certificate")
    blocks = _pem_blocks(data)
    if not blocks:
        raise CertificateError(source.cert_path, "is not a PEM file (no -----BEGIN block)")
    chain = _parse_certs(blocks, source.cert_path)
    if not chain:
        raise CertificateError(source.cert_path, "holds no CERTIFICATE block")
    files = [source.cert_path]
    key_path = source.key_path
    key = None
    if key_path is None:
        key = _parse_key(blocks, source.cert_path)
        if key is None:
            sibling = os.path.splitext(source.cert_path)[0] + ".key"
            if os.path.lexists(sibling):
                key_path = sibling
    if key_path is not None:
        key = _parse_key(_pem_blocks(_read(key_path, "private key")), key_path)
        files.append(key_path)
        if key is None:
            raise CertificateError(key_path, "holds no PRIVATE KEY block")
    if key is None:
        raise CertificateError(
            source.cert_path, "holds no private key (append it to the file or put it "
                              "next to it as <name>.key)")
    return tuple(files), chain, key
