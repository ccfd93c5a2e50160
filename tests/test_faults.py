"""Faults: the broker killed mid-flood, a receiver killed before its ack, a connection that goes
silent, a full disk, a wall clock that jumps. Every accepted message reaches the receiving
transcript exactly once; every refused one is reported to its sender.

Real processes throughout (broker, plugins); senders are the CLI's own one-shot client in threads.
What the test adds: a TCP proxy that holds an ack or goes silent, a tmpfs it fills, and a broker
whose wall clock it can move (tests/clock_broker.py). RELIABILITY.md has the counts.
"""

import asyncio
import contextlib
import errno
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest

import dispatch_plugin
from harness import (BrokerProcess, Proxy, ToolFailed, broker_clock_moved, clock_broker, connected, db_query, peer,
                    plugin_env, start_broker, until_live, wait_connected, wait_for)

pytestmark = pytest.mark.faults


# --------------------------------------------------------------------------------------------
# Helpers: one-shot senders, plugin transcripts
# --------------------------------------------------------------------------------------------


def oneshot(broker: BrokerProcess, base: str, name: str) -> dispatch_plugin.BrokerClient:
    """The CLI's client (one HTTP POST a call, 2026-07-28 era), in this process."""
    config = dispatch_plugin.Config(url=broker.url, token=broker.token(base), base=base, name=name,
                                    token_source="test")
    return dispatch_plugin.BrokerClient(config)


@dataclass
class Attempt:
    """One `send` as its caller saw it."""

    body: str
    started: float
    ended: float
    ok: bool
    error: str = ""


#: A sender that found the broker down waits this long before its next message (not a retry: the
#: failed message stays failed), so the outage costs each sender a few messages, not all of them.
DOWN_PAUSE = 0.5


def push_messages(client: dispatch_plugin.BrokerClient, to: str, count: int, attempts: list[Attempt]) -> None:
    """Send `count` numbered messages as the CLI does (identify, then send); record each outcome."""
    identified = False
    for n in range(count):
        body = f"{client.config.name} #{n}"
        started = time.monotonic()
        try:
            if not identified:
                client.identify()
                identified = True
            client.call("send", to=to, body=body)
        except dispatch_plugin.DispatchError as exc:
            attempts.append(Attempt(body, started, time.monotonic(), False, str(exc)))
            identified = False  # a restarted broker knows no links: identify again
            if isinstance(exc, dispatch_plugin.BrokerDown):
                time.sleep(DOWN_PAUSE)
            continue
        attempts.append(Attempt(body, started, time.monotonic(), True))


def events_with(plugin, message_id: str) -> list[dict]:
    return [e for e in plugin.channel if e["meta"]["message_id"] == message_id]


def message_id_of(broker: BrokerProcess, body: str) -> str:
    [(message_id,)] = db_query(broker, "SELECT id FROM messages WHERE body = ?", body)
    return message_id


def acked(broker: BrokerProcess, message_id: str) -> bool:
    return db_query(broker, "SELECT acked_at IS NOT NULL FROM messages WHERE id = ?", message_id) == [(1,)]


# --------------------------------------------------------------------------------------------
# The broker is SIGKILLed while 10 senders push 1,000 messages
# --------------------------------------------------------------------------------------------

#: The broker is killed once this many sends were accepted: mid-flood, with mail still in flight.
KILL_AFTER = 300


