"""Federation with ejabberd 23.01 (Debian package): see tests/s2s_interop.py."""
from tests.peers import FederatingEjabberd
from tests.s2s_interop import InteropTests


class TestEjabberd(InteropTests):
    peer_cls = FederatingEjabberd
    peer_domain = "ejabberd.test"
