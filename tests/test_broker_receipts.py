"""What became of a sender's mail: `status` (receipts), bounces at the TTL and `wait_s` on send.

TTL tests run a broker whose wall clock the test moves (tests/clock_broker.py, --ttl 30s: purged
every 7.5 s), so a message expires without the test waiting out its TTL.
"""

import asyncio
import json
import sqlite3
import time

import pytest

from harness import (ToolFailed, broker_module, clock_broker, db_query, eventually, http, logged, peer, start_broker,
                     until_live)

dispatch_broker = broker_module()
METRICS_TOKEN = "metrics-" + "7" * 32
TTL = 30.0


def metric(broker, name: str) -> float:
    status, _, text = http(f"http://127.0.0.1:{broker.port}/metrics",
                           headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200, text
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def postmaster_mail(broker, to: str) -> list[tuple]:
    return db_query(broker, "SELECT id, chat_id, body FROM messages WHERE sender = ? AND recipient = ?",
                    dispatch_broker.POSTMASTER, to)


async def states(sender, **filters) -> dict[str, str]:
    """recipient -> state of the sender's mail, as `status` reports it."""
    return {r["to"]: r["state"] for r in (await sender.call("status", **filters))["messages"]}


async def answered(value):
    """`value`, awaitable: for `eventually` with a plain check (a sync wait would stop the peers' loop)."""
    return value


async def acking(receiver) -> None:
    """Ack every message as it arrives, as a plugin does once its transcript shows it."""
    while True:
        mail = await receiver.inbox.get()
        await receiver.call("mail.ack", ids=[mail["id"]])


# -- status ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_status_reports_each_state_of_the_senders_own_mail_and_keeps_it_past_the_purge(broker_factory,
                                                                                              tmp_path):
    broker, jump = clock_broker(broker_factory, tmp_path, "--ttl", "30s", "--ack-timeout", "1h")
    async with (peer(broker, "backend", "backend-1") as b, peer(broker, "frontend", "frontend-away"),
                peer(broker, "frontend", "frontend-mute") as mute, peer(broker, "frontend", "frontend-ok") as ok):
        mute.listen()
        ok.listen()
        await until_live(b, "frontend-mute")
        await until_live(b, "frontend-ok")
        reader = asyncio.ensure_future(acking(ok))
        for name in ("frontend-away", "frontend-mute", "frontend-ok"):
            await b.call("send", to=name, body=f"for {name}, and some more words")
        await mute.next_mail()

        async def delivered():
            return (await states(b)).get("frontend-ok") == "delivered"
        await eventually(delivered, what="the acked message reported delivered")
        reader.cancel()

        found = {r["to"]: r for r in (await b.call("status"))["messages"]}
        assert {n: r["state"] for n, r in found.items()} == {
            "frontend-away": "stored", "frontend-mute": "pushed", "frontend-ok": "delivered"}
        assert (found["frontend-mute"]["attempts"], found["frontend-away"]["attempts"]) == (1, 0)
        assert found["frontend-ok"]["delivered_at"] and found["frontend-mute"]["delivered_at"] is None
        assert found["frontend-away"]["begins"] == "for frontend-away, and some more words"
        assert [r["to"] for r in (await b.call("status", last=1))["messages"]] == ["frontend-ok"]  # newest first
        mute_id = found["frontend-mute"]["id"]
        assert await states(b, message_id=mute_id) == {"frontend-mute": "pushed"}
        assert await states(b, chat_id=found["frontend-away"]["chat_id"]) == {"frontend-away": "stored"}

        # Only the sender sees its mail: not a recipient, by id or otherwise.
        assert (await mute.call("status", message_id=mute_id))["messages"] == []
        assert (await mute.call("status"))["messages"] == []
        with pytest.raises(ToolFailed, match="unknown chat_id"):
            await b.call("status", chat_id="backend-1~frontend-ok~00000000~" + "0" * 16)
        with pytest.raises(ToolFailed, match="bad message_id"):
            await b.call("status", message_id="m_nothex")

        # Past the TTL and the time acked mail is kept: deleted, yet its state is still told.
        b.listen()
        await until_live(mute, "backend-1")
        jump(+3600)
        await eventually(lambda: answered(not db_query(broker, "SELECT id FROM messages WHERE sender = 'backend-1'")),
                         timeout=30, what="the purge to delete backend-1's mail")
        assert await states(b) == {"frontend-away": "expired", "frontend-mute": "expired", "frontend-ok": "delivered"}
    broker.kill()


