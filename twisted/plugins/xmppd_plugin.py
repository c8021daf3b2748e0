"""twistd plugin: makes ``twistd xmppd`` find the xmppd service maker.

Kept tiny on purpose: twistd imports every module in ``twisted/plugins`` at
start-up, so the real work is deferred to ``xmppd.tap`` until the plugin is
actually chosen.
"""
from twisted.application.service import ServiceMaker

xmppd = ServiceMaker(
    "xmppd",
    "xmppd.tap",
    "A security-minded XMPP server (c2s, SASL, blocking, certificates).",
    "xmppd",
)
