"""xmppd: a security-minded XMPP server daemon on Twisted."""

__version__ = "0.1.0"
