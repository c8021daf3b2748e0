"""LoginThrottle: sliding windows per address+account, address (IPv6 per prefix) and account."""
from __future__ import annotations

import time

import pytest
from twisted.internet.task import Clock

from tests.backends import captured_log  # noqa: F401 (fixture)
from xmppd.auth.throttle import LoginThrottle, ip_key

ALICE = "alice@example.org"


def make(pair=0, ip=3, account=5, window=60.0, **kw):
    clock = Clock()
    clock.advance(1000)
    return LoginThrottle(per_ip_account=pair, per_ip=ip, per_account=account, window=window,
                         clock=clock, **kw), clock


def test_not_blocked_below_the_limit():
    t, _ = make(pair=3)
    for _ in range(2):
        t.record_failure("192.0.2.1", ALICE)
    assert t.blocked("192.0.2.1", ALICE) == 0


# -- address+account ------------------------------------------------------------


def test_address_account_blocks_only_that_pair():
    t, _ = make(pair=3, ip=0, account=0)
    for _ in range(3):
        t.record_failure("192.0.2.1", ALICE)
    assert t.blocked("192.0.2.1", ALICE) > 0
    assert t.blocked("192.0.2.2", ALICE) == 0  # the owner elsewhere is not locked out
    assert t.blocked("192.0.2.1", "bob@example.org") == 0
    assert t.blocked("192.0.2.1", "") == 0  # the pre-SASL address check is not affected


def test_failures_spread_over_addresses_do_not_lock_the_account_out():
    """The issue: ten addresses, one wrong password each, must not lock alice out."""
    t, _ = make(pair=10, ip=20, account=100)
    for i in range(10):
        t.record_failure(f"198.51.100.{i}", ALICE)
    assert t.blocked("203.0.113.7", ALICE) == 0
    for i in range(10):
        assert t.blocked(f"198.51.100.{i}", ALICE) == 0


def test_success_clears_the_pair():
    t, _ = make(pair=3, ip=0, account=0)
    for _ in range(3):
        t.record_failure("192.0.2.1", ALICE)
    t.record_success("192.0.2.1", ALICE)
    assert t.blocked("192.0.2.1", ALICE) == 0


# -- address --------------------------------------------------------------------


def test_ip_blocked_at_the_limit_for_the_rest_of_the_window():
    t, clock = make(ip=3, window=60)
    t.record_failure("192.0.2.1", "a@example.org")
    clock.advance(10)
    t.record_failure("192.0.2.1", "b@example.org")
    clock.advance(10)
    t.record_failure("192.0.2.1", "c@example.org")
    # Blocked for any account, until the first failure leaves the window.
    assert t.blocked("192.0.2.1", "d@example.org") == pytest.approx(40)
    assert t.blocked("192.0.2.1", "") == pytest.approx(40)
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


def test_success_does_not_clear_the_address():
    t, _ = make(ip=3, account=3)
    for _ in range(3):
        t.record_failure("192.0.2.1", ALICE)
    t.record_success("192.0.2.1", ALICE)
    assert t.blocked("192.0.2.2", ALICE) == 0
    assert t.blocked("192.0.2.1", "bob@example.org") > 0


# -- account ----------------------------------------------------------------------


def test_account_blocked_from_every_address():
    t, _ = make(ip=100, account=3)
    for i in range(3):
        t.record_failure(f"198.51.100.{i}", ALICE)
    assert t.blocked("203.0.113.7", ALICE) > 0
    assert t.blocked("203.0.113.7", "bob@example.org") == 0
    t.record_success("203.0.113.7", ALICE)  # the owner is back
    assert t.blocked("203.0.113.8", ALICE) == 0


# -- addresses ----------------------------------------------------------------------


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4():
    t, _ = make(ip=2, account=0)
    t.record_failure("2001:db8:1:2::1", "")
    t.record_failure("2001:db8:1:2:ffff::99", "")
    assert t.blocked("2001:db8:1:2::abcd", "") > 0
    assert t.blocked("2001:db8:1:3::1", "") == 0
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_key("[2001:db8::1]") == "2001:db8::/64"


