"""RFC 7622 address preparation."""
import pytest

from xmppd import jid


@pytest.mark.parametrize("text,full", [
    ("Alice@Example.COM/Res", "alice@example.com/Res"),
    ("example.com", "example.com"),
    ("a@b/c/d", "a@b/c/d"),
    ("ÖSTERREICH@bücher.example", "österreich@bücher.example"),
    ("a@[::1]", "a@[::1]"),
])
def test_valid(text, full):
    assert jid.parse(text).full == full


@pytest.mark.parametrize("text", [
    "@example.com", "a b@example.com", "a@", "a@exa mple.com", "a@b/", "",
    "x" * 1024 + "@example.com", "a@example.com/" + "r" * 1024, "a\"b@example.com",
])
def test_invalid(text):
    with pytest.raises(jid.InvalidJID):
        jid.parse(text)


def test_parts():
    j = jid.parse("u@h/r")
    assert (j.user, j.host, j.resource, j.bare) == ("u", "h", "r", "u@h")
    assert j.bare_jid().full == "u@h"


def test_cache_is_bounded():
    assert jid.parse.cache_info().maxsize == 16384
