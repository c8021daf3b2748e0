"""XEP-0016 §2.1 matching of blocklist items (unit level)."""
import pytest

from xmppd import jid
from xmppd.handlers.blocking import EMPTY, Blocklist, matches


@pytest.mark.parametrize("item,other,expected", [
    ("a@x/r", "a@x/r", True), ("a@x/r", "a@x/s", False), ("a@x/r", "a@x", False),
    ("a@x", "a@x/r", True), ("a@x", "a@x", True), ("a@x", "b@x/r", False),
    ("x/r", "a@x/r", True), ("x/r", "b@x/r", True), ("x/r", "a@x/s", False), ("x/r", "a@x", False),
    ("x", "a@x/r", True), ("x", "x", True), ("x", "x/r", True), ("x", "a@y", False),
    ("x", "a@sub.x", False),
])
def test_match_order_forms(item, other, expected):
    assert matches(Blocklist([item]), jid.parse(other)) is expected


def test_domain_resource_flag_and_empty():
    assert Blocklist(["x/r"]).has_domain_resource
    assert not Blocklist(["a@x/r", "a@x", "x"]).has_domain_resource
    assert not EMPTY and not matches(EMPTY, jid.parse("a@x/r"))