def test_ipv6_prefix_is_configurable():
    t, _ = make(pair=2, ip=2, account=0, ipv6_prefix=48)
    t.record_failure("2001:db8:1:2::1", ALICE)
    t.record_failure("2001:db8:1:ffff::1", ALICE)  # another /64, the same /48
    assert t.blocked("2001:db8:1:9::1", "") > 0
    assert t.blocked("2001:db8:1:9::1", ALICE) > 0  # address+account uses the prefix too
    assert t.blocked("2001:db8:2::1", ALICE) == 0
    assert ip_key("2001:db8:1:2::1", 128) == "2001:db8:1:2::1/128"
    assert ip_key("192.0.2.1", 48) == "192.0.2.1"  # IPv4 is always per address


def test_zero_disables_a_counter_and_empty_keys_are_ignored():
    t, _ = make(pair=0, ip=0, account=0)
    for _ in range(50):
        t.record_failure("192.0.2.1", ALICE)
    assert t.blocked("192.0.2.1", ALICE) == 0
    t2, _ = make(pair=2, ip=2, account=2)
    for _ in range(5):
        t2.record_failure("", "")
    assert t2.blocked("", "") == 0
    assert not any(c.failures for c in t2.counters())


def test_engaging_is_logged_once_per_mode(captured_log):
    t, _ = make(pair=2, ip=3, account=0)
    for _ in range(5):
        t.record_failure("192.0.2.1", ALICE)
    assert len(captured_log.with_key("xmppd_throttle", "address+account")) == 1
    assert len(captured_log.with_key("xmppd_throttle", "address")) == 1
    assert f"{ALICE} from 192.0.2.1" in captured_log.text()


# -- memory ---------------------------------------------------------------------------


def test_timestamps_per_key_are_capped_at_the_limit():
    t, _ = make(pair=3, ip=4, account=5)
    for _ in range(1000):
        t.record_failure("192.0.2.1", ALICE)
    assert [len(v) for c in t.counters() for v in c.failures.values()] == [3, 4, 5]


def test_spraying_keys_cannot_grow_the_tables_past_the_cap(captured_log):
    t, clock = make(pair=10, ip=10, account=10, max_entries=500)
    for i in range(5000):  # one failure each from new addresses for new accounts
        t.record_failure(f"10.0.{i // 256}.{i % 256}", f"user{i}@example.org")
        clock.advance(0.001)
    for c in t.counters():
        assert len(c.failures) == 500
        assert c.evicted == 4500
        # The newest keys survive; the oldest went first.
        times = [v[0] for v in c.failures.values()]
        assert times[0] == pytest.approx(1000 + 4500 * 0.001)
        assert times[-1] == pytest.approx(1000 + 4999 * 0.001)
    # One warning per counter for the whole burst, not one per eviction.
    assert len(captured_log.with_key("xmppd_throttle_full", "account")) == 1


def test_expired_keys_leave_without_a_full_scan():
    t, clock = make(pair=3, ip=3, account=3, window=10, max_entries=100_000)
    for i in range(20000):
        t.record_failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"user{i}@example.org")
    clock.advance(11)
    t.record_failure("192.0.2.1", "x@example.org")  # the first add after the window
    assert [len(c.failures) for c in t.counters()] == [1, 1, 1]
    # Later adds do not touch the table beyond its (empty) expired front: 20k
    # adds in a half-expired table stay linear, not quadratic.
    for i in range(10000):
        t.record_failure(f"172.16.{i // 256}.{i % 256}", "")
    clock.advance(5)
    start = time.process_time()
    for i in range(20000):
        t.record_failure(f"172.17.{i // 256}.{i % 256}", "")
    assert time.process_time() - start < 5  # a full scan per add would take minutes
    assert len(t._ips.failures) == 30001


def test_bad_arguments():
    with pytest.raises(ValueError):
        make(ip=-1)
    with pytest.raises(ValueError):
        make(window=0)
    with pytest.raises(ValueError):
        make(ipv6_prefix=129)
    with pytest.raises(ValueError):
        make(max_entries=0)
