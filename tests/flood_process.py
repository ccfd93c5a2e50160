"""A flood of `send`s from one token, in its own process so it cannot slow the test's own clock.

    python tests/flood_process.py URL TOKEN NAME TO COUNT CONNECTIONS

Opens CONNECTIONS links (2026-07-28 era: one POST a call, a Dispatch-Session header each), each
identified as NAME-<n>, and sends COUNT messages to TO as fast as the broker answers. Prints one
JSON line: how many were accepted, refused "rate limited", refused "mailbox full", or anything else
(with a few examples), and the seconds it took.
"""

import asyncio
import json
import os
import sys
import time

import httpx2

PROTOCOL = "2026-07-28"


async def flood(url: str, token: str, name: str, to: str, count: int, connections: int) -> dict:
    counts = {"accepted": 0, "rate_limited": 0, "mailbox_full": 0, "other": 0}
    examples: dict[str, str] = {}
    left = iter(range(count))

    async def call(client: httpx2.AsyncClient, request_id: int, tool: str, arguments: dict) -> dict:
        meta = {"io.modelcontextprotocol/protocolVersion": PROTOCOL,
                "io.modelcontextprotocol/clientInfo": {"name": "flood", "version": "0"},
                "io.modelcontextprotocol/clientCapabilities": {}}
        body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                "params": {"name": tool, "arguments": arguments, "_meta": meta}}
        response = await client.post(url, json=body, headers={"Mcp-Method": "tools/call", "Mcp-Name": tool})
        return response.json()

    async def connection(n: int) -> None:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": PROTOCOL, "Dispatch-Session": os.urandom(8).hex()}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as client:
            answer = await call(client, 1, "identify", {"name": f"{name}-{n}"})
            assert not answer["result"].get("isError"), answer
            for i in left:
                answer = await call(client, i + 2, "send", {"to": to, "body": f"flood {i}"})
                result = answer.get("result", {})
                text = " ".join(c.get("text", "") for c in result.get("content", []))
                if not result.get("isError") and "error" not in answer:
                    kind = "accepted"
                elif "rate limited" in text:
                    kind = "rate_limited"
                elif "mailbox full" in text:
                    kind = "mailbox_full"
                else:
                    kind = "other"
                counts[kind] += 1
                examples.setdefault(kind, text or json.dumps(answer)[:300])

    started = time.monotonic()
    await asyncio.gather(*(connection(n) for n in range(connections)))
    return {**counts, "examples": examples, "seconds": round(time.monotonic() - started, 2)}


if __name__ == "__main__":
    url, token, name, to, count, connections = sys.argv[1:7]
    print(json.dumps(asyncio.run(flood(url, token, name, to, int(count), int(connections)))), flush=True)
