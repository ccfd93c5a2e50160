"""GET /metrics: what an operator watches, in the Prometheus text format, behind its own bearer.

Parsed with prometheus_client's own text-format parser (the reference client library's), so a
line Prometheus would reject fails here too.
"""

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ToolFailed, fresh, http, peer, start_broker

METRICS_TOKEN = "metrics-" + "5" * 32


def scrape(broker, token: str | None = METRICS_TOKEN) -> tuple[int, str, str]:
    """(status, content type, body) of GET /metrics."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, answer_headers, text = http(f"http://127.0.0.1:{broker.port}/metrics", headers=headers)
    return status, answer_headers.get("content-type", ""), text


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from a strict parse of the whole page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: dict, name: str, **labels) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_off_unless_a_metrics_token_is_set(broker):
    assert scrape(broker)[0] == 404


@pytest.mark.anyio
async def test_metrics_need_the_metrics_bearer_and_counters_move_as_mail_is_sent_refused_and_acked(broker_factory):
    broker = start_broker(broker_factory, "--metrics-token", METRICS_TOKEN, "--ack-timeout", "1s")
    assert scrape(broker, None)[0] == 401
    assert scrape(broker, "wrong")[0] == 401
    assert scrape(broker, broker.token("backend"))[0] == 401  # a mail token is not a metrics token
    status, content_type, text = scrape(broker)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    before = samples(text)
    sender, receiver = fresh("backend"), fresh("frontend")
    body = "a body no metric may show"

    async with peer(broker, "backend", sender) as b, peer(broker, "frontend", receiver) as f:
        f.listen()
        for _ in range(50):
            if receiver in {p["name"] for p in (await b.call("who"))["participants"] if p["live"]}:
                break
        await b.call("send", to=receiver, body=body)
        await b.call("send", to=receiver, body=body + " again")
        first, second = await f.next_mail(), await f.next_mail()
        await f.call("mail.ack", ids=[first["id"]])
        redelivered = await f.next_mail(timeout=5)  # the unacked one, after the 1 s ack timeout
        assert redelivered["id"] == second["id"]
        with pytest.raises(ToolFailed, match="unknown recipient"):
            await b.call("send", to="nobody-1", body=body)
        with pytest.raises(ToolFailed, match="body is"):
            await b.call("send", to=receiver, body="x" * 70_000)
        http(broker.url, json.dumps({}).encode(), {"Authorization": "Bearer dsp_backend_" + "0" * 48})

        status, _, text = scrape(broker)
        after = samples(text)
        assert value(after, "dispatch_participants_live") == 1
        assert value(after, "dispatch_links") >= 2

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("dispatch_sends_total") == 2
    assert moved("dispatch_messages_stored_total") == 2
    assert moved("dispatch_pushes_total") >= 3
    assert moved("dispatch_redeliveries_total") >= 1
    assert moved("dispatch_acks_total") == 1
    assert moved("dispatch_refusals_total", reason="unknown_recipient") == 1
    assert moved("dispatch_refusals_total", reason="body_too_large") == 1
    assert moved("dispatch_auth_failures_total", reason="unknown") == 1
    assert value(after, "dispatch_mail_pending") == 1
    assert value(after, "dispatch_database_bytes") > 0
    assert value(after, "dispatch_database_limit_bytes") > value(after, "dispatch_database_bytes")
    # Nothing that names anyone or says anything: no names, bodies or tokens.
    for secret in (sender, receiver, "backend-", "frontend-", body, broker.token("backend"), METRICS_TOKEN, "dsp_"):
        assert secret not in text