#: (senders, messages each): 1,000 messages either way; with 50 senders most commits are shared.
@pytest.mark.parametrize("senders, per_sender", [(10, 100), (50, 20)], ids=["10-senders", "50-senders"])
def test_every_accepted_send_is_delivered_exactly_once_when_the_broker_is_sigkilled_mid_flood(plugins, broker_factory,
                                                                                              senders, per_sender):
    broker = start_broker(broker_factory, "--rate", "0", "--ack-timeout", "2s")
    receivers = [f"frontend-r{i}" for i in range(2)]
    channels = {name: connected(plugins(plugin_env(broker, "frontend", name))) for name in receivers}
    attempts: dict[str, list[Attempt]] = {f"backend-s{i}": [] for i in range(senders)}
    threads = [threading.Thread(target=push_messages, daemon=True,
                                args=(oneshot(broker, "backend", name), receivers[i % 2], per_sender, attempts[name]))
               for i, name in enumerate(attempts)]
    for t in threads:
        t.start()

    def accepted() -> int:
        return sum(a.ok for log in attempts.values() for a in list(log))

    wait_for(lambda: accepted() >= KILL_AFTER, timeout=120, what=f"{KILL_AFTER} accepted sends")
    killing = time.monotonic()
    broker.kill()  # SIGKILL: no shutdown, no checkpoint, requests cut mid-way
    killed = time.monotonic()
    # Every sender is told while the broker is down: a send that finds no broker fails.
    wait_for(lambda: all(any(not a.ok and a.started > killed for a in list(log)) for log in attempts.values()),
             timeout=30, what="a failed send reported to every sender while the broker is down")
    broker.start()  # same port, db and tokens
    restarted = time.monotonic()
    for t in threads:
        t.join(timeout=180)
        assert not t.is_alive(), "a sender did not finish within 180 s"

    # Delivered means acked by the receiving plugin after it wrote the event: wait for every row.
    wait_for(lambda: db_query(broker, "SELECT count(*) FROM messages WHERE acked_at IS NULL") == [(0,)],
             timeout=120, interval=0.5, what="every stored message acked by its receiver")
    for plugin in channels.values():
        wait_connected(plugin)  # its answer comes after every channel event written before it

    everything = [a for log in attempts.values() for a in log]
    ok = {a.body for a in everything if a.ok}
    failed = [a for a in everything if not a.ok]
    # A send cut by the kill itself may have been stored before its answer was lost: the caller
    # was told it failed, and it may still arrive. Only those may arrive without a success.
    in_flight = {a.body for a in failed if a.started <= killed and a.ended >= killing}
    during_outage = [a for a in failed if killed < a.started < restarted]
    after_restart = [a for a in failed if a.started >= restarted]
    events = [(name, e) for name, p in channels.items() for e in p.channel]
    bodies = [e["content"] for _, e in events]
    delivered = set(bodies)
    duplicates = len(bodies) - len(delivered)
    stored = {body for (body,) in db_query(broker, "SELECT body FROM messages")}
    pushed_again = len(re.findall(r" \(attempt [2-9]\d*\)", broker.logs()))  # what the plugins had to drop
    print(f"\nsigkill mid-flood: sent {len(everything)}, accepted {len(ok)}, failed {len(failed)} "
          f"({len(in_flight)} cut by the kill, {len(during_outage)} while down, {len(after_restart)} after the "
          f"restart: {sorted({a.error[:60] for a in after_restart})}), delivered {len(delivered)}, "
          f"duplicates {duplicates} (pushed again by the broker: {pushed_again}), delivered though reported "
          f"failed {len(delivered - ok)}")

    assert len(everything) == senders * per_sender
    assert duplicates == 0
    assert ok <= delivered, f"accepted but never delivered: {sorted(ok - delivered)[:10]}"
    assert delivered - ok <= in_flight, f"delivered without being accepted: {sorted(delivered - ok - in_flight)}"
    assert stored == delivered  # nothing stored that the transcripts lack, nothing shown that was not stored
    assert during_outage and all("cannot reach" in a.error or "not identified" in a.error for a in during_outage)
    for name, event in events:  # each in its receiver's transcript, from its real sender
        sender = event["content"].split(" #")[0]
        assert (event["meta"]["to"], event["meta"]["from"]) == (name, sender)
        assert receivers[int(sender.removeprefix("backend-s")) % 2] == name
    assert "Traceback" not in broker.logs()


