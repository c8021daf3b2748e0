"""DNS for s2s (RFC 6120 §3.2, XEP-0368, RFC 2782), with a fake twisted.names resolver.

No packet leaves the process: the fake answers ``lookupService``,
``lookupAddress`` and ``lookupIPV6Address`` from a table, as
``twisted.names.client.Resolver`` would (``(answers, authority,
additional)`` of ``RRHeader``), or fails the way it fails.
"""
from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.names import dns, error

from xmppd.s2s.resolve import DEFAULT_PORT, Resolver, SRVRecord, Target, order_records


class FakeResolver:
    def __init__(self, records: dict, fail: dict | None = None) -> None:
        self.records = records  # (name, type) -> [payload]
        self.fail = fail or {}  # name -> exception
        self.asked: list[tuple[str, int, tuple]] = []

    def _answer(self, name: str, rtype: int, timeout) -> defer.Deferred:
        self.asked.append((name, rtype, timeout))
        if name in self.fail:
            return defer.fail(self.fail[name])
        payloads = self.records.get((name, rtype))
        if payloads is None:
            return defer.fail(error.DNSNameError(name))
        answers = [dns.RRHeader(name=name, type=rtype, payload=p) for p in payloads]
        return defer.succeed((answers, [], []))

    def lookupService(self, name, timeout=None):
        return self._answer(name, dns.SRV, timeout)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, dns.A, timeout)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, dns.AAAA, timeout)


def srv(priority: int, weight: int, port: int, target: str) -> dns.Record_SRV:
    return dns.Record_SRV(priority, weight, port, target)


def resolved(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the fake answers synchronously"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_srv_records_of_both_services_by_priority_direct_tls_first():
    fake = FakeResolver({
        ("_xmpp-server._tcp.example.org", dns.SRV): [srv(10, 0, 5269, "xmpp1.example.org"),
                                                     srv(20, 0, 5270, "backup.example.org")],
        ("_xmpps-server._tcp.example.org", dns.SRV): [srv(10, 0, 443, "xmpp1.example.org")],
    })
    targets = resolved(Resolver(3.0, resolver=fake).targets("example.org"))
    assert targets == [Target("xmpp1.example.org", 443, True), Target("xmpp1.example.org", 5269, False),
                       Target("backup.example.org", 5270, False)]
    # Every query carries the configured timeout, one try.
    assert {t for _n, _t, t in fake.asked} == {(3.0,)}


def test_no_srv_falls_back_to_the_domain_on_5269():
    fake = FakeResolver({})
    assert resolved(Resolver(1.0, resolver=fake).targets("plain.example")) == [
        Target("plain.example", DEFAULT_PORT, False)]


def test_srv_timeout_falls_back_too():
    timeout = error.DNSQueryTimeoutError("x")
    fake = FakeResolver({}, fail={"_xmpp-server._tcp.slow.example": timeout,
                                  "_xmpps-server._tcp.slow.example": timeout})
    assert resolved(Resolver(1.0, resolver=fake).targets("slow.example")) == [
        Target("slow.example", DEFAULT_PORT, False)]


def test_srv_dot_means_no_service():
    # RFC 2782 target "." (the root name, empty on the wire)
    fake = FakeResolver({("_xmpp-server._tcp.nofed.example", dns.SRV): [srv(0, 0, 0, "")]})
    assert resolved(Resolver(1.0, resolver=fake).targets("nofed.example")) == []


def test_weights_order_within_a_priority():
    records = [SRVRecord(10, 10, 1, "light", False), SRVRecord(10, 90, 2, "heavy", False),
               SRVRecord(10, 0, 3, "zero", False), SRVRecord(5, 0, 4, "first", False)]
    # RFC 2782: a draw in [0, total] picks the first record whose running sum reaches it.
    draws = iter([50, 0, 0])  # priority 10 group ordered zero(0), light(10), heavy(90)
    order = order_records(records, choice=lambda total: next(draws) if total else 0)
    assert [r.target for r in order] == ["first", "heavy", "zero", "light"]
    # Over many random draws the heavy record leads far more often.
    leads = sum(order_records(records)[1].target == "heavy" for _ in range(400))
    assert leads > 250


def test_addresses_ipv6_first_and_literals_untouched():
    fake = FakeResolver({
        ("xmpp1.example.org", dns.A): [dns.Record_A("192.0.2.7")],
        ("xmpp1.example.org", dns.AAAA): [dns.Record_AAAA("2001:db8::7")],
    })
    r = Resolver(1.0, resolver=fake)
    assert resolved(r.addresses("xmpp1.example.org")) == ["2001:db8::7", "192.0.2.7"]
    assert resolved(r.addresses("127.0.0.1")) == ["127.0.0.1"]
    with pytest.raises(error.DNSNameError):
        resolved(r.addresses("missing.example.org"))
