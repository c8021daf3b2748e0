"""The built-in session-manager plugins, by the name used in ``[sm] plugins``.

Names follow the namespaces they serve where one exists (the blocking
command is ``urn:xmpp:blocking``, as operators know it from other servers).
Modules are imported only when enabled.  Plugins of other packages register
through the ``xmppd.plugins`` entry-point group; :mod:`xmppd.registry` puts
both together.
"""

BUILTIN_PLUGINS = {
    "register": "xmppd.handlers.register:RegisterPlugin",
    "ping": "xmppd.handlers.ping:PingPlugin",
    "disco": "xmppd.handlers.disco:DiscoPlugin",
    "version": "xmppd.handlers.version:VersionPlugin",
    "roster": "xmppd.handlers.roster:RosterPlugin",
    "presence": "xmppd.handlers.presence:PresencePlugin",
    "offline": "xmppd.handlers.offline:OfflinePlugin",
    "vcard": "xmppd.handlers.vcard:VCardPlugin",
    "urn:xmpp:blocking": "xmppd.handlers.blocking:BlockingPlugin",
    "domain-filter": "xmppd.handlers.domainfilter:DomainFilterPlugin",
    "adhoc": "xmppd.handlers.adhoc:AdHocPlugin",
    "urn:xmpp:csi:0": "xmppd.handlers.csi:CSIPlugin",
    "urn:xmpp:sm:3": "xmppd.handlers.sm:StreamManagementPlugin",
    "urn:xmpp:sid:0": "xmppd.handlers.stanzaid:StanzaIdPlugin",
    "urn:xmpp:carbons:2": "xmppd.handlers.carbons:CarbonsPlugin",
    # Personal eventing (issue 15): caps before pep, pep before bookmarks.
    "caps": "xmppd.handlers.caps:CapsPlugin",
    "pep": "xmppd.handlers.pep:PepPlugin",
    "jabber:iq:private": "xmppd.handlers.private:PrivatePlugin",
    "urn:xmpp:bookmarks:1": "xmppd.handlers.bookmarks:BookmarksPlugin",
    # XEP-0398, after presence, vcard and pep.
    "urn:xmpp:pep-vcard-conversion:0": "xmppd.handlers.avatarconv:AvatarConversionPlugin",
    # XEP-0313 message archive (issue 16); needs urn:xmpp:sid:0 before it
    "urn:xmpp:mam:2": "xmppd.handlers.mam:MAMPlugin",
}
