"""xmppd.scram: the server side of SCRAM from stored keys (issue 20), checked
against scramp's independent client."""
from __future__ import annotations

import base64

import pytest
from scramp import ScramClient, ScramMechanism

from xmppd.scram import ScramError, ScramServer, dummy_credentials

MECHS = ("SCRAM-SHA-1", "SCRAM-SHA-256")


def server_for(mech: str, password: str = "pencil", binding=None) -> ScramServer:
    salt, stored, server_key, iterations = ScramMechanism(mech).make_auth_info(password, 4096)
    return ScramServer(mech, salt, stored, server_key, iterations, binding)


@pytest.mark.parametrize("mech", MECHS)
def test_exchange_with_right_password_verifies_both_ways(mech):
    client = ScramClient([mech], "user", "pencil")
    server = server_for(mech)
    client.set_server_first(server.first(client.get_client_first()))
    client.set_server_final(server.final(client.get_client_final()))  # checks v=


@pytest.mark.parametrize("mech", MECHS)
def test_wrong_password_is_refused(mech):
    client = ScramClient([mech], "user", "wrong")
    server = server_for(mech)
    client.set_server_first(server.first(client.get_client_first()))
    with pytest.raises(ScramError, match="wrong proof"):
        server.final(client.get_client_final())


def test_channel_binding_data_must_match():
    mech = "SCRAM-SHA-256"
    client = ScramClient([mech + "-PLUS"], "user", "pencil",
                         channel_binding=("tls-server-end-point", b"the-real-channel"))
    server = server_for(mech, binding=("tls-server-end-point", b"another-channel"))
    client.set_server_first(server.first(client.get_client_first()))
    with pytest.raises(ScramError, match="channel binding"):
        server.final(client.get_client_final())
    client = ScramClient([mech + "-PLUS"], "user", "pencil",
                         channel_binding=("tls-server-end-point", b"the-real-channel"))
    server = server_for(mech, binding=("tls-server-end-point", b"the-real-channel"))
    client.set_server_first(server.first(client.get_client_first()))
    client.set_server_final(server.final(client.get_client_final()))


def test_nonce_must_be_the_servers():
    mech = "SCRAM-SHA-1"
    client = ScramClient([mech], "user", "pencil")
    server = server_for(mech)
    client.set_server_first(server.first(client.get_client_first()))
    final = client.get_client_final()
    c, r, p = final.split(",")
    with pytest.raises(ScramError, match="nonce"):
        server.final(f"{c},{r}x,{p}")


@pytest.mark.parametrize("first, why", [
    ("n,,m=ext,n=user,r=abc", "mandatory extensions"),
    ("n,,r=abc,n=user", "needs n= and r="),
    ("n,,n=user", "needs n= and r="),
    ("n,,n=user,r=", "nonce"),
    ("n,,n=user,r=a\u00e9b", "nonce"),
    ("n,,n=user,r=a b", "nonce"),
    ("n,n=user,r=abc", "needs n= and r="),
    ("n,,", "needs n= and r="),
    ("n=user,r=abc", "malformed"),
])
def test_malformed_client_first_is_refused(first, why):
    with pytest.raises(ScramError, match=why):
        server_for("SCRAM-SHA-1").first(first)


@pytest.mark.parametrize("final, why", [
    ("c=biws,r=abc", "p= last"),
    ("r=abc,c=biws,p=AAAA", "needs c= and r="),
    ("c=!!,r=abc,p=AAAA", "base64"),
])
def test_malformed_client_final_is_refused(final, why):
    server = server_for("SCRAM-SHA-1")
    server.first("n,,n=user,r=abc")
    with pytest.raises(ScramError, match=why):
        server.final(final)


def test_final_before_first_is_refused():
    with pytest.raises(ScramError, match="before client-first"):
        server_for("SCRAM-SHA-1").final("c=biws,r=abc,p=" + base64.b64encode(b"x" * 20).decode())


def test_unknown_user_credentials_refuse_any_password():
    mech = "SCRAM-SHA-1"
    client = ScramClient([mech], "ghost", "pencil")
    server = ScramServer(mech, *dummy_credentials(mech, 4096))
    client.set_server_first(server.first(client.get_client_first()))
    with pytest.raises(ScramError, match="wrong proof"):
        server.final(client.get_client_final())
