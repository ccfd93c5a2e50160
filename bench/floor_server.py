"""The floor's server: a bare Starlette app on uvicorn, what the broker's stack costs without Dispatch.

    python bench/floor_server.py PORT DB

    stdlib http.client (kept alive) ──POST /insert──▶ Starlette on uvicorn ──▶ SQLite (WAL, FULL)
                                    ──POST /echo────▶ the same, no storage

/insert does what every send must: one INSERT and a durable COMMIT (BEGIN IMMEDIATE, as the
broker's Store does, on the event loop's thread, as the broker's async tools do). Issue 11's
send → channel floor is one kept-alive POST to it.
"""

import sqlite3
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


def app(db_path: str) -> Starlette:
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS m (id INTEGER PRIMARY KEY, recipient TEXT, body TEXT, sent_at REAL)")

    async def echo(request):
        return JSONResponse({"ok": True, "echo": await request.json()})

    async def insert(request):
        mail = await request.json()
        db.execute("BEGIN IMMEDIATE")
        cursor = db.execute("INSERT INTO m (recipient, body, sent_at) VALUES (?, ?, ?)",
                            (mail["to"], mail["body"], time.time()))
        db.execute("COMMIT")
        return JSONResponse({"ok": True, "id": cursor.lastrowid})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/insert", insert, methods=["POST"])])


if __name__ == "__main__":
    port, db_path = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(app(db_path), host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")
