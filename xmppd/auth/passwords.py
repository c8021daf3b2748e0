"""Password storage formats of foreign databases, written from their specs.

Two families:

* the ``password_encoding`` choices of the SQL connector (``plain``,
  ``md5``/``sha256``/``sha512`` hex digests, ``bcrypt``, ``scram``), which we
  both write (``add_user``/``set_password``) and verify;
* the formats a Drupal site stores in ``users.pass``, which we only verify:

  - ``$S$``: Drupal 7+'s "portable" hash: SHA-512, stretched ``2**n`` times
    where ``n`` is the position of the 4th character in Drupal's itoa64
    alphabet, over an 8-character salt, encoded with Drupal's little-endian
    6-bit encoding and cut to 55 characters (``includes/password.inc``);
  - ``$P$`` / ``$H$``: the same construction with MD5 (phpass; phpBB writes
    ``$H$``), full length (34 characters);
  - ``U$...``: Drupal 7's upgrade of Drupal 6 accounts: the stored hash is
    of ``md5(password)`` in lowercase hex, prefixed with ``U``;
  - PHP ``password_hash()`` output that Drupal 10.1+ writes: bcrypt
    (``$2y$``, also ``$2a$``/``$2b$``) and Argon2 (``$argon2id$``,
    ``$argon2i$``).

Every comparison of secrets is constant-time (``hmac.compare_digest``).
Hash verification can be slow on purpose (bcrypt, argon2, 2**16 rounds of
SHA-512): callers run :func:`verify` off the reactor thread.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re

from xmppd.auth.base import ScramCredentials

ENCODINGS = ("plain", "md5", "sha256", "sha512", "bcrypt", "scram")
SCRAM_MECHANISMS = ("SCRAM-SHA-1", "SCRAM-SHA-256")
# Encodings whose verification is expensive enough to leave the reactor.
SLOW_ENCODINGS = frozenset({"bcrypt", "scram"})

_HEX_DIGESTS = {"md5": 32, "sha256": 64, "sha512": 128}


class BadStoredPassword(ValueError):
    """The stored value is not in the configured format (a data problem)."""


# -- new passwords -------------------------------------------------------------

#: Longest new password, in UTF-8 bytes as given and after SASLprep.  Every
#: SCRAM login runs PBKDF2 and SASLprep (pure Python, per character) over it,
#: so a client must not choose stanza-sized input; 1024 bytes is far beyond any
#: passphrase.  docs/auth.rst, "Password length".
MAX_PASSWORD_BYTES = 1024
#: bcrypt hashes only the first 72 bytes.
BCRYPT_MAX_BYTES = 72


class UnacceptablePassword(ValueError):
    """A new password that must not be stored; ``str()`` is one line for the user."""


def check_new_password(password: str, connector: object = None, min_length: int = 1) -> None:
    """Refuse a new or changed password before any hashing cost is paid.

    The one check behind registration, password change, the admin ad-hoc
    commands and ``xmppctl``.  ``connector`` may lower the limit with a
    ``max_password_bytes`` attribute (bcrypt storage: 72).  The size is
    checked before SASLprep (bounding its cost) and after it (NFKC may
    expand a string); a password SASLprep refuses could never be used with
    SCRAM and is refused too.
    """
    from scramp.utils import ScramException, saslprep

    limit = min(MAX_PASSWORD_BYTES, getattr(connector, "max_password_bytes", None) or MAX_PASSWORD_BYTES)
    if len(password) < min_length:
        raise UnacceptablePassword(f"password shorter than {min_length} characters")
    too_long = f"password longer than {limit} bytes"
    if limit == BCRYPT_MAX_BYTES:
        too_long += " (this host stores bcrypt hashes, which use only the first 72 bytes)"
    if len(password.encode("utf-8", "surrogatepass")) > limit:
        raise UnacceptablePassword(too_long)
    try:
        prepared = saslprep(password)
    except ScramException as e:
        raise UnacceptablePassword(f"password not allowed by SASLprep (RFC 4013): {e.args[0]}") from None
    if not prepared:
        raise UnacceptablePassword("password is empty after SASLprep (RFC 4013)")
    if len(prepared.encode("utf-8")) > limit:
        raise UnacceptablePassword(too_long + " after SASLprep (RFC 4013)")


#: Shortest password ``xmppctl adduser/addusers/passwd`` sets (the default
#: of ``[register] min_password_length`` for in-band registration too).
MIN_PASSWORD_LENGTH = 8


def check_password_length(password: str) -> str | None:
    """Why an operator-set password is refused before any store is opened, or None.

    The connector-independent part of :func:`check_new_password` (a
    connector may lower the maximum further).
    """
    try:
        check_new_password(password, min_length=MIN_PASSWORD_LENGTH)
    except UnacceptablePassword as e:
        return f"password refused: {e}"
    return None


# -- the SQL connector's encodings -----------------------------------------


def make_scram(password: str, iterations: int) -> dict:
    """SCRAM-SHA-1 and -256 credentials, as the JSON the ``scram`` encoding stores."""
    from scramp import ScramMechanism  # only where credentials are made (not at login)

    out = {}
    for mech in SCRAM_MECHANISMS:
        salt, stored_key, server_key, i = ScramMechanism(mech).make_auth_info(
            password, iteration_count=iterations
        )
        out[mech] = ScramCredentials(salt, stored_key, server_key, i).to_json()
    return out


def parse_scram(stored: str) -> dict[str, ScramCredentials]:
    """The ``scram`` encoding's stored text -> credentials per mechanism."""
    try:
        data = json.loads(stored)
        creds = {m: ScramCredentials.from_json(data[m]) for m in SCRAM_MECHANISMS if m in data}
    except (ValueError, TypeError, KeyError) as e:
        raise BadStoredPassword(f"not SCRAM credentials JSON ({e.__class__.__name__})") from None
    if not creds:
        raise BadStoredPassword("no SCRAM-SHA-1/256 credentials in the stored value")
    return creds