# -- bounces ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_mail_that_expires_unread_bounces_once_to_its_live_sender_and_acked_mail_never_does(broker_factory,
                                                                                                  tmp_path):
    broker, jump = clock_broker(broker_factory, tmp_path, "--ttl", "30s", "--metrics-token", METRICS_TOKEN)
    async with (peer(broker, "backend", "backend-1") as b, peer(broker, "frontend", "frontend-away") as away,
                peer(broker, "frontend", "frontend-mute") as mute, peer(broker, "frontend", "frontend-ok") as ok):
        await away.call("ping")  # known, then never again
        mute.listen()
        ok.listen()
        b.listen()
        for name in ("frontend-mute", "frontend-ok", "backend-1"):
            await until_live(away, name)
        reader = asyncio.ensure_future(acking(ok))
        body = "Deploy the fix to staging, then tell me. " * 5
        sent = await b.call("send", to="frontend", body=body)
        await mute.next_mail()
        acked = await b.call("send", to="frontend-ok", body="this one is read")
        await eventually(lambda: answered(db_query(broker, "SELECT count(*) FROM messages WHERE recipient = "
                                                           "'frontend-ok' AND acked_at IS NOT NULL") == [(2,)]),
                         what="frontend-ok's acks")

        jump(TTL + 1)
        bounce = await b.next_mail(timeout=20)

        assert bounce["from"] == dispatch_broker.POSTMASTER and bounce["to"] == "backend-1"
        text = bounce["body"]
        assert sent["chat_id"] in text and "Never read" in text
        assert "- frontend-away (m_" in text and "never connected again" in text.split("frontend-away")[1]
        assert "- frontend-mute (m_" in text and "pushed it 1 time(s), but never proved it" in text
        assert "frontend-ok" not in text and acked["chat_id"] not in text  # acked: no bounce, for either send
        assert f"It began: {json.dumps(body[:dispatch_broker.QUOTE_CHARS] + '…', ensure_ascii=False)}" in text
        assert metric(broker, "dispatch_bounces_total") == 1
        # A reply to the notice is refused, saying why; so is mail to the broker's name.
        with pytest.raises(ToolFailed, match="'postmaster' is reserved: .* nobody reads mail to it"):
            await b.call("reply", chat_id=bounce["chat_id"], body="thanks")
        with pytest.raises(ToolFailed, match="reserved"):
            await b.call("send", to="postmaster", body="hello?")

        # Once: the next purges find nothing more to bounce, and the bounce itself, never acked,
        # expires without a bounce of its own.
        since = len(broker.logs())
        jump(TTL + 1)
        await eventually(lambda: answered(f"expiry {bounce['id']}" in broker.logs()[since:]), timeout=20,
                         what="the bounce purged")
        reader.cancel()
        assert postmaster_mail(broker, "backend-1") == []
        assert metric(broker, "dispatch_bounces_total") == 1
        assert broker.logs().count(" bounce m_") == 1
    broker.kill()


@pytest.mark.faults
@pytest.mark.anyio
async def test_a_broker_restart_between_send_and_expiry_still_bounces_once(broker_factory, tmp_path):
    broker, jump = clock_broker(broker_factory, tmp_path, "--ttl", "30s")
    async with peer(broker, "backend", "backend-1") as b, peer(broker, "frontend", "frontend-away"):
        sent = await b.call("send", to="frontend-away", body="are you there?")
    broker.restart()  # kill -9, then start on the same db
    async with peer(broker, "backend", "backend-1") as b:
        b.listen()
        await until_live(b, "backend-1")
        jump(TTL + 1)
        bounce = await b.next_mail(timeout=20)
        assert sent["chat_id"] in bounce["body"]
    broker.restart()  # the purge at start finds the mail deleted and the bounce stored: nothing new

    async with peer(broker, "backend", "backend-1") as b:
        waiting = (await b.call("inbox"))["messages"]
    assert [(m["from"], m["id"]) for m in waiting] == [("postmaster", bounce["id"])]
    assert len(db_query(broker, "SELECT id FROM messages WHERE sender = 'postmaster'")) == 1
    broker.kill()


