"""Floods: one token sending as fast as the broker answers, and connections that come and vanish.

The flood is FLOOD_SENDS sends from one token, over FLOOD_CONNECTIONS connections: 5,000 in CI,
the issue's 50,000 with DISPATCH_FLOOD_SENDS=50000 (RELIABILITY.md has the command). A
rate-limited send is answered only after RATE_LIMITED_PAUSE, so the flooder gets about
FLOOD_CONNECTIONS refusals a second plus RATE "mailbox full" ones: ~45 s for 5,000, ~8 minutes for
50,000. Either scale fills the mailbox to its cap in the first second and then runs tens of seconds
on refusals alone, so both prove the same things; each refusal still costs the broker a whole MCP
request (~4 ms of CPU here), which is what the probes from other bases compete with. The churn runs CHURN_ROUNDS rounds of 1,000
connections as asked. RELIABILITY.md has the figures.
"""

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection, HTTPResponse

import pytest

from harness import LEGACY_INITIALIZE, MODERN, ROOT, db_query, http, peer, start_broker, until_live, wait_for

pytestmark = pytest.mark.faults


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------------------------
# A flood of sends from one token
# --------------------------------------------------------------------------------------------

#: Sends in the flood. CI's 5,000 outlast the burst and the cap ~10 times over; the issue's
#: figure is DISPATCH_FLOOD_SENDS=50000.
FLOOD_SENDS = int(os.environ.get("DISPATCH_FLOOD_SENDS", "5000"))
#: Each connection gets one "rate limited" a second (held RATE_LIMITED_PAUSE), and RATE sends a
#: second take a token and find the mailbox full: ~110 refusals a second, ~45 s for 5,000
#: sends, ~8 minutes for 50,000. More connections would end it sooner but slow the probes past 2x on 2 cores.
FLOOD_CONNECTIONS = 60
#: The burst fills the mailbox (MAX_PENDING) and goes on into "mailbox full". The rate applies
#: to every base, so it must leave room for the probes (one every PROBE_SPACING + a round trip).
RATE, BURST, MAX_PENDING = 50, 500, 400
#: How long the flood may take, with room for a slower machine.
FLOOD_TIMEOUT = 1800
#: Probe round trips (send -> push) measured idle, before and after the flood, and during it.
PROBES = 100
#: A leak of even 5 KiB a flooding request would pass this; the broker's working set is ~75 MB.
RSS_GROWTH_KIB = 16 * 1024


#: Probes are spaced this far apart, idle and during the flood alike: back to back they run ~30%
#: faster (hot caches, no wake-ups), which would make idle look better than it is.
PROBE_SPACING = 0.02


async def probe_latencies(sender, receiver, count: int, until=None) -> list[float]:
    """Seconds from `send` to the push arriving, for `count` probes (and until `until()` is true)."""
    latencies = []
    while len(latencies) < count or (until and not until()):
        await asyncio.sleep(PROBE_SPACING)
        started = time.monotonic()
        await sender.call("send", to="other-probe", body=f"probe {len(latencies)}")
        mail = await receiver.next_mail()
        latencies.append(time.monotonic() - started)
        await receiver.call("mail.ack", ids=[mail["id"]])
    return latencies


async def listen_on(receiver) -> None:
    """Keep a listen pending, as the plugin does: each ends after MAX_LISTEN_SECONDS at most."""
    while True:
        await receiver.call("listen", wait_s=300)


@pytest.mark.anyio
async def test_a_flood_from_one_token_is_refused_clearly_and_other_bases_mail_flows_at_idle_speed(broker_factory):
    broker = start_broker(broker_factory, "--rate", str(RATE), "--burst", str(BURST), "--max-pending", str(MAX_PENDING))
    async with peer(broker, "other", "other-sink"):
        pass  # known, offline: every accepted flood message stays pending in its mailbox
    async with peer(broker, "frontend", "frontend-probe") as sender, peer(broker, "other", "other-probe") as receiver:
        listening = asyncio.ensure_future(listen_on(receiver))  # the flood outlasts one listen
        await until_live(sender, "other-probe")
        await probe_latencies(sender, receiver, 20)  # warm up
        idle = await probe_latencies(sender, receiver, PROBES)
        rss_before = rss_kib(broker.proc.pid)

        flood = subprocess.Popen([sys.executable, str(ROOT / "tests" / "flood_process.py"), broker.url,
                                  broker.token("backend"), "backend-flood", "other-sink", str(FLOOD_SENDS),
                                  str(FLOOD_CONNECTIONS)], stdout=subprocess.PIPE, text=True)
        try:
            during = await probe_latencies(sender, receiver, PROBES, until=lambda: flood.poll() is not None)
            out, _ = await asyncio.to_thread(flood.communicate, timeout=FLOOD_TIMEOUT)
        finally:
            flood.kill()
        rss_after = rss_kib(broker.proc.pid)
        idle += await probe_latencies(sender, receiver, PROBES)  # idle again: the machine's load drifts
        listening.cancel()

    report = json.loads(out)
    idle_p50, during_p50 = statistics.median(idle), statistics.median(during)
    print(f"\nflood: {report}\nprobes: idle p50 {idle_p50 * 1000:.1f} ms (n={len(idle)}), during p50 "
          f"{during_p50 * 1000:.1f} ms (n={len(during)}); RSS {rss_before} -> {rss_after} KiB")
    assert report["other"] == 0, report["examples"]
    assert report["accepted"] + report["rate_limited"] + report["mailbox_full"] == FLOOD_SENDS
    # The mailbox cap holds exactly; the rate limit holds (every send that took a token was
    # accepted or found the mailbox full), and both are said in words.
    assert report["accepted"] == MAX_PENDING
    assert db_query(broker, "SELECT count(*) FROM messages WHERE recipient = 'other-sink'") == [(MAX_PENDING,)]
    assert report["accepted"] + report["mailbox_full"] <= BURST + RATE * report["seconds"] + RATE
    assert report["rate_limited"] > 0 and report["mailbox_full"] > 0
    assert f"rate limited: base 'backend' may send {RATE} messages a second" in report["examples"]["rate_limited"]
    assert f"mailbox full ({MAX_PENDING} unacked messages, limit {MAX_PENDING})" in report["examples"]["mailbox_full"]
    # Other bases' mail: every probe arrived, and as fast as when the broker was idle (within 2x).
    assert len(during) >= PROBES
    assert during_p50 <= 2 * idle_p50, f"p50 {during_p50 * 1000:.1f} ms during the flood vs {idle_p50 * 1000:.1f} idle"
    assert rss_after - rss_before < RSS_GROWTH_KIB
    assert "Traceback" not in broker.logs()