# --------------------------------------------------------------------------------------------
# A receiver dies after the push, before its ack
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["ack-held-on-the-wire", "stopped-then-killed"])
def test_mail_pushed_to_a_plugin_killed_before_its_ack_reaches_the_next_plugin_of_that_name_once(
        plugins, broker_factory, how):
    broker = start_broker(broker_factory, "--ack-timeout", "2s")
    name, body = "frontend-crashy", f"pushed, never acked ({how})"
    proxy = Proxy(broker.port, ack="silence") if how == "ack-held-on-the-wire" else None
    try:
        env = plugin_env(broker, "frontend", name)
        first = connected(plugins({**env, "DISPATCH_URL": proxy.url} if proxy else env))
        if not proxy:
            first.proc.send_signal(signal.SIGSTOP)  # the push lands in its socket; it never reads it
        sender = oneshot(broker, "backend", "backend-1")
        sender.identify()
        sender.call("send", to=name, body=body)
        message_id = message_id_of(broker, body)
        if proxy:
            assert first.wait_channel(1)[0]["meta"]["message_id"] == message_id  # written to its transcript
            wait_for(proxy.held.is_set, timeout=15, what="its ack held by the proxy")
        else:
            wait_for(lambda: f"push {message_id} to {name} (attempt 1)" in broker.logs(), timeout=15,
                     what="the push to the stopped plugin")
        first.kill()  # SIGKILL (a stopped process dies too)
        assert not acked(broker, message_id)

        second = plugins(env)  # same name, straight to the broker
        second.handshake()
        [event] = second.wait_channel(1, timeout=40)
        assert (event["content"], event["meta"]["message_id"], event["meta"]["from"]) == (body, message_id, "backend-1")
        wait_for(lambda: acked(broker, message_id), timeout=20, what="the successor's ack")
        wait_connected(second)  # any later duplicate would have been written before this answer
        assert len(events_with(second, message_id)) == 1 and len(second.channel) == 1
        assert "(attempt 2)" in broker.logs().split(f"push {message_id} to {name} (attempt 1)")[1]
    finally:
        if proxy:
            proxy.close()


# --------------------------------------------------------------------------------------------
# The listener's connection goes silent without closing
# --------------------------------------------------------------------------------------------


#: After the plugin gives up on a silent stream: the new listen's request, and room for a loaded
#: machine; well short of the listen's own read deadline (LISTEN_SECONDS + HEARTBEAT_SECONDS).
RECONNECT_SLACK = 5.0


def test_plugin_listens_again_when_its_connection_goes_silent_and_mail_sent_meanwhile_arrives_once(plugins,
                                                                                                 broker_factory):
    broker = start_broker(broker_factory, "--ack-timeout", "2s")
    name = "frontend-quiet"
    proxy = Proxy(broker.port)
    try:
        plugin = connected(plugins({**plugin_env(broker, "frontend", name), "DISPATCH_URL": proxy.url}))
        mark = len(broker.logs())
        sender = oneshot(broker, "backend", "backend-1")
        sender.identify()

        assert proxy.silence() >= 1  # the pending listen (and any pooled connection) go quiet
        silenced = time.monotonic()
        result, _ = sender.call("send", to=name, body="sent into the silence")
        assert result["delivered_to"] == [name]  # the broker still believes in that listen

        # The broker writes a keepalive on the listen's stream every few seconds; the plugin takes
        # HEARTBEAT_SECONDS without one for a dead connection and listens again on a new one,
        # which takes over from the frozen listen. (A ping could not tell: it would go over a
        # fresh connection, which the proxy forwards.)
        bound = dispatch_plugin.HEARTBEAT_SECONDS
        wait_for(lambda: f"listen {name}: a newer session takes over" in broker.logs()[mark:], timeout=bound + 30,
                 interval=0.2, what="the plugin to listen again on a new connection")
        took = time.monotonic() - silenced
        print(f"\nsilent connection: noticed and listening again after {took:.1f} s (bound {bound:.0f} s)")
        assert took < bound + RECONNECT_SLACK

        [event] = plugin.wait_channel(1, timeout=30)
        assert (event["content"], event["meta"]["from"]) == ("sent into the silence", "backend-1")
        message_id = event["meta"]["message_id"]
        wait_for(lambda: acked(broker, message_id), timeout=40, what="the ack on a new connection")
        wait_connected(plugin)
        assert len(events_with(plugin, message_id)) == 1
    finally:
        proxy.close()


