"""RFC 6121 §3.1.3: a subscription request keeps its extended content, also
when it waits in the store for an offline contact (and across a restart)."""
from __future__ import annotations

from tests.daemon import Daemon
from tests.rawclient import RawClient

PREAUTH = "<preauth xmlns='urn:xmpp:pars:0' token='tok-123'/>"
NICK = "<nick xmlns='http://jabber.org/protocol/nick'>Sue</nick>"


def _online(d, user):
    c = RawClient(d.port)
    c.login(user, f"{user}-secret", "r")
    c.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>")
    c.read_until(b"id='r'.*?</iq>")
    return c


def test_offline_subscription_request_keeps_extended_content(tmp_path):
    d = Daemon(tmp_path, plugins=["roster", "presence"])
    for user in ("sue", "tom", "uma"):
        d.adduser(f"{user}@localhost", f"{user}-secret")
    d.start()
    try:
        sue = _online(d, "sue")
        sue.send(f"<presence to='tom@localhost' type='subscribe'>{PREAUTH}{NICK}</presence>")
        sue.read_until(b"ask='subscribe'")  # processed: tom's request is stored
        sue.close()
        d.stop()
        d.start()
        tom = _online(d, "tom")
        got = tom.read_until(b"<presence[^>]*type='subscribe'.*?</presence>").decode()
        assert "from='sue@localhost'" in got
        assert "<preauth xmlns='urn:xmpp:pars:0' token='tok-123'/>" in got
        assert "<nick xmlns='http://jabber.org/protocol/nick'>Sue</nick>" in got
        # to an online contact, the content is delivered as well
        uma = _online(d, "uma")
        uma.send(f"<presence to='tom@localhost' type='subscribe'>{NICK}</presence>")
        got = tom.read_until(b"<presence[^>]*from='uma@localhost'.*?</presence>").decode()
        assert "type='subscribe'" in got and "<nick xmlns='http://jabber.org/protocol/nick'>Sue</nick>" in got
        tom.close()
        uma.close()
    finally:
        d.stop()
