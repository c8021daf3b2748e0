#!/bin/sh
# Install the system packages the authentication-connector tests need:
# a PostgreSQL server (initdb/pg_ctl), OpenLDAP's slapd and the ldap-utils
# (ldapadd/slapadd).  The test fixtures start private instances of these in
# temporary directories on free ports; the system services are never used.
#
# Idempotent: packages already installed are not touched, and apt is not even
# called when nothing is missing.  Run as root on Debian 12 (make test does).
set -eu

PACKAGES="postgresql slapd ldap-utils"

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

echo "install-test-deps: installing$missing"
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
echo "install-test-deps: done"