# --------------------------------------------------------------------------------------------
# The disk fills up
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path, size: str = "4m"):
    """A tmpfs of `size` mounted at `path` (root only; skips where it cannot mount)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() if mounted else 'not root'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path) -> int:
    """Write `path` until the filesystem is full; the bytes written."""
    written, chunk = 0, b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 2]


def integrity(db_path) -> str:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


@pytest.mark.anyio
async def test_send_fails_with_a_clear_error_while_the_disk_is_full_and_works_again_when_space_returns(
        broker_factory, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        broker = broker_factory().mint("backend", "frontend")
        broker.db = disk / "dispatch.db"  # the log and tokens stay on the real disk
        broker.start()
        async with peer(broker, "backend", "backend-1") as b, peer(broker, "frontend", "frontend-1") as f:
            f.listen()
            await until_live(b, "frontend-1")
            await b.call("send", to="frontend-1", body="before")
            assert (await f.next_mail())["body"] == "before"
            # Empty the WAL into the db and truncate it, so the broker's next write must grow a file.
            checkpoint = sqlite3.connect(broker.db, timeout=5)
            assert checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            checkpoint.close()
            fill(disk / "filler")

            refusals = []
            for n in range(5):
                with pytest.raises(ToolFailed) as refused:
                    await b.call("send", to="frontend-1", body=f"while full {n}")
                refusals.append(str(refused.value))
            assert all("nothing was stored" in r and "disk is full" in r for r in refusals), refusals
            assert (await b.call("ping"))["name"] == "backend-1"  # the heartbeat still answers
            cli = oneshot(broker, "frontend", "frontend-cli")  # and so does a new identify
            assert (await asyncio.to_thread(cli.identify))["name"] == "frontend-cli"
            await f.no_mail(within=1.0)

            (disk / "filler").unlink()
            result = await b.call("send", to="frontend-1", body="after")
            assert result["delivered_to"] == ["frontend-1"]
            assert (await f.next_mail())["body"] == "after"
            await f.call("mail.ack", ids=[m["id"] for m in (await f.call("inbox"))["messages"]])
        bodies = [body for (body,) in db_query(broker, "SELECT body FROM messages ORDER BY sent_at")]
        assert bodies == ["before", "after"]  # not one refused send was stored
        assert integrity(broker.db) == "ok"
        broker.kill()


@pytest.mark.anyio
async def test_concurrent_sends_of_a_failed_group_commit_each_fail_with_the_disk_error_and_reads_still_answer(
        broker_factory, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        broker = broker_factory().mint("backend", "frontend")
        broker.db = disk / "dispatch.db"
        broker.start()
        async with contextlib.AsyncExitStack() as stack:
            f = await stack.enter_async_context(peer(broker, "frontend", "frontend-1"))
            senders = [await stack.enter_async_context(peer(broker, "backend", f"backend-{i}")) for i in range(5)]
            await senders[0].call("send", to="frontend-1", body="before")
            checkpoint = sqlite3.connect(broker.db, timeout=5)
            assert checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            checkpoint.close()
            fill(disk / "filler")

            # Sends that arrive together share commits: each fails as a lone send would, with its own answer.
            outcomes = await asyncio.gather(*(s.call("send", to="frontend-1", body=f"while full {s.name} {n}")
                                              for s in senders for n in range(4)), return_exceptions=True)
            assert all(isinstance(o, ToolFailed) for o in outcomes), outcomes
            assert all("nothing was stored" in str(o) and "disk is full" in str(o) for o in outcomes), outcomes
            # Reads use their own connection and are not in any commit: they answer meanwhile.
            who, pending = await asyncio.gather(f.call("who"), f.call("inbox", peek=True))
            assert {p["name"] for p in who["participants"]} >= {"frontend-1", "backend-0"}
            assert pending["pending"] == 1

            (disk / "filler").unlink()
            after = await asyncio.gather(*(s.call("send", to="frontend-1", body=f"after {s.name}") for s in senders))
            assert all(a["queued"] for a in after)
        bodies = sorted(body for (body,) in db_query(broker, "SELECT body FROM messages"))
        assert bodies == ["after backend-0", "after backend-1", "after backend-2", "after backend-3", "after backend-4",
                          "before"]  # not one refused send was stored
        assert integrity(broker.db) == "ok"
        broker.kill()


def test_broker_refuses_to_start_and_names_the_file_when_its_database_is_on_a_read_only_filesystem(
        broker_factory, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        broker = broker_factory().mint("backend")
        broker.db = disk / "dispatch.db"
        broker.start()
        assert broker.stop() == 0  # a mailbox with its schema; now the filesystem turns read-only
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        assert remounted.returncode == 0, remounted.stderr

        with pytest.raises(AssertionError, match="broker exited with 1"):
            broker.start()
        last = broker.logs().strip().splitlines()[-1]
        assert last.startswith(f"Error: cannot open the mailbox {broker.db}: unable to open database file"), last
        assert "Traceback" not in broker.logs()


# --------------------------------------------------------------------------------------------
# The wall clock jumps (a broker whose time.time the test moves; the machine's clock is untouched)
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unacked_mail_is_still_pushed_again_after_the_wall_clock_jumps_back(broker_factory, tmp_path):
    broker, jump = clock_broker(broker_factory, tmp_path, "--ack-timeout", "1s")
    async with peer(broker, "backend", "backend-1") as b, peer(broker, "frontend", "frontend-1") as f:
        f.listen()
        await until_live(b, "frontend-1")
        await b.call("send", to="frontend-1", body="ack me")
        first = await f.next_mail()
        jump(-3600)  # an NTP step back, a VM restored from a snapshot
        await broker_clock_moved(b, -3600)

        again = await f.next_mail(timeout=10)  # ack timeout 1 s + housekeeping, not an hour

        assert (again["id"], first["attempt"], again["attempt"]) == (first["id"], 1, 2)
    broker.kill()


@pytest.mark.anyio
async def test_mail_whose_ttl_the_wall_clock_jumps_past_is_never_delivered_and_is_purged(broker_factory, tmp_path):
    broker, jump = clock_broker(broker_factory, tmp_path, "--ttl", "30s")  # purged every 7.5 s
    async with peer(broker, "backend", "backend-1") as b:
        async with peer(broker, "frontend", "frontend-1"):
            pass
        await b.call("send", to="frontend-1", body="stale after the jump")
        jump(+7200)
        await broker_clock_moved(b, +7200)

        async with peer(broker, "frontend", "frontend-1") as f:
            assert (await f.call("inbox"))["pending"] == 0
            f.listen()
            await until_live(b, "frontend-1")
            await f.no_mail(within=1.5)
        wait_for(lambda: "(backend-1 -> frontend-1): not acked within the TTL" in broker.logs(), timeout=30,
                 what="the expired mail purged")
        # Only the bounce to its sender (seen after the jump, by its pings) is left.
        assert db_query(broker, "SELECT sender, recipient FROM messages") == [("postmaster", "backend-1")]
    broker.kill()


@pytest.mark.anyio
async def test_rate_limit_and_listen_deadline_run_on_the_monotonic_clock_when_the_wall_clock_jumps(
        broker_factory, tmp_path):
    broker, jump = clock_broker(broker_factory, tmp_path, "--rate", "0.1", "--burst", "2")
    async with peer(broker, "backend", "backend-1") as b, peer(broker, "frontend", "frontend-1") as f:
        for n in range(2):
            await b.call("send", to="frontend-1", body=f"burst {n}")
        wait_s, started = 8, time.monotonic()
        listening = f.listen(wait_s=wait_s)
        await until_live(b, "frontend-1")
        jump(+7200)  # two hours "pass": a wall-clock bucket would be full again, a deadline long gone
        await broker_clock_moved(b, +7200)

        with pytest.raises(ToolFailed, match="rate limited"):
            await b.call("send", to="frontend-1", body="still limited")
        assert not listening.done(), "the listen ended at the jump (or the machine is very slow)"
        assert (await listening)["ended"] == "timeout"
        assert time.monotonic() - started >= wait_s - 0.5  # ran its full time, not cut short
    broker.kill()


# --------------------------------------------------------------------------------------------
# Kept-alive connections the broker closed
# --------------------------------------------------------------------------------------------

def test_a_client_whose_kept_alive_connections_all_went_stale_is_answered_at_its_next_call(broker):
    """Calls made side by side leave the client one kept-alive connection each; the broker closes
    every one of them once idle for its keep-alive. The next call, an ack say, which nothing
    retries, is answered: not failed on a second closed connection after the first."""
    import dispatch_broker

    client = oneshot(broker, "backend", "backend-1")
    client.identify()
    barrier = threading.Barrier(6)

    def side_by_side(_) -> None:
        barrier.wait(10)
        client.call("ping")

    for _ in range(5):
        threads = [threading.Thread(target=side_by_side, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(client.idle) >= 3, "the calls did not overlap: nothing to go stale"
    time.sleep(dispatch_broker.KEEP_ALIVE_SECONDS + 1)
    assert client.call("mail.ack", ids=[])[0]["acked"] == 0
