"""XEP-0050 Ad-Hoc Commands with XEP-0133 Service Administration (``adhoc``).

Commands live on each virtual host's server JID.  A client lists them with
disco#items on node ``http://jabber.org/protocol/commands`` and runs one
with ``<command xmlns='http://jabber.org/protocol/commands' node=...
action='execute'/>`` in an IQ set to the server domain.  A command that
needs input answers ``status='executing'`` with a data form and a
``sessionid``; the client submits the form (``action='complete'``,
``'next'`` or ``'execute'``) or cancels (``action='cancel'``).  A client
may also put the submitted form into the very first ``execute`` and skip
the round trip.

Every command has an ACL (:mod:`xmppd.acl`, ``[acl]`` keyed by node; the
default is ``["ADMIN"]``).  A command the requester may not run is left out
of disco#items, its node's disco#info answers ``item-not-found``, and
running it answers ``forbidden`` (logged with requester and command).  The
ACL is checked when the command starts, against the vhost it is addressed
to, and again when the form is submitted, against the domain of every
account it acts on (that is what ``DOMAIN_ADMIN`` refers to).

XEP-0133 nodes (``http://jabber.org/protocol/admin#...``): ``add-user``,
``delete-user``, ``change-user-password``, ``end-user-session``,
``get-online-users-list``, ``get-online-users-num``,
``get-registered-users-num``, ``announce``.  xmppd's own nodes
(``urn:xmppd:admin#...``): ``set-domain-filter``, ``reload-certificates``,
``certificate-status``.

Errors (RFC 6120 §8.3 plus XEP-0050's application conditions): unknown node
``item-not-found``; ACL ``forbidden``; unknown or foreign session
``bad-request`` + ``<bad-sessionid/>``; expired session ``not-allowed`` +
``<session-expired/>``; ``prev`` ``bad-request`` + ``<bad-action/>``;
missing form ``bad-request`` + ``<bad-payload/>``; bad field values
``bad-request`` / ``jid-malformed`` / ``not-acceptable`` with a text; an
account that exists already ``conflict``; an unknown account
``item-not-found``; a connector that cannot do it
``feature-not-implemented``.

Sessions ended by an administrator (``end-user-session``) get the stream
error ``<policy-violation/>`` with a text; sessions of a deleted account get
``<not-authorized/>`` ("account deleted").

Configuration::

    [adhoc]
    session_timeout = 600     # seconds a multi-stage command may stay open
    max_values = 100          # JIDs (lines) one multi-value field may carry

A field with more values than ``max_values`` is refused with
``policy-violation`` before any of them is parsed or acted on.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.xish import domish

from xmppd import acl as acllib
from xmppd import jid as jidlib
from xmppd.auth.passwords import UnacceptablePassword, check_new_password
from xmppd.config import ConfigError
from xmppd.jid import JID
from xmppd.plugin import Plugin, Request
from xmppd.stanzas import NS_CLIENT, StanzaError
from xmppd.wokkel_compat import data_form, disco
from xmppd.logfilter import log_observer

log = Logger(observer=log_observer)

NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_ADMIN = "http://jabber.org/protocol/admin"
NS_XMPPD_ADMIN = "urn:xmppd:admin"
NS_DATA = "jabber:x:data"
ACTIONS = ("execute", "next", "complete", "prev", "cancel")
MAX_SESSIONS_PER_REQUESTER = 10
MAX_SESSIONS = 10000


def command_error(condition: str, specific: str, text: str | None = None) -> StanzaError:
    return StanzaError(condition, text=text, extra=domish.Element((NS_COMMANDS, specific)))


class _Entity:
    """What wokkel's DiscoItem needs of a JID (``full()``), without stringprep."""

    def __init__(self, text: str) -> None:
        self.text = text

    def full(self) -> str:
        return self.text


# -- results of a command step -------------------------------------------------


@dataclass
class Next:
    """Another stage: show ``form``; ``final`` says whether it is the last one."""

    form: Any
    final: bool = True


@dataclass
class Done:
    note: str | None = None
    form: Any = None
    note_type: str = "info"


@dataclass
class Session:
    id: str
    node: str
    requester: str
    domain: str
    expires: float
    data: dict = field(default_factory=dict)


