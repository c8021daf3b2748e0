"""Issue 13: the plugin registry (entry points) and [components] validation, without a daemon."""
from __future__ import annotations

import inspect
import sys
import textwrap

import pytest
from twisted.internet import task

from xmppd import config, registry
from xmppd.components import settings
from xmppd.config import ConfigError
from xmppd.core import Server
from xmppd.storage import MemoryStore


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """An installed package (a dist-info directory on sys.path) registering two plugins."""
    (tmp_path / "xmppd_motd.py").write_text(textwrap.dedent("""\
        from xmppd.plugin import Plugin

        class MotdPlugin(Plugin):
            name = "motd"
            features = ("urn:test:motd",)

        class RosterImpostor(Plugin):
            name = "roster"
        """))
    info = tmp_path / "xmppd_motd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xmppd-motd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[xmppd.plugins]\nmotd = xmppd_motd:MotdPlugin\nroster = xmppd_motd:RosterImpostor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("xmppd_motd", None)


def server(data: dict) -> Server:
    cfg = config.from_dict(data)
    return Server(cfg, store=MemoryStore(), clock=task.Clock(), certs=object(),
                  connectors={h: None for h in cfg.hosts})


def test_entry_point_plugins_load_and_cannot_replace_builtins(third_party):
    known = registry.known_plugins()
    assert "motd" in known
    assert known["roster"] == "xmppd.handlers.roster:RosterPlugin"
    s = server({"sm": {"plugins": ["disco", "motd"]}})
    assert s.plugin("motd") is not None
    assert "urn:test:motd" in s.disco_features()


def test_unknown_plugin_is_refused_when_the_server_is_built_not_by_the_config_layer():
    cfg = config.from_dict({"sm": {"plugins": ["roster", "nope"]}})  # the config layer accepts it
    with pytest.raises(ConfigError) as e:
        Server(cfg, store=MemoryStore(), clock=task.Clock(), certs=object(),
               connectors={"localhost": None})
    assert str(e.value).startswith("<defaults>: sm.plugins = 'nope': unknown plugin; known: ")
    assert "xmppd.handlers" not in inspect.getsource(config)  # no import of the layer above


def test_duplicate_plugin_is_a_config_error():
    with pytest.raises(ConfigError, match="sm.plugins = 'roster': listed twice"):
        config.from_dict({"sm": {"plugins": ["roster", "roster"]}})


@pytest.mark.parametrize("table, message", [
    ({"x.localhost": {"handlers": ["a:B"], "secret": "s"}},
     "components.\"x.localhost\".handlers = ['a:B']: a component is either in process"),
    ({"x.localhost": {"secret": "s", "secret_file": "f"}},
     "give secret or secret_file, not both"),
    ({"x.localhost": {"secret": ""}}, "the secret must not be empty"),
    ({"x.localhost": {"handlers": ["no-colon"]}}, "must be 'package.module:Factory'"),
    ({"x.localhost": {"handlers": [{"factory": "a:B", "argz": []}]}}, "unknown key 'argz'"),
    ({"x.localhost": {"secret": "s", "colour": "red"}},
     "components.\"x.localhost\".colour = 'red': unknown key"),
    ({"localhost": {"secret": "s"}}, "localhost is a served host (server.hosts): only handlers"),
    ({"u@x.localhost": {"secret": "s"}}, "must be a bare domain name"),
    ({"listen": ["tcp:99999"]}, "components.listen = 'tcp:99999': port 99999 is out of range"),
    ({"oops": 3}, "components.oops = 3: unknown key"),
])
def test_component_settings_errors_name_the_key(table, message):
    cfg = config.from_dict({"components": table})
    with pytest.raises(ConfigError) as e:
        settings.read(cfg)
    assert message in str(e.value)


def test_component_settings(tmp_path):
    secret = tmp_path / "gw.secret"
    secret.write_text("s3cret\n")
    (tmp_path / "x.toml").write_text(textwrap.dedent("""\
        [components."gw.localhost"]
        secret_file = "gw.secret"
        public = false
        [components."echo.localhost"]
        handlers = ["examples.echo:EchoBot", {factory = "wokkel.generic:VersionHandler", args = ["E", "1"]}]
        """))
    read = settings.read(config.load(str(tmp_path / "x.toml")))
    assert read.listen == settings.DEFAULT_LISTEN
    gw, echo = read.components["gw.localhost"], read.components["echo.localhost"]
    assert gw.secret == "s3cret" and gw.external and not gw.public
    assert [str(h) for h in echo.handlers] == ["examples.echo:EchoBot", "wokkel.generic:VersionHandler"]
    assert echo.handlers[1].args == ("E", "1") and echo.public


def test_no_external_component_no_listener():
    s = server({"components": {"echo.localhost": {"handlers": ["examples.echo:EchoBot"]}}})
    assert s.components.listeners() == []
    s = server({"components": {"gw.localhost": {"secret": "s"}}})
    assert [key for key, _, _ in s.components.listeners()] == ["components.listen"]
