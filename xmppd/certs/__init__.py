"""
The server certificate store: which certificate each virtual host presents.

One store serves every TLS listener.  It finds a certificate (chain + key) for
each configured host, checks it, builds one ``OpenSSL.SSL.Context`` per
certificate and hands those contexts out for STARTTLS (by stream-header host)
and direct TLS (by SNI).  Reloading re-reads the files and swaps the whole
host -> context table in one assignment, so connections that are already
established keep their context while new ones get the new certificate.

Sources for a host, highest priority first (see docs/certificates.rst):

1. ``explicit`` -- paths configured for that host (``[hosts."h".tls]``);
2. ``certs_dir`` -- ``<host>.pem`` (chain + key) or ``<host>.crt`` + ``<host>.key``;
3. ``wildcard`` -- ``*.<parent>.pem`` / ``.crt`` in certs_dir, then any
   certificate in certs_dir whose subjectAltNames cover the host;
4. ``letsencrypt`` -- ``<letsencrypt_dir>/<host>/fullchain.pem`` + ``privkey.pem``,
   then any certbot lineage whose names cover the host;
5. ``default`` -- the configured default certificate;
6. ``generated`` -- a self-signed certificate in ``<data_dir>/certs/<host>.pem``.

Other *names* (public component domains, for their server-to-server streams)
are looked up in sources 2 to 4 only: a certificate found for one is served
for it; otherwise the name gets what any other name gets (a served
certificate naming it, else the default host's), never a generated one.

Everything here runs in the reactor thread and only touches small local files;
nothing touches the network.

The package, lower modules first (none imports the store at run time):

``model``        value types of the store's state, and the clock
``pem``          reading files; PEM, certificate and key parsing; access problems
``identity``     RFC 6125 / XmppAddr identities, coverage, display names
``contexts``     TLS policy and the pyOpenSSL contexts built with it, ALPN
``selfsigned``   generating self-signed certificates
``clientcerts``  client certificates: trust, CRLs, verification (SASL EXTERNAL)
``table``        CertInfo and the ``xmppctl certs`` table
``checks``       key/chain/date checks, one pass over the disk, ``xmppctl check``
``watch``        polling the files: reload on change, expiry warnings
``store``        CertificateStore: resolution, reload, SNI, connection creators

Import from ``xmppd.certs``: the names below are the package's interface.
"""

from __future__ import annotations

# Names outside __all__ stay importable from here too, as before the split:
# the constants, the s2s helpers (identity_for, policy_context) and the
# generator the tests use (noqa F401: re-exports).
from xmppd.certs.checks import EXPIRY_WARNING, check_certificates, has_errors  # noqa: F401
from xmppd.certs.clientcerts import (
    CLIENT_CERT_MODES,
    ClientCertificate,
    ClientCertPolicy,
    client_certificate,
)
from xmppd.certs.contexts import (  # noqa: F401
    ALPN_PROTOCOLS,
    DEFAULT_CIPHERS,
    TLSPolicy,
    policy_context,
)
from xmppd.certs.identity import identity_for  # noqa: F401
from xmppd.certs.pem import CertificateError
from xmppd.certs.selfsigned import (  # noqa: F401
    SELF_SIGNED_LIFETIME,
    SELF_SIGNED_RENEW,
    _generate_self_signed,
)
from xmppd.certs.store import CertificateStore
from xmppd.certs.table import CertInfo, format_cert_table

__all__ = [
    "ALPN_PROTOCOLS",
    "CLIENT_CERT_MODES",
    "CertInfo",
    "CertificateError",
    "CertificateStore",
    "ClientCertPolicy",
    "ClientCertificate",
    "TLSPolicy",
    "check_certificates",
    "client_certificate",
    "format_cert_table",
    "has_errors",
]
