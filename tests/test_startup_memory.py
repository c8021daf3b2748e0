"""Base memory (issue 20): the daemon imports only what its configuration uses.

The shipped configuration (etc/xmppd.toml, paths and ports pointed into a
temp dir) is started through twistd's own entry point in a child process,
exactly as ``twistd -n xmppd --config ...`` does; once it serves, the child
reports which modules are loaded and its VmRSS, and stops.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

from tests.daemon import REPO, free_port

#: Stacks that the default configuration does not use.
HEAVY = (
    "scramp", "asn1crypto", "importlib.metadata",            # SCRAM runs on xmppd.scram
    "wokkel.pubsub", "wokkel.component", "wokkel.delay", "dateutil",
    "ldaptor", "psycopg", "psycopg2", "twisted.enterprise.adbapi",
    "xmppd.auth.ldap", "xmppd.auth.sql", "xmppd.auth.drupal",
    "prometheus_client", "twisted.web.server", "xmppd.metricspage",
    "xmppd.handlers.adhoc", "xmppd.pie", "xmppd.pieconvert", "xmppd.migrate",
)

RUN_DAEMON = textwrap.dedent("""\
    import json, re, sys
    out, cfg = sys.argv[1], sys.argv[2]
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "xmppd", "--config", cfg]
    from twisted.internet import reactor

    def report():
        status = open("/proc/self/status").read()
        rss = int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1))
        with open(out, "w") as f:
            json.dump({"modules": sorted(sys.modules), "rss_kib": rss}, f)
        reactor.stop()

    reactor.callLater(1.0, report)
    from twisted.scripts.twistd import run
    run()
""")

# What any TLS server under twistd carries before it does anything: the
# interpreter, twistd (and its plugin discovery), the reactor, Twisted's TLS
# and pyOpenSSL.
FLOOR = textwrap.dedent("""\
    import re
    import twisted.scripts.twistd, twisted.internet.reactor, twisted.internet.endpoints
    import twisted.internet.ssl, twisted.words.protocols.jabber.xmlstream
    from twisted.plugin import getPlugins
    from twisted.application.service import IServiceMaker
    list(getPlugins(IServiceMaker))
    print(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
""")


def default_config(tmp_path) -> str:
    text = (REPO / "etc" / "xmppd.toml").read_text()
    for path in ("/var/lib/xmppd", "/etc/xmppd/certs", "/etc/letsencrypt/live"):
        (tmp_path / path.strip("/")).mkdir(parents=True, exist_ok=True)
        text = text.replace(f'"{path}"', f'"{tmp_path / path.strip("/")}"')
    text = re.sub(r"tcp:\d+:interface=[0-9.]+", lambda _m: f"tcp:{free_port()}:interface=127.0.0.1",
                  text)
    cfg = tmp_path / "xmppd.toml"
    cfg.write_text(text)
    return str(cfg)


def test_default_config_loads_no_unused_stack_and_little_memory(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", RUN_DAEMON, str(out), default_config(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    modules = set(report["modules"])
    assert "xmppd.c2s" in modules and "xmppd.handlers.roster" in modules  # it did start
    assert sorted(m for m in HEAVY if m in modules) == []
    floor = int(subprocess.run([sys.executable, "-c", FLOOR], env=env, capture_output=True,
                               text=True, timeout=60, check=True).stdout)
    # Everything xmppd adds to that floor, with every default listener and
    # plugin: ~10 MiB (it was ~14 MiB when every stack was imported).
    assert report["rss_kib"] - floor < 12 * 1024, (report["rss_kib"], floor)
