"""Who may talk to the broker, and as whom: bearer tokens, identities, chats, acks, sessions.

Each refusal is checked for what the caller sees and, where the broker logs it, for the log line.
"""

import asyncio
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mcp.shared.exceptions import MCPError
from harness import (LEGACY_INITIALIZE, MODERN, ToolFailed, broker_module, fresh, fresh_peers, http, liveness, logged,
                    peer, start_broker, until_live)

dispatch_broker = broker_module()


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
    # One line an address a window: an earlier failure from 127.0.0.1 holds this one to its count.
    logged(module_broker, log_line, since=mark, timeout=dispatch_broker.AUTH_LOG_SECONDS + 3)


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
    logged(module_broker, "auth failure: unknown or revoked token", since=mark, timeout=dispatch_broker.AUTH_LOG_SECONDS + 3)


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
    async with fresh_peers(module_broker, "backend", "frontend", "other") as (s, f, o):
        receiver, outsider = f.name, o.name
        chat_id = (await s.call("send", to=receiver, body="between us"))["chat_id"]
        mark = len(module_broker.logs())

        with pytest.raises(ToolFailed, match="not a party of chat"):
            await o.call("reply", chat_id=chat_id, body="butting in")

        assert (await s.call("inbox"))["pending"] == 0  # nothing reached the chat's starter
    logged(module_broker, f"refused reply: {outsider} is not a party of {chat_id}", since=mark)


@pytest.mark.anyio
async def test_ack_of_someone_elses_message_is_refused_and_it_stays_pending_for_its_owner(module_broker):
    async with fresh_peers(module_broker, "backend", "frontend", "other") as (s, f, o):
        owner, outsider = f.name, o.name
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



# -- hardening (issue 12) -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["backend-x\n", "backend\n", "backend-x\n\n"])
async def test_identify_and_send_are_refused_when_a_name_ends_with_a_newline(module_broker, name):
    async with peer(module_broker, "backend", fresh("backend")) as b:
        with pytest.raises(ToolFailed, match="bad name"):
            await b.call("identify", name=name)
        with pytest.raises(ToolFailed, match="bad name"):
            await b.call("send", to=name, body="to a name with a newline")


def test_token_add_is_refused_when_the_base_ends_with_a_newline(tmp_path, capsys):
    tokens = tmp_path / "tokens"

    assert dispatch_broker.main(["token", "add", "backend\n", "--tokens", str(tokens)]) == 1

    assert "bad base" in capsys.readouterr().err
    assert not tokens.exists()
    for pattern in (dispatch_broker.NAME_RE, dispatch_broker.BASE_RE, dispatch_broker.TOKEN_RE):
        # fullmatch everywhere: `$` with .match lets a trailing newline through
        assert not pattern.fullmatch("backend\n") and not pattern.fullmatch(f"dsp_backend_{'0' * 48}\n")


@pytest.mark.anyio
async def test_a_listen_of_a_revoked_token_ends_at_once_as_revoked_and_stops_counting_live(module_broker):
    added = module_broker.cli("token", "add", "cutoff", "--tokens", str(module_broker.tokens_file))
    token, token_id = added.stdout.strip(), re.search(r"token (\S+) for base cutoff", added.stderr)[1]
    module_broker.reload()
    name = fresh("cutoff")
    async with peer(module_broker, "cutoff", name, token=token) as listener, \
            peer(module_broker, "backend", fresh("backend")) as sender:
        listening = asyncio.ensure_future(listener.client.call_tool("listen", {"wait_s": 120}))
        await until_live(sender, name)
        module_broker.cli("token", "revoke", token_id, "--tokens", str(module_broker.tokens_file))
        revoked_at = time.monotonic()
        module_broker.reload()

        result = await asyncio.wait_for(listening, 10)
        took = time.monotonic() - revoked_at

        assert result.structured_content == {"ended": "revoked"}
        assert "token revoked" in result.content[0].text
        assert not (await liveness(sender)).get(name)
        sent = await sender.call("send", to=name, body="after the revocation")
        assert (sent["delivered_to"], sent["queued"]) == ([], True)
        await listener.no_mail(within=0.5)
    print(f"\nrevoked listen ended {took:.2f} s after SIGHUP was sent")
    assert took < 5