@dataclass
class Context:
    """One step of one command run."""

    plugin: "AdHocPlugin"
    requester: JID
    domain: str
    session: Session | None

    @property
    def server(self):
        return self.plugin.server

    def require(self, node: str, account: JID) -> None:
        """ACL check against the account's domain (DOMAIN_ADMIN)."""
        if account.host not in self.plugin.router.hosts:
            raise StanzaError("bad-request", text=f"{account.host} is not a virtual host of this server")
        if not self.plugin.acl.check(node, self.requester, account.host):
            raise StanzaError("forbidden", text=f"you may not run this command for {account.host}")


# -- form helpers ----------------------------------------------------------------


def form(title: str, instructions: str, fields: list, ns: str = NS_ADMIN, kind: str = "form"):
    return data_form.Form(kind, title=title, instructions=[instructions] if instructions else None,
                          formNamespace=ns, fields=fields)


def result_form(fields: list, ns: str = NS_ADMIN, title: str | None = None):
    return data_form.Form("result", title=title, formNamespace=ns, fields=fields)


def F(kind: str, var: str, label: str | None = None, value=None, values=None, required=False,
      options=None, desc=None):
    f = data_form.Field(kind, var=var, label=label, value=value, values=values,
                        required=required, desc=desc)
    if options:
        f.options = [data_form.Option(v, lbl) for v, lbl in options]
    return f


def form_values(payload: domish.Element) -> dict[str, list[str]] | None:
    """The submitted form's values as strings (None: no form; raises for cancel forms)."""
    for child in payload.elements(NS_DATA, "x"):
        try:
            submitted = data_form.Form.fromElement(child)
        except data_form.Error:
            raise command_error("bad-request", "bad-payload") from None
        if submitted.formType == "cancel":
            return {"__cancel__": []}
        return {
            f.var: [str(v) for v in f.values]
            for f in submitted.fieldList if f.var is not None
        }
    return None


def one(values: dict, var: str, required: bool = True) -> str | None:
    got = [v.strip() for v in values.get(var, []) if v.strip()]
    if not got:
        if required:
            raise StanzaError("bad-request", text=f"field {var!r} is required")
        return None
    return got[0]


def many(values: dict, var: str, limit: int) -> list[str]:
    """The non-empty lines of a multi-value field; more than ``limit`` is refused."""
    out = []
    for v in values.get(var, []):
        out.extend(line.strip() for line in v.splitlines() if line.strip())
        if len(out) > limit:
            raise StanzaError("policy-violation", text=f"field {var!r}: at most {limit} values")
    return out


def account(text: str, allow_full: bool = False) -> JID:
    try:
        j = jidlib.parse(text.strip())
    except jidlib.InvalidJID as e:
        raise StanzaError("jid-malformed", text=f"{text!r}: {e}") from None
    if j.user is None or (j.resource is not None and not allow_full):
        raise StanzaError("jid-malformed", text=f"{text!r} is not an account JID (user@domain)")
    return j


def _map_connector_error(failure, subject: str):
    from xmppd.auth.base import NoSuchUser, NotSupported, TemporaryAuthFailure, UserExists

    err = failure.value
    if isinstance(err, UserExists):
        raise StanzaError("conflict", text=f"{subject} already exists")
    if isinstance(err, NoSuchUser):
        raise StanzaError("item-not-found", text=f"no such account {subject}")
    if isinstance(err, NotSupported):
        raise StanzaError("feature-not-implemented", text=f"the account backend cannot do this: {err}")
    if isinstance(err, TemporaryAuthFailure):
        raise StanzaError("service-unavailable", "wait", text="the account backend is unavailable")
    return failure


# -- commands --------------------------------------------------------------------


class Command:
    node = ""
    name = ""
    default_acl: tuple = ("ADMIN",)

    def available(self, plugin: "AdHocPlugin") -> bool:
        return True

    def start(self, ctx: Context):
        """First answer to ``execute``: a form (Next) or the result (Done)."""
        return self.submit(ctx, {})

    def submit(self, ctx: Context, values: dict):
        raise NotImplementedError