def derive_scram(password: str, mechanism: str, salt: bytes, iterations: int) -> ScramCredentials:
    from scramp import ScramMechanism

    salt, stored_key, server_key, i = ScramMechanism(mechanism).make_auth_info(
        password, iteration_count=iterations, salt=salt
    )
    return ScramCredentials(salt, stored_key, server_key, i)


def derived_salt(mechanism: str, jid: str) -> bytes:
    """A stable per-account salt for SCRAM derived from a clear-text password.

    Stable so that clients which cache SaltedPassword keep working; it guards
    nothing the clear-text column does not already give away.
    """
    return hashlib.sha256(f"xmppd-scram-salt\0{mechanism}\0{jid}".encode()).digest()[:16]


def encode(encoding: str, password: str, *, scram_iterations: int = 4096,
           bcrypt_rounds: int = 12) -> str:
    """The value to store for ``password`` in the given encoding."""
    if encoding == "plain":
        return password
    if encoding in _HEX_DIGESTS:
        return hashlib.new(encoding, password.encode()).hexdigest()
    if encoding == "bcrypt":
        import bcrypt

        raw = password.encode()
        if len(raw) > 72:
            # bcrypt ignores everything after 72 bytes; refuse rather than
            # store a hash that silently accepts a shorter password.
            raise ValueError("bcrypt cannot hash passwords longer than 72 bytes")
        return bcrypt.hashpw(raw, bcrypt.gensalt(rounds=bcrypt_rounds)).decode()
    if encoding == "scram":
        return json.dumps(make_scram(password, scram_iterations), separators=(",", ":"))
    raise ValueError(f"unknown password encoding {encoding!r}")


def scram_matches(creds: ScramCredentials, mechanism: str, password: str) -> bool:
    """Constant-time check of a clear password against stored SCRAM keys."""
    d = derive_scram(password, mechanism, creds.salt, creds.iterations)
    return hmac.compare_digest(d.stored_key, creds.stored_key) and hmac.compare_digest(
        d.server_key, creds.server_key
    )


def verify(encoding: str, stored: str, password: str) -> bool:
    """Does ``password`` match ``stored``?  Raises BadStoredPassword on junk."""
    if encoding == "plain":
        return hmac.compare_digest(stored.encode(), password.encode())
    if encoding in _HEX_DIGESTS:
        want = stored.strip().lower()
        if len(want) != _HEX_DIGESTS[encoding] or not re.fullmatch(r"[0-9a-f]+", want):
            raise BadStoredPassword(f"not a {encoding} hex digest")
        got = hashlib.new(encoding, password.encode()).hexdigest()
        return hmac.compare_digest(got, want)
    if encoding == "bcrypt":
        return verify_bcrypt(stored, password)
    if encoding == "scram":
        creds = parse_scram(stored)
        mech = "SCRAM-SHA-256" if "SCRAM-SHA-256" in creds else "SCRAM-SHA-1"
        return scram_matches(creds[mech], mech, password)
    raise ValueError(f"unknown password encoding {encoding!r}")


# -- PHP password_hash() formats ---------------------------------------------