def test_failed_logins_are_logged_once_a_window_with_a_count_and_answered_ever_slower(broker_factory):
    broker = start_broker(broker_factory)
    bad = bearer(foreign_token(broker.token("backend")))
    initialize = json.dumps(LEGACY_INITIALIZE).encode()
    mark = len(broker.logs())

    with ThreadPoolExecutor(40) as pool:  # a burst of 40 failures from one address, as a scanner sends them
        statuses = list(pool.map(lambda _: http(broker.url, initialize, bad)[0], range(40)))

    assert statuses == [401] * 40
    window = dispatch_broker.AUTH_LOG_SECONDS
    log = logged(broker, "more in the last", since=mark, timeout=window + 3)
    lines = [line for line in log.splitlines() if "auth failure" in line]
    assert len(lines) == 2, lines  # the first at once, then one line with the count
    assert "from 127.0.0.1" in lines[0]
    assert re.search(r"\b39 more in the last", lines[1]), lines[1]
    # Past a few failures each further one waits, up to AUTH_MAX_DELAY.
    started = time.monotonic()
    assert http(broker.url, initialize, bad)[0] == 401
    took = time.monotonic() - started
    assert dispatch_broker.AUTH_MAX_DELAY * 0.75 <= took <= dispatch_broker.AUTH_MAX_DELAY + 1.5, took
    # A good token from the same address is not slowed.
    started = time.monotonic()
    assert http(broker.url, initialize, bearer(broker.token("backend")))[0] == 200
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("host", ["127.0.0.1:{port}.evil", "localhost:{port}.evil.example", "127.0.0.1:{port}00000",
                                  "[::1]:{port}x", "127.0.0.1.evil:{port}", "evil.example:{port}"])
def test_host_header_is_refused_unless_it_is_exactly_loopback_with_a_port(module_broker, host):
    token = bearer(module_broker.token("backend"))
    status, _, text = http(module_broker.url, json.dumps(LEGACY_INITIALIZE).encode(),
                           {**token, "Host": host.format(port=module_broker.port)})
    assert (status, "Invalid Host header" in text) == (421, True)


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}.evil", "http://localhost:{port}00000",
                                    "http://evil.example:{port}"])
def test_origin_header_is_refused_unless_it_is_exactly_loopback(module_broker, origin):
    token = bearer(module_broker.token("backend"))
    status, _, text = http(module_broker.url, json.dumps(LEGACY_INITIALIZE).encode(),
                           {**token, "Origin": origin.format(port=module_broker.port)})
    assert (status, "Invalid Origin header" in text) == (403, True)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "127.0.0.1", "localhost", "127.0.0.1:1",
                                  "[::1]:9000"])
def test_host_header_of_loopback_on_any_port_is_answered_as_through_a_tunnel(module_broker, host):
    token = bearer(module_broker.token("backend"))
    status, _, _ = http(module_broker.url, json.dumps(LEGACY_INITIALIZE).encode(),
                        {**token, "Host": host.format(port=module_broker.port),
                         "Origin": f"http://{host.format(port=module_broker.port)}"})
    assert status == 200


def test_allowed_host_is_matched_exactly_with_or_without_this_port(broker_factory):
    broker = start_broker(broker_factory, "--allowed-host", "dispatch.example.net", "--allowed-host", "proxy.example.net:8443")
    token = bearer(broker.token("backend"))

    def status(host: str) -> int:
        return http(broker.url, json.dumps(LEGACY_INITIALIZE).encode(), {**token, "Host": host})[0]

    port = broker.port
    assert [status(h) for h in ("dispatch.example.net", f"dispatch.example.net:{port}", "proxy.example.net:8443")] == [200] * 3
    assert [status(h) for h in ("dispatch.example.net.evil", f"dispatch.example.net:{port}.evil", "dispatch.example.net:1",
                                "proxy.example.net", f"proxy.example.net:{port}", "xdispatch.example.net")] == [421] * 6


# -- forwarded addresses and what reaches the log (issue 21) ----------------------------------------


def test_x_forwarded_for_from_loopback_is_ignored_when_no_proxy_is_trusted(broker_factory):
    """A local client rotating X-Forwarded-For must not get an address (no delay, a log line) per try."""
    broker = start_broker(broker_factory)
    bad = bearer(foreign_token(broker.token("backend")))
    initialize = json.dumps(LEGACY_INITIALIZE).encode()
    mark = len(broker.logs())

    with ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(lambda n: http(broker.url, initialize, {**bad, "X-Forwarded-For": f"203.0.113.{n}"})[0],
                                 range(30)))

    assert statuses == [401] * 30
    log = logged(broker, "more in the last", since=mark, timeout=dispatch_broker.AUTH_LOG_SECONDS + 3)
    lines = [line for line in log.splitlines() if "auth failure" in line]
    print(f"\n30 failures with 30 forwarded addresses: {len(lines)} log lines")
    assert len(lines) == 2 and all("from 127.0.0.1" in line for line in lines), lines
    assert "203.0.113." not in log


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client_and_is_logged_with_controls_escaped(broker_factory):
    # Set by the environment, as a unit would: DISPATCH_TRUSTED_PROXY = --trusted-proxy.
    broker = broker_factory()
    broker.env = {**os.environ, "DISPATCH_TRUSTED_PROXY": "127.0.0.1,::1"}
    broker.mint("backend").start()
    bad = bearer(foreign_token(broker.token("backend")))
    initialize = json.dumps(LEGACY_INITIALIZE).encode()
    mark = len(broker.logs())
    # U+009B is CSI and U+009D OSC on their own (a terminal reads `CSI 2J` as ESC[2J: clear the
    # screen); h11 lets bytes 0x80-0xff through in a header value, unlike ESC itself.
    hostile = "\x9b2J\x9d0;owned\x9c"

    assert http(broker.url, initialize, {**bad, "X-Forwarded-For": "198.51.100.7"})[0] == 401
    assert http(broker.url, initialize, {**bad, "X-Forwarded-For": hostile})[0] == 401

    logged(broker, "from 198.51.100.7", since=mark)
    log = logged(broker, "owned", since=mark)
    assert "\\x9b2J\\x9d0;owned\\x9c" in log, log[-500:]
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", log), ascii(log[-500:])


