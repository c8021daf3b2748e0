"""Runnable examples of wokkel handlers served by xmppd (docs/extending.rst)."""
