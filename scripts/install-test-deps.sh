#!/bin/sh
# Install the system packages the tests need: for the authentication
# connectors a PostgreSQL server (initdb/pg_ctl), OpenLDAP's slapd and the
# ldap-utils (ldapadd/slapadd); for the migration tests (XEP-0227 exports of
# real peers) Prosody 0.12 and ejabberd 23.01; for the cluster tests redis-server.  The test fixtures start
# private instances of these in temporary directories on free loopback ports;
# the system services are never used, never started and left disabled.
# strace counts the daemon's system calls per message (test_c2s_light_load.py).
#
# Idempotent: packages already installed are not touched, and apt is not even
# called when nothing is missing.  Run as root on Debian 12 (make test does).
set -eu

PACKAGES="postgresql slapd ldap-utils prosody ejabberd openssl util-linux systemd redis-server strace"
# Daemons whose packaged services must not run (tests start their own).
SERVICES="prosody ejabberd redis-server"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        "install ok installed") ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "install-test-deps: all present ($PACKAGES)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: missing Debian packages:$missing" >&2
    echo "install-test-deps: run as root, or: sudo apt-get install$missing" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# slapd: do not build a default directory for the system service; the tests
# bring their own configuration.
echo "slapd slapd/no_configuration boolean true" | debconf-set-selections

# No service may start while installing: a policy-rc.d that exits 101 makes
# invoke-rc.d / deb-systemd-invoke skip every start.  One already there (a
# container's) is left alone; ours is removed however the script ends.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# install-test-deps.sh: no service starts while installing\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT INT TERM
fi

echo "install-test-deps: installing$missing"
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing

# Left disabled: the packages enable their units for the next boot.
for svc in $SERVICES; do
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || systemctl disable "$svc" >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1 && [ -e "/etc/init.d/$svc" ]; then
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
done
echo "install-test-deps: done"
