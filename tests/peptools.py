"""Raw-XML helpers for the PEP tests: caps-announcing clients and subscriptions."""
from __future__ import annotations

import base64
import hashlib
import itertools
import re
import time

from tests.rawclient import RawClient

PW = "pw-secret"
CAPS_NODE = "https://xmppd.test/raw"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
PUBSUB = "http://jabber.org/protocol/pubsub"
_names = itertools.count(1)


def caps_ver(name: str, features) -> str:
    """XEP-0115 §5.1 for one identity client/pc and ``features`` (no forms)."""
    s = f"client/pc//{name}<" + "".join(f + "<" for f in sorted(features))
    return base64.b64encode(hashlib.sha1(s.encode()).digest()).decode()


def online(d, user: str, resource: str = "r", notify=(), caps: bool = True,
           lie: bool = False, host: str = "localhost", password: str = PW) -> RawClient:
    """A logged-in raw client that sent initial presence (with caps announcing
    ``NODE+notify`` for each of ``notify`` and answering the server's disco#info;
    ``lie``: the answer does not match the announced hash)."""
    c = RawClient(d.port, host=host)
    c.jid = c.login(user, password, resource)
    if not caps:
        c.send("<presence/>")
        c.read_until("<presence[^>]*(/>|>.*?</presence>)")
        return c
    name = f"raw {user} {next(_names)}"
    features = [DISCO_INFO] + [n + "+notify" for n in notify]
    ver = caps_ver(name, features)
    c.send(f"<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
           f"node='{CAPS_NODE}' ver='{ver}'/></presence>")
    c.caps_info = (name, features + (["urn:xmpp:lie"] if lie else []), ver)
    answer_caps(c, c.read_until(r"<iq [^>]*type='get'[^>]*>.*?</iq>").decode())
    return c


def answer_caps(c: RawClient, text: str) -> None:
    """Answer the server's disco#info query for the client's caps (the last IQ in ``text``)."""
    name, features, ver = c.caps_info
    query = text[text.rindex("<iq "):]
    assert DISCO_INFO in query and f"node='{CAPS_NODE}#{ver}'" in query, query
    ident = re.search(r"<iq [^>]*id='([^']+)'", query).group(1)
    asker = re.search(r"<iq [^>]*from='([^']+)'", query).group(1)
    feats = "".join(f"<feature var='{f}'/>" for f in features)
    c.send(f"<iq type='result' to='{asker}' id='{ident}'><query xmlns='{DISCO_INFO}' "
           f"node='{CAPS_NODE}#{ver}'><identity category='client' type='pc' name='{name}'/>"
           f"{feats}</query></iq>")


def sync(c: RawClient) -> str:
    """Everything sent before has been processed by the server (one ping round trip);
    returns what arrived meanwhile."""
    ident = f"sync{next(_names)}"
    return c.iq(f"<iq type='get' id='{ident}'><ping xmlns='urn:xmpp:ping'/></iq>", ident)


def subscribe_both(d, a: str, b: str, groups=(), db=None, hosts=("localhost", "localhost"),
                   password: str = PW) -> None:
    """Mutual presence subscription between users ``a`` (on ``d``) and ``b`` (on ``db``,
    default ``d``), local parts; ``groups``: roster groups ``a`` puts ``b`` in."""
    ca = online(d, a, "sub", caps=False, host=hosts[0], password=password)
    cb = online(db or d, b, "sub", caps=False, host=hosts[1], password=password)
    ja, jb = f"{a}@{hosts[0]}", f"{b}@{hosts[1]}"
    if groups:
        g = "".join(f"<group>{x}</group>" for x in groups)
        ca.iq(f"<iq type='set' id='rs'><query xmlns='jabber:iq:roster'><item jid='{jb}'>{g}"
              f"</item></query></iq>", "rs")
    ca.send(f"<presence to='{jb}' type='subscribe'/>")
    cb.read_until(f"<presence(?=[^>]*from='{ja}')(?=[^>]*type='subscribe')")
    cb.send(f"<presence to='{ja}' type='subscribed'/><presence to='{ja}' type='subscribe'/>")
    ca.read_until(f"<presence(?=[^>]*from='{jb}')(?=[^>]*type='subscribe')")
    ca.send(f"<presence to='{jb}' type='subscribed'/>")
    sync(ca)
    sync(cb)
    ca.close()
    cb.close()


def publish(c: RawClient, node: str, item_id: str, payload: str, options: dict | None = None,
            ident: str = "pub") -> str:
    opts = ""
    if options:
        fields = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in options.items())
        opts = (f"<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' "
                f"type='hidden'><value>{PUBSUB}#publish-options</value></field>{fields}</x>"
                f"</publish-options>")
    return c.iq(f"<iq type='set' id='{ident}'><pubsub xmlns='{PUBSUB}'><publish node='{node}'>"
                f"<item id='{item_id}'>{payload}</item></publish>{opts}</pubsub></iq>", ident)


def get_items(c: RawClient, owner: str, node: str, ident: str = "items", extra: str = "",
              inner: str = "") -> str:
    return c.iq(f"<iq type='get' id='{ident}' to='{owner}'><pubsub xmlns='{PUBSUB}'>"
                f"<items node='{node}'{extra}>{inner}</items></pubsub></iq>", ident)


def expect_event(c: RawClient, node: str, timeout: float = 3) -> str:
    return c.read_until(rf"<message[^>]*>(?:(?!</message>).)*<items node='{re.escape(node)}'.*?</message>",
                        timeout=timeout).decode()


def expect_no_event(c: RawClient, node: str, wait: float = 0.5) -> None:
    """Nothing about ``node`` arrives (after a server round trip plus ``wait``)."""
    seen = sync(c)
    time.sleep(wait)
    seen += sync(c) + c.buffer.decode(errors="replace")
    assert f"node='{node}'" not in seen, seen[-800:]


def own_event(c: RawClient, reply: str, node: str) -> str:
    """The owner's own notification: it may have come before the IQ result (in ``reply``)."""
    m = re.search(rf"<message[^>]*>(?:(?!</message>).)*<items node='{re.escape(node)}'.*?</message>",
                  reply, re.S)
    return m.group(0) if m else expect_event(c, node)
