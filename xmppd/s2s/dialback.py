"""Server dialback keys (XEP-0220, generated per XEP-0185).

A dialback key proves to a receiving server that the originating server
really is authoritative for its domain: the receiving server asks the
domain's authoritative server (found through DNS, or ``[s2s.routes]``)
whether the key is right.  Per XEP-0185 the key is::

    HMAC-SHA256(key = hex(SHA256(secret)),
                text = receiving + " " + originating + " " + stream_id)

in lower-case hex, so any process holding the secret can verify a key
without remembering which keys it handed out.  The secret is 32 random
bytes kept in ``s2s-dialback.secret`` in the store's directory (``[storage] dir``,
default ``data_dir``; mode 0600, created at the
first start, never two at once), so keys stay valid across restarts.
Keys are compared with :func:`hmac.compare_digest` (constant time).
"""
from __future__ import annotations

import hashlib
import hmac
import os

SECRET_FILE = "s2s-dialback.secret"
SECRET_BYTES = 32


class DialbackKeys:
    """Generates and checks dialback keys with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("dialback secret too short")
        self._key = hashlib.sha256(secret).hexdigest().encode("ascii")

    def generate(self, receiving: str, originating: str, stream_id: str) -> str:
        text = f"{receiving} {originating} {stream_id}".encode("utf-8")
        return hmac.new(self._key, text, hashlib.sha256).hexdigest()

    def check(self, key: str, receiving: str, originating: str, stream_id: str) -> bool:
        expected = self.generate(receiving, originating, stream_id)
        return hmac.compare_digest(expected.encode("ascii"), key.strip().encode("utf-8", "replace"))


def load_secret(directory: str) -> bytes:
    """The secret from ``directory`` (the store's, :func:`xmppd.storeconfig.store_dir`),
    created (0600) when missing.

    In the store's directory so that the nodes of a cluster that share it
    share the secret: a dialback key made by one node's outbound stream is
    verified by whichever node the remote server's verify connection
    reaches (docs/cluster.rst).  Created with ``link``, not ``replace``:
    nodes starting together must not each install a secret of their own.
    """
    path = os.path.join(directory, SECRET_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) >= 16:
            return data
    except FileNotFoundError:
        pass
    secret = os.urandom(SECRET_BYTES)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        # Another node made it first (or a short one is there): use what is there
        # if it is whole, else replace it.
        with open(path, "rb") as f:
            data = f.read()
        if len(data) >= 16:
            os.unlink(tmp)
            return data
        os.replace(tmp, path)
        return secret
    os.unlink(tmp)
    return secret