# -- links and sessions one token may hold (issue 21) ------------------------------------------------

#: The _meta a 2026-07-28 call carries.
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {}}
METRICS_TOKEN = "metrics-token-for-tests"


def modern_call(broker, token: str, link: str, tool: str, **arguments) -> tuple[bool, str]:
    """One 2026-07-28 tool call over raw HTTP on link `link`: (is error, text)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments, "_meta": META}}
    status, _, text = http(broker.url, json.dumps(body).encode(),
                           {**bearer(token), "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool,
                            "Dispatch-Session": link})
    assert status == 200, text[:300]
    result = json.loads(text)["result"]
    return result["isError"], " ".join(c.get("text", "") for c in result["content"])


def rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024


def links_gauge(broker) -> int:
    _, _, text = http(f"http://127.0.0.1:{broker.port}/metrics", headers=bearer(METRICS_TOKEN))
    return int(re.search(r"^dispatch_links (\d+)$", text, re.M)[1])


def with_env(broker, **variables: str):
    """`broker` (not yet started) with these settings in its environment: a setting an older
    broker lacks is then ignored there, so a test of it fails on that broker's behaviour, not at its start."""
    broker.env = {**os.environ, **variables}
    return broker


def test_requests_with_new_60_kb_link_ids_grow_the_broker_by_less_than_8_mb(broker_factory):
    broker = start_broker(broker_factory)
    token = broker.token("backend")

    def ping(n: int) -> None:
        is_error, text = modern_call(broker, token, f"{n:08x}" + "x" * 60_000, "ping")
        assert is_error, text

    for n in range(40):  # the allocator's pools and the SDK's caches warm up first
        ping(n)
    before = rss_mb(broker.proc.pid)
    for n in range(40, 440):
        ping(n)
    grown = rss_mb(broker.proc.pid) - before
    print(f"\n400 pings with new 60 KB link ids: RSS {before:.1f} MB -> +{grown:.1f} MB")
    assert grown < 8


def test_a_request_that_never_identifies_leaves_no_link_behind(broker_factory):
    broker = with_env(broker_factory(), DISPATCH_METRICS_TOKEN=METRICS_TOKEN).mint("backend").start()
    token = broker.token("backend")
    before = links_gauge(broker)

    answers = [modern_call(broker, token, os.urandom(16).hex(), tool) for tool in ("ping", "who", "inbox") * 10]

    assert all(is_error and "not identified" in text for is_error, text in answers), answers[:3]
    assert links_gauge(broker) == before


def test_identify_on_a_new_link_is_refused_past_max_links_while_other_tokens_still_connect(broker_factory):
    broker = with_env(broker_factory(), DISPATCH_MAX_LINKS="3").mint("backend", "frontend").start()
    backend = broker.token("backend")
    links = [os.urandom(16).hex() for _ in range(4)]
    mark = len(broker.logs())

    answers = [modern_call(broker, backend, link, "identify", name=fresh("backend")) for link in links]

    assert [is_error for is_error, _ in answers] == [False, False, False, True], answers
    assert "holds 3 connections, the limit (--max-links 3)" in answers[3][1]
    assert modern_call(broker, backend, links[0], "ping") [0] is False  # its links still work
    assert modern_call(broker, broker.token("frontend"), os.urandom(16).hex(), "identify", name=fresh("frontend"))[0] is False
    logged(broker, "refused link: token", since=mark)


def legacy_session(broker, token: str) -> tuple[int, str | None]:
    status, headers, _ = http(broker.url, json.dumps(LEGACY_INITIALIZE).encode(), bearer(token))
    return status, headers.get("mcp-session-id")


def test_one_token_opens_only_its_share_of_mcp_sessions_and_other_tokens_still_open_theirs(broker_factory):
    broker = with_env(broker_factory(), DISPATCH_MAX_LINKS="20").mint("backend", "frontend").start()
    backend = broker.token("backend")
    mark = len(broker.logs())

    opened = [legacy_session(broker, backend) for _ in range(20)]
    refused, _, text = http(broker.url, json.dumps(LEGACY_INITIALIZE).encode(), bearer(backend))

    assert [status for status, _ in opened] == [200] * 20
    assert (refused, "Too many open sessions" in text) == (503, True), text
    assert legacy_session(broker, broker.token("frontend"))[0] == 200
    logged(broker, "refused MCP session: token", since=mark)
    # Room comes back as its own sessions end.
    ended = http(broker.url, None, {**bearer(backend), "Mcp-Session-Id": opened[0][1], "MCP-Protocol-Version": "2025-11-25"},
                 method="DELETE")
    assert ended[0] == 200
    assert legacy_session(broker, backend)[0] == 200