@pytest.mark.anyio
async def test_a_sender_that_is_gone_gets_no_bounce_and_it_is_counted(broker_factory, tmp_path):
    broker, jump = clock_broker(broker_factory, tmp_path, "--ttl", "30s", "--metrics-token", METRICS_TOKEN)
    async with peer(broker, "frontend", "frontend-away"):
        pass
    async with peer(broker, "backend", "backend-gone") as b:
        sent = await b.call("send", to="frontend-away", body="nobody will read this")
    jump(TTL + 1)  # neither party shows a sign of life for the TTL

    logged(broker, f"no bounce for {sent['chat_id']} (backend-gone): its sender is gone", timeout=20)
    assert db_query(broker, "SELECT count(*) FROM messages") == [(0,)]
    assert metric(broker, "dispatch_bounces_unsent_total") == 1 and metric(broker, "dispatch_bounces_total") == 0
    broker.kill()


@pytest.mark.anyio
async def test_nobody_can_take_the_postmasters_name(broker_factory):
    broker = start_broker(broker_factory)
    with pytest.raises(dispatch_broker.ConfigError, match="postmaster"):
        dispatch_broker.mint_token(broker.tokens_file, "postmaster")
    # A token of that base written by hand still cannot take the name.
    token = "dsp_postmaster_" + "ab" * 24
    tokens = dispatch_broker.read_tokens(broker.tokens_file)
    dispatch_broker.write_tokens(broker.tokens_file, tokens + [dispatch_broker.Token(
        "feedf00d", "postmaster", dispatch_broker.hash_token(token), "2026-12-07T00:00:00Z")])
    broker.reload()
    async with peer(broker, "postmaster", token=token) as p:
        for name in ("postmaster", "postmaster-1"):
            with pytest.raises(ToolFailed, match="reserved"):
                await p.call("identify", name=name)


# -- wait_s: proof at send time ----------------------------------------------------------------


@pytest.mark.anyio
async def test_send_with_wait_s_says_which_live_recipient_acked_and_which_did_not(broker_factory):
    broker = start_broker(broker_factory, "--ack-timeout", "1h")
    async with (peer(broker, "backend", "backend-1") as b, peer(broker, "frontend", "frontend-ok") as ok,
                peer(broker, "frontend", "frontend-dead") as dead, peer(broker, "frontend", "frontend-away")):
        ok.listen()
        dead.listen()  # live, but never acks: a session whose transcript never shows it
        await until_live(b, "frontend-ok")
        await until_live(b, "frontend-dead")
        reader = asyncio.ensure_future(acking(ok))

        started = time.monotonic()
        result = await b.client.call_tool("send", {"to": "frontend", "body": "prove it", "wait_s": 2})
        waited = time.monotonic() - started

        assert not result.is_error
        assert result.structured_content == {"chat_id": result.structured_content["chat_id"],
                                             "delivered_to": ["frontend-dead", "frontend-ok"], "queued": True,
                                             "dropped": [], "acked_by": ["frontend-ok"],
                                             "not_acked_by": ["frontend-dead"]}
        assert 2 <= waited < 5
        assert "In the transcript of frontend-ok (acked). Not acked within wait_s by frontend-dead" in \
            result.content[0].text

        # Every live recipient acks: answered as soon as it did, not at the end of the wait.
        started = time.monotonic()
        answer = await b.call("send", to="frontend-ok", body="quick", wait_s=20)
        assert (answer["acked_by"], answer["not_acked_by"]) == (["frontend-ok"], [])
        assert time.monotonic() - started < 5
        reader.cancel()

        # Without wait_s: at once, as before; past the bound: refused.
        assert "acked_by" not in await b.call("send", to="frontend-dead", body="no wait")
        with pytest.raises(ToolFailed):
            await b.call("send", to="frontend-ok", body="too long", wait_s=31)


def test_a_mailbox_of_the_schema_before_receipts_opens_and_keeps_its_mail(tmp_path):
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    for _, script in dispatch_broker.MIGRATIONS[:2]:
        old.executescript(script)
    old.execute("PRAGMA user_version = 2")
    old.execute("INSERT INTO messages (id, chat_id, sender, recipient, body, sent_at, expires_at) "
                "VALUES ('m_0000000000000001', 'a~b~n~m', 'backend-1', 'frontend-1', 'kept', 1.0, 9e9)")
    old.commit()
    old.close()

    store = dispatch_broker.Store(path)

    assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(dispatch_broker.MIGRATIONS)
    [row] = store.receipts("backend-1", None, None, 10)
    assert (row[0], row[3]) == ("m_0000000000000001", "kept")
    store.close()
