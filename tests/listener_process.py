"""A Dispatch participant in its own process, for tests that SIGKILL or SIGSTOP a listener.

    python tests/listener_process.py URL TOKEN NAME [MODE]

Connects with the SDK client, identifies as NAME, prints "listening" and keeps a `listen` call
open (re-issuing it when it ends) until killed. It never acks, so its mail stays pending.
"""

import asyncio
import os
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

LEGACY = "legacy"


async def main(url: str, token: str, name: str, mode: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    if mode != LEGACY:  # the 2026-07-28 era names its link with this header (no Mcp-Session-Id)
        headers["Dispatch-Session"] = os.urandom(8).hex()
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=400))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        result = await client.call_tool("identify", {"name": name})
        if result.is_error:
            sys.exit(f"identify failed: {result.content}")
        print("listening", flush=True)
        while True:
            await client.call_tool("listen", {"wait_s": 300})


if __name__ == "__main__":
    url, token, name = sys.argv[1:4]
    asyncio.run(main(url, token, name, sys.argv[4] if len(sys.argv) > 4 else "2026-07-28"))
