"""The echo bot (and ping, disco, version) as an external component (XEP-0114).

wokkel's ``Component`` connects to ``[components] listen`` with the
component's secret; the handlers are the same objects xmppd runs in process::

    [components."echo.example.org"]
    secret_file = "echo.secret"

    python -m examples.external --domain echo.example.org --port 5347 \\
        --secret-file /etc/xmppd/echo.secret

Prints ``connected`` once the handshake succeeded, and exits 1 with the
reason if the server refuses it.
"""
from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.words.protocols.jabber import xmlstream

from examples.echo import EchoBot
from xmppd.wokkel_compat import component, disco, generic, ping


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5347)
    secret = parser.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret")
    secret.add_argument("--secret-file")
    args = parser.parse_args(argv)
    password = args.secret
    if password is None:
        with open(args.secret_file, encoding="utf-8") as f:
            password = f.readline().strip()

    service = component.Component(args.host, args.port, args.domain, password)
    for handler in (EchoBot(), ping.PingHandler(), disco.DiscoHandler(),
                    generic.VersionHandler("Echo bot", "1.0"), generic.FallbackHandler()):
        handler.setHandlerParent(service)
    outcome = {"code": 0}

    def connected(_xs) -> None:
        print("connected", flush=True)

    def failed(reason) -> None:
        print(f"refused: {reason.getErrorMessage()}", flush=True)
        outcome["code"] = 1
        service.factory.stopTrying()
        reactor.stop()

    def stream_error(reason) -> None:
        print(f"stream error: {reason.value.condition}", flush=True)
        outcome["code"] = 1
        service.factory.stopTrying()
        if reactor.running:
            reactor.stop()

    service.factory.addBootstrap(xmlstream.STREAM_AUTHD_EVENT, connected)
    service.factory.addBootstrap(xmlstream.INIT_FAILED_EVENT, failed)
    service.factory.addBootstrap(xmlstream.STREAM_ERROR_EVENT, stream_error)
    service.startService()
    reactor.run()
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