# --------------------------------------------------------------------------------------------
# Connections that open, identify and vanish
# --------------------------------------------------------------------------------------------

CHURN = 1000
CHURN_ROUNDS = 4
#: Rounds before the baseline is taken: first-use caches and allocator arenas.
CHURN_WARMUP_ROUNDS = 2
#: What the last half of the rounds together may leave behind. A leak grows with every round; the
#: allocator's arenas stop growing, but on a loaded machine (the whole suite beside it) they still
#: grew for a round or two after the warm-up (+4.7 MB, then +2.9 MB, where the same test alone
#: measures +0.1 MB), so only the rounds after those are held to it.
CHURN_RSS_KIB = 4 * 1024


def come_and_vanish(port: int, token: str, n: int) -> str | None:
    """One client: connect, (initialize,) identify, then close the socket without a word.
    Even n: a 2025-11-25 session (returns its id); odd n: a 2026-07-28 Dispatch-Session link."""
    connection = HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    identify = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "identify", "arguments": {"name": f"backend-churn{n}"}}}
    session = None

    def post(body: dict) -> tuple[int, bytes, HTTPResponse]:
        connection.request("POST", "/mcp", json.dumps(body), headers)
        response = connection.getresponse()
        return response.status, response.read(), response

    if n % 2 == 0:
        status, _, response = post(LEGACY_INITIALIZE)
        session = response.getheader("mcp-session-id")
        headers.update({"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"})
        assert post({"jsonrpc": "2.0", "method": "notifications/initialized"})[0] == 202
    else:
        headers.update({"MCP-Protocol-Version": MODERN, "Dispatch-Session": os.urandom(8).hex(),
                        "Mcp-Method": "tools/call", "Mcp-Name": "identify"})
        identify["params"]["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                                       "io.modelcontextprotocol/clientInfo": {"name": "churn", "version": "0"},
                                       "io.modelcontextprotocol/clientCapabilities": {}}
    status, body, _ = post(identify)
    assert status == 200 and b'"isError":false' in body, (status, body[:300])
    connection.close()
    return session


def churn(broker, count: int) -> list[str]:
    """`count` clients come and vanish, 8 at a time; the legacy session ids they left."""
    token = broker.token("backend")
    with ThreadPoolExecutor(8) as pool:
        return [s for s in pool.map(lambda n: come_and_vanish(broker.port, token, n), range(count)) if s]


def settled(broker, sessions: list[str], since: int) -> None:
    """Wait until the reaper ran: every link forgotten, and each sampled session id answers 404."""
    wait_for(lambda: "; 0 remain" in broker.logs()[since:], timeout=30, what="every idle link forgotten")
    token = broker.token("backend")
    ping = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "ping"}).encode()

    def gone(session: str) -> bool:
        headers = {"Authorization": f"Bearer {token}", "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        status, _, text = http(broker.url, ping, headers)
        return status == 404 and "Session not found" in text
    for session in sessions[:: max(1, len(sessions) // 25)]:
        wait_for(lambda: gone(session), timeout=30, what=f"session {session} closed by the idle reaper")


def test_connections_that_identify_and_vanish_leave_no_sessions_fds_or_memory_behind(broker_factory):
    broker = start_broker(broker_factory, "--session-idle-timeout", "2s")  # the SDK's default is 30 min
    pid = broker.proc.pid
    for _ in range(CHURN_WARMUP_ROUNDS):
        mark = len(broker.logs())
        settled(broker, churn(broker, CHURN), mark)
    baseline = (open_fds(pid), rss_kib(pid))

    rounds = []
    for _ in range(CHURN_ROUNDS):
        mark = len(broker.logs())
        sessions = churn(broker, CHURN)
        assert len(sessions) == CHURN // 2
        settled(broker, sessions, mark)
        rounds.append((open_fds(pid), rss_kib(pid)))

    print(f"\nchurn: {CHURN_WARMUP_ROUNDS + CHURN_ROUNDS} x {CHURN} connections; fds, RSS KiB after warm-up {baseline}, "
          f"after each round {rounds}")
    for fds, _ in rounds:
        assert fds <= baseline[0] + 2  # a request in flight (a health check, the log) may hold one
    halfway = rounds[CHURN_ROUNDS // 2 - 1][1]
    assert rounds[-1][1] - halfway < CHURN_RSS_KIB, f"RSS grew {rounds[-1][1] - halfway} KiB in the last rounds"
    assert "Traceback" not in broker.logs()
