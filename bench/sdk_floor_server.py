"""The SDK's floor: the least the broker's mandated stack costs for one message, without Dispatch.

    python bench/sdk_floor_server.py PORT DB TOKEN [SYNCHRONOUS]

    stdlib client ──POST tools/call send──▶ MCPServer (the mcp SDK's streamable HTTP, bearer auth)
                                            on uvicorn ──▶ SQLite (WAL, FULL): one INSERT + COMMIT
    stdlib client ◀── notification on the stream of its pending tools/call listen ◀──┘
    stdlib client ──POST tools/call ack (ids)──▶ one UPDATE + COMMIT

What the broker does for a send, kept to what the SDK and a durable store need: the same SDK
apps (MCPServer.streamable_http_app: a send answered as JSON, a listen as an event stream, routed
by the broker's own `by_tool`), the same bearer auth through the SDK, the same 2026-07-28 POSTs
from the plugin's own BrokerClient, one FULL commit, and the push as a notification related to
the listen call, as the broker sends it, and an ack that marks a batch of ids in one commit, as
`mail.ack` does. No names, no checks, no stdio. SYNCHRONOUS is SQLite's level, FULL unless
given: the throughput section runs it OFF, so that no commit waits on the disk and what is left is
the stack's own ceiling. The latency section times a send → notification
beside Dispatch's send → channel (bench/floor.py, SdkFloor); the throughput section runs the same
crowds through it (bench/throughput.py, sdk_floor).
"""

import asyncio
import gc
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dispatch_broker import by_tool  # noqa: E402  (the broker's routing between the SDK's two apps)


class Mail(BaseModel):
    method: str = "notifications/dispatch/mail"
    params: dict[str, Any]


class OneToken:
    """The SDK's token_verifier for a single bearer token."""

    def __init__(self, token: str):
        self.token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if token != self.token:
            return None
        return AccessToken(token=token, client_id="bench", scopes=[])


def app(db_path: str, token: str, synchronous: str = "FULL"):
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE IF NOT EXISTS m (id INTEGER PRIMARY KEY, recipient TEXT, body TEXT, sent_at REAL, "
               "acked_at REAL)")
    server = MCPServer("sdk-floor", token_verifier=OneToken(token),
                       auth=AuthSettings(issuer_url="http://127.0.0.1", resource_server_url=None))
    listening: dict[str, asyncio.Queue] = {}  # by name: a send before its listen waits there

    def queue_of(name: str) -> asyncio.Queue:
        return listening.setdefault(name, asyncio.Queue())

    @server.tool()
    async def send(to: str, body: str) -> dict[str, Any]:
        """Store one message durably and hand it to the recipient's listen."""
        db.execute("BEGIN IMMEDIATE")
        cursor = db.execute("INSERT INTO m (recipient, body, sent_at) VALUES (?, ?, ?)", (to, body, time.time()))
        db.execute("COMMIT")
        queue_of(to).put_nowait({"id": cursor.lastrowid, "body": body})
        return {"id": cursor.lastrowid}

    @server.tool()
    async def listen(name: str, ctx: Context) -> dict[str, Any]:
        """Push each message for `name` on this call's stream, until the client goes away."""
        queue = queue_of(name)
        session, request_id = ctx.session, ctx.request_id
        while True:
            await session.send_notification(Mail(params=await queue.get()), related_request_id=request_id)

    @server.tool()
    async def ack(ids: list[int]) -> dict[str, Any]:
        """Mark these messages acked, in one commit."""
        db.execute("BEGIN IMMEDIATE")
        cursor = db.execute(f"UPDATE m SET acked_at = ? WHERE id IN ({', '.join('?' * len(ids))})", (time.time(), *ids))
        db.execute("COMMIT")
        return {"acked": cursor.rowcount}

    return by_tool(server.streamable_http_app(), server.streamable_http_app(json_response=True))


if __name__ == "__main__":
    port, db_path, token, *synchronous = sys.argv[1:]
    served = app(db_path, token, *synchronous)
    gc.collect()
    gc.freeze()  # as the broker does: no full collection walks the SDK's long-lived objects mid-run
    uvicorn.run(served, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
