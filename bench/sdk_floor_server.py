"""The SDK's floor: the least the broker's mandated stack costs for one message, without Dispatch.

    python bench/sdk_floor_server.py PORT DB TOKEN

    stdlib client ──POST tools/call send──▶ MCPServer (the mcp SDK's streamable HTTP, bearer auth)
                                            on uvicorn ──▶ SQLite (WAL, FULL): one INSERT + COMMIT
    stdlib client ◀── notification on the stream of its pending tools/call listen ◀──┘

What the broker does for a send, kept to what the SDK and a durable store need: the same SDK
apps (MCPServer.streamable_http_app: a send answered as JSON, a listen as an event stream, routed
by the broker's own `by_tool`), the same bearer auth through the SDK, the same 2026-07-28 POSTs
from the plugin's own BrokerClient, one FULL commit, and the push as a notification related to
the listen call, as the broker sends it. No names, no checks, no acks, no stdio.
The latency section times it beside Dispatch's send → channel (bench/floor.py, SdkFloor).
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


def app(db_path: str, token: str):
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS m (id INTEGER PRIMARY KEY, recipient TEXT, body TEXT, sent_at REAL)")
    server = MCPServer("sdk-floor", token_verifier=OneToken(token),
                       auth=AuthSettings(issuer_url="http://127.0.0.1", resource_server_url=None))
    listening: dict[str, asyncio.Queue] = {}

    @server.tool()
    async def send(to: str, body: str) -> dict[str, Any]:
        """Store one message durably and hand it to the recipient's listen."""
        db.execute("BEGIN IMMEDIATE")
        cursor = db.execute("INSERT INTO m (recipient, body, sent_at) VALUES (?, ?, ?)", (to, body, time.time()))
        db.execute("COMMIT")
        listening[to].put_nowait({"id": cursor.lastrowid, "body": body})
        return {"id": cursor.lastrowid}

    @server.tool()
    async def listen(name: str, ctx: Context) -> dict[str, Any]:
        """Push each message for `name` on this call's stream, until the client goes away."""
        queue = listening[name] = asyncio.Queue()
        session, request_id = ctx.session, ctx.request_id
        while True:
            await session.send_notification(Mail(params=await queue.get()), related_request_id=request_id)

    return by_tool(server.streamable_http_app(), server.streamable_http_app(json_response=True))


if __name__ == "__main__":
    port, db_path, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    served = app(db_path, token)
    gc.collect()
    gc.freeze()  # as the broker does: no full collection walks the SDK's long-lived objects mid-run
    uvicorn.run(served, host="127.0.0.1", port=port, log_level="warning", access_log=False)
