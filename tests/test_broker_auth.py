"""Who may talk to the broker, and as whom: bearer tokens, identities, chats, acks, sessions.

Each refusal is checked for what the caller sees and, where the broker logs it, for the log line.
"""

import json
import re

import pytest
from mcp.shared.exceptions import MCPError
from conftest import (
    LEGACY_INITIALIZE,
    MODERN,
    ToolFailed,
    fresh,
    http,
    logged,
    peer,
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def foreign_token(token: str) -> str:
    """`token` with its secret tail changed: well-formed, never minted."""
    tail = "0" * 8 if token[-8:] != "0" * 8 else "1" * 8
    return token[:-8] + tail


# -- bearer tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [json.dumps(LEGACY_INITIALIZE).encode(), b"{not json-rpc at all"],
                         ids=["initialize", "garbage"])
def test_mcp_endpoint_answers_401_without_a_token_before_any_mcp_processing(module_broker, body):
    status, headers, text = http(module_broker.url, body)

    # Garbage gets the same 401 as a valid initialize: the body was never parsed, no session made.
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer ")
    assert json.loads(text)["error"] == "invalid_token"
    assert "mcp-session-id" not in headers


@pytest.mark.parametrize("kind, log_line", [("unknown", "auth failure: unknown or revoked token"),
                                            ("malformed", "auth failure: malformed token")])
def test_mcp_endpoint_answers_401_and_logs_when_token_is_wrong(module_broker, kind, log_line):
    real = module_broker.token("backend")
    token = foreign_token(real) if kind == "unknown" else real[:-1]
    mark = len(module_broker.logs())

    status, headers, _ = http(module_broker.url, json.dumps(LEGACY_INITIALIZE).encode(), bearer(token))

    assert status == 401
    assert "mcp-session-id" not in headers
    logged(module_broker, log_line, since=mark)


@pytest.mark.anyio
async def test_revoked_token_gets_401_after_sighup(module_broker):
    added = module_broker.cli("token", "add", "revoked", "--tokens", str(module_broker.tokens_file))
    token, token_id = added.stdout.strip(), re.search(r"token (\S+) for base revoked", added.stderr)[1]
    module_broker.tokens["revoked"] = token
    module_broker.reload()
    initialize = json.dumps(LEGACY_INITIALIZE).encode()
    assert http(module_broker.url, initialize, bearer(token))[0] == 200
    async with peer(module_broker, "revoked", fresh("revoked")) as connected:
        module_broker.cli("token", "revoke", token_id, "--tokens", str(module_broker.tokens_file))
        mark = len(module_broker.logs())
        module_broker.reload()  # SIGHUP: the broker re-reads its tokens file

        assert http(module_broker.url, initialize, bearer(token))[0] == 401
        # A connection opened before the revocation is cut off at its next request too.
        with pytest.raises(MCPError):
            await connected.call("ping")
    logged(module_broker, "auth failure: unknown or revoked token", since=mark)


# -- identity -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["frontend-x", "backendx-1"])
async def test_identify_is_refused_when_name_is_of_another_base(module_broker, name):
    mark = len(module_broker.logs())
    async with peer(module_broker, "backend") as impostor:
        with pytest.raises(ToolFailed, match="cannot identify as"):
            await impostor.call("identify", name=name)
        with pytest.raises(ToolFailed, match="not identified"):
            await impostor.call("send", to="backend", body="sent as nobody")
    logged(module_broker, f"refused identify: token of base 'backend' asked for name {name!r}", since=mark)


# -- chats and acks -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_reply_is_refused_when_caller_is_not_a_party_of_the_chat(module_broker):
    sender, receiver, outsider = fresh("backend"), fresh("frontend"), fresh("other")
    async with (peer(module_broker, "backend", sender) as s, peer(module_broker, "frontend", receiver),
                peer(module_broker, "other", outsider) as o):
        chat_id = (await s.call("send", to=receiver, body="between us"))["chat_id"]
        mark = len(module_broker.logs())

        with pytest.raises(ToolFailed, match="not a party of chat"):
            await o.call("reply", chat_id=chat_id, body="butting in")

        assert (await s.call("inbox"))["pending"] == 0  # nothing reached the chat's starter
    logged(module_broker, f"refused reply: {outsider} is not a party of {chat_id}", since=mark)


@pytest.mark.anyio
async def test_ack_of_someone_elses_message_is_refused_and_it_stays_pending_for_its_owner(module_broker):
    sender, owner, outsider = fresh("backend"), fresh("frontend"), fresh("other")
    async with (peer(module_broker, "backend", sender) as s, peer(module_broker, "frontend", owner) as f,
                peer(module_broker, "other", outsider) as o):
        await s.call("send", to=owner, body="for the owner only")
        await s.call("send", to=outsider, body="for the outsider")
        [theirs] = [m["id"] for m in (await f.call("inbox"))["messages"]]
        [mine] = [m["id"] for m in (await o.call("inbox"))["messages"]]
        mark = len(module_broker.logs())

        with pytest.raises(ToolFailed, match="not addressed to you"):
            await o.call("mail.ack", ids=[theirs])
        # Refused whole: one foreign id in the list and not even the caller's own mail is acked.
        with pytest.raises(ToolFailed, match="nothing acked"):
            await o.call("mail.ack", ids=[mine, theirs])

        assert [m["id"] for m in (await f.call("inbox"))["messages"]] == [theirs]
        assert [m["id"] for m in (await o.call("inbox"))["messages"]] == [mine]
    logged(module_broker, f"refused ack: {outsider} tried to ack 1 messages addressed to others", since=mark)


# -- sessions -----------------------------------------------------------------------------------


def test_legacy_session_id_replayed_with_another_bases_token_is_refused(module_broker):
    backend, frontend = module_broker.token("backend"), module_broker.token("frontend")
    status, headers, _ = http(module_broker.url, json.dumps(LEGACY_INITIALIZE).encode(), bearer(backend))
    assert status == 200
    session = {"Mcp-Session-Id": headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert http(module_broker.url, json.dumps(initialized).encode(), {**bearer(backend), **session})[0] == 202
    identify = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "identify", "arguments": {"name": fresh("backend")}}}
    mark = len(module_broker.logs())

    status, _, text = http(module_broker.url, json.dumps(identify).encode(), {**bearer(frontend), **session})

    assert status == 404  # as if the session did not exist: nothing to learn about it
    assert "Session not found" in text
    logged(module_broker, "credential does not match the one that created the session", since=mark)
    # The session still works for the token that made it.
    status, _, text = http(module_broker.url, json.dumps(identify).encode(), {**bearer(backend), **session})
    assert status == 200 and '"isError":false' in text


@pytest.mark.anyio
async def test_dispatch_session_replayed_with_another_bases_token_is_refused(module_broker):
    link = {"Dispatch-Session": fresh("link")}
    owner = fresh("backend")
    async with peer(module_broker, "backend", owner, MODERN, headers=link) as b:
        mark = len(module_broker.logs())
        async with peer(module_broker, "frontend", mode=MODERN, headers=link) as thief:
            with pytest.raises(ToolFailed, match="belongs to another token"):
                await thief.call("who")
            with pytest.raises(ToolFailed, match="belongs to another token"):
                await thief.call("identify", name=fresh("frontend"))

        assert (await b.call("ping"))["name"] == owner
    logged(module_broker, "replayed with another token (base frontend)", since=mark)

