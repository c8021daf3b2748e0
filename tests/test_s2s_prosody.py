"""Federation with Prosody 0.12 (Debian package): see tests/s2s_interop.py."""
from tests.peers import FederatingProsody
from tests.s2s_interop import InteropTests


class TestProsody(InteropTests):
    peer_cls = FederatingProsody
    peer_domain = "prosody.test"