class AddUser(Command):
    node = NS_ADMIN + "#add-user"
    name = "Add a user"

    def start(self, ctx):
        return Next(form("Adding a user", "Fill out this form to add a user.", [
            F("jid-single", "accountjid", "The Jabber ID for the account to be added", required=True),
            F("text-private", "password", "The password for this account", required=True),
            F("text-private", "password-verify", "Retype password", required=True),
            F("text-single", "email", "Email address"),
            F("text-single", "given_name", "Given name"),
            F("text-single", "surname", "Family name"),
        ]))

    def submit(self, ctx, values):
        j = account(one(values, "accountjid"))
        ctx.require(self.node, j)
        password = one(values, "password")
        verify = one(values, "password-verify", required=False)
        if verify is not None and verify != password:
            raise StanzaError("not-acceptable", text="the passwords differ")
        connector = ctx.server.connector_for(j.host)
        return _with_password(ctx, j, connector.add_user, password,
                              "created", f"Account {j.bare} created.")


def _with_password(ctx, j, operation, password: str, verb: str, done: str):
    """Check the password, run a connector operation taking it; log it; finish the command."""
    try:
        check_new_password(password, ctx.server.connector_for(j.host))
    except UnacceptablePassword as e:
        raise StanzaError("not-acceptable", text=str(e)) from None
    d = operation(j.user, j.host, password)
    d.addErrback(_map_connector_error, j.bare)
    d.addCallback(lambda _: log.info("adhoc: {by} {verb} {user}",
                                     by=ctx.requester.full, verb=verb, user=j.bare))
    return d.addCallback(lambda _: Done(done))


class DeleteUser(Command):
    node = NS_ADMIN + "#delete-user"
    name = "Delete a user"

    def start(self, ctx):
        return Next(form("Deleting a user", "Fill out this form to delete a user.", [
            F("jid-multi", "accountjids", "The Jabber ID(s) to delete", required=True),
        ]))

    @defer.inlineCallbacks
    def submit(self, ctx, values):
        accounts = [account(t) for t in many(values, "accountjids", ctx.plugin.max_values)]
        if not accounts:
            raise StanzaError("bad-request", text="field 'accountjids' is required")
        for j in accounts:
            ctx.require(self.node, j)
        for j in accounts:
            exists = yield ctx.server.connector_for(j.host).user_exists(j.user, j.host)
            if not exists:
                raise StanzaError("item-not-found", text=f"no such account {j.bare}")
        for j in accounts:
            try:
                yield ctx.server.connector_for(j.host).remove_user(j.user, j.host)
            except Exception:
                _map_connector_error(Failure(), j.bare)
                raise
            ctx.plugin.end_sessions(j, "not-authorized", "account deleted")
            domain_filter = ctx.server.plugin("domain-filter")
            if domain_filter is not None:
                domain_filter.forget(j.bare)
            log.info("adhoc: {by} deleted {user}", by=ctx.requester.full, user=j.bare)
        return Done("Deleted " + ", ".join(j.bare for j in accounts) + ".")


class ChangePassword(Command):
    node = NS_ADMIN + "#change-user-password"
    name = "Change a user's password"

    def start(self, ctx):
        return Next(form("Changing a user password", "Fill out this form to change a user's password.", [
            F("jid-single", "accountjid", "The Jabber ID for this account", required=True),
            F("text-private", "password", "The password for this account", required=True),
        ]))

    def submit(self, ctx, values):
        j = account(one(values, "accountjid"))
        ctx.require(self.node, j)
        password = one(values, "password")
        connector = ctx.server.connector_for(j.host)
        return _with_password(ctx, j, connector.set_password, password,
                              "changed the password of", f"Password of {j.bare} changed.")


class EndUserSession(Command):
    node = NS_ADMIN + "#end-user-session"
    name = "End a user session"

    def start(self, ctx):
        return Next(form("Ending a user session", "Fill out this form to end a user's session.", [
            F("jid-multi", "accountjids", "The Jabber ID(s) for which to end sessions", required=True),
        ]))

    def submit(self, ctx, values):
        targets = [account(t, allow_full=True)
                   for t in many(values, "accountjids", ctx.plugin.max_values)]
        if not targets:
            raise StanzaError("bad-request", text="field 'accountjids' is required")
        for j in targets:
            ctx.require(self.node, j)
        ended = 0
        for j in targets:
            ended += ctx.plugin.end_sessions(j, "policy-violation", "session ended by an administrator")
        log.info("adhoc: {by} ended {n} session(s) of {targets}", by=ctx.requester.full, n=ended,
                 targets=", ".join(j.full for j in targets))
        return Done(f"Ended {ended} session(s).")