def verify_bcrypt(stored: str, password: str) -> bool:
    """PHP ``password_verify`` for ``$2y$``/``$2a$``/``$2b$`` hashes."""
    import bcrypt

    if not re.fullmatch(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", stored):
        raise BadStoredPassword("not a bcrypt hash")
    raw = password.encode()
    if b"\0" in raw:
        return False  # C-string semantics would truncate there: never a match
    # PHP (and every bcrypt) uses only the first 72 bytes; the Python binding
    # refuses longer input instead of truncating, so truncate as PHP does.
    return bcrypt.checkpw(raw[:72], stored.encode())


# Refuse hashes whose parameters would cost more than this to check (a
# row written by an attacker with database access must not take the
# server's memory): 1 GiB, 64 passes, 64 lanes.
_ARGON2_MAX = {"m": 1 << 20, "t": 64, "p": 64}


def verify_argon2(stored: str, password: str) -> bool:
    """PHP ``password_verify`` for ``$argon2id$`` / ``$argon2i$`` (PHC strings)."""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    m = re.fullmatch(r"\$argon2(?:id|i)\$v=(\d+)\$m=(\d+),t=(\d+),p=(\d+)\$[^$]+\$[^$]+", stored)
    if not m:
        raise BadStoredPassword("not an argon2i/argon2id hash")
    params = {"m": int(m.group(2)), "t": int(m.group(3)), "p": int(m.group(4))}
    for name, limit in _ARGON2_MAX.items():
        if params[name] > limit:
            raise BadStoredPassword(f"argon2 parameter {name}={params[name]} above {limit}")
    try:
        return PasswordHasher().verify(stored, password)
    except VerifyMismatchError:
        return False
    except (InvalidHashError, VerificationError) as e:
        raise BadStoredPassword(f"argon2: {e}") from None


# -- Drupal / phpass portable hashes -----------------------------------------

ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DRUPAL_MIN_HASH_COUNT = 7
DRUPAL_MAX_HASH_COUNT = 30
DRUPAL_HASH_LENGTH = 55
DRUPAL_MAX_PASSWORD_LENGTH = 512  # bytes; Drupal refuses longer passwords


def itoa64_encode(data: bytes) -> str:
    """Drupal's/phpass's base64: 6 bits at a time, least significant first."""
    out = []
    i, n = 0, len(data)
    while i < n:
        value = data[i]
        i += 1
        out.append(ITOA64[value & 0x3F])
        if i < n:
            value |= data[i] << 8
        out.append(ITOA64[(value >> 6) & 0x3F])
        if i >= n:
            break
        i += 1
        if i < n:
            value |= data[i] << 16
        out.append(ITOA64[(value >> 12) & 0x3F])
        if i >= n:
            break
        i += 1
        out.append(ITOA64[(value >> 18) & 0x3F])
    return "".join(out)


def portable_crypt(algo: str, password: bytes, setting: str) -> str | None:
    """The stretched hash for ``setting`` (``$S$``/``$P$``/``$H$`` + count + salt)."""
    if len(password) > DRUPAL_MAX_PASSWORD_LENGTH:
        return None
    setting = setting[:12]
    if len(setting) < 12 or setting[0] != "$" or setting[2] != "$":
        return None
    count_log2 = ITOA64.find(setting[3])
    if count_log2 < DRUPAL_MIN_HASH_COUNT or count_log2 > DRUPAL_MAX_HASH_COUNT:
        return None
    salt = setting[4:12].encode()
    if len(salt) != 8:
        return None
    digest = hashlib.new(algo, salt + password).digest()
    for _ in range(1 << count_log2):
        digest = hashlib.new(algo, digest + password).digest()
    encoded = itoa64_encode(digest)
    # -(-a // b) is ceil(a / b): the expected length of the encoded digest.
    if len(encoded) != -(-8 * len(digest) // 6):
        return None
    return (setting + encoded)[:DRUPAL_HASH_LENGTH]


def drupal_hash(password: str, count_log2: int = 15, salt: str | None = None,
                prefix: str = "$S$") -> str:
    """A Drupal 7-style hash (``$S$``; ``$P$``/``$H$`` for MD5), for tests and tools."""
    if salt is None:
        salt = itoa64_encode(os.urandom(6))
    if len(salt) != 8 or any(c not in ITOA64 for c in salt):
        raise ValueError("salt must be 8 itoa64 characters")
    algo = "sha512" if prefix == "$S$" else "md5"
    out = portable_crypt(algo, password.encode(), prefix + ITOA64[count_log2] + salt)
    if out is None:
        raise ValueError("bad count or password too long")
    return out


def drupal_check_password(password: str, stored: str) -> bool:
    """Drupal's ``user_check_password`` plus the ``password_hash`` formats of 10.1+.

    Raises BadStoredPassword for a value in none of the known formats.
    """
    raw = password.encode()
    if not raw or len(raw) > DRUPAL_MAX_PASSWORD_LENGTH:
        return False
    if stored.startswith("$2"):
        return verify_bcrypt(stored, password)
    if stored.startswith("$argon2"):
        return verify_argon2(stored, password)
    if stored.startswith("U$"):
        # Drupal 7's user_update_7000(): a Drupal 6 md5 re-hashed.
        stored = stored[1:]
        raw = hashlib.md5(raw).hexdigest().encode()
    kind = stored[:3]
    if kind == "$S$":
        computed = portable_crypt("sha512", raw, stored)
    elif kind in ("$P$", "$H$"):
        computed = portable_crypt("md5", raw, stored)
    else:
        raise BadStoredPassword("unknown Drupal hash format")
    if computed is None:
        raise BadStoredPassword("malformed Drupal hash setting")
    return hmac.compare_digest(computed.encode(), stored.encode())
