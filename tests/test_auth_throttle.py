"""LoginThrottle: sliding windows per address (IPv6 per /64) and per account."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from tests.backends import captured_log  # noqa: F401 (fixture)
from xmppd.auth.throttle import LoginThrottle, ip_key


def make(ip=3, account=5, window=60.0):
    clock = Clock()
    clock.advance(1000)
    return LoginThrottle(ip, account, window, clock=clock), clock


def test_not_blocked_below_the_limit():
    t, _ = make()
    for _ in range(2):
        t.record_failure("192.0.2.1", "alice@example.org")
    assert t.blocked("192.0.2.1", "alice@example.org") == 0


def test_ip_blocked_at_the_limit_for_the_rest_of_the_window():
    t, clock = make(ip=3, window=60)
    t.record_failure("192.0.2.1", "a@example.org")
    clock.advance(10)
    t.record_failure("192.0.2.1", "b@example.org")
    clock.advance(10)
    t.record_failure("192.0.2.1", "c@example.org")
    # Blocked for any account, until the first failure leaves the window.
    assert t.blocked("192.0.2.1", "d@example.org") == pytest.approx(40)
    assert t.blocked("192.0.2.9", "d@example.org") == 0  # other addresses are fine
    clock.advance(40)
    assert t.blocked("192.0.2.1", "d@example.org") == 0


def test_retrying_while_blocked_does_not_extend_the_block():
    t, clock = make(ip=2, account=0, window=60)
    t.record_failure("192.0.2.1", "")
    t.record_failure("192.0.2.1", "")
    clock.advance(30)
    t.record_failure("192.0.2.1", "")  # the SASL layer may still report one
    assert t.blocked("192.0.2.1", "") == pytest.approx(30)


def test_account_blocked_from_every_address():
    t, _ = make(ip=100, account=3)
    for i in range(3):
        t.record_failure(f"198.51.100.{i}", "alice@example.org")
    assert t.blocked("203.0.113.7", "alice@example.org") > 0
    assert t.blocked("203.0.113.7", "bob@example.org") == 0


def test_success_clears_the_account_but_not_the_address():
    t, _ = make(ip=3, account=3)
    for _ in range(3):
        t.record_failure("192.0.2.1", "alice@example.org")
    t.record_success("192.0.2.1", "alice@example.org")
    assert t.blocked("192.0.2.2", "alice@example.org") == 0
    assert t.blocked("192.0.2.1", "bob@example.org") > 0


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4():
    t, _ = make(ip=2, account=0)
    t.record_failure("2001:db8:1:2::1", "")
    t.record_failure("2001:db8:1:2:ffff::99", "")
    assert t.blocked("2001:db8:1:2::abcd", "") > 0
    assert t.blocked("2001:db8:1:3::1", "") == 0
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_key("[2001:db8::1]") == "2001:db8::/64"


def test_zero_disables_a_dimension_and_empty_keys_are_ignored():
    t, _ = make(ip=0, account=0)
    for _ in range(50):
        t.record_failure("192.0.2.1", "alice@example.org")
    assert t.blocked("192.0.2.1", "alice@example.org") == 0
    t2, _ = make(ip=2, account=2)
    for _ in range(5):
        t2.record_failure("", "")
    assert t2.blocked("", "") == 0


def test_engaging_is_logged_once(captured_log):
    t, _ = make(ip=2, account=0)
    for _ in range(5):
        t.record_failure("192.0.2.1", "")
    engaged = captured_log.with_key("xmppd_throttle", "address")
    assert len(engaged) == 1
    assert "192.0.2.1" in captured_log.text()


def test_memory_is_bounded():
    t, clock = make(ip=3, account=3, window=10)
    for i in range(10000):
        t.record_failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"user{i}@example.org")
    clock.advance(11)
    t.record_failure("192.0.2.1", "x@example.org")
    for i in range(7000):  # a second wave triggers a sweep of the expired first one
        t.record_failure(f"172.16.{i // 256}.{i % 256}", "")
    assert len(t._ips.failures) <= 7001
    assert all(len(v) <= 3 for v in t._ips.failures.values())


def test_bad_arguments():
    with pytest.raises(ValueError):
        LoginThrottle(-1, 1, 10, clock=Clock())
    with pytest.raises(ValueError):
        LoginThrottle(1, 1, 0, clock=Clock())