def _online_users(plugin: "AdHocPlugin", domain: str) -> list[str]:
    return sorted(b for b, res in plugin.router.sessions.items() if res and b.endswith("@" + domain))


class OnlineUsersNum(Command):
    node = NS_ADMIN + "#get-online-users-num"
    name = "Get number of online users"

    def submit(self, ctx, values):
        n = len(_online_users(ctx.plugin, ctx.domain))
        return Done(form=result_form([F("text-single", "onlineusersnum", "The number of online users",
                                        value=str(n))]))


class OnlineUsersList(Command):
    node = NS_ADMIN + "#get-online-users-list"
    name = "Get list of online users"
    LIMITS = ("25", "50", "75", "100", "150", "200", "none")

    def start(self, ctx):
        return Next(form("Requesting list of online users",
                         "Fill out this form to request the online users.", [
            F("list-single", "max_items", "Maximum number of items to show", value="100",
              options=[(v, v) for v in self.LIMITS]),
        ]))

    def submit(self, ctx, values):
        limit = one(values, "max_items", required=False) or "none"
        if limit not in self.LIMITS:
            raise StanzaError("not-acceptable",
                              text=f"max_items must be one of {', '.join(self.LIMITS)}")
        users = _online_users(ctx.plugin, ctx.domain)
        if limit != "none":
            users = users[: int(limit)]
        return Done(form=result_form([
            F("jid-multi", "onlineuserjids", "The list of all online users",
              values=[jidlib.parse(u) for u in users]),
        ]))


class RegisteredUsersNum(Command):
    node = NS_ADMIN + "#get-registered-users-num"
    name = "Get number of registered users"

    def submit(self, ctx, values):
        d = ctx.server.connector_for(ctx.domain).count_users(ctx.domain)
        d.addErrback(_map_connector_error, ctx.domain)
        return d.addCallback(lambda n: Done(form=result_form([
            F("text-single", "registeredusersnum", "The number of registered users", value=str(n)),
        ])))


class Announce(Command):
    node = NS_ADMIN + "#announce"
    name = "Send announcement to online users"

    def start(self, ctx):
        return Next(form("Making an announcement", "Fill out this form to make an announcement "
                         "to all active users of this service.", [
            F("text-single", "subject", "Subject"),
            F("text-multi", "announcement", "Announcement", required=True),
        ]))

    def submit(self, ctx, values):
        body = "\n".join(values.get("announcement", [])).strip()
        if not body:
            raise StanzaError("bad-request", text="field 'announcement' is required")
        subject = one(values, "subject", required=False)
        sent = 0
        for bare in _online_users(ctx.plugin, ctx.domain):
            for session in list(ctx.plugin.router.resources_of(bare).values()):
                if not session.available:
                    continue
                msg = domish.Element((NS_CLIENT, "message"))
                msg["from"] = ctx.domain
                msg["to"] = session.jid.full
                msg["type"] = "headline"
                if subject:
                    msg.addElement("subject", content=subject)
                msg.addElement("body", content=body)
                ctx.plugin.router.send_from_server(msg, session.jid)
                sent += 1
        log.info("adhoc: {by} announced to {n} session(s) on {domain}", by=ctx.requester.full,
                 n=sent, domain=ctx.domain)
        return Done(f"Announcement sent to {sent} session(s).")


