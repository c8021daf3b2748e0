"""Issue 15: two real OMEMO clients (slixmpp + slixmpp-omemo, XEP-0384) start an encrypted
conversation through xmppd: each publishes its device list and bundle to its own PEP
service, learns the other's device list by +notify (or fetches it), fetches the other's
bundle, and one encrypted message goes through, readable only by the other client."""
from __future__ import annotations

import asyncio

import pytest

from tests.daemon import Daemon
from tests.peptools import PW, subscribe_both

# The library's own use of the old slixmpp plugin access; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing plugins through the XMPP object:DeprecationWarning")
PLUGINS = ["roster", "presence", "disco", "ping", "caps", "pep"]
OLDMEMO = "eu.siacs.conversations.axolotl"


@pytest.fixture(scope="module")
def od(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("omemo"), plugins=PLUGINS).start()
    for u in ("romeo", "juliet"):
        d.adduser(f"{u}@localhost", PW)
    subscribe_both(d, "romeo", "juliet")
    yield d
    d.stop()


def _omemo_plugin():
    """An XEP_0384 with its data in memory and blind trust (BTBV): what a test client needs."""
    import omemo
    from omemo.storage import Just, Maybe, Nothing, Storage
    from slixmpp.plugins import register_plugin
    from slixmpp_omemo import XEP_0384

    class MemoryStorage(Storage):
        def __init__(self) -> None:
            super().__init__()
            self.data: dict = {}

        async def _load(self, key: str) -> Maybe:
            return Just(self.data[key]) if key in self.data else Nothing()

        async def _store(self, key: str, value) -> None:
            self.data[key] = value

        async def _delete(self, key: str) -> None:
            self.data.pop(key, None)

    class TestOmemo(XEP_0384):
        default_config = {"fallback_message": "This message is OMEMO encrypted."}

        def plugin_init(self) -> None:
            self.__storage = MemoryStorage()
            super().plugin_init()

        @property
        def storage(self) -> Storage:
            return self.__storage

        @property
        def _btbv_enabled(self) -> bool:
            return True

        async def _prompt_manual_trust(self, manually_trusted, identifier) -> None:
            raise omemo.TrustDecisionFailed("the test trusts blindly")

    register_plugin(TestOmemo)


def test_two_slixmpp_omemo_clients_exchange_an_encrypted_message(od):
    from slixmpp import JID

    from tests.xmpp import connect, run

    _omemo_plugin()
    plugins = ["xep_0030", "xep_0060", "xep_0163", "xep_0115", "xep_0280", "xep_0334", "xep_0384"]

    async def go():
        romeo = await connect("romeo@localhost/omemo", PW, od.port, plugins=plugins)
        juliet = await connect("juliet@localhost/omemo", PW, od.port, plugins=plugins)
        # Each builds its keys and publishes its bundle and device list through PEP.
        r_sm = await asyncio.wait_for(romeo.plugin["xep_0384"].get_session_manager(), 30)
        j_sm = await asyncio.wait_for(juliet.plugin["xep_0384"].get_session_manager(), 30)
        r_dev = (await r_sm.get_own_device_information())[0].device_id
        j_dev = (await j_sm.get_own_device_information())[0].device_id
        # What the server holds: the device list (open, so any sender can start) and the bundle.
        items = await juliet.plugin["xep_0060"].get_items(JID("romeo@localhost"), f"{OLDMEMO}.devicelist")
        assert f"id=\"{r_dev}\"" in str(items)
        bundle = await juliet.plugin["xep_0060"].get_items(JID("romeo@localhost"), f"{OLDMEMO}.bundles:{r_dev}")
        assert "identityKey" in str(bundle)
        # Romeo encrypts for Juliet's devices (device list + bundle fetched from her PEP service).
        msg = romeo.make_message(mto=JID("juliet@localhost"), mbody="meet me at the balcony", mtype="chat")
        encrypted, errors = await romeo.plugin["xep_0384"].encrypt_message(msg, JID("juliet@localhost"))
        assert encrypted is not None and not errors, errors
        assert "balcony" not in str(encrypted)
        encrypted.send()
        while True:
            got = await juliet.next_message(10)
            if juliet.plugin["xep_0384"].is_encrypted(got):
                break
        assert "balcony" not in str(got)  # what crossed the server
        plain, sender = await juliet.plugin["xep_0384"].decrypt_message(got)
        assert plain["body"] == "meet me at the balcony"
        assert sender.bare_jid == "romeo@localhost" and sender.device_id == r_dev
        # And back: Juliet answers in the session Romeo's message started.
        reply = juliet.make_message(mto=JID("romeo@localhost"), mbody="by moonlight", mtype="chat")
        encrypted, errors = await juliet.plugin["xep_0384"].encrypt_message(reply, JID("romeo@localhost"))
        assert encrypted is not None and not errors, errors
        encrypted.send()
        while True:
            got = await romeo.next_message(10)
            if romeo.plugin["xep_0384"].is_encrypted(got):
                break
        plain, sender = await romeo.plugin["xep_0384"].decrypt_message(got)
        assert plain["body"] == "by moonlight" and sender.device_id == j_dev
        romeo.disconnect()
        juliet.disconnect()

    run(go(), timeout=90)