class SetDomainFilter(Command):
    node = NS_XMPPD_ADMIN + "#set-domain-filter"
    name = "Set a user's domain filter"

    def available(self, plugin):
        return plugin.server.plugin("domain-filter") is not None

    def start(self, ctx):
        return Next(form("Setting a user's domain filter", "Whose domain filter?", [
            F("jid-single", "accountjid", "The Jabber ID of the account", required=True),
        ], ns=NS_XMPPD_ADMIN), final=False)

    @defer.inlineCallbacks
    def submit(self, ctx, values):
        from xmppd import filtering

        plugin = ctx.server.plugin("domain-filter")
        if plugin is None:
            raise StanzaError("feature-not-implemented", text="the domain-filter plugin is not enabled")
        text = one(values, "accountjid", required=False)
        if text is None and ctx.session is not None:
            text = ctx.session.data.get("accountjid")  # stage 2 without the hidden value
        if text is None:
            raise StanzaError("bad-request", text="field 'accountjid' is required")
        j = account(text)
        ctx.require(self.node, j)
        policy_name = one(values, "policy", required=False)
        if policy_name is None:
            # Second stage: the current setting, pre-filled.
            if ctx.session is not None:
                ctx.session.data["accountjid"] = j.bare
            stored = (yield filtering.load_setting(plugin.store, j.bare)) or {}
            effective = yield plugin.effective(j)
            return Next(form(f"Domain filter of {j.bare}",
                             f"In force now: {effective.describe()}"
                             + ("" if stored else " (the default)") + ". "
                             "DEFAULT drops the user's own setting. Domains are for LIST and "
                             "BLACKLIST, one per line; rules are for CUSTOM, one per line "
                             "('allow example.org', 'deny *').", [
                F("jid-single", "accountjid", "Account", value=j, required=True),
                F("list-single", "policy", "Policy", value=stored.get("policy", filtering.DEFAULT),
                  options=[(p, p) for p in (filtering.DEFAULT, *filtering.POLICIES)], required=True),
                F("text-multi", "domains", "Domains", values=list(stored.get("domains", []))),
                F("text-multi", "rules", "Rules", values=list(stored.get("rules", []))),
            ], ns=NS_XMPPD_ADMIN))
        exists = yield ctx.server.connector_for(j.host).user_exists(j.user, j.host)
        if not exists:
            raise StanzaError("item-not-found", text=f"no such account {j.bare}")
        policy_name = policy_name.upper()
        if policy_name == filtering.DEFAULT:
            policy = None
        else:
            try:
                limit = plugin.max_entries
                policy = filtering.Policy(policy_name, many(values, "domains", limit),
                                          many(values, "rules", limit), ctx.plugin.router.hosts, "user")
            except filtering.FilterError as e:
                raise StanzaError("not-acceptable", text=str(e)) from None
        effective = yield plugin.set_filter(j, policy, by=ctx.requester.full)
        return Done(f"Domain filter of {j.bare}: {effective.describe()}"
                    + (" (the default)" if policy is None else "") + ".")


class ReloadCertificates(Command):
    node = NS_XMPPD_ADMIN + "#reload-certificates"
    name = "Reload TLS certificates"

    def submit(self, ctx, values):
        messages = list(ctx.server.certs.reload() or ())
        for m in messages:
            log.info("certificates: {message}", message=m)
        log.info("adhoc: {by} reloaded the certificates", by=ctx.requester.full)
        return Done("\n".join(messages) or "Certificates reloaded.", form=result_form([
            F("text-multi", "messages", "Messages", values=messages or ["no changes"]),
        ], ns=NS_XMPPD_ADMIN))


class CertificateStatus(Command):
    node = NS_XMPPD_ADMIN + "#certificate-status"
    name = "Show certificate status"
    COLUMNS = (("host", "Host"), ("status", "Status"), ("subject", "Subject"),
               ("sans", "Names"), ("issuer", "Issuer"), ("not_after", "Expires"),
               ("sources", "Files"), ("notes", "Notes"))

    def submit(self, ctx, values):
        infos = ctx.server.certs.describe()
        result = result_form([], ns=NS_XMPPD_ADMIN, title="Certificates")
        return Done(form=_Table(result, self.COLUMNS, [_cert_row(i) for i in infos]))


def _cert_row(info) -> dict[str, str]:
    def text(v):
        if isinstance(v, (tuple, list)):
            return ", ".join(str(x) for x in v)
        if hasattr(v, "isoformat"):
            return v.isoformat()
        return str(v)

    return {name: text(getattr(info, name, "")) for name, _ in CertificateStatus.COLUMNS}


class _Table:
    """A result form with an XEP-0004 §3.4 table (wokkel has no <reported/>)."""

    def __init__(self, base, columns, rows) -> None:
        self.base, self.columns, self.rows = base, columns, rows

    def toElement(self) -> domish.Element:
        x = self.base.toElement()
        reported = x.addElement("reported")
        for var, label in self.columns:
            f = reported.addElement("field")
            f["var"], f["label"], f["type"] = var, label, "text-single"
        for row in self.rows:
            item = x.addElement("item")
            for var, _ in self.columns:
                f = item.addElement("field")
                f["var"] = var
                f.addElement("value", content=row.get(var, ""))
        return x


COMMANDS: tuple[type[Command], ...] = (
    AddUser, DeleteUser, ChangePassword, EndUserSession, OnlineUsersList, OnlineUsersNum,
    RegisteredUsersNum, Announce, SetDomainFilter, ReloadCertificates, CertificateStatus,
)


# -- the plugin ------------------------------------------------------------------


class AdHocPlugin(Plugin):
    name = "adhoc"
    features = (NS_COMMANDS,)

    def setup(self) -> None:
        sec = self.server.config.section("adhoc")
        self.session_timeout = sec.number("session_timeout", 600.0, minimum=1)
        self.max_values = sec.int("max_values", 100, minimum=1)
        sec.reject_unknown()
        self.acl = acllib.for_server(self.server)
        self.commands: dict[str, Command] = {}
        for cls in COMMANDS:
            self.add_command(cls())
        unknown = self.acl.unknown((NS_ADMIN + "#", NS_XMPPD_ADMIN + "#"))
        if unknown:
            raise ConfigError(self.server.config.path, f'acl."{unknown[0]}"', None,
                              "no such command; known: " + ", ".join(sorted(self.commands)))
        self.sessions: dict[str, Session] = {}
        self.handle_iq("set", NS_COMMANDS, "command", self.on_command)
        self._disco_registered = False
        if not self._register_disco():
            # disco comes later in [sm] plugins: register once everything is attached.
            self.server.clock.callLater(0, self._register_disco)

    def add_command(self, command: Command) -> None:
        """Other plugins may add their own commands (ACL default from the command)."""
        self.commands[command.node] = command
        self.acl.register(command.node, command.default_acl)
        if getattr(self, "_disco_registered", False):
            self._add_disco_node(self.server.plugin("disco"), command)

    # -- disco -------------------------------------------------------------------

    def _register_disco(self) -> bool:
        discoplugin = self.server.plugin("disco")
        if discoplugin is None or not hasattr(discoplugin, "nodes"):
            return False
        discoplugin.add_node(NS_COMMANDS, self._list_info, self._list_items)
        for command in self.commands.values():
            self._add_disco_node(discoplugin, command)
        self._disco_registered = True
        return True

    def _add_disco_node(self, discoplugin, command: Command) -> None:
        discoplugin.add_node(command.node, lambda r, c=command: self._node_info(r, c), lambda r: [])

    def visible(self, command: Command, requester: JID, domain: str) -> bool:
        return command.available(self) and self.acl.allowed(command.node, requester, domain)

    def _list_info(self, request: Request):
        info = disco.DiscoInfo()
        info.append(disco.DiscoIdentity("automation", "command-list", "Commands"))
        return info

    def _list_items(self, request: Request) -> list:
        domain = request.to.host
        return [
            disco.DiscoItem(_Entity(domain), c.node, c.name)
            for c in self.commands.values() if self.visible(c, request.sender, domain)
        ]

    def _node_info(self, request: Request, command: Command):
        if not self.visible(command, request.sender, request.to.host):
            return None
        info = disco.DiscoInfo()
        info.append(disco.DiscoIdentity("automation", "command-node", command.name))
        info.append(disco.DiscoFeature(NS_COMMANDS))
        info.append(disco.DiscoFeature(NS_DATA))
        return info

    # -- sessions ----------------------------------------------------------------

    def end_sessions(self, target: JID, condition: str, text: str) -> int:
        """Close the target's sessions (one resource for a full JID); returns how many."""
        resources = self.router.resources_of(target.bare)
        if target.resource is not None:
            sessions = [resources[target.resource]] if target.resource in resources else []
        else:
            sessions = list(resources.values())
        for session in sessions:
            closer = getattr(session, "stream_error", None)
            if closer is not None:
                closer(condition, text)
        return len(sessions)

    def _new_session(self, node: str, requester: JID, domain: str) -> Session:
        now = self.server.clock.seconds()
        for sid in [s for s, v in self.sessions.items() if v.expires <= now]:
            del self.sessions[sid]
        mine = sorted((v.expires, s) for s, v in self.sessions.items() if v.requester == requester.full)
        for _, sid in mine[: max(0, len(mine) - MAX_SESSIONS_PER_REQUESTER + 1)]:
            del self.sessions[sid]
        if len(self.sessions) >= MAX_SESSIONS:
            raise StanzaError("resource-constraint", text="too many open command sessions")
        session = Session(uuid.uuid4().hex, node, requester.full, domain, now + self.session_timeout)
        self.sessions[session.id] = session
        return session

    # -- the IQ ------------------------------------------------------------------

    def on_command(self, request: Request):
        to = request.to
        if to is None or to.user is not None or to.resource is not None:
            raise StanzaError("service-unavailable", text="commands are offered by the server JID")
        payload = request.payload
        node = payload.getAttribute("node")
        command = self.commands.get(node or "")
        if command is None or not command.available(self):
            raise StanzaError("item-not-found", text=f"no command {node!r}")
        action = payload.getAttribute("action", "execute")
        if action not in ACTIONS:
            raise command_error("bad-request", "malformed-action")
        requester, domain = request.sender, to.host
        sid = payload.getAttribute("sessionid")
        if sid is None:
            if action == "cancel":
                raise command_error("bad-request", "bad-sessionid", "no session to cancel")
            if not self.acl.check(node, requester, domain):
                raise StanzaError("forbidden", text="you may not run this command")
            session = self._new_session(node, requester, domain)
            values = form_values(payload)
            ctx = Context(self, requester, domain, session)
            if values is not None:
                step = lambda: command.submit(ctx, values)  # noqa: E731
            else:
                step = lambda: command.start(ctx)  # noqa: E731
            return self._run(step, command, session)
        session = self.sessions.get(sid)
        if session is None or session.node != node or session.requester != requester.full:
            raise command_error("bad-request", "bad-sessionid")
        if session.expires <= self.server.clock.seconds():
            self.sessions.pop(sid, None)
            raise command_error("not-allowed", "session-expired")
        if action == "cancel":
            self.sessions.pop(sid, None)
            return self._reply(command, session, "canceled")
        if action == "prev":
            raise command_error("bad-request", "bad-action", "this command has no previous stage")
        values = form_values(payload)
        if values is None:
            raise command_error("bad-request", "bad-payload", "submit the form")
        if "__cancel__" in values:
            self.sessions.pop(sid, None)
            return self._reply(command, session, "canceled")
        # Re-check: the ACL may have been narrowed by the target (DOMAIN_ADMIN).
        if not self.acl.check(node, requester, session.domain):
            self.sessions.pop(sid, None)
            raise StanzaError("forbidden", text="you may not run this command")
        ctx = Context(self, requester, session.domain, session)
        return self._run(lambda: command.submit(ctx, values), command, session)

    def _run(self, step: Callable, command: Command, session: Session):
        d = defer.maybeDeferred(step)

        def done(result):
            if isinstance(result, Next):
                session.expires = self.server.clock.seconds() + self.session_timeout
                return self._reply(command, session, "executing", result.form,
                                   actions="complete" if result.final else "next")
            self.sessions.pop(session.id, None)
            result = result if isinstance(result, Done) else Done()
            return self._reply(command, session, "completed", result.form, note=result.note,
                               note_type=result.note_type)

        def failed(failure):
            self.sessions.pop(session.id, None)
            return failure

        return d.addCallbacks(done, failed)

    @staticmethod
    def _reply(command: Command, session: Session, status: str, x=None, actions: str | None = None,
               note: str | None = None, note_type: str = "info") -> domish.Element:
        el = domish.Element((NS_COMMANDS, "command"))
        el["node"] = command.node
        el["sessionid"] = session.id
        el["status"] = status
        if actions is not None:
            acts = el.addElement("actions")
            acts["execute"] = actions
            acts.addElement(actions)
        if note:
            n = el.addElement("note", content=note)
            n["type"] = note_type
        if x is not None:
            el.addChild(x.toElement())
        return el
