"""Dispatch broker: an authenticated MCP mailbox that pushes mail and proves delivery by ack.

Several Claude Code sessions talk to one broker through the Dispatch plugin. The broker knows
who is connected, pushes mail to live receivers, keeps mail for offline ones until a TTL, and
counts mail as delivered only when the receiver acknowledges it. Mail that waits out the TTL
unacked is deleted and its sender told so (a bounce from `postmaster`, in its own mailbox);
`status` tells a sender what became of each message::

    sender plugin ──send(to, body)──▶ tools ──INSERT job──▶ writer thread ──one COMMIT a batch──▶ SQLite
                                        │   (event loop)      (group commit)        mailbox (WAL, FULL)
                                        └──wake, once committed──▶ Listener queue    (reads: own connection)
                                                                       │
    receiver plugin ◀── notifications/dispatch/mail ───────────────────┘ (rides the pending `listen` call)
    receiver plugin ──mail.ack(ids)──▶ tools ──UPDATE acked_at job──▶ writer thread (no more redelivery)

Run it::

    python3 dispatch_broker.py token add backend          # prints a new token once
    python3 dispatch_broker.py serve --port 8765          # MCP endpoint at http://127.0.0.1:8765/mcp
    python3 dispatch_broker.py install                    # or: as your own service, the plugin set up for it

State: the SQLite file given by --db, else $STATE_DIRECTORY/dispatch.db (systemd), else
./dispatch.db. Tokens: --tokens, else $CREDENTIALS_DIRECTORY/tokens (systemd LoadCredential),
else ./tokens; the file holds SHA-256 hashes only and is re-read on SIGHUP. `install` keeps both,
and the broker file, in ~/.local/share/dispatch (~/Library/Application Support/dispatch on macOS).
"""

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import gc
import getpass
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import plistlib
import queue
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import h11
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.streamable_http_manager import DEFAULT_MAX_SESSIONS
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, PlainTextResponse
from typing_extensions import NotRequired, TypedDict  # pydantic needs this one on Python < 3.12 for nested dicts
from uvicorn.protocols.http.h11_impl import H11Protocol

__version__ = "0.1.0"

log = logging.getLogger("dispatch.broker")

# --------------------------------------------------------------------------------------------
# Defaults. Each has a flag on `serve` and a row in README's table.
# --------------------------------------------------------------------------------------------

#: Loopback by default: exposing the broker is a decision (--host 0.0.0.0 plus TLS or a proxy).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
#: Mail for an offline participant waits this long (72 h: a long weekend), then is purged.
DEFAULT_TTL = 72 * 3600.0
#: A body larger than this is refused; mail is for messages, not file transfer.
DEFAULT_MAX_BODY = 64 * 1024
#: Pending (unacked) messages one recipient may hold before new mail to it is dropped, loudly.
DEFAULT_MAX_PENDING = 10_000
#: Sends a second each base may make (a token bucket; a fan-out counts once), and its burst.
#: Generous for agents; a runaway loop is told "rate limited" instead of filling mailboxes.
DEFAULT_RATE = 200.0
DEFAULT_BURST = 1000
#: A rate-limited send is answered only after this pause. The broker has one thread: a loop that
#: retries at once would cost it a request a millisecond and slow every other base's mail; paused,
#: it costs one request a second per connection.
RATE_LIMITED_PAUSE = 1.0
#: SQLite's fsync level for stored mail: FULL, so an answered send survives a power cut.
DEFAULT_SYNCHRONOUS = "FULL"
#: What each --synchronous level means for a `send` that was answered, logged at start.
DURABILITY = {
    "FULL": "a send is fsynced before it is answered: it survives a broker crash and a power cut",
    "NORMAL": "a send survives a broker crash; a power cut may lose the last sends answered",
}


#: A pushed message not acked within this many seconds is pushed again (attempt + 1, same id).
DEFAULT_ACK_TIMEOUT = 15.0
#: One push may take this long; a receiver that stopped reading must not hold its listener forever.
PUSH_TIMEOUT = 5.0
#: A send is answered once its pushes to live recipients are on their streams: the answer's own
#: work (the SDK's result, its write) then no longer runs ahead of the mail. A sender waits no
#: longer than this for a listener busy with a backlog or a stream slow to take writes.
PUSH_FIRST_WAIT = 0.1
#: The longest a single `listen` call may stay open; the plugin re-issues it at once.
MAX_LISTEN_SECONDS = 300.0
#: How often a pending 2025-11-25-era listen checks that its HTTP client is still there (that
#: era does not cancel the handler when the client goes away). Keeps "not live" under 2 s.
DISCONNECT_POLL = 0.5
#: A listen that has written nothing on its stream for this long writes a keepalive there (a
#: progress notification, to a client that asked for progress). The plugin takes a listen stream
#: silent for its HEARTBEAT_SECONDS (10 s) for a dead connection, the only sign it gets when a
#: path dies without closing; a third of that, so one keepalive may be lost and the next late
#: before it gives up. The listen's own loop wakes for it, so no task of its own.
KEEPALIVE_SECONDS = 3.0
#: A participant whose listen ended this recently still counts as live for `*` and `who`: the
#: plugin re-issues listen within milliseconds, and a broadcast must not miss it in that gap.
LIVE_GRACE = 5.0
#: How often the background task looks for unacked mail to push again.
HOUSEKEEPING_INTERVAL = 1.0
#: How often expired mail is purged (more often when the TTL is short).
PURGE_INTERVAL = 30.0
#: A client connection (an MCP session, or a 2026-07-28 client's Dispatch-Session link) that has
#: made no request for this long is forgotten, by the SDK and by us alike. The SDK's own default;
#: a listening plugin re-issues its listen every 2 minutes, so only a client that vanished without
#: closing gets there.
DEFAULT_SESSION_IDLE_TIMEOUT = 1800.0
#: Client connections open at once (each a file descriptor). At the cap a new connection pushes out
#: the one that has waited longest without a whole request (`Connections`). A plugin holds two or
#: three (its listen's and kept-alive ones), so 4096 is over a thousand sessions. Held to half the
#: descriptors the process may open (see FD_RESERVE).
DEFAULT_MAX_CONNECTIONS = 4096
#: A request's header must arrive within this of the connection opening (or of its first byte after
#: a kept-alive pause), and its body within this again: a client that sends nothing, half a header
#: or half a body holds a descriptor no longer. Never extended by a dribble of bytes. 10 s is
#: 1 MiB (MAX_REQUEST_BYTES) at 100 KB/s; raise it for slower links.
DEFAULT_READ_TIMEOUT = 10.0
#: A kept-alive connection with no request in it is closed after this: uvicorn's own default,
#: and as long as the plugin's HTTP client keeps an idle one.
KEEP_ALIVE_SECONDS = 5
#: Descriptors kept from client connections for the broker's own (stdio, the mailbox and its -wal
#: and -shm, the listening socket, the event loop, the tokens file on SIGHUP: ~15 in all). The
#: connections get half of what remains: asyncio accepts a burst (up to uvicorn's backlog, 2048)
#: before the broker sees any of it, and the other half absorbs that.
FD_RESERVE = 32
#: uvicorn's default listen backlog (`accept_backlog` lowers it under a small descriptor limit).
UVICORN_BACKLOG = 2048
#: JSON-RPC request bodies larger than this are refused by the SDK before parsing (a 64 KiB body
#: of control characters is ~6x larger once JSON-escaped).
MAX_REQUEST_BYTES = 1024 * 1024
#: Links one token may hold at once (MCP sessions and Dispatch-Session links together); the next
#: identify on a new link is refused until one is forgotten (idle for --session-idle-timeout).
#: A plugin is one link and a CLI run one more for 30 minutes: a thousand is a busy base's day,
#: and bounds what one token can make the broker hold.
DEFAULT_MAX_LINKS = 1000
#: MCP sessions (2025-11-25 era) of all tokens together: the SDK's own limit. Each token may open
#: at most its share (`Broker.session_share`), so one cannot lock the era for the others.
MAX_SESSIONS = DEFAULT_MAX_SESSIONS
#: Names one base may create. A session is one name (`base-<8 hex of its session id>`) and a name
#: is forgotten a TTL after its last sign of life once no mail waits for it, so 1000 is a thousand
#: sessions of one project within 72 h; it also bounds a fan-out to the base at 1000 copies.
DEFAULT_MAX_NAMES = 1000
#: Past this many bytes of database pages in use new mail is refused; mail already accepted is
#: never dropped for it. 1 GiB holds 15,000 bodies of 64 KiB, far more than a working mailbox,
#: and stays a safe share of a small VPS's disk.
DEFAULT_MAX_DB = 1 << 30
#: Acked mail is deleted this long after its ack (at the next purge): kept a while for an
#: operator looking into a delivery, then its space goes back to new mail.
ACKED_KEEP = 600.0
#: What a stored copy costs beyond its body (ids, chat id, stamps, index entries), for the
#: --max-db check made before a send is stored.
ROW_OVERHEAD = 256
#: An `inbox` answer holds about this much at most; it returns fewer messages, and `pending`
#: still counts them all. The SDK sends a result twice (structured, and as JSON text), so the
#: messages get half. A full `limit` of 64 KiB bodies would otherwise be tens of MB in one answer.
INBOX_MAX_BYTES = 1024 * 1024
#: Failed logins: one log line an address at most every AUTH_LOG_SECONDS (with the count since the
#: previous line), so a client looping on a wrong token cannot flood the log.
AUTH_LOG_SECONDS = 5.0
#: Failures an address may make before each further one is answered late: 0.25 s, doubling, at
#: most AUTH_MAX_DELAY. A typo costs nothing; a guessing loop gets one try every 2 s a connection.
AUTH_FREE_FAILURES = 3
AUTH_MAX_DELAY = 2.0
#: An address with no failure for this long starts afresh; at most AUTH_MAX_ADDRESSES are tracked.
AUTH_FORGET_SECONDS = 60.0
AUTH_MAX_ADDRESSES = 10_000

#: A participant name: a base (`backend`) or base-suffix (`backend-a8b3c1d2`). Every pattern here
#: is used with fullmatch: `$` with .match lets a trailing newline through.
BASE_PATTERN = r"[a-z0-9]{1,32}"
BASE_RE = re.compile(BASE_PATTERN)
NAME_RE = re.compile(rf"{BASE_PATTERN}(?:-[a-z0-9-]{{1,31}})?")
#: Tokens read `dsp_<base>_<48 hex>`: a greppable prefix for secret scanners, the base so a
#: plugin can derive its name without a round trip, and a fixed shape so a malformed token is
#: refused before any lookup.
TOKEN_PREFIX = "dsp_"
#: Random bytes in a token (`mint_token`), hex-encoded: 192 bits.
TOKEN_BYTES = 24
TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}({BASE_PATTERN})_[0-9a-f]{{{2 * TOKEN_BYTES}}}")
#: Random bytes in a message id (`new_message_id`): the plugin matches transcript lines by it.
MESSAGE_ID_BYTES = 8
MESSAGE_ID_RE = re.compile(rf"m_[0-9a-f]{{{2 * MESSAGE_ID_BYTES}}}")
#: A sender's own id for one message (`send`/`reply`'s client_msg_id): a repeat of it from the
#: same base within the TTL is answered with the first answer and not stored again.
CLIENT_MSG_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A Host header entry of --allowed-host: a DNS name or IPv4 address, or a bracketed IPv6
#: address, optionally with a port.
HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
#: Characters escaped in every log line (`SafeFormatter`): C0 and C1 controls (ESC starts a terminal
#: sequence, and U+009B is CSI on its own), DEL, line and paragraph separators, and the bidi
#: controls that reorder what a terminal shows.
LOG_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: The metrics bearer: printable ASCII, long enough not to be guessed.
METRICS_TOKEN_RE = re.compile(r"[\x21-\x7e]{16,256}")
#: A chat id ends in this many hex characters of its MAC (`ChatIds`): 64 bits.
CHAT_MAC_CHARS = 16
CHAT_MAC_RE = re.compile(rf"[0-9a-f]{{{CHAT_MAC_CHARS}}}")
#: The header a 2026-07-28 client sends to name its link: that era has no Mcp-Session-Id.
LINK_HEADER = "dispatch-session"
#: A link's id, as a client sends it in LINK_HEADER (the plugin: 32 hex) or the SDK makes it (32
#: hex): visible ASCII, short. A longer one is refused before anything is kept for it.
LINK_ID_MAX = 128
LINK_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{LINK_ID_MAX}}}")
#: The protocol era whose clients name their link with LINK_HEADER (the plugin speaks it).
LINK_PROTOCOL = "2026-07-28"
#: Tools whose call is answered once, with nothing on its stream before the answer: every tool
#: but `listen`. Their 2026-07-28 calls are answered as JSON (`by_tool`).
ANSWERED_TOOLS = frozenset({b"identify", b"send", b"reply", b"ping", b"mail.ack", b"who", b"inbox", b"status"})
#: The most messages one `inbox` call returns.
INBOX_MAX_LIMIT = 1000
#: The broker's own name, the sender of its delivery notices (bounces). A base like any other by
#: its shape, but reserved: no token is minted for it and no participant may take it, so nobody
#: can pass for the broker; mail to it is refused, never stored for nobody.
POSTMASTER = "postmaster"
#: The longest a send may wait for its live recipients' acks (`wait_s`): the answer is held open
#: meanwhile, and the plugin waits for a call this much longer than usual.
MAX_SEND_WAIT = 30.0
#: A bounce quotes this many characters of the message it reports, and a receipt keeps as many:
#: enough for the sender to know which message it was, never the whole body.
QUOTE_CHARS = 80
#: The most messages one `status` call reports.
STATUS_MAX_LIMIT = 200
MAIL_METHOD = "notifications/dispatch/mail"


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class DispatchError(Exception):
    """Base of every error the broker reports to a caller."""


class ConfigError(DispatchError):
    """The command line or a file it names cannot work."""


class ServiceError(DispatchError):
    """The service manager refused the broker, or the broker it started did not answer."""


class Refused(DispatchError, ToolError):
    """A refused tool call; the SDK turns it into an isError result whose text says what and why."""

    #: A fixed word for /metrics' refusals by reason (never the text: that may name people).
    reason = "refused"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason:
            self.reason = reason


class RateLimited(Refused):
    """A send past its base's rate; answered after RATE_LIMITED_PAUSE."""

    reason = "rate_limited"


class StorageFull(Refused):
    """A send that would take the database past --max-db; nothing was stored."""

    reason = "storage_full"


class Unavailable(Refused):
    """The mailbox cannot be written now (disk full, read-only or locked file); nothing was changed."""

    reason = "unavailable"


# --------------------------------------------------------------------------------------------
# Small parsers shared by the CLI and the tools
# --------------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """'72h', '30m', '10s', '3d', '1.5' (seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 30m, 72h, 3d)")
    value, unit = float(match[1]), match[2] or "s"
    seconds = value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return seconds


def base_of(name: str) -> str:
    """The base of a participant name: the part before the first '-'."""
    return name.split("-", 1)[0]


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise Refused(
            f"bad name {name!r}: use a base like 'backend' ([a-z0-9]{{1,32}}) or base-suffix like "
            "'backend-a8b3c1d2' (suffix [a-z0-9-]{1,31})", "bad_name")
    return name


def check_not_postmaster(name: str) -> None:
    """POSTMASTER (and its base) is the broker's own: nobody may take it, and nobody reads mail to it."""
    if base_of(name) == POSTMASTER:
        raise Refused(f"{name!r} is reserved: {POSTMASTER!r} is the Dispatch broker's own name for its delivery "
                      "notices (bounces), and nobody reads mail to it. To try an unread message again, send it to "
                      "its recipient anew", "reserved_name")


def check_client_msg_id(client_msg_id: str) -> str:
    if not CLIENT_MSG_ID_RE.fullmatch(client_msg_id):
        raise Refused(f"bad client_msg_id {client_msg_id!r}: use 1-64 characters of A-Z a-z 0-9 _ -; nothing sent",
                      "bad_client_msg_id")
    return client_msg_id


def argument(convert):
    """An argparse type from a converter that raises ValueError with a plain reason."""

    def parse(text: str):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = convert.__name__
    return parse


@argument
def port_number(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 0 < int(text) < 65536:
        raise ValueError(f"not a TCP port: {text!r} (1-65535)")
    return int(text)


@argument
def positive_int(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError(f"not a positive whole number: {text!r}")
    return int(text)


@argument
def non_negative_number(text: str) -> float:
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        raise ValueError(f"not a number >= 0: {text!r}")
    return float(text)


def format_duration(seconds: float) -> str:
    """Seconds as parse_duration reads them back: '72h', '30m', '15s'."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@argument
def byte_size(text: str) -> int:
    """'1G', '500M', '64K' (binary multiples) or bytes -> bytes."""
    match = re.fullmatch(r"([0-9]+)([KMG]?)", text)
    if not match or int(match[1]) < 1:
        raise ValueError(f"not a size: {text!r} (use e.g. 500M, 1G, or bytes)")
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]]


def format_size(size: int) -> str:
    """Bytes as byte_size reads them back: '1G', '500M', '64K', or bytes."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


@argument
def host_name(text: str) -> str:
    if not HOST_RE.fullmatch(text):
        raise ValueError(f"not a host name: {text!r} (e.g. dispatch.example.net, or with a port: dispatch.example.net:8443)")
    return text


@argument
def proxy_address(text: str) -> str:
    """An address or network (CIDR) of a reverse proxy: 127.0.0.1, ::1, 10.0.0.0/8."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"not an IP address or network: {text!r} (e.g. 127.0.0.1, ::1, 10.0.0.0/8)") from None


@argument
def metrics_token(text: str) -> str:
    if not METRICS_TOKEN_RE.fullmatch(text):
        raise ValueError("the metrics token must be 16-256 printable ASCII characters, no spaces")
    return text


# --------------------------------------------------------------------------------------------
# Schema and SQL: every statement the broker runs, in one place
# --------------------------------------------------------------------------------------------

#: Ordered schema steps; step N brings the database to PRAGMA user_version N. Never renumber.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "create mailbox, participants and meta",
        """
        CREATE TABLE messages (
            id          TEXT PRIMARY KEY,
            chat_id     TEXT NOT NULL,
            sender      TEXT NOT NULL,
            recipient   TEXT NOT NULL,
            body        TEXT NOT NULL,
            sent_at     REAL NOT NULL,
            expires_at  REAL NOT NULL,
            attempt     INTEGER NOT NULL DEFAULT 0,
            pushed_at   REAL,
            acked_at    REAL
        );
        CREATE INDEX messages_pending ON messages (recipient, sent_at) WHERE acked_at IS NULL;
        CREATE INDEX messages_expiry ON messages (expires_at);
        CREATE TABLE participants (
            name        TEXT PRIMARY KEY,
            base        TEXT NOT NULL,
            first_seen  REAL NOT NULL,
            last_seen   REAL NOT NULL
        );
        CREATE INDEX participants_base ON participants (base);
        CREATE TABLE meta (
            key         TEXT PRIMARY KEY,
            value       TEXT NOT NULL
        );
        """,
    ),
    (
        "remember each client_msg_id's first answer, per base, until the TTL",
        """
        CREATE TABLE sent_ids (
            base          TEXT NOT NULL,
            client_msg_id TEXT NOT NULL,
            answer        TEXT NOT NULL,
            expires_at    REAL NOT NULL,
            PRIMARY KEY (base, client_msg_id)
        );
        CREATE INDEX sent_ids_expiry ON sent_ids (expires_at);
        """,
    ),
    (
        "keep what became of each message for its sender once the message is deleted (receipts)",
        """
        CREATE TABLE receipts (
            id          TEXT PRIMARY KEY,
            chat_id     TEXT NOT NULL,
            sender      TEXT NOT NULL,
            recipient   TEXT NOT NULL,
            begins      TEXT NOT NULL,
            sent_at     REAL NOT NULL,
            expires_at  REAL NOT NULL,
            attempt     INTEGER NOT NULL,
            pushed_at   REAL,
            acked_at    REAL,
            kept_until  REAL NOT NULL
        );
        CREATE INDEX receipts_sender ON receipts (sender, sent_at);
        CREATE INDEX receipts_expiry ON receipts (kept_until);
        """,
    ),
]

#: A message for a live recipient is stamped as pushed (attempt 1) in the same commit: its
#: first push then needs no write of its own.
SQL_INSERT_MESSAGE = """
INSERT INTO messages (id, chat_id, sender, recipient, body, sent_at, expires_at, attempt, pushed_at)
VALUES (:id, :chat_id, :sender, :recipient, :body, :sent_at, :expires_at, :attempt, :pushed_at)
"""
SQL_GET_MESSAGE = """
SELECT id, chat_id, sender, recipient, body, sent_at, attempt, acked_at, expires_at
FROM messages
WHERE id = ?
"""
SQL_MARK_PUSHED = """
UPDATE messages
SET attempt = attempt + 1, pushed_at = :now
WHERE id = :id AND acked_at IS NULL
"""
SQL_PENDING_FOR = """
SELECT id, chat_id, sender, recipient, body, sent_at, attempt
FROM messages
WHERE recipient = :recipient AND acked_at IS NULL AND expires_at > :now
ORDER BY sent_at, id
LIMIT :limit
"""
SQL_PENDING_IDS = """
SELECT id
FROM messages
WHERE recipient = :recipient AND acked_at IS NULL AND expires_at > :now
ORDER BY sent_at, id
"""
SQL_COUNT_ALL_PENDING = """
SELECT count(*)
FROM messages
WHERE acked_at IS NULL AND expires_at > :now
"""
SQL_COUNT_PENDING = """
SELECT count(*)
FROM messages
WHERE recipient = :recipient AND acked_at IS NULL AND expires_at > :now
"""
SQL_COUNT_PENDING_AMONG = """
SELECT recipient, count(*)
FROM messages
WHERE recipient IN ({placeholders}) AND acked_at IS NULL AND expires_at > ?
GROUP BY recipient
"""
SQL_COUNT_PENDING_FROM = """
SELECT recipient, count(*)
FROM messages
WHERE sender = :sender AND acked_at IS NULL AND expires_at > :now
GROUP BY recipient
"""
#: A push stamped in the future means the wall clock stepped back since (NTP, a restored VM):
#: due now, rather than once the clock has caught up with the stamp, maybe hours later.
SQL_DUE_FOR_REDELIVERY = """
SELECT id, recipient
FROM messages
WHERE acked_at IS NULL AND pushed_at IS NOT NULL AND expires_at > :now
  AND (pushed_at < :cutoff OR pushed_at > :now)
ORDER BY sent_at
"""
SQL_OWNERS_OF = """
SELECT id, recipient, acked_at
FROM messages
WHERE id IN ({placeholders})
"""
SQL_ACK = """
UPDATE messages
SET acked_at = ?
WHERE recipient = ? AND acked_at IS NULL AND id IN ({placeholders})
"""
SQL_EXPIRED_UNACKED = """
SELECT id, sender, recipient
FROM messages
WHERE expires_at <= :now AND acked_at IS NULL
"""
SQL_PURGE_EXPIRED = """
DELETE FROM messages
WHERE expires_at <= :now
"""
#: Acked mail is read by nothing (replies route by chat id, repeats by sent_ids): its space goes
#: back to new mail ACKED_KEEP after the ack instead of counting against --max-db until the TTL.
SQL_PURGE_ACKED = """
DELETE FROM messages
WHERE acked_at IS NOT NULL AND acked_at <= :cutoff
"""
SQL_PURGE_SENT_IDS = """
DELETE FROM sent_ids
WHERE expires_at <= :now
"""
SQL_INSERT_SENT_ID = """
INSERT INTO sent_ids (base, client_msg_id, answer, expires_at)
VALUES (:base, :client_msg_id, :answer, :expires_at)
"""
SQL_GET_SENT_ID = """
SELECT answer
FROM sent_ids
WHERE base = :base AND client_msg_id = :client_msg_id AND expires_at > :now
"""
#: Bytes of pages in use: freed pages are reused before the file grows, so they do not count.
SQL_DATABASE_BYTES = """
SELECT (page_count - freelist_count) * page_size
FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()
"""
SQL_UPSERT_PARTICIPANT = """
INSERT INTO participants (name, base, first_seen, last_seen)
VALUES (:name, :base, :now, :now)
ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen
"""
SQL_PARTICIPANT = """
SELECT name, base, last_seen
FROM participants
WHERE name = ?
"""
SQL_PARTICIPANTS = """
SELECT name, base, last_seen
FROM participants
ORDER BY name
"""
SQL_PARTICIPANTS_OF_BASE = """
SELECT name
FROM participants
WHERE base = ?
ORDER BY name
"""
SQL_COUNT_PARTICIPANTS_OF_BASE = """
SELECT count(*)
FROM participants
WHERE base = ?
"""
SQL_PURGE_PARTICIPANTS = """
DELETE FROM participants
WHERE last_seen <= :cutoff
  AND NOT EXISTS (SELECT 1 FROM messages WHERE recipient = participants.name AND acked_at IS NULL)
"""
SQL_GET_META = "SELECT value FROM meta WHERE key = ?"
SQL_SET_META = "INSERT INTO meta (key, value) VALUES (?, ?)"
#: Each job of a group commit runs under its own savepoint: a job that raises is undone alone.
SQL_JOB_BEGIN = "SAVEPOINT job"
SQL_JOB_UNDO = "ROLLBACK TO job"
SQL_JOB_END = "RELEASE job"

# -- receipts and bounces: what became of a sender's mail -------------------------------------

#: Mail past its TTL that nobody acked and that has no receipt yet (a receipt is kept in the same
#: commit as the bounce, so none is bounced twice), with both parties' last sign of life: why it
#: was never read, and whether its sender is still there to be told. A bounce never bounces.
SQL_EXPIRED_TO_BOUNCE = """
SELECT m.id, m.chat_id, m.sender, m.recipient, substr(m.body, 1, :quote + 1), m.sent_at, m.attempt,
       r.last_seen, s.last_seen
FROM messages AS m
LEFT JOIN participants AS r ON r.name = m.recipient
LEFT JOIN participants AS s ON s.name = m.sender
WHERE m.expires_at <= :now AND m.acked_at IS NULL AND m.sender != :postmaster
  AND NOT EXISTS (SELECT 1 FROM receipts WHERE receipts.id = m.id)
ORDER BY m.sent_at, m.id
"""
#: A receipt for each message the purge is about to delete (the same two conditions as
#: SQL_PURGE_EXPIRED and SQL_PURGE_ACKED): its state outlives its body for `status`.
SQL_KEEP_RECEIPTS = """
INSERT OR IGNORE INTO receipts (id, chat_id, sender, recipient, begins, sent_at, expires_at, attempt, pushed_at,
                                acked_at, kept_until)
SELECT id, chat_id, sender, recipient, substr(body, 1, :quote), sent_at, expires_at, attempt, pushed_at,
       acked_at, :kept_until
FROM messages
WHERE sender != :postmaster
  AND (expires_at <= :now OR (acked_at IS NOT NULL AND acked_at <= :cutoff))
"""
SQL_PURGE_RECEIPTS = """
DELETE FROM receipts
WHERE kept_until <= :now
"""
#: One sender's mail, newest first: what is still stored, then what only its receipt remembers
#: (a message and its receipt are both there only until the purge that made the receipt commits).
SQL_RECEIPTS_OF_SENDER = """
SELECT id, chat_id, recipient, substr(body, 1, :quote), sent_at, expires_at, attempt, pushed_at, acked_at
FROM messages
WHERE sender = :sender AND (:chat_id IS NULL OR chat_id = :chat_id) AND (:id IS NULL OR id = :id)
UNION ALL
SELECT id, chat_id, recipient, begins, sent_at, expires_at, attempt, pushed_at, acked_at
FROM receipts
WHERE sender = :sender AND (:chat_id IS NULL OR chat_id = :chat_id) AND (:id IS NULL OR id = :id)
  AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.id = receipts.id)
ORDER BY sent_at DESC, id
LIMIT :limit
"""


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


@dataclass
class Mail:
    """One message as one recipient sees it."""

    id: str
    chat_id: str
    sender: str
    recipient: str
    body: str
    sent_at: float
    attempt: int

    def params(self) -> dict[str, Any]:
        """The `notifications/dispatch/mail` params (and an `inbox` entry)."""
        return {
            "id": self.id,
            "chat_id": self.chat_id,
            "from": self.sender,
            "to": self.recipient,
            "body": self.body,
            "sent_at": iso_time(self.sent_at),
            "attempt": self.attempt,
        }


@dataclass
class Unread:
    """A message that expired before its recipient acked it, as its bounce tells its sender."""

    id: str
    chat_id: str
    sender: str
    recipient: str
    begins: str  #: its first QUOTE_CHARS characters, and one more when it went on
    sent_at: float
    attempt: int  #: pushes made: more than none, and the recipient was there to take it
    recipient_seen: float | None  #: the recipient's last sign of life; None: forgotten
    sender_seen: float | None  #: the sender's; None: forgotten


#: SQLite keeps at most this many bound parameters a statement (999 in older builds).
SQL_PARAMETERS = 500


def chunks(items: list, size: int = SQL_PARAMETERS):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def upsert_participant(db: sqlite3.Connection, name: str, now: float) -> None:
    """A sign of life from `name`: known from now on, last seen `now`."""
    db.execute(SQL_UPSERT_PARTICIPANT, {"name": name, "base": base_of(name), "now": now})


def pending_among(db: sqlite3.Connection, recipients: list[str], now: float) -> dict[str, int]:
    """Pending mail of each recipient, in one query per SQL_PARAMETERS names (a fan-out)."""
    counts: dict[str, int] = {}
    for chunk in chunks(recipients):
        sql = SQL_COUNT_PENDING_AMONG.format(placeholders=",".join("?" * len(chunk)))
        counts.update(db.execute(sql, [*chunk, now]).fetchall())
    return counts


def owners_of(db: sqlite3.Connection, ids: list[str]) -> list[tuple[str, str, float | None]]:
    """(id, recipient, acked_at) of those of `ids` still stored, in one query per SQL_PARAMETERS ids."""
    rows: list[tuple[str, str, float | None]] = []
    for chunk in chunks(ids):
        rows += db.execute(SQL_OWNERS_OF.format(placeholders=",".join("?" * len(chunk))), chunk).fetchall()
    return rows


def bytes_in_use(db: sqlite3.Connection) -> int:
    """Bytes of database pages in use (WAL frames included; in a transaction, its own pages too)."""
    return db.execute(SQL_DATABASE_BYTES).fetchone()[0]


def first_answer(db: sqlite3.Connection, base: str, client_msg_id: str, now: float) -> dict[str, Any] | None:
    """The answer a send with this base's client_msg_id got, while remembered."""
    row = db.execute(SQL_GET_SENT_ID, {"base": base, "client_msg_id": client_msg_id, "now": now}).fetchone()
    return json.loads(row[0]) if row else None


def store_mail(db: sqlite3.Connection, sender: str, rows: list[dict[str, Any]], now: float,
               sent_id: dict[str, Any] | None) -> None:
    """One message for each recipient, the sender's sign of life and the answer to its
    client_msg_id (so stored and remembered go together): all in the caller's transaction."""
    upsert_participant(db, sender, now)
    db.executemany(SQL_INSERT_MESSAGE, rows)
    if sent_id:
        db.execute(SQL_INSERT_SENT_ID, sent_id)


#: What SQLite keeps beside the mailbox in WAL mode; both hold bodies too.
SIDE_FILES = ("-wal", "-shm")


def keep_private(path: str) -> None:
    """Make the mailbox readable by its owner only, whatever the umask: it holds every body, the
    pending ids and the chat-id key. Created 0600 before SQLite opens it (SQLite gives its -wal and
    -shm the file's mode); one an older broker left open to others is narrowed, with a log line."""
    with contextlib.suppress(FileExistsError):  # O_EXCL: an existing file is left to SQLite to open
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, *(path + side for side in SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(name).st_mode & 0o777
            if mode & 0o077:
                os.chmod(name, 0o600)
                log.warning("mailbox file %s was mode %o, readable by others: now 0600", name, mode)


class GroupCommit:
    """The one writer: a thread of its own that owns the write connection (group commit).

    Callers hand it jobs (`submit`): a function of the connection that writes a few rows and
    returns what its caller needs. The thread takes every job that gathered while its previous
    commit was syncing and runs them all in one transaction, each under a savepoint, then commits
    once: N concurrent sends cost one fsync, not N, and the event loop never waits for one. Each
    caller's future is settled only once that commit is done, so nothing is answered before its
    rows are on disk. A job that raises (a refused ack) is undone alone and fails alone; a
    failed commit or a write SQLite cannot make (disk full, read-only file) fails every job of
    that transaction with Unavailable, as a lone write would, and the next batch starts clean.
    """

    def __init__(self, store: "Store"):
        self.store = store
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  #: (job, durable, future), or None: stop
        self.thread = threading.Thread(target=self.run, name="dispatch-writer", daemon=True)
        self.thread.start()

    def submit(self, job, durable: bool) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((job, durable, future))
        return future

    def run(self) -> None:
        while True:
            batch = [self.jobs.get()]  # blocks while there is nothing to write
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self.jobs.get_nowait())
            jobs = [item for item in batch if item is not None]
            # A caller cancelled before its turn (its client went away) is skipped: never answered, never written.
            jobs = [item for item in jobs if item[2].set_running_or_notify_cancel()]
            if jobs:
                self.commit(jobs)
            if None in batch:
                return

    def commit(self, jobs: list) -> None:
        outcomes = []
        try:
            with self.store.transaction(durable=any(durable for _, durable, _ in jobs)) as db:
                for job, _, _ in jobs:
                    outcomes.append(run_job(db, job))
        except Unavailable as exc:
            outcomes = [(None, Unavailable(*exc.args)) for _ in jobs]  # one exception each: each is raised on its own
        except Exception as exc:  # a bug: fail the callers rather than the thread
            log.exception("group commit failed")
            outcomes = [(None, exc) for _ in jobs]
        for (_, _, future), (result, error) in zip(jobs, outcomes):
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def stop(self) -> None:
        """Commit what was handed over, then end the thread."""
        self.jobs.put(None)
        self.thread.join()


def run_job(db: sqlite3.Connection, job) -> tuple[Any, BaseException | None]:
    """Run one job of a group commit under its savepoint: (its result, None) or (None, its
    error), its rows undone. An OperationalError (the disk) is raised: the transaction is lost."""
    db.execute(SQL_JOB_BEGIN)
    try:
        result = job(db)
    except sqlite3.OperationalError:
        raise
    except Exception as exc:
        db.execute(SQL_JOB_UNDO)
        db.execute(SQL_JOB_END)
        return None, exc
    db.execute(SQL_JOB_END)
    return result, None


class Store:
    """The SQLite mailbox: one connection for writes, in the GroupCommit thread, one for reads.

    Every tool is an `async def` and runs on the event loop thread. Reads run there, on their
    own connection: in WAL mode a reader sees the last commit and never waits for the writer or
    its fsync, and the mailbox's pages are few and hot (--max-db). Writes are jobs handed to the
    GroupCommit thread and awaited: the loop goes on serving while a commit syncs, and every
    write that arrives meanwhile shares the next commit. Only the writer thread touches the
    write connection once it runs (before it, migrations run on that connection directly).

    Stored mail is committed durably (WAL, synchronous=FULL unless told otherwise), so a `send`
    that returned survives SIGKILL and power loss. Bookkeeping alone (acks, push stamps, last
    seen) is committed with synchronous=NORMAL: in WAL mode that survives a broker crash but not
    a power cut, where the cost of a lost ack is one redelivery, which the plugin drops by id.
    A batch with any stored mail in it commits at the durable level, and so syncs all of it.

    A send's own job checks the mailbox cap, --max-db and its client_msg_id on the write
    connection, inside the batch: the caps hold exactly and a repeat is never stored twice,
    however many sends share a commit.
    """

    def __init__(self, path: str, *, synchronous: str = DEFAULT_SYNCHRONOUS):
        self.path = path
        self.synchronous = synchronous  #: the level of durable commits, a keyword checked by argparse
        self.level = ""  #: the level the write connection is at now
        try:
            keep_private(path)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.migrate()
            self.reader = sqlite3.connect(path, isolation_level=None)
            self.reader.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, OSError) as exc:  # SQLite's own text ("unable to open database file") names no file
            raise ConfigError(f"cannot open the mailbox {path}: {exc} (the file and its directory must be "
                              "writable: WAL mode keeps -wal and -shm files beside it)") from None
        self.writer = GroupCommit(self)

    @contextlib.contextmanager
    def transaction(self, durable: bool = True):
        """All or nothing, on the write connection. A write SQLite cannot make (disk full,
        read-only file) is rolled back and raised as Unavailable, so a tool says why instead of
        crashing, and the next transaction starts clean once the disk has room again.
        `durable=False`: bookkeeping, committed without an fsync (see the class docstring)."""
        level = self.synchronous if durable else "NORMAL"
        try:
            if level != self.level:  # WAL: a later FULL commit still syncs every earlier frame
                self.db.execute(f"PRAGMA synchronous={level}")
                self.level = level
            self.db.execute("BEGIN IMMEDIATE")
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:  # a failed COMMIT may leave it open, or SQLite may have rolled back
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                log.error("mailbox write failed: %s", exc)
                raise Unavailable(f"the broker cannot write its mailbox ({exc}): nothing was stored; "
                                  "try again later") from exc
            raise

    async def write(self, job, durable: bool = False) -> Any:
        """Run `job(connection)` in the next group commit; its result once that commit is done."""
        return await asyncio.wrap_future(self.writer.submit(job, durable))

    def migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise ConfigError(
                f"{self.path} has schema version {version}, newer than this broker knows "
                f"({len(MIGRATIONS)}): upgrade the broker"
            )
        for number, (what, script) in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction() as db:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")  # an int from enumerate
            log.info("schema step %d: %s", number, what)

    def close(self) -> None:
        self.writer.stop()
        self.reader.close()
        self.db.close()

    # -- meta ---------------------------------------------------------------------------------

    def secret(self, key: str) -> bytes:
        """A random secret kept in the database (created on first use), e.g. the chat-id key.
        Blocks until committed: for the start, before the event loop runs."""
        def job(db: sqlite3.Connection) -> bytes:
            row = db.execute(SQL_GET_META, (key,)).fetchone()
            if row:
                return bytes.fromhex(row[0])
            value = secrets.token_bytes(32)
            db.execute(SQL_SET_META, (key, value.hex()))
            return value
        return self.writer.submit(job, durable=True).result()

    # -- participants -------------------------------------------------------------------------

    async def touch(self, name: str, now: float) -> None:
        await self.write(lambda db: upsert_participant(db, name, now))

    def participant(self, name: str) -> tuple[str, str, float] | None:
        return self.reader.execute(SQL_PARTICIPANT, (name,)).fetchone()

    def participants(self) -> list[tuple[str, str, float]]:
        return self.reader.execute(SQL_PARTICIPANTS).fetchall()

    def participants_of_base(self, base: str) -> list[str]:
        return [row[0] for row in self.reader.execute(SQL_PARTICIPANTS_OF_BASE, (base,))]

    def count_names(self, base: str) -> int:
        return self.reader.execute(SQL_COUNT_PARTICIPANTS_OF_BASE, (base,)).fetchone()[0]

    def size(self) -> int:
        return bytes_in_use(self.reader)

    # -- messages -----------------------------------------------------------------------------

    def count_pending(self, recipient: str, now: float) -> int:
        return self.reader.execute(SQL_COUNT_PENDING, {"recipient": recipient, "now": now}).fetchone()[0]

    def count_all_pending(self, now: float) -> int:
        return self.reader.execute(SQL_COUNT_ALL_PENDING, {"now": now}).fetchone()[0]

    def pending_from(self, sender: str, now: float) -> dict[str, int]:
        return dict(self.reader.execute(SQL_COUNT_PENDING_FROM, {"sender": sender, "now": now}).fetchall())

    def sent_answer(self, base: str, client_msg_id: str, now: float) -> dict[str, Any] | None:
        return first_answer(self.reader, base, client_msg_id, now)

    def iter_pending(self, recipient: str, now: float, limit: int = -1):
        """Pending mail oldest first, one row at a time: a caller that stops early reads no more."""
        rows = self.reader.execute(SQL_PENDING_FOR, {"recipient": recipient, "now": now, "limit": limit})
        return (Mail(*row) for row in rows)

    def pending_for(self, recipient: str, now: float, limit: int = -1) -> list[Mail]:
        return list(self.iter_pending(recipient, now, limit))

    def pending_ids(self, recipient: str, now: float) -> list[str]:
        return [row[0] for row in self.reader.execute(SQL_PENDING_IDS, {"recipient": recipient, "now": now})]

    async def mark_pushed(self, message_id: str, now: float) -> Mail | None:
        """Count one more push attempt; None when the message was acked or purged meanwhile."""
        def job(db: sqlite3.Connection):
            changed = db.execute(SQL_MARK_PUSHED, {"id": message_id, "now": now}).rowcount
            return changed, db.execute(SQL_GET_MESSAGE, (message_id,)).fetchone()
        changed, row = await self.write(job)
        if not changed or row is None or row[8] <= now:
            return None
        return Mail(*row[:7])

    def due_for_redelivery(self, cutoff: float, now: float) -> list[tuple[str, str]]:
        return self.reader.execute(SQL_DUE_FOR_REDELIVERY, {"cutoff": cutoff, "now": now}).fetchall()

    async def ack(self, recipient: str, ids: list[str], now: float) -> tuple[int, list[str]]:
        """Mark the caller's messages delivered, one statement per SQL_PARAMETERS ids. Returns
        (newly acked, ids owned by others). When any id belongs to someone else nothing is
        acked: the call is refused whole (owners are read in the same transaction)."""
        def job(db: sqlite3.Connection) -> tuple[int, list[str]]:
            owners = {message_id: owner for message_id, owner, _ in owners_of(db, ids)}
            foreign = [i for i in ids if i in owners and owners[i] != recipient]
            if foreign:
                return 0, foreign
            acked = 0
            for chunk in chunks(ids):
                sql = SQL_ACK.format(placeholders=",".join("?" * len(chunk)))
                acked += db.execute(sql, [now, recipient, *chunk]).rowcount
            return acked, []
        return await self.write(job)

    async def purge_expired(self, now: float, participant_ttl: float, alive: list[str], receipts_ttl: float,
                            notices: Callable[[list[Unread]], list[dict[str, Any]]]) -> tuple[list[dict], list[tuple]]:
        """In one commit: mark `alive` as seen now; store the bounces `notices(mail that expired
        unread)` makes and a receipt of every message about to go (kept `receipts_ttl`); delete
        expired and acked mail, old receipts, forgotten client_msg_ids and long-gone
        participants. (The bounces stored, the unacked mail dropped.) A receipt marks its message
        bounced and goes in the same commit as the deletion: no crash bounces anything twice."""
        def job(db: sqlite3.Connection) -> tuple[list[dict], list[tuple]]:
            for name in alive:
                upsert_participant(db, name, now)
            rows = db.execute(SQL_EXPIRED_TO_BOUNCE, {"now": now, "quote": QUOTE_CHARS, "postmaster": POSTMASTER})
            stored = notices([Unread(*row) for row in rows])
            db.executemany(SQL_INSERT_MESSAGE, stored)
            db.execute(SQL_KEEP_RECEIPTS, {"now": now, "cutoff": now - ACKED_KEEP, "kept_until": now + receipts_ttl,
                                           "quote": QUOTE_CHARS, "postmaster": POSTMASTER})
            db.execute(SQL_PURGE_RECEIPTS, {"now": now})
            expired = db.execute(SQL_EXPIRED_UNACKED, {"now": now}).fetchall()
            db.execute(SQL_PURGE_EXPIRED, {"now": now})
            db.execute(SQL_PURGE_ACKED, {"cutoff": now - ACKED_KEEP})
            db.execute(SQL_PURGE_SENT_IDS, {"now": now})
            db.execute(SQL_PURGE_PARTICIPANTS, {"cutoff": now - participant_ttl})
            return stored, expired
        return await self.write(job)

    # -- receipts -----------------------------------------------------------------------------

    def receipts(self, sender: str, chat_id: str | None, message_id: str | None, limit: int) -> list[tuple]:
        """`sender`'s mail, newest first: (id, chat_id, recipient, begins, sent_at, expires_at,
        attempt, pushed_at, acked_at), from the mailbox or, once deleted, from its receipt."""
        return self.reader.execute(SQL_RECEIPTS_OF_SENDER, {"sender": sender, "chat_id": chat_id, "id": message_id,
                                                            "quote": QUOTE_CHARS, "limit": limit}).fetchall()

    def acked_among(self, ids: list[str]) -> set[str]:
        """Those of `ids` whose recipient acked them."""
        return {message_id for message_id, _, acked_at in owners_of(self.reader, ids) if acked_at is not None}


# --------------------------------------------------------------------------------------------
# Tokens and auth
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    id: str
    base: str
    sha256: str
    created: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def default_tokens_path() -> Path:
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(creds) / "tokens" if creds else Path("tokens")


def read_tokens(path: Path) -> list[Token]:
    """Parse the tokens file: one `id base sha256 created` line per token, '#' comments."""
    if not path.exists():
        return []
    tokens = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 4 or not BASE_RE.fullmatch(parts[1]) or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
            raise ConfigError(f"{path}:{number}: expected 'id base sha256 created', got {line!r}")
        tokens.append(Token(*parts))
    return tokens


def write_tokens(path: Path, tokens: list[Token]) -> None:
    """Rewrite the tokens file atomically, readable by its owner only."""
    lines = ["# Dispatch tokens: id base sha256(token) created. Hashes only; see `token add`.\n"]
    lines += [f"{t.id} {t.base} {t.sha256} {t.created}\n" for t in tokens]
    write_private(path, "".join(lines).encode())


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, readable by its owner only, atomically.

    Through a new file of a random name (mkstemp: O_EXCL, so nothing planted beside it, file or
    link, is opened), made 0600 before anything is written, then renamed over `path`: a rename
    replaces a link at `path` itself and never writes where it points."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once its directory is synced
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def mint_token(path: Path, base: str) -> tuple[Token, str]:
    """Append a new token for `base` and return it with its plaintext (shown once)."""
    if not BASE_RE.fullmatch(base):
        raise ConfigError(f"bad base {base!r}: use [a-z0-9]{{1,32}}, no hyphen")
    if base == POSTMASTER:
        raise ConfigError(f"base {POSTMASTER!r} is the broker's own name for its delivery notices: choose another")
    plaintext = f"{TOKEN_PREFIX}{base}_{secrets.token_hex(TOKEN_BYTES)}"
    token = Token(secrets.token_hex(4), base, hash_token(plaintext), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_tokens(path, read_tokens(path) + [token])
    return token, plaintext


def revoke_token(path: Path, token_id: str) -> None:
    """Remove token `token_id` from the tokens file."""
    tokens = read_tokens(path)
    kept = [t for t in tokens if t.id != token_id]
    if len(kept) == len(tokens):
        raise ConfigError(f"no token with id {token_id!r} in {path}")
    write_tokens(path, kept)


#: Per request: a dict the auth middleware sets up and verify_token (which runs below it, in the
#: same task) writes why a token was refused into.
AUTH_NOTE: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("dispatch_auth_note", default=None)
#: The refusal reasons, and their /metrics label (a fixed word, never the token).
AUTH_REASONS = {"malformed token": "malformed", "unknown or revoked token": "unknown", "no bearer token": "missing",
                "bad metrics token": "metrics"}


def note_auth_failure(reason: str) -> None:
    note = AUTH_NOTE.get()
    if note is not None:
        note["reason"] = reason


class TokenVerifier:
    """The SDK's `token_verifier`: bearer token -> AccessToken(client_id=token id, claims.base).

    Only hashes are held. The lookup is by hash (which leaks nothing about the token), and the
    match is confirmed with a constant-time compare. `reload()` runs on SIGHUP.
    """

    def __init__(self, path: Path):
        self.path = path
        self.by_hash: dict[str, Token] = {}
        self.reload()

    def reload(self) -> None:
        tokens = read_tokens(self.path)
        self.by_hash = {t.sha256: t for t in tokens}
        log.info("tokens: %d loaded from %s", len(tokens), self.path)

    def ids(self) -> set[str]:
        return {t.id for t in self.by_hash.values()}

    async def verify_token(self, token: str) -> AccessToken | None:
        # Why it failed goes to AuthFailures (through AUTH_NOTE), which knows the client's address
        # and logs it at most once a window; the SDK hands this method the token alone.
        shape = TOKEN_RE.fullmatch(token)
        if not shape:
            note_auth_failure("malformed token")
            return None
        digest = hash_token(token)
        found = self.by_hash.get(digest)
        if found is None or not hmac.compare_digest(found.sha256, digest) or found.base != shape[1]:
            note_auth_failure("unknown or revoked token")
            return None
        return AccessToken(token=token, client_id=found.id, scopes=[], claims={"base": found.base})


@dataclass
class Strikes:
    """Recent failed logins of one client address."""

    count: int = 0  #: failures since the address last went AUTH_FORGET_SECONDS without one
    last: float = 0.0  #: monotonic time of the latest failure
    logged_at: float = float("-inf")  #: monotonic time of the latest log line
    unlogged: int = 0  #: failures since that line
    reason: str = ""  #: the latest failure's reason


class AuthFailures:
    """Failed logins by client address: a log line an address at most every AUTH_LOG_SECONDS, with
    the count since the previous line, and a growing delay before each 401 past
    AUTH_FREE_FAILURES. Used from the event loop only."""

    def __init__(self):
        self.by_address: dict[str, Strikes] = {}
        self.counts: collections.Counter = collections.Counter()  #: /metrics label -> failures

    def record(self, address: str, reason: str) -> float:
        """Count one failure; return how long to hold its 401 answer."""
        now = time.monotonic()
        strikes = self.by_address.get(address)
        if strikes is None or now - strikes.last > AUTH_FORGET_SECONDS:
            strikes = self.by_address[address] = Strikes()
            self.bound()
        strikes.count += 1
        strikes.unlogged += 1
        strikes.last, strikes.reason = now, reason
        self.counts[AUTH_REASONS.get(reason, "other")] += 1
        if now - strikes.logged_at >= AUTH_LOG_SECONDS:
            self.report(address, strikes, now)
        extra = strikes.count - AUTH_FREE_FAILURES
        return 0.0 if extra <= 0 else min(AUTH_MAX_DELAY, 0.25 * 2 ** (extra - 1))

    def report(self, address: str, strikes: Strikes, now: float) -> None:
        if strikes.unlogged == 1:
            log.warning("auth failure: %s (from %s)", strikes.reason, address)
        else:
            log.warning("auth failure: %s (from %s: %d more in the last %.0f s)", strikes.reason, address,
                        strikes.unlogged, now - strikes.logged_at)
        strikes.logged_at, strikes.unlogged = now, 0

    def flush(self) -> None:
        """Log the counts whose window has passed, and forget quiet addresses (housekeeping)."""
        now = time.monotonic()
        for address, strikes in list(self.by_address.items()):
            if strikes.unlogged and now - strikes.logged_at >= AUTH_LOG_SECONDS:
                self.report(address, strikes, now)
            elif not strikes.unlogged and now - strikes.last > AUTH_FORGET_SECONDS:
                del self.by_address[address]

    def bound(self) -> None:
        """Past AUTH_MAX_ADDRESSES, forget the address tracked longest (a flood of addresses must
        not grow this without end)."""
        while len(self.by_address) > AUTH_MAX_ADDRESSES:
            del self.by_address[next(iter(self.by_address))]


# --------------------------------------------------------------------------------------------
# Chat ids: self-describing and tamper-proof, so replies route from the id alone
# --------------------------------------------------------------------------------------------


class ChatIds:
    """`<from>~<to>~<nonce>~<mac>`: the two parties are inside the id; the MAC (keyed by a
    secret kept in the database) proves the broker made it, also after a restart."""

    def __init__(self, key: bytes):
        self.key = key

    def _mac(self, text: str) -> str:
        # surrogatepass: a forged id may hold a lone surrogate; it must fail the MAC, not crash
        return hmac.new(self.key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:CHAT_MAC_CHARS]

    def new(self, sender: str, to: str) -> str:
        text = f"{sender}~{to}~{secrets.token_hex(4)}"
        return f"{text}~{self._mac(text)}"

    def parties(self, chat_id: str) -> tuple[str, str]:
        parts = chat_id.split("~")
        # The shape first: compare_digest raises TypeError on a str that is not ASCII (`a~b~c~é`).
        if len(parts) != 4 or not CHAT_MAC_RE.fullmatch(parts[3]) or \
                not hmac.compare_digest(self._mac("~".join(parts[:3])), parts[3]):
            raise Refused(f"unknown chat_id {chat_id!r}: use a chat_id from a message you received or sent", "unknown_chat")
        return parts[0], parts[1]


# --------------------------------------------------------------------------------------------
# Delivery: rate limit, listeners, push, redelivery
# --------------------------------------------------------------------------------------------


class RateLimit:
    """A token bucket per base: `rate` stored messages a second on average, up to `burst` at once.

    A send costs one token per copy it stores (a fan-out to 40 costs 40): what fills the disk is
    copies, not calls. A send larger than the burst may go when the bucket is full, and leaves it
    in debt, so over time a base still stores at most `rate` copies a second."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, tuple[float, float]] = {}  # base -> (tokens, monotonic time)

    def wait_needed(self, base: str, cost: int = 1) -> float:
        """Take `cost` tokens for `base`: 0.0 if it had them, else the seconds until it will."""
        if self.rate <= 0:
            return 0.0  # --rate 0 turns the limit off
        now = time.monotonic()
        tokens, then = self.buckets.get(base, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        needed = float(min(cost, self.burst))
        if tokens < needed:
            self.buckets[base] = (tokens, now)
            return (needed - tokens) / self.rate
        self.buckets[base] = (tokens - cost, now)
        return 0.0


class Metrics:
    """What GET /metrics counts: plain numbers and fixed reason words, never names, bodies or
    tokens. Counted on the event loop only."""

    def __init__(self):
        self.sends = 0  #: send/reply calls that stored mail
        self.stored = 0  #: copies stored (a fan-out to 40 is 40)
        self.repeats = 0  #: sends answered from a remembered client_msg_id
        self.pushes = 0  #: mail written on a listen stream, first pushes and redeliveries
        self.redeliveries = 0  #: pushes of attempt 2 and later
        self.acks = 0  #: messages newly acked
        self.expired = 0  #: unacked mail purged at its TTL
        self.bounces = 0  #: notices stored for senders of mail that expired unread (one a send)
        self.bounces_unsent = 0  #: such notices not stored: the sender was gone
        self.receipts = 0  #: message states `status` reported
        self.refusals: collections.Counter = collections.Counter()  #: reason -> refused tool calls
        self.dropped: collections.Counter = collections.Counter()  #: reason -> copies not stored


@dataclass
class Link:
    """One client connection (an MCP session, or a 2026-07-28 client's Dispatch-Session id)."""

    key: str
    token_id: str
    base: str
    name: str | None = None
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Listener:
    """A pending `listen` call: the one stream we can push a participant's mail on."""

    name: str
    link_key: str
    token_id: str  #: the token the listen was opened with: it ends when a reload drops that token
    push: Any  # async (params) -> None, bound to the listen request's own session and id
    keepalive: Any  # async (seconds listened) -> None, on the same stream
    #: (message id, its Mail when the send already stamped it pushed, else None: stamp at push)
    wake: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued: set = field(default_factory=set)
    #: id of fresh mail -> the future its send awaits, done once the push is written or never will be
    handed: dict = field(default_factory=dict)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str = ""

    def stop(self, reason: str) -> None:
        """End this listen early: 'superseded' by a newer one, 'revoked' or 'shutdown'. The wake
        queue gets an empty entry so the listen loop sees it at once, not at its next timeout."""
        self.stop_reason = reason
        self.stopped.set()
        self.wake.put_nowait((None, None))

    def offer(self, message_id: str, fresh: Mail | None = None) -> asyncio.Future | None:
        """Queue one message for this listener (once, however often it is offered). `fresh`:
        the message as just stored and stamped by its send, pushed without another write; for
        it, a future that `handed_over` completes."""
        if message_id not in self.queued:
            self.queued.add(message_id)
            self.wake.put_nowait((message_id, fresh))
        if fresh is None:
            return None
        return self.handed.setdefault(message_id, asyncio.get_running_loop().create_future())

    def handed_over(self, message_id: str | None = None) -> None:
        """The push of `message_id` is written, failed or will not happen (None: of everything
        still waiting, as the listen ends): its send may answer."""
        for key in list(self.handed) if message_id is None else [message_id]:
            future = self.handed.pop(key, None)
            if future is not None and not future.done():
                future.set_result(None)


def within_bytes(mails, budget: int) -> list[dict[str, Any]]:
    """The mails' params, oldest first, while their JSON fits in `budget` (at least one, so a
    single large message can always be read)."""
    taken, used = [], 0
    for mail in mails:
        params = mail.params()
        size = len(json.dumps(params)) + 2
        if taken and used + size > budget:
            break
        taken.append(params)
        used += size
    return taken


async def written(listener: Listener, what: str, write) -> bool:
    """Await one write on a listen's stream for at most PUSH_TIMEOUT: a receiver that stopped
    reading must not hold its listener forever. False (and the listen ends) if it failed. The
    write runs in the listen's own task: asyncio.wait_for would start a task for each push
    (Python 3.11), and a turn of the event loop before the write begins."""
    try:
        async with asyncio.timeout(PUSH_TIMEOUT):
            await write
    except Exception as exc:  # a dead or stuck stream
        log.warning("%s to %s failed (%s)", what, listener.name, type(exc).__name__)
        return False
    return True


def why_unread(unread: Unread) -> str:
    """Why a message was never read, as its bounce says it."""
    if unread.attempt:
        return (f"connected, and was pushed it {unread.attempt} time(s), but never proved it: its session's "
                "transcript never showed it (no ack)")
    if unread.recipient_seen is not None and unread.recipient_seen > unread.sent_at:
        return "connected again, but never proved it: it never read it (no ack)"
    return "never connected again"


def bounce_body(send: list[Unread], ttl: float) -> str:
    """A bounce: which message (the copies of one send), when it was sent, that it was never
    read and why, and its first words."""
    first = send[0]
    words = first.begins[:QUOTE_CHARS] + ("…" if len(first.begins) > QUOTE_CHARS else "")
    return "\n".join([
        f"Never read: your Dispatch message of {iso_time(first.sent_at)} (chat_id {first.chat_id}) waited the whole "
        f"mail TTL ({format_duration(ttl)}) unacked, and was deleted unread. Its recipients:",
        *(f"- {u.recipient} ({u.id}): {why_unread(u)}" for u in send),
        f"It began: {json.dumps(words, ensure_ascii=False)}",
        f"This notice is from the Dispatch broker itself ({POSTMASTER}): nobody reads replies to it. To try again, "
        "send the message anew.",
    ])


def receipt(row: tuple, now: float) -> dict[str, Any]:
    """A `status` entry from a Store.receipts row: stored, pushed, delivered or expired."""
    message_id, chat_id, recipient, begins, sent_at, expires_at, attempt, pushed_at, acked_at = row
    if acked_at is not None:
        state = "delivered"
    elif expires_at <= now:
        state = "expired"
    else:
        state = "pushed" if attempt else "stored"
    return {"id": message_id, "chat_id": chat_id, "to": recipient, "state": state, "sent_at": iso_time(sent_at),
            "attempts": attempt, "last_pushed_at": iso_time(pushed_at) if pushed_at else None,
            "delivered_at": iso_time(acked_at) if acked_at else None, "expires_at": iso_time(expires_at),
            "begins": begins}


class Broker:
    """Routing and delivery. Owns the Store, the links and the live listeners."""

    def __init__(self, store: Store, *, ttl: float, max_body: int, max_pending: int, ack_timeout: float,
                 rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST,
                 session_idle_timeout: float = DEFAULT_SESSION_IDLE_TIMEOUT,
                 max_names: int = DEFAULT_MAX_NAMES, max_db: int = DEFAULT_MAX_DB,
                 max_links: int = DEFAULT_MAX_LINKS):
        self.store = store
        self.limit = RateLimit(rate, burst)
        self.ttl = ttl
        self.max_body = max_body
        self.max_pending = max_pending
        self.ack_timeout = ack_timeout
        self.session_idle_timeout = session_idle_timeout
        self.max_names = max_names
        self.max_db = max_db
        self.chats = ChatIds(store.secret("chat_key"))
        self.links: dict[str, Link] = {}
        self.max_links = max_links
        self.links_of: collections.Counter = collections.Counter()  #: token id -> links in self.links
        #: token id -> monotonic time a refused MCP session of it was last logged (once a window)
        self.session_refusals_logged: dict[str, float] = {}
        self.listeners: dict[str, Listener] = {}
        self.listen_ended: dict[str, float] = {}  # name -> monotonic time its last listen ended
        #: ids of the tokens in force (set on start and every reload); None: not tracked
        self.token_ids: set[str] | None = None
        self.metrics = Metrics()
        self.started = time.time()
        #: message id -> futures of sends waiting for its ack (`await_acks`)
        self.ack_waiters: dict[str, list[asyncio.Future]] = {}

    # -- identity -----------------------------------------------------------------------------

    def link(self, key: str, token_id: str, base: str, create: bool = False) -> Link:
        """The link `key` names; made only by `identify` (`create`), so a request that never
        identifies leaves nothing behind. Refused when another token made it, and when this
        token already holds --max-links."""
        if not LINK_ID_RE.fullmatch(key):
            raise Refused(f"bad {LINK_HEADER} header: use 1-{LINK_ID_MAX} visible ASCII characters", "bad_link")
        link = self.links.get(key)
        if link is None:
            if not create:
                raise Refused("not identified: call identify(name) first", "not_identified")
            if self.links_of[token_id] >= self.max_links:
                log.warning("refused link: token %s (base %s) holds %d links, the limit", token_id, base,
                            self.links_of[token_id])
                raise Refused(f"this token holds {self.links_of[token_id]} connections, the limit (--max-links "
                              f"{self.max_links}): close some, or wait until idle ones are forgotten", "too_many_links")
            link = self.links[key] = Link(key, token_id, base)
            self.links_of[token_id] += 1
        elif link.token_id != token_id:
            log.warning("refused: session %s replayed with another token (base %s)", key[:12], base)
            raise Refused("this session belongs to another token", "foreign_session")
        link.last_used = time.monotonic()
        return link

    def forget_links(self, keys: list[str]) -> None:
        for key in keys:
            link = self.links.pop(key)
            self.links_of[link.token_id] -= 1
            if not self.links_of[link.token_id]:
                del self.links_of[link.token_id]

    def session_share(self) -> int:
        """MCP sessions one token may hold: --max-links, or less where that many for every token
        in force would pass MAX_SESSIONS."""
        return max(1, min(self.max_links, MAX_SESSIONS // max(1, len(self.token_ids or ()))))

    def session_refused(self, token_id: str, held: int) -> None:
        """Log a token's refused MCP session, at most once every AUTH_LOG_SECONDS a token."""
        now = time.monotonic()
        if now - self.session_refusals_logged.get(token_id, float("-inf")) >= AUTH_LOG_SECONDS:
            self.session_refusals_logged[token_id] = now
            log.warning("refused MCP session: token %s holds %d, its share (of %d, --max-links %d)", token_id, held,
                        MAX_SESSIONS, self.max_links)

    async def identify(self, link: Link, name: str) -> None:
        check_name(name)
        check_not_postmaster(name)
        if base_of(name) != link.base:
            log.warning("refused identify: token of base %r asked for name %r", link.base, name)
            raise Refused(f"your token is for base {link.base!r}; it cannot identify as {name!r}", "wrong_base")
        if self.store.participant(name) is None:
            names = self.store.count_names(link.base)
            if names >= self.max_names:
                log.warning("refused identify: base %r has %d names, the limit", link.base, names)
                raise Refused(f"base {link.base!r} has {names} names, the limit (--max-names {self.max_names}): "
                              "use one of them; a name is forgotten a TTL after its last use", "too_many_names")
        link.name = name
        await self.seen(name)
        log.info("identify %s", name)

    def tokens_changed(self, token_ids: set[str]) -> None:
        """After the tokens file was (re)read: forget the links of tokens no longer in it and end
        their listens at once, so a revoked token neither receives nor counts as live."""
        self.token_ids = set(token_ids)
        gone = [key for key, link in self.links.items() if link.token_id not in self.token_ids]
        ended = [listener for listener in self.listeners.values() if listener.token_id not in self.token_ids]
        for listener in ended:
            listener.stop("revoked")
        self.forget_links(gone)
        if gone or ended:
            log.info("tokens: %d links and %d listens of revoked tokens ended", len(gone), len(ended))

    def token_valid(self, token_id: str) -> bool:
        return self.token_ids is None or token_id in self.token_ids

    async def seen(self, name: str) -> None:
        """Record a sign of life. Best effort: while the disk is full, a heartbeat or identify must
        still answer (a plugin takes a refused identify for a refused name and exits), and nothing
        can be sent to the name meanwhile anyway. The next sign of life after that records it."""
        with contextlib.suppress(Unavailable):
            await self.store.touch(name, time.time())

    def caller(self, link: Link) -> str:
        """The identified name of this link, refusing links that never identified."""
        if link.name is None:
            raise Refused("not identified: call identify(name) first", "not_identified")
        return link.name

    def is_live(self, name: str) -> bool:
        if name in self.listeners:
            return True
        ended = self.listen_ended.get(name)
        return ended is not None and time.monotonic() - ended < LIVE_GRACE

    def live_count(self) -> int:
        return sum(1 for name in set(self.listeners) | set(self.listen_ended) if self.is_live(name))

    def presence(self, name: str) -> dict[str, Any]:
        """identify's and ping's answer: the caller's name and base, the broker's time, its pending count."""
        now = time.time()
        return {"ok": True, "name": name, "base": base_of(name), "server_time": iso_time(now),
                "pending": self.store.count_pending(name, now)}

    def who(self, me: str) -> list[dict[str, Any]]:
        """Every known participant, and how many of `me`'s messages each has not acked yet."""
        pending = self.store.pending_from(me, time.time())
        return [{"name": n, "base": b, "live": self.is_live(n), "last_seen": iso_time(seen),
                 "pending_for_you": pending.get(n, 0)}
                for n, b, seen in self.store.participants()]

    def mail_pending(self) -> int:
        """Stored messages not acked yet and not expired, of everyone."""
        return self.store.count_all_pending(time.time())

    def database_bytes(self) -> int:
        return self.store.size()

    # -- sending ------------------------------------------------------------------------------

    def resolve(self, sender: str, to: str) -> list[str]:
        """Recipients of `to`: a participant, every participant of a base, or every live one ('*')."""
        if to == "*":
            names = [n for n, _, _ in self.store.participants() if n != sender and self.is_live(n)]
            if not names:
                raise Refused("no live participant to send to: `*` reaches only participants listening now",
                              "no_recipient")
            return names
        check_name(to)
        check_not_postmaster(to)
        if BASE_RE.fullmatch(to):
            members = self.store.participants_of_base(to)
            names = [n for n in members if n != sender]
            if names:
                return names
            if members:
                raise Refused(f"you are the only participant of base {to!r}: nobody else to send to", "no_recipient")
            raise Refused(f"no participant of base {to!r} is known yet: nobody with that base has connected",
                          "unknown_recipient")
        if self.store.participant(to) is None:
            raise Refused(f"unknown recipient {to!r}: no participant of that name has ever connected (see who())",
                          "unknown_recipient")
        return [to]

    async def send(self, sender: str, to: str, body: str, chat_id: str | None = None,
                   client_msg_id: str | None = None) -> dict[str, Any]:
        """Store one copy for each recipient and push to the live ones, then answer (within
        PUSH_FIRST_WAIT). A repeat of a client_msg_id from the same base gets the first answer
        back, and nothing is stored."""
        if client_msg_id is not None:
            first = self.store.sent_answer(base_of(sender), check_client_msg_id(client_msg_id), time.time())
            if first is not None:
                return self.repeat(sender, client_msg_id, first)
        size = self.check_body(body)
        recipients = self.resolve(sender, to)
        # Charged per recipient, before the mailbox checks: a loop sending into full mailboxes
        # is paced like any other (RATE_LIMITED_PAUSE), not answered as fast as it asks.
        wait = self.limit.wait_needed(base_of(sender), len(recipients))
        if wait:
            log.warning("rate limited: %s (base %s), %d copies", sender, base_of(sender), len(recipients))
            raise RateLimited(f"rate limited: base {base_of(sender)!r} may send {self.limit.rate:g} messages a second "
                              f"(bursts of {self.limit.burst}; a send costs one per recipient, this one "
                              f"{len(recipients)}); not sent, try again in {wait:.2f} s")
        chat_id = chat_id or self.chats.new(sender, to)
        live = {name: self.listeners[name] for name in recipients if name in self.listeners}
        now = time.time()

        def job(db: sqlite3.Connection) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
            """Runs in the writer's transaction: the mailbox and size caps count every row committed
            or batched before this send's, so they hold exactly however many sends share a commit."""
            if client_msg_id is not None and (first := first_answer(db, base_of(sender), client_msg_id, now)):
                return first, None  # a send with the same id committed while this one waited
            accepted, dropped = self.with_room(recipients, pending_among(db, recipients, now))
            self.check_storage(len(accepted) * (size + ROW_OVERHEAD), bytes_in_use(db))
            rows = [{"id": "m_" + secrets.token_hex(MESSAGE_ID_BYTES), "chat_id": chat_id, "sender": sender,
                     "recipient": name, "body": body, "sent_at": now, "expires_at": now + self.ttl,
                     "attempt": 1 if name in live else 0, "pushed_at": now if name in live else None}
                    for name in accepted]
            result = {"chat_id": chat_id, "delivered_to": [n for n in accepted if n in live], "dropped": sorted(dropped),
                      "queued": any(n not in live for n in accepted), "reasons": dropped,
                      "live_ids": {row["recipient"]: row["id"] for row in rows if row["recipient"] in live}}
            sent_id = None if client_msg_id is None else {
                "base": base_of(sender), "client_msg_id": client_msg_id, "answer": json.dumps(result),
                "expires_at": now + self.ttl}
            store_mail(db, sender, rows, now, sent_id)
            return result, rows

        result, rows = await self.store.write(job, durable=True)
        if rows is None:
            return self.repeat(sender, client_msg_id, result)
        dropped = result["reasons"]
        self.count_send(rows, dropped)
        pushes = self.offer_stored(rows, live)
        if pushes:
            await asyncio.wait(pushes, timeout=PUSH_FIRST_WAIT)
        log.info("send %s -> %s (%s): %d bytes, delivered_to=%s queued=%s dropped=%s",
                 sender, to, chat_id, size, result["delivered_to"], result["queued"], sorted(dropped))
        return result

    def repeat(self, sender: str, client_msg_id: str, first: dict[str, Any]) -> dict[str, Any]:
        """A send's answer when its client_msg_id was sent before: the first answer; nothing stored."""
        self.metrics.repeats += 1
        log.info("send %s: repeat of client_msg_id %s, answered as first (%s)", sender, client_msg_id, first["chat_id"])
        return {**first, "repeat_of": client_msg_id}

    def offer_stored(self, rows: list[dict[str, Any]], live: dict[str, Listener]) -> list[asyncio.Future]:
        """Queue just-committed rows for their recipients' listeners as they are now: the commit
        let other work run. A listener the rows were stamped for gets the mail without another
        write, and a future its send awaits; one that began listening meanwhile may have read the
        pending ids before the commit, so it is offered the id (stamped at push). No listener:
        pending until the next listen, or pushed again after the ack timeout."""
        waits = []
        for row in rows:
            name, listener = row["recipient"], self.listeners.get(row["recipient"])
            if listener is not None and listener is live.get(name):
                mail = Mail(row["id"], row["chat_id"], row["sender"], name, row["body"], row["sent_at"], row["attempt"])
                waits.append(listener.offer(row["id"], mail))
            elif listener is not None:
                listener.offer(row["id"])
        return waits

    def check_body(self, body: str) -> int:
        """The body's size in bytes, once it is known to be storable text."""
        size = len(body.encode("utf-8", "surrogatepass"))
        if size > self.max_body:
            raise Refused(f"body is {size} bytes; the limit is {self.max_body} bytes", "body_too_large")
        if "\x00" in body or any(0xD800 <= ord(c) <= 0xDFFF for c in body):
            raise Refused("body contains a NUL or an unpaired surrogate; send valid UTF-8 text", "bad_body")
        return size

    def with_room(self, recipients: list[str], pending: dict[str, int]) -> tuple[list[str], dict[str, str]]:
        """(recipients whose mailbox has room, {recipient: why not} for the others), from each
        recipient's `pending` count; refused when none has."""
        accepted, dropped = [], {}
        for name in recipients:
            if pending.get(name, 0) >= self.max_pending:
                dropped[name] = f"mailbox full ({pending[name]} unacked messages, limit {self.max_pending})"
            else:
                accepted.append(name)
        if not accepted:
            reasons = "; ".join(f"{n}: {why}" for n, why in dropped.items())
            raise Refused(f"not sent: {reasons}", "mailbox_full")
        return accepted, dropped

    def check_storage(self, incoming: int, used: int) -> None:
        """Refuse mail that would take the database past --max-db (`used` bytes now). Only new
        mail is refused: nothing stored is ever deleted to make room."""
        if used + incoming > self.max_db:
            log.warning("storage full: %d bytes in use, %d more asked, limit %d", used, incoming, self.max_db)
            raise StorageFull(f"mailbox storage full: the broker's database holds {used / 2**20:.1f} MiB of its "
                              f"{self.max_db / 2**20:.1f} MiB limit (--max-db) and this send needs "
                              f"{incoming / 2**10:.0f} KiB more; not sent. Mail already accepted is kept; space "
                              "comes back as mail is acked and expires")

    def count_send(self, rows: list[dict[str, Any]], dropped: dict[str, str]) -> None:
        self.metrics.sends += 1
        self.metrics.stored += len(rows)
        self.metrics.dropped["mailbox_full"] += len(dropped)

    async def reply(self, sender: str, chat_id: str, body: str, client_msg_id: str | None = None) -> dict[str, Any]:
        first, second = self.chats.parties(chat_id)
        if sender == first:
            to = second
        elif sender == second or (BASE_RE.fullmatch(second) and base_of(sender) == second) or second == "*":
            to = first
        else:
            log.warning("refused reply: %s is not a party of %s", sender, chat_id)
            raise Refused(f"you ({sender}) are not a party of chat {chat_id}; start a new chat with send()", "not_a_party")
        return await self.send(sender, to, body, chat_id=chat_id, client_msg_id=client_msg_id)

    # -- receiving ----------------------------------------------------------------------------

    def inbox(self, name: str, peek: bool, limit: int) -> dict[str, Any]:
        """Pull mode: the count of `name`'s pending mail and, unless `peek`, the oldest of it, at
        most `limit` messages and about INBOX_MAX_BYTES."""
        now = time.time()
        count = self.store.count_pending(name, now)
        messages = [] if peek else within_bytes(self.store.iter_pending(name, now, limit), INBOX_MAX_BYTES // 2)
        return {"pending": count, "messages": messages}

    async def listen(self, name: str, link: Link, push, keepalive, wait_s: float, disconnected=None) -> str:
        """Push the participant's mail on this call's stream until wait_s passes, a newer
        listen supersedes it, or the client goes away; a keepalive when there was nothing to
        push for KEEPALIVE_SECONDS. Returns why it ended."""
        old = self.listeners.get(name)
        if old:  # the newest session of a name receives; the older one is told it was superseded
            log.info("listen %s: a newer session takes over the name", name)
            old.stop("superseded")
        listener = Listener(name, link.key, link.token_id, push, keepalive)
        self.listeners[name] = listener
        await self.seen(name)
        for message_id in self.store.pending_ids(name, time.time()):
            listener.offer(message_id)  # redelivered on every new listen until acked
        started = written = time.monotonic()
        deadline = started + wait_s
        reason = "timeout"
        try:
            while True:
                if listener.stopped.is_set():
                    reason = listener.stop_reason
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Wake for the next disconnect check, or else when a keepalive is due.
                wake = DISCONNECT_POLL if disconnected else written + KEEPALIVE_SECONDS - time.monotonic()
                try:  # not asyncio.wait_for: it would start a task for every get (see `written`)
                    async with asyncio.timeout(max(0.0, min(left, wake))):
                        message_id, fresh = await listener.wake.get()
                except TimeoutError:
                    if disconnected and await disconnected():
                        reason = "disconnected"
                        break
                    if time.monotonic() - written >= KEEPALIVE_SECONDS:
                        if not await self.keep_alive(listener, time.monotonic() - started):
                            reason = "keepalive failed"
                            break
                        written = time.monotonic()
                    continue
                if message_id is None:  # stop() woke us
                    continue
                listener.queued.discard(message_id)
                if not self.token_valid(listener.token_id):  # checked again before each push
                    reason = "revoked"
                    break
                pushed = await self.push_one(listener, message_id, fresh)
                listener.handed_over(message_id)
                if not pushed:
                    reason = "push failed"
                    break
                written = time.monotonic()
        except asyncio.CancelledError:  # a 2026-07-28 client closed the stream, or the broker stops
            reason = "cancelled"
            raise
        finally:
            listener.handed_over()
            if self.listeners.get(name) is listener:
                del self.listeners[name]
                if reason == "timeout":  # the plugin listens again at once: stay live meanwhile
                    self.listen_ended[name] = time.monotonic()
                else:
                    self.listen_ended.pop(name, None)
            log.info("listen %s ended: %s", name, reason)
        return reason

    async def push_one(self, listener: Listener, message_id: str, fresh: Mail | None = None) -> bool:
        mail = fresh or await self.store.mark_pushed(message_id, time.time())
        if mail is None:
            return True  # acked or expired since it was queued: nothing to do
        # On failure the mail stays pending for the next listen.
        if not await written(listener, f"push {mail.id}", listener.push(mail.params())):
            return False
        # The SDK hands the push to the stream's own task, which writes it at its next turn: yield
        # it that turn now, so the mail is on the wire before this task logs and wakes the send.
        await asyncio.sleep(0)
        log.info("push %s to %s (attempt %d)", mail.id, listener.name, mail.attempt)
        self.metrics.pushes += 1
        self.metrics.redeliveries += mail.attempt > 1
        return True

    async def keep_alive(self, listener: Listener, listened: float) -> bool:
        """Tell an idle listen's client its stream still works; False when the write is stuck."""
        return await written(listener, "keepalive", listener.keepalive(listened))

    async def ack(self, name: str, ids: list[str]) -> int:
        # An id of another shape was never made here, so it is nobody's: skipped, not looked up
        # (SQLite's encoder raises on a lone surrogate).
        ids = [i for i in ids if MESSAGE_ID_RE.fullmatch(i)]
        acked, foreign = await self.store.ack(name, ids, time.time())
        if foreign:
            log.warning("refused ack: %s tried to ack %d messages addressed to others", name, len(foreign))
            raise Refused(f"refused: {len(foreign)} of these ids are not addressed to you ({name}); nothing acked",
                          "foreign_ack")
        log.info("ack %s: %d of %d", name, acked, len(ids))
        self.metrics.acks += acked
        self.wake_ack_waiters(ids)
        return acked

    # -- receipts and bounces -----------------------------------------------------------------

    def receipts(self, sender: str, chat_id: str | None, message_id: str | None, last: int) -> list[dict[str, Any]]:
        """`status`: what became of `sender`'s own mail, newest first, at most `last` messages."""
        if chat_id is not None:
            self.chats.parties(chat_id)  # refuses an id the broker never made (and a lone surrogate)
        if message_id is not None and not MESSAGE_ID_RE.fullmatch(message_id):
            raise Refused(f"bad message_id {message_id!r}: a message id reads m_ and 16 hex digits", "bad_message_id")
        now = time.time()
        found = [receipt(row, now) for row in self.store.receipts(sender, chat_id, message_id, last)]
        self.metrics.receipts += len(found)
        return found

    async def await_acks(self, live_ids: dict[str, str], wait_s: float) -> dict[str, list[str]]:
        """After a send with `wait_s`: wait until every live recipient acked its copy (its
        transcript holds it) or wait_s passes; who did and who did not, as the mailbox says."""
        loop = asyncio.get_running_loop()
        futures = {message_id: loop.create_future() for message_id in live_ids.values()}
        for message_id, future in futures.items():
            self.ack_waiters.setdefault(message_id, []).append(future)
        try:
            acked = self.store.acked_among(list(futures))  # some may have been acked before we asked
            waiting = [future for message_id, future in futures.items() if message_id not in acked]
            if waiting:
                await asyncio.wait(waiting, timeout=wait_s)
        finally:
            for message_id, future in futures.items():
                self.forget_ack_waiter(message_id, future)
        acked = self.store.acked_among(list(futures))
        return {"acked_by": sorted(n for n, i in live_ids.items() if i in acked),
                "not_acked_by": sorted(n for n, i in live_ids.items() if i not in acked)}

    def wake_ack_waiters(self, ids: list[str]) -> None:
        for message_id in ids:
            for future in self.ack_waiters.pop(message_id, []):
                if not future.done():
                    future.set_result(None)

    def forget_ack_waiter(self, message_id: str, future: asyncio.Future) -> None:
        waiters = self.ack_waiters.get(message_id, [])
        if future in waiters:
            waiters.remove(future)
        if not waiters:
            self.ack_waiters.pop(message_id, None)

    def bounce_notices(self, now: float, gone: list[tuple[str, str]]) -> Callable[[list[Unread]], list[dict[str, Any]]]:
        """For the purge's commit: of mail that expired unread, the notices to store, one a send,
        from POSTMASTER, stored and pushed like any mail (a bounce never bounces). A sender that
        is gone (forgotten, or not seen for a TTL: the purge forgets it now) is not told: added
        to `gone`."""
        def notices(unread: list[Unread]) -> list[dict[str, Any]]:
            sends: dict[tuple, list[Unread]] = collections.defaultdict(list)
            for u in unread:
                sends[u.sender, u.chat_id, u.sent_at].append(u)
            rows = []
            for (sender, chat_id, _), send in sends.items():
                if send[0].sender_seen is None or send[0].sender_seen <= now - self.ttl:
                    gone.append((sender, chat_id))
                else:
                    rows.append(self.notice(sender, bounce_body(send, self.ttl), now))
            return rows
        return notices

    def bounced(self, stored: list[dict[str, Any]], gone: list[tuple[str, str]]) -> None:
        """The bounces the purge committed: counted, and offered to their senders if live."""
        for sender, chat_id in gone:
            log.info("no bounce for %s (%s): its sender is gone (not seen for the TTL)", chat_id, sender)
        self.metrics.bounces_unsent += len(gone)
        self.metrics.bounces += len(stored)
        for row in stored:
            log.info("bounce %s to %s: mail of theirs expired unread", row["id"], row["recipient"])
            if row["recipient"] in self.listeners:
                self.listeners[row["recipient"]].offer(row["id"])

    def notice(self, to: str, body: str, now: float) -> dict[str, Any]:
        """A message from the broker itself to `to`, in a chat of its own (a reply to it is refused)."""
        return {"id": "m_" + secrets.token_hex(MESSAGE_ID_BYTES), "chat_id": self.chats.new(POSTMASTER, to),
                "sender": POSTMASTER, "recipient": to, "body": body, "sent_at": now, "expires_at": now + self.ttl,
                "attempt": 0, "pushed_at": None}

    # -- housekeeping -------------------------------------------------------------------------

    def redeliver_due(self) -> None:
        now = time.time()
        for message_id, recipient in self.store.due_for_redelivery(now - self.ack_timeout, now):
            listener = self.listeners.get(recipient)
            if listener and message_id not in listener.queued:
                log.info("redelivery %s to %s: not acked within %.0fs", message_id, recipient, self.ack_timeout)
                listener.offer(message_id)

    async def purge(self) -> None:
        self.forget_idle_links()  # first: memory is freed even while the disk is full
        now = time.time()
        # A long listen is a sign of life too; each sender of mail that expired unread is told
        # (bounce_notices), in the commit that deletes that mail.
        gone: list[tuple[str, str]] = []  #: (sender, chat_id) of mail whose sender is not there to be told
        stored, expired = await self.store.purge_expired(now, self.ttl, list(self.listeners), self.ttl,
                                                         self.bounce_notices(now, gone))
        self.bounced(stored, gone)
        for message_id, sender, recipient in expired:
            log.info("expiry %s (%s -> %s): not acked within the TTL", message_id, sender, recipient)
            self.metrics.expired += 1

    def forget_idle_links(self) -> None:
        idle = time.monotonic() - self.session_idle_timeout
        listening = {listener.link_key for listener in self.listeners.values()}  # a long listen is no idleness
        gone = [k for k, link in self.links.items() if link.last_used < idle and k not in listening]
        self.forget_links(gone)
        if gone:
            log.info("links: forgot %d idle for %.0fs; %d remain", len(gone), self.session_idle_timeout, len(self.links))

    async def housekeeping(self, *also) -> None:
        """Redeliver, purge, and call each of `also` every HOUSEKEEPING_INTERVAL."""
        purge_every = max(HOUSEKEEPING_INTERVAL, min(PURGE_INTERVAL, self.ttl / 4, self.session_idle_timeout / 4))
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                for task in also:
                    task()
                self.redeliver_due()
                if time.monotonic() - last_purge >= purge_every:
                    last_purge = time.monotonic()
                    await self.purge()
            except Exception:  # keep the loop alive; the next round retries
                log.exception("housekeeping failed")

    def stop_listening(self) -> None:
        """On shutdown: end every pending listen now, so clients reconnect at once and
        uvicorn need not wait out its graceful timeout."""
        for listener in list(self.listeners.values()):
            listener.stop("shutdown")


# --------------------------------------------------------------------------------------------
# MCP server and tools
# --------------------------------------------------------------------------------------------


class MailNotification(BaseModel):
    """notifications/dispatch/mail, sent with related_request_id so it rides the listen call."""

    method: str = MAIL_METHOD
    params: dict[str, Any]


class SendResult(TypedDict):
    chat_id: str
    delivered_to: list[str]
    dropped: list[str]
    queued: bool
    acked_by: NotRequired[list[str]]  #: with wait_s: live recipients whose transcript holds it
    not_acked_by: NotRequired[list[str]]  #: with wait_s: live recipients that did not ack within it


class PingResult(TypedDict):
    ok: bool
    name: str
    base: str
    server_time: str
    pending: int


class AckResult(TypedDict):
    acked: int


class Participant(TypedDict):
    name: str
    base: str
    live: bool
    last_seen: str
    pending_for_you: int


class WhoResult(TypedDict):
    participants: list[Participant]


class InboxResult(TypedDict):
    pending: int
    messages: list[dict[str, Any]]


class ListenResult(TypedDict):
    ended: str


class Receipt(TypedDict):
    id: str
    chat_id: str
    to: str
    state: Literal["stored", "pushed", "delivered", "expired"]
    sent_at: str
    attempts: int
    last_pushed_at: str | None
    delivered_at: str | None
    expires_at: str
    begins: str


class StatusResult(TypedDict):
    messages: list[Receipt]


INSTRUCTIONS = """Dispatch broker: cross-session messaging between Claude Code agents.
Call identify(name) first on every connection; then send/reply/listen/inbox/mail.ack/who/ping/status.
Mail from postmaster is the broker's notice that mail of yours expired unread; it takes no reply."""


class DispatchServer(MCPServer):
    """The SDK's MCPServer, counting refused tool calls by reason for /metrics."""

    def __init__(self, *args, metrics: Metrics, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def call_tool(self, name, arguments, context=None):
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc, UnexpectedToolError):  # a crash is no refusal; the SDK logs it
                # The SDK wraps what a tool raised; a ToolError of its own is an argument it refused.
                self.metrics.refusals[getattr(exc.__cause__, "reason", "bad_arguments")] += 1
            raise


#: Text of a listen's result by how it ended (the structured result is {"ended": reason}).
LISTEN_ENDINGS = {
    "timeout": "listen ended: wait_s passed; listen again",
    "superseded": "listen ended: superseded by a newer listen of the same name",
    "revoked": "listen ended: token revoked (removed from the broker's tokens file); nothing more is pushed on it",
    "shutdown": "listen ended: the broker is shutting down; listen again once it is back",
}


def host_security(allowed_hosts: list[str], port: int) -> TransportSecuritySettings:
    """The SDK's DNS-rebinding protection: loopback and each --allowed-host, on any port. Its
    `host:*` pattern is a prefix test that lets `127.0.0.1:8765.evil` through, so `exact_hosts`
    checks the whole value first."""
    names = ["127.0.0.1", "localhost", "[::1]", *(h.rsplit(":", 1)[0] if re.search(r":[0-9]+$", h) else h
                                                  for h in allowed_hosts)]
    hosts = [h for name in names for h in (name, f"{name}:*")]
    origins = [f"{scheme}://{h}" for scheme in ("http", "https") for name in names[:3] for h in (name, f"{name}:*")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def by_tool(streaming, answering):
    """Two of the SDK's apps over the one server. A 2026-07-28 call of a tool in ANSWERED_TOOLS
    goes to `answering` (json_response): answered once, without the per-request event stream the
    SDK sets up in case a handler notifies, which costs every message broker CPU and latency.
    Everything else goes to `streaming`: `listen`, whose answer is the stream its mail rides on,
    2025-11-25 sessions, GETs. The SDK refuses a call whose Mcp-Name is not its tool's name, so
    a listen cannot land where its pushes would have no stream."""
    its_own = streaming.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app):  # each app's session manager runs for the broker's lifetime
        async with its_own(app), answering.router.lifespan_context(answering):
            yield

    streaming.router.lifespan_context = lifespan
    era = LINK_PROTOCOL.encode()

    async def routed(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"mcp-protocol-version") == era and headers.get(b"mcp-name") in ANSWERED_TOOLS:
                return await answering(scope, receive, send)
        return await streaming(scope, receive, send)

    return routed


def fair_sessions(manager, broker: Broker) -> None:
    """Each token may hold its share of the SDK's MCP sessions (`Broker.session_share`); past it
    its next initialize is answered 503 "Too many open sessions", while other tokens still open
    theirs. The SDK records each session's owner (for its own credential check) but limits only
    the total, so its admission step (mcp 2.3: `_admit_session`, run under its creation lock, and
    `_session_owners`) is wrapped; checked here, so an SDK without them stops the broker at start."""
    admit, owners = manager._admit_session, manager._session_owners
    # The SDK's own line names only the total; ours names the token, once a window.
    logging.getLogger("mcp.server.streamable_http_manager").addFilter(
        lambda record: not record.getMessage().startswith("Refusing to open a new session"))

    def admit_fairly(requestor):
        if requestor is not None:
            held = sum(1 for owner in owners.values() if owner["client_id"] == requestor["client_id"])
            if held >= broker.session_share():
                broker.session_refused(requestor["client_id"], held)
                return None
        return admit(requestor)

    manager._admit_session = admit_fairly


def exact_hosts(app, allowed_hosts: list[str], port: int):
    """Refuse a Host that is not exactly loopback (with any port, or none: a TCP forwarder or an
    SSH tunnel, `ssh -L 9000:127.0.0.1:8765`, keeps its own) or an --allowed-host (as given, or
    with this port when given without one), and an Origin that is not exactly loopback; the SDK's
    own check follows."""
    loopback = r"(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?"
    allowed = [re.escape(h) + ("" if re.fullmatch(r".*:[0-9]+", h) else f"(?::{port})?") for h in allowed_hosts]
    host_re = re.compile("|".join([loopback, *allowed]), re.IGNORECASE)
    origin_re = re.compile(r"https?://(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?", re.IGNORECASE)

    async def checked(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host, origin = headers.get(b"host", b"").decode("latin-1"), headers.get(b"origin")
            if not host_re.fullmatch(host):
                return await PlainTextResponse("Invalid Host header", status_code=421)(scope, receive, send)
            if origin is not None and not origin_re.fullmatch(origin.decode("latin-1")):
                return await PlainTextResponse("Invalid Origin header", status_code=403)(scope, receive, send)
        return await app(scope, receive, send)

    return checked


def guarded(app, failures: AuthFailures):
    """Every 401 (a missing, malformed, unknown or revoked token, or a wrong metrics bearer) is
    counted by client address in `failures`, logged through it, and answered after its delay."""

    async def guard(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        note: dict[str, str] = {}
        AUTH_NOTE.set(note)  # this task's context: verify_token runs below, in the same task

        async def send_answer(message):
            if message["type"] == "http.response.start" and message["status"] == 401:
                has_token = any(k == b"authorization" for k, _ in scope["headers"])
                reason = note.get("reason") or ("malformed Authorization header" if has_token else "no bearer token")
                delay = failures.record((scope.get("client") or ("?", 0))[0], reason)
                if delay:
                    await asyncio.sleep(delay)
            await send(message)

        return await app(scope, receive, send_answer)

    return guard


#: The Prometheus text exposition format, version 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_text(broker: Broker, failures: AuthFailures) -> str:
    """GET /metrics: counts and sizes only; no names, bodies or tokens."""
    m = broker.metrics
    families = [
        ("dispatch_participants_live", "gauge", "Participants listening now (or within the re-listen grace).",
         {(): broker.live_count()}),
        ("dispatch_links", "gauge", "Client connections the broker knows (MCP sessions and Dispatch-Session links).",
         {(): len(broker.links)}),
        ("dispatch_mail_pending", "gauge", "Stored messages not acked yet and not expired.",
         {(): broker.mail_pending()}),
        ("dispatch_database_bytes", "gauge", "Bytes of database pages in use.", {(): broker.database_bytes()}),
        ("dispatch_database_limit_bytes", "gauge", "--max-db: new mail is refused past it.", {(): broker.max_db}),
        ("dispatch_sends_total", "counter", "send and reply calls that stored mail.", {(): m.sends}),
        ("dispatch_messages_stored_total", "counter", "Messages stored, one per recipient.", {(): m.stored}),
        ("dispatch_repeated_sends_total", "counter", "Sends answered from an earlier client_msg_id, not stored.",
         {(): m.repeats}),
        ("dispatch_pushes_total", "counter", "Messages written on a listen stream, redeliveries included.",
         {(): m.pushes}),
        ("dispatch_redeliveries_total", "counter", "Pushes of a message not acked in time (attempt 2 and later).",
         {(): m.redeliveries}),
        ("dispatch_acks_total", "counter", "Messages acked.", {(): m.acks}),
        ("dispatch_expired_total", "counter", "Unacked messages purged at their TTL.", {(): m.expired}),
        ("dispatch_bounces_total", "counter", "Notices sent to senders of mail that expired unread, one a send.",
         {(): m.bounces}),
        ("dispatch_bounces_unsent_total", "counter", "Such notices not sent: the sender was gone (not seen for the TTL).",
         {(): m.bounces_unsent}),
        ("dispatch_receipts_total", "counter", "Message states reported by status.", {(): m.receipts}),
        ("dispatch_refusals_total", "counter", "Refused tool calls, by reason.",
         {(("reason", r),): n for r, n in sorted(m.refusals.items())}),
        ("dispatch_dropped_total", "counter", "Copies of a send not stored for one recipient, by reason.",
         {(("reason", r),): n for r, n in sorted(m.dropped.items())}),
        ("dispatch_auth_failures_total", "counter", "Requests refused 401, by reason.",
         {(("reason", r),): n for r, n in sorted(failures.counts.items())}),
    ]
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, number in samples.items():
            label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"{name}{label_text} {number}")
    return "\n".join(lines) + "\n"


def describe_send(result: dict[str, Any]) -> str:
    """The tool result text: exactly what happened, in one or two lines."""
    parts = [f"chat_id {result['chat_id']}."]
    if result.get("repeat_of"):
        parts.append(f"A repeat of client_msg_id {result['repeat_of']}: this is the first send's answer; nothing was stored again.")
    if result["delivered_to"]:
        parts.append(f"Pushed to {', '.join(result['delivered_to'])} (live; delivery is confirmed by their ack).")
    if result["queued"]:
        parts.append("Queued for offline recipients; they get it when they next listen.")
    for name, why in result["reasons"].items():
        parts.append(f"Dropped for {name}: {why}.")
    if "acked_by" in result:
        parts.append(describe_acks(result))
    return " ".join(parts)


def describe_acks(result: dict[str, Any]) -> str:
    """What a send's wait_s saw: whose transcript holds the message, and whose did not in time."""
    if not result["acked_by"] and not result["not_acked_by"]:
        return "No live recipient to wait for."
    parts = []
    if result["acked_by"]:
        parts.append(f"In the transcript of {', '.join(result['acked_by'])} (acked).")
    if result["not_acked_by"]:
        parts.append(f"Not acked within wait_s by {', '.join(result['not_acked_by'])}: it stays pending for them "
                     "(see status).")
    return " ".join(parts)


def build_app(broker: Broker, verifier: TokenVerifier, allowed_hosts: list[str], port: int,
              failures: AuthFailures | None = None, metrics_token: str | None = None):
    """The Starlette app: the MCP endpoint at /mcp (bearer auth), GET /healthz (no auth) and,
    with a metrics token, GET /metrics (that bearer)."""
    failures = failures or AuthFailures()
    server = DispatchServer(
        "dispatch",
        version=__version__,
        instructions=INSTRUCTIONS,
        token_verifier=verifier,
        # Resource-server-only auth: no OAuth routes, just the bearer check before MCP runs.
        auth=AuthSettings(issuer_url="http://127.0.0.1", resource_server_url=None),
        metrics=broker.metrics,
    )

    def link_of(ctx: Context, create: bool = False) -> Link:
        token = get_access_token()
        headers = ctx.headers or {}
        key = headers.get("mcp-session-id") or headers.get(LINK_HEADER)
        if token is None or not key:
            raise Refused(f"no session: use a stateful MCP session or send a {LINK_HEADER} header", "no_session")
        return broker.link(key, token.client_id, (token.claims or {})["base"], create)

    async def sent(ctx: Context, send, *args, client_msg_id: str | None, wait_s: float | None = None) -> CallToolResult:
        """send and reply: `send` (broker.send or broker.reply) from this link's caller, answered
        as text and structured result; a rate-limited send is refused after RATE_LIMITED_PAUSE.
        With wait_s, answered once every live recipient acked or wait_s passed."""
        sender = broker.caller(link_of(ctx))
        try:
            result = await send(sender, *args, client_msg_id=client_msg_id)
        except RateLimited:
            await asyncio.sleep(RATE_LIMITED_PAUSE)
            raise
        if wait_s:
            result = {**result, **await broker.await_acks(result.get("live_ids", {}), wait_s)}
        structured = {k: result[k] for k in ("chat_id", "delivered_to", "dropped", "queued", "acked_by", "not_acked_by")
                      if k in result}
        return CallToolResult(content=[TextContent(type="text", text=describe_send(result))],
                              structured_content=structured)

    Body = Annotated[str, Field(description="The message text (UTF-8, at most 64 KiB by default).")]
    ClientMsgId = Annotated[str | None, Field(description=(
        "Optional: your own id for this message (1-64 of A-Z a-z 0-9 _ -). Sending again with the same id "
        "(from your base, within the mail TTL) returns the first answer and stores nothing: retry safely."))]
    WaitS = Annotated[float | None, Field(description=(
        f"Optional: wait up to this many seconds (at most {MAX_SEND_WAIT:g}) until every live recipient's "
        "transcript holds the message (its ack); the result then says who acked (acked_by) and who did not "
        "(not_acked_by). Without it the call returns at once."), ge=0, le=MAX_SEND_WAIT)]

    @server.tool()
    async def identify(
        name: Annotated[str, Field(description="Participant name: your token's base, or base-suffix, e.g. 'backend-a8b3c1d2'.")],
        ctx: Context,
    ) -> PingResult:
        """Bind this connection to participant `name` (first call on a connection). The name's base
        must be your token's base. When a newer session of the same name listens, it takes over
        receiving and the older listen ends as superseded."""
        await broker.identify(link_of(ctx, create=True), name)
        return broker.presence(name)

    @server.tool()
    async def send(
        to: Annotated[str, Field(description="A participant name, a base name (all of that base), or '*' (every live participant).")],
        body: Body,
        ctx: Context,
        client_msg_id: ClientMsgId = None,
        wait_s: WaitS = None,
    ) -> Annotated[CallToolResult, SendResult]:
        """Send a message. Returns chat_id, delivered_to (pushed to a live listener now),
        queued (stored for an offline recipient) and dropped (will not get it; reason in the text);
        with wait_s, also acked_by and not_acked_by."""
        return await sent(ctx, broker.send, to, body, client_msg_id=client_msg_id, wait_s=wait_s)

    @server.tool()
    async def reply(
        chat_id: Annotated[str, Field(description="The chat_id of a message you received or sent.")],
        body: Body,
        ctx: Context,
        client_msg_id: ClientMsgId = None,
        wait_s: WaitS = None,
    ) -> Annotated[CallToolResult, SendResult]:
        """Reply into a chat: goes to the other party of `chat_id`. Same result as send."""
        return await sent(ctx, broker.reply, chat_id, body, client_msg_id=client_msg_id, wait_s=wait_s)

    @server.tool()
    async def ping(ctx: Context) -> PingResult:
        """Health probe and heartbeat: your name, base, the broker's time and your pending count."""
        name = broker.caller(link_of(ctx))
        await broker.seen(name)
        return broker.presence(name)

    @server.tool(name="mail.ack")
    async def mail_ack(
        ids: Annotated[list[str], Field(description="Message ids you have delivered.", max_length=10_000)],
        ctx: Context,
    ) -> AckResult:
        """Mark messages addressed to you as delivered, so they are not pushed again."""
        return {"acked": await broker.ack(broker.caller(link_of(ctx)), ids)}

    @server.tool()
    async def listen(
        wait_s: Annotated[float, Field(description="Seconds to stay open (at most 300).", ge=0, le=MAX_LISTEN_SECONDS)],
        ctx: Context,
    ) -> Annotated[CallToolResult, ListenResult]:
        """Receive: while this call is pending, your mail arrives as notifications/dispatch/mail on
        this call's stream; with a progress token, notifications/progress every few seconds without
        mail proves the stream alive. Returns {ended: why} after wait_s, when a newer listen of yours
        supersedes it, or when its token is revoked."""
        link = link_of(ctx)
        name = broker.caller(link)
        session, request_id, request = ctx.session, ctx.request_id, ctx.request_context.request

        async def push(params: dict[str, Any]) -> None:
            await session.send_notification(MailNotification(params=params), related_request_id=request_id)

        async def keepalive(listened: float) -> None:
            # The SDK's progress mechanism: it rides this call's stream in both protocol eras, and is
            # a no-op for a client that sent no progress token (it never asked, so it is not told).
            await ctx.report_progress(round(listened, 1), wait_s)

        async def disconnected() -> bool:
            return request is not None and await request.is_disconnected()

        # A 2025-11-25 session outlives its requests: the SDK does not cancel this handler when the
        # client goes away, so it must be asked. A 2026-07-28 handler is cancelled with its stream,
        # so it is not asked: polling each idle listen twice a second is costly (BENCHMARKS.md).
        legacy = bool((ctx.headers or {}).get("mcp-session-id"))
        ended = await broker.listen(name, link, push, keepalive, wait_s, disconnected if legacy else None)
        text = LISTEN_ENDINGS.get(ended, f"listen ended: {ended}")
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content={"ended": ended})

    @server.tool()
    async def who(ctx: Context) -> WhoResult:
        """List every known participant: name, base, live (listening now), last_seen, and how
        many of your messages each has not acked yet."""
        return {"participants": broker.who(broker.caller(link_of(ctx)))}

    @server.tool()
    async def inbox(
        ctx: Context,
        peek: Annotated[bool, Field(description="Only count pending mail.")] = False,
        limit: Annotated[int, Field(description="At most this many messages.", ge=1, le=INBOX_MAX_LIMIT)] = 50,
    ) -> InboxResult:
        """Pull mode: your pending (unacked) mail, oldest first, at most `limit` messages and about
        1 MB (`pending` counts them all). Ack what you handled with mail.ack, then ask again."""
        return broker.inbox(broker.caller(link_of(ctx)), peek, limit)

    @server.tool()
    async def status(
        ctx: Context,
        chat_id: Annotated[str | None, Field(description="Only the messages of this chat.")] = None,
        message_id: Annotated[str | None, Field(description="Only this message (m_ and 16 hex digits).")] = None,
        last: Annotated[int, Field(description="At most this many messages, newest first.", ge=1,
                                   le=STATUS_MAX_LIMIT)] = 20,
    ) -> StatusResult:
        """What became of mail you sent (yours only), newest first, one entry a recipient: state
        `stored` (waiting for an offline recipient), `pushed` (written to its session `attempts`
        times, not acked yet), `delivered` (its transcript holds it: acked at delivered_at) or
        `expired` (deleted unread at expires_at; you were sent a bounce). A message's state is
        kept for the mail TTL after it was delivered or expired. Read-only."""
        return {"messages": broker.receipts(broker.caller(link_of(ctx)), chat_id, message_id, last)}

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(request):
        return JSONResponse({"ok": True, "version": __version__, "uptime": round(time.time() - broker.started, 1)})

    if metrics_token:
        expected = f"Bearer {metrics_token}".encode()

        @server.custom_route("/metrics", methods=["GET"])
        async def metrics(request):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                note_auth_failure("bad metrics token")
                return PlainTextResponse("metrics need the metrics bearer token\n", status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"})
            return PlainTextResponse(metrics_text(broker, failures), media_type=METRICS_CONTENT_TYPE)

    options = dict(transport_security=host_security(allowed_hosts, port), max_request_body_size=MAX_REQUEST_BYTES,
                   session_idle_timeout=broker.session_idle_timeout)
    streaming = server.streamable_http_app(max_sessions=MAX_SESSIONS, **options)
    fair_sessions(server.session_manager, broker)  # the streaming app's: only it opens MCP sessions
    app = by_tool(streaming, server.streamable_http_app(json_response=True, **options))
    return exact_hosts(guarded(app, failures), allowed_hosts, port)


# --------------------------------------------------------------------------------------------
# Connections: the cap and read deadlines uvicorn's h11 protocol lacks
# --------------------------------------------------------------------------------------------


def descriptor_limit(wanted: int) -> int:
    """The process's soft limit on open files, first raised toward `wanted` as far as the hard
    limit allows (systemd's default soft limit is 1024, launchd's 256)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses past kern.maxfilesperproc
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def connection_cap(max_connections: int) -> tuple[int, int]:
    """(--max-connections held to half the descriptors left after FD_RESERVE, the descriptor limit)."""
    limit = descriptor_limit(2 * max_connections + FD_RESERVE)
    cap = max(1, min(max_connections, (limit - FD_RESERVE) // 2))
    if cap < max_connections:
        log.warning("connections: at most %d, not %d (--max-connections): the process may open only %d files "
                    "(raise LimitNOFILE, or launchd's NumberOfFiles)", cap, max_connections, limit)
    return cap, limit


class Connections:
    """Open client connections, by uvicorn's h11 protocol (`GuardedH11Protocol`). uvicorn counts
    connections (`limit_concurrency`) only to answer a request 503 once one arrives: a connection
    that never sends one is kept forever, and keeps real clients out. Here at most `cap` are open:
    a new one past it closes the connection that has waited longest for a whole request (a
    stranger's silent socket before a client's call in flight), so the broker never runs out of
    descriptors and a real client is let in at once. One waiting for its header or body past
    `read_timeout` is closed. Used on the event loop only."""

    def __init__(self, cap: int, read_timeout: float):
        self.cap = cap
        self.read_timeout = read_timeout
        #: connections without a whole request in them, those waiting longest first
        self.waiting: dict[Any, None] = {}
        self.evicted = 0  #: connections closed to make room (the newcomer, when none was waiting)

    def protocol(self) -> type:
        """The protocol class uvicorn's `http` setting takes, bound to this."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})

    def admit(self, new, open_now: int) -> None:
        """`new` has just connected, `open_now` connections with it: make room past the cap."""
        if open_now <= self.cap:
            return
        # Every other connection has a request in hand: then the newcomer is the one closed.
        victim = next((c for c in self.waiting if c is not new), new)
        victim.close("evicted to make room" if victim is not new else "over the connection cap")
        self.evicted += 1
        if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
            log.warning("connections: %d open, the cap (--max-connections): %d closed so far to make room, "
                        "each without a whole request in it", open_now, self.evicted)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's header and body and a place in
    `guard.waiting` while it has no whole request. Between requests uvicorn's keep-alive timer
    (timeout_keep_alive) closes it; everything else is uvicorn's."""

    guard: Connections  #: set by Connections.protocol()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.deadline: asyncio.TimerHandle | None = None
        self.waiting_for = ""  #: "header" or "body": what the deadline is for
        self.track(fresh=True)
        self.guard.admit(self, len(self.connections))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.track()

    def connection_lost(self, exc: Exception | None) -> None:
        self.expect("")
        self.guard.waiting.pop(self, None)
        super().connection_lost(exc)

    def track(self, fresh: bool = False) -> None:
        """After each event: what this connection waits for now, by h11's state of the client."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self.expect("body")
        elif state is h11.IDLE and (fresh or self.conn.trailing_data[0]):
            self.expect("header")  # a new connection, or a request begun after a kept-alive pause
        elif state is h11.IDLE:
            self.expect("")  # between requests: uvicorn's keep-alive timer
        else:  # the request is whole (being answered), or the connection is ending
            self.expect("")
            self.guard.waiting.pop(self, None)
            return
        self.guard.waiting.setdefault(self, None)

    def expect(self, what: str) -> None:
        """Arm the deadline for `what` ("header", "body"; "": none), unless it is armed already."""
        if what == self.waiting_for:
            return
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.waiting_for = what
        if what:
            self.deadline = self.loop.call_later(self.guard.read_timeout, self.close, f"no whole {what} in time")

    def close(self, why: str) -> None:
        self.guard.waiting.pop(self, None)
        if not self.transport.is_closing():
            log.debug("connection from %s closed: %s", self.client, why)
            with contextlib.suppress(h11.LocalProtocolError):  # as uvicorn's keep-alive timeout ends one
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def exhausted_descriptors_logger():
    """An event loop exception handler. Each time accept() finds no descriptor left, asyncio logs
    a traceback (Python 3.11: once for every try left in its accept batch) and retries a second
    later; this says it in one line a second. Anything else goes to asyncio's own handler."""
    logged_at = float("-inf")

    def handle(loop, context: dict) -> None:
        nonlocal logged_at
        if context.get("message") != "socket.accept() out of system resource":
            return loop.default_exception_handler(context)
        if time.monotonic() - logged_at >= 1.0:
            logged_at = time.monotonic()
            log.warning("out of file descriptors (%s): new connections wait a second", context.get("exception"))

    return handle


def accept_backlog(cap: int, limit: int) -> int:
    """uvicorn's `backlog`: the kernel's queue of connections not yet accepted, and also how many
    asyncio accepts at once, before the broker sees any of them. An evicted connection's descriptor
    is freed three turns of the loop after the newcomer was accepted, so three such batches must fit
    in the descriptors the cap leaves free. uvicorn's own 2048 wherever they do."""
    return max(16, min(UVICORN_BACKLOG, (limit - FD_RESERVE - cap) // 4))


# --------------------------------------------------------------------------------------------
# Install: the broker as one user's service on this machine
# --------------------------------------------------------------------------------------------

#: launchd's name for the agent and its plist's file name, as in net.dispatch.broker.plist.
LAUNCHD_LABEL = "net.dispatch.broker"
#: The user unit's name; dispatch.service in the repository is the system one.
SYSTEMD_UNIT = "dispatch.service"
#: The broker files install may have put in the data directory: a zipapp, or this module.
INSTALLED_NAMES = ("broker.pyz", "dispatch_broker.py")
#: A broker.pyz's first start unpacks it into PEX_ROOT: a few seconds, more on a busy machine.
INSTALL_START_TIMEOUT = 60.0
#: launchd takes this long to end a booted-out agent, SIGKILL included (the plist's ExitTimeOut).
LAUNCHD_EXIT_TIMEOUT = 15
#: Each client connection is a file descriptor: dispatch.service's LimitNOFILE, and launchd's
#: NumberOfFiles up to kern.maxfilesperproc of older Macs (net.dispatch.broker.plist's).
SYSTEMD_NOFILE = 16384
LAUNCHD_NOFILE = 10240
#: dispatch.service's hardening that a user's own systemd can apply: seccomp and prctl. Its
#: namespace settings (ProtectHome=, PrivateDevices=, ...) need unprivileged user namespaces in a
#: user unit, and where those are off the unit would not start at all (and ProtectHome= would hide
#: the broker's own files); CapabilityBoundingSet= is moot, a user's processes hold none.
USER_UNIT_HARDENING = """\
NoNewPrivileges=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077
"""
#: What to run once the broker is up: the plugin from a clone of this repository, then Claude Code
#: as usual (mail reaches an idle session through its own inbox; no flag is needed).
CLAUDE_LINE = ("claude plugin marketplace add /path/to/dispatch && claude plugin install dispatch@dispatch\n"
               "  claude")


def plugin_config_file(env=os.environ) -> Path:
    """The plugin's config.toml, where dispatch_plugin.config_file() looks (tests/test_contract.py)."""
    home = Path(env.get("HOME") or Path.home())
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "dispatch" / "config.toml"


@dataclass(frozen=True)
class Layout:
    """Where `install` puts each thing for one user of this machine."""

    data: Path  #: the broker file, the tokens file and the mailbox
    cache: Path  #: PEX_ROOT: where a broker.pyz unpacks on its first run; safe to delete
    service: Path  #: the systemd user unit, or the launchd agent
    config: Path  #: the plugin's config.toml
    log: Path | None  #: launchd's log file; None under systemd, whose journal keeps it

    @classmethod
    def for_user(cls, platform: str = sys.platform, env=os.environ) -> "Layout":
        home = Path(env.get("HOME") or Path.home())
        if platform == "darwin":
            library = home / "Library"
            return cls(library / "Application Support" / "dispatch", library / "Caches" / "dispatch",
                       library / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist", plugin_config_file(env),
                       library / "Logs" / "dispatch" / "broker.log")
        if platform.startswith(("win", "cygwin")):
            raise ConfigError("install knows launchd (macOS) and systemd (Linux): here, run `serve` yourself")
        return cls(Path(env.get("XDG_DATA_HOME") or home / ".local" / "share") / "dispatch",
                   Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "dispatch",
                   Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "systemd" / "user" / SYSTEMD_UNIT,
                   plugin_config_file(env), None)

    @property
    def tokens(self) -> Path:
        return self.data / "tokens"

    @property
    def db(self) -> Path:
        return self.data / "dispatch.db"


@dataclass(frozen=True)
class BrokerFile:
    """The broker file this process runs from, and the Python a service runs it with."""

    path: Path
    python: Path
    name: str  #: its name in the data directory, one of INSTALLED_NAMES


def running_broker(env=os.environ) -> BrokerFile:
    """A broker.pyz runs in a venv pex made in its cache, and pex names the zipapp in $PEX: the
    service runs the zipapp with the interpreter that venv was made from (the venv is pex's to
    remake). Otherwise (a checkout, pip) this module, with this interpreter, which has its mcp."""
    pex = env.get("PEX")
    if pex and Path(pex).is_file() and Path(__file__).resolve().is_relative_to(Path(sys.prefix).resolve()):
        return BrokerFile(Path(pex).resolve(), Path(sys._base_executable), INSTALLED_NAMES[0])
    return BrokerFile(Path(__file__).resolve(), Path(sys.executable), INSTALLED_NAMES[1])


def service_environment(layout: Layout, port: int) -> dict[str, str]:
    """The broker's settings under either service manager (README's table): loopback only."""
    return {"DISPATCH_HOST": DEFAULT_HOST, "DISPATCH_PORT": str(port), "DISPATCH_DB": str(layout.db),
            "DISPATCH_TOKENS": str(layout.tokens), "PEX_ROOT": str(layout.cache), "PYTHONUNBUFFERED": "1"}


def systemd_quoted(word: str, command: bool = False) -> str:
    """`word` as one quoted systemd word: % starts a specifier, and $ a variable in a command."""
    word = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (word.replace("$", "$$") if command else word) + '"'


def user_unit(layout: Layout, broker: Path, python: Path, port: int) -> str:
    """The systemd user unit: dispatch.service's restart, stop and file limits, and the part of
    its hardening a user unit can have, with every path written out."""
    environment = "".join(f"Environment={systemd_quoted(f'{k}={v}')}\n"
                          for k, v in service_environment(layout, port).items())
    command = " ".join(systemd_quoted(str(word), command=True) for word in (python, broker, "serve"))
    return f"""\
# Dispatch broker for one user, written by the broker's `install` (run again, it rewrites this file;
# `uninstall` removes it). Settings (README's table) go in `systemctl --user edit dispatch`, e.g.
#   [Service]
#   Environment=DISPATCH_TTL=24h
# then `systemctl --user restart dispatch`; for another port run `install --port` again, which also
# rewrites the plugin's config.toml. Logs: journalctl --user -u dispatch.

[Unit]
Description=Dispatch MCP broker (this user's)

[Service]
Type=exec
{environment}ExecStart={command}
# The broker re-reads its tokens file on SIGHUP.
ExecReload=/bin/kill -HUP $MAINPID
KillSignal=SIGTERM
# The broker gives open streams 3 s to finish and exits 0; past this, SIGKILL.
TimeoutStopSec=15
Restart=on-failure
RestartSec=5
# The broker takes half of these for client connections (--max-connections).
LimitNOFILE={SYSTEMD_NOFILE}

# Hardening: dispatch.service's, less what needs namespaces a user's systemd may not have.
{USER_UNIT_HARDENING}
[Install]
WantedBy=default.target
"""


def launchd_agent(layout: Layout, broker: Path, python: Path, port: int) -> bytes:
    """The launchd agent: net.dispatch.broker.plist with this machine's paths and interpreter."""
    log = str(layout.log)
    return plistlib.dumps({
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [str(python), str(broker), "serve"],
        "EnvironmentVariables": service_environment(layout, port),
        "WorkingDirectory": str(layout.data),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # again after a crash; a clean exit (SIGTERM) stays down
        "ThrottleInterval": 5,
        "ExitTimeOut": LAUNCHD_EXIT_TIMEOUT,
        "SoftResourceLimits": {"NumberOfFiles": LAUNCHD_NOFILE},
        "HardResourceLimits": {"NumberOfFiles": LAUNCHD_NOFILE},
        "Umask": 0o077,
        "StandardOutPath": log,
        "StandardErrorPath": log,
    })


def service_definition(layout: Layout, broker: Path, python: Path, port: int) -> bytes:
    if layout.log is not None:
        return launchd_agent(layout, broker, python, port)
    return user_unit(layout, broker, python, port).encode()


def put(path: Path, data: bytes) -> bool:
    """Make `path` hold `data`, readable by its owner only; True when that changed anything."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == data:
            return make_private(path)
    write_private(path, data)
    return True


def make_private(path: Path) -> bool:
    """chmod 600 unless it is already; True when it was not (the plugin refuses a config.toml with a
    token that others can read)."""
    if path.stat().st_mode & 0o077 == 0:
        return False
    path.chmod(0o600)
    return True


def plugin_config(path: Path) -> dict[str, Any] | None:
    """config.toml's settings: {} when there is none, None when it is not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


def plugin_config_text(url: str, token: str) -> bytes:
    return ("# Written by the Dispatch broker's `install`: the broker on this machine and your token for it.\n"
            "# `install --force` mints a new token; `uninstall` removes this file.\n"
            f"url = {json.dumps(url)}\ntoken = {json.dumps(token)}\n").encode()


def listed_token(path: Path, token: Any) -> Token | None:
    """The tokens file's entry for the plaintext `token`, if it has one."""
    if not isinstance(token, str) or not path.exists():
        return None
    digest = hash_token(token)
    return next((t for t in read_tokens(path) if hmac.compare_digest(t.sha256, digest)), None)


def install_token(layout: Layout, config: dict[str, Any], base: str, force: bool) -> tuple[str, str]:
    """(the token config.toml is to hold, what was done). The one it holds while the tokens file
    lists it for `base`, unless `force`; else a new one, and the one it replaces is revoked: its
    plaintext was only ever in config.toml."""
    old = listed_token(layout.tokens, config.get("token"))
    if old and old.base == base and not force:
        return config["token"], f"base {base}, id {old.id} (kept)"
    if old:
        revoke_token(layout.tokens, old.id)
    new, plaintext = mint_token(layout.tokens, base)
    return plaintext, f"base {base}, id {new.id} (minted{f'; {old.id} revoked' if old else ''})"


def default_base() -> str:
    """The user name, as a base: lower case, letters and digits only (john.doe -> johndoe)."""
    return re.sub(r"[^a-z0-9]", "", getpass.getuser().lower())[:32]


def port_in_use(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((DEFAULT_HOST, port), timeout=1):
        return True
    return False


def healthz(port: int) -> dict[str, Any] | None:
    """The broker's /healthz on this machine's `port`, or None (http.client: no proxy in between)."""
    connection = http.client.HTTPConnection(DEFAULT_HOST, port, timeout=2)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return json.loads(response.read()) if response.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def wait_healthy(port: int, logs: str) -> dict[str, Any]:
    deadline = time.monotonic() + INSTALL_START_TIMEOUT
    while time.monotonic() < deadline:
        health = healthz(port)
        if health:
            return health
        time.sleep(0.25)
    raise ServiceError(f"the broker did not answer http://{DEFAULT_HOST}:{port}/healthz within "
                       f"{INSTALL_START_TIMEOUT:.0f} s: see {logs}")


def run_tool(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def last_line(done: subprocess.CompletedProcess) -> str:
    return (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[-1]


class Systemd:
    """This user's systemd (`systemctl --user`): starts the unit at login, logs to the journal."""

    command = "systemctl"
    unit = f"{SYSTEMD_UNIT} (systemctl --user)"
    logs = "journalctl --user -u dispatch"
    #: A user's services stop when their last session ends, unless lingering is on.
    note = "runs while you are logged in (`loginctl enable-linger` keeps it running without)"

    def __init__(self, layout: Layout):
        self.layout = layout
        self.load_command = "systemctl --user daemon-reload && systemctl --user enable --now dispatch"

    def unreachable(self) -> str | None:
        done = run_tool(self.command, "--user", "show-environment")
        return None if done.returncode == 0 else f"`systemctl --user` cannot reach your systemd: {last_line(done)}"

    def running(self) -> bool:
        return run_tool(self.command, "--user", "is-active", "--quiet", SYSTEMD_UNIT).returncode == 0

    def start(self) -> None:
        for action in (["daemon-reload"], ["enable", SYSTEMD_UNIT], ["restart", SYSTEMD_UNIT]):
            done = run_tool(self.command, "--user", *action)
            if done.returncode != 0:
                raise ServiceError(f"systemctl --user {' '.join(action)}: {last_line(done)}")

    def stop(self) -> None:
        run_tool(self.command, "--user", "disable", "--now", SYSTEMD_UNIT)  # fails only when not there

    def forget(self) -> None:
        """After the unit file is gone: systemd keeps a unit it has read until it reloads."""
        run_tool(self.command, "--user", "daemon-reload")


class Launchd:
    """This user's launchd (the gui/<uid> domain): loads the agent at login, logs to layout.log."""

    command = "launchctl"
    unit = f"{LAUNCHD_LABEL} (launchctl)"
    note = "starts at login"

    def __init__(self, layout: Layout):
        self.layout = layout
        self.domain = f"gui/{os.getuid()}"
        self.logs = str(layout.log)
        self.load_command = f"launchctl bootstrap {self.domain} {shlex.quote(str(layout.service))}"

    def unreachable(self) -> str | None:
        done = run_tool(self.command, "print", self.domain)
        return None if done.returncode == 0 else f"no launchd session of yours here ({last_line(done)})"

    def running(self) -> bool:
        return run_tool(self.command, "print", f"{self.domain}/{LAUNCHD_LABEL}").returncode == 0

    def start(self) -> None:
        """Boot out the agent as it was (it may run an older file), then bootstrap it anew."""
        self.stop()
        deadline = time.monotonic() + LAUNCHD_EXIT_TIMEOUT
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        done = run_tool(self.command, "bootstrap", self.domain, str(self.layout.service))
        if done.returncode != 0:
            raise ServiceError(f"launchctl bootstrap {self.domain}: {last_line(done)}")

    def stop(self) -> None:
        run_tool(self.command, "bootout", f"{self.domain}/{LAUNCHD_LABEL}")  # fails only when not loaded

    def forget(self) -> None:
        """A booted-out agent is gone from launchd already."""


def service_kind(layout: Layout) -> type[Systemd] | type[Launchd]:
    return Launchd if layout.log is not None else Systemd


def service_manager(layout: Layout, files_only: bool) -> tuple[Systemd | Launchd | None, str]:
    """The service manager to load the broker into, or None and why not."""
    if files_only:
        return None, "--files-only"
    kind = service_kind(layout)
    if not shutil.which(kind.command):
        return None, f"no {kind.command} here, so no {kind.__name__.lower()} to run it"
    manager = kind(layout)
    why = manager.unreachable()
    return (None, why) if why else (manager, "")


@dataclass(frozen=True)
class Installed:
    """What install_files did: each field True when it changed something."""

    source: BrokerFile
    broker: Path  #: the copy in the data directory
    copied: bool
    token_note: str
    minted: bool
    defined: bool  #: the unit or agent written
    configured: bool  #: config.toml written, or made private


def check_install(layout: Layout, manager: Systemd | Launchd | None, config: dict[str, Any] | None, url: str,
                  base: str, port: int, force: bool) -> bool:
    """Refuse before anything is written; True when the service runs already."""
    if (config is None or config and config.get("url") != url) and not force:
        holds = "is not TOML" if config is None else f"points the plugin at {config.get('url')!r}"
        raise ConfigError(f"{layout.config} {holds}; install would replace it: run it again with --force")
    if not BASE_RE.fullmatch(base):
        raise ConfigError(f"cannot make a base of {base!r}: give one with --base ([a-z0-9]{{1,32}})")
    running = manager is not None and manager.running()
    if manager is not None and not running and port_in_use(port):
        raise ServiceError(f"something already listens on {DEFAULT_HOST}:{port} (a broker started by hand?): "
                           "stop it, or install with another --port")
    return running


def install_files(layout: Layout, config: dict[str, Any], url: str, base: str, port: int, force: bool) -> Installed:
    """The broker file, its token, the service definition, then config.toml: each only if it differs."""
    logs = [layout.log.parent] if layout.log else []  # launchd makes no directory for its log
    for directory in (layout.data, layout.service.parent, layout.config.parent, *logs):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    source = running_broker()
    broker = layout.data / source.name
    copied = not (broker.exists() and broker.samefile(source.path)) and put(broker, source.path.read_bytes())
    for other in set(INSTALLED_NAMES) - {source.name}:  # a zipapp replaced by the module, or back
        with contextlib.suppress(FileNotFoundError):
            (layout.data / other).unlink()
    token, token_note = install_token(layout, config, base, force)
    minted = token != config.get("token")
    defined = put(layout.service, service_definition(layout, broker, source.python, port))
    # A kept token keeps config.toml as it is: it may hold more settings (a name) of the user's.
    configured = put(layout.config, plugin_config_text(url, token)) if minted else make_private(layout.config)
    return Installed(source, broker, copied, token_note, minted, defined, configured)


def say(rows: list[tuple[str, str]]) -> None:
    """Print (label, text) rows as an aligned table."""
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"  {label:<{width}}  {text}")


def install(layout: Layout, manager: Systemd | Launchd | None, why_not: str, base: str, port: int,
            force: bool) -> None:
    """cmd_install's work, for `layout`; `manager` None leaves every service manager alone."""
    url = f"http://{DEFAULT_HOST}:{port}/mcp"
    config = plugin_config(layout.config)
    running = check_install(layout, manager, config, url, base, port, force)
    done = install_files(layout, config or {}, url, base, port, force)
    rows = [("broker", f"{done.broker} ({f'copied from {done.source.path}' if done.copied else 'unchanged'})"),
            ("python", str(done.source.python)),
            ("token", done.token_note),
            ("mailbox", f"{layout.db} ({'kept' if layout.db.exists() else 'made at first start'})"),
            ("service", f"{layout.service} ({'written' if done.defined else 'unchanged'})"),
            ("config", f"{layout.config} ({'written, mode 0600' if done.configured else 'unchanged'})")]
    restart = not running or done.copied or done.minted or done.defined
    if manager is not None:
        if restart:
            manager.start()
        health = wait_healthy(port, manager.logs)
        state = ("restarted" if running else "started") if restart else "running"
        rows += [("broker", f"{state}, {manager.note}; answers at {url} (version {health.get('version')})"),
                 ("logs", manager.logs)]
    print(f"Dispatch broker for {base} on this machine:")
    say(rows)
    if not (done.copied or done.minted or done.defined or done.configured or manager and restart):
        print("Nothing changed.")
    if manager is None:
        serve = [str(done.source.python), str(done.broker), "serve", "--port", str(port), "--db", str(layout.db),
                 "--tokens", str(layout.tokens)]
        print(f"\nNot started: {why_not}.")
        if why_not == "--files-only":
            print(f"Start the service with:\n  {service_kind(layout)(layout).load_command}\nor run the broker yourself:")
        else:
            print("Run the broker yourself (with a supervisor of your own to keep it up):")
        print(f"  {shlex.join(serve)}")
    for variable in ("DISPATCH_URL", "DISPATCH_TOKEN", "DISPATCH_TOKEN_COMMAND"):
        if os.environ.get(variable):
            print(f"Note: {variable} is set in this shell, and wins over config.toml for the plugin.")
    print(f"\nThen install the plugin from a clone of this repository, once, and start Claude Code as usual:\n"
          f"  {CLAUDE_LINE}")


def uninstall(layout: Layout, manager: Systemd | Launchd | None, purge: bool) -> None:
    """cmd_uninstall's work, for `layout`; `manager` None leaves every service manager alone."""
    config = plugin_config(layout.config) or {}
    ours = listed_token(layout.tokens, config.get("token"))  # read before the tokens file may go
    rows = []

    def remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            return
        rows.append(("removed", str(path)))

    if manager is not None:
        running = manager.running()
        manager.stop()  # also when not running: systemd may still have it enabled
        if running:
            rows.append(("stopped", manager.unit))
    if ours:
        remove(layout.config)
        with contextlib.suppress(OSError):  # only when empty: the plugin's directory, made by install
            layout.config.parent.rmdir()
        if not purge:
            revoke_token(layout.tokens, ours.id)  # its plaintext was only in config.toml
            rows.append(("revoked", f"token {ours.id} (base {ours.base})"))
    remove(layout.service)
    if manager is not None:
        manager.forget()
    for path in [layout.data / name for name in INSTALLED_NAMES] + [layout.cache]:
        remove(path)
    if purge:
        for path in [layout.db.with_name(layout.db.name + side) for side in ("", *SIDE_FILES)] + [layout.tokens]:
            remove(path)
        if layout.log is not None:
            remove(layout.log.parent)
        with contextlib.suppress(OSError):  # only when empty: nothing of anyone else's goes
            layout.data.rmdir()
            rows.append(("removed", str(layout.data)))
    elif layout.db.exists():
        rows.append(("kept", f"{layout.db} (the mailbox; `uninstall --purge` removes it)"))
    if layout.config.exists():
        rows.append(("kept", f"{layout.config} (not written by install: its token is not one this broker minted)"))
    if not any(label in ("stopped", "removed") for label, _ in rows):
        print("Nothing of the Dispatch broker was installed here.")
        return
    print("Dispatch broker uninstalled from this machine:")
    say(rows)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def default_db_path() -> str:
    state = os.environ.get("STATE_DIRECTORY")
    return str(Path(state.split(":")[0]) / "dispatch.db") if state else "dispatch.db"


def escape_controls(text: str) -> str:
    """`text` with each LOG_UNSAFE_RE character written as its Python escape (`\\x1b`, `\\u202e`)."""
    return LOG_UNSAFE_RE.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


class SafeFormatter(logging.Formatter):
    """One log record, one line a reader can trust: a value a client chose (an address, a header,
    a name) cannot clear the screen, retitle the terminal or forge a line. A traceback keeps its
    line breaks and nothing else."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return "\n".join(escape_controls(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(escape_controls(line) for line in stack_info.split("\n"))


def configure_logging(verbose: bool) -> None:
    """Every logger, uvicorn's and the SDK's included, writes through one SafeFormatter on stderr."""
    # journald stamps every line itself; elsewhere a timestamp helps.
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(fmt))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("mcp", "uvicorn.access", "httpx", "sse_starlette"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ShutdownServer(uvicorn.Server):
    """uvicorn's server, ending every pending listen as soon as SIGTERM/SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, broker: Broker):
        super().__init__(config)
        self.broker = broker

    def handle_exit(self, sig, frame) -> None:
        asyncio.get_running_loop().call_soon(self.broker.stop_listening)
        super().handle_exit(sig, frame)


def reload_tokens(verifier: TokenVerifier, broker: Broker) -> None:
    try:
        verifier.reload()
    except ConfigError as exc:  # keep the old set rather than lock everyone out
        log.error("SIGHUP: tokens not reloaded: %s", exc)
        return
    broker.tokens_changed(verifier.ids())


def print_dev_banner(args: argparse.Namespace, token: str) -> None:
    url = f"http://{args.host}:{args.port}/mcp"
    print(f"""Development token (base 'dev'), shown once (each --dev run adds one to {args.tokens or default_tokens_path()}):
  {token}

Connect a Claude Code session:
  claude mcp add dispatch -e DISPATCH_URL={url} -e DISPATCH_TOKEN={token} -- python3 {Path('dist/plugin.pyz').resolve()}
  claude --dangerously-load-development-channels server:dispatch
""", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the broker.

    Example: python3 broker.pyz serve --host 0.0.0.0 --port 8765 --allowed-host dispatch.example.net
    """
    tokens_path = Path(args.tokens) if args.tokens else default_tokens_path()
    if args.dev:
        # Only hashes are kept, so an earlier run's token cannot be shown again: mint one per run.
        print_dev_banner(args, mint_token(tokens_path, "dev")[1])
    elif not tokens_path.exists():
        raise ConfigError(f"no tokens file at {tokens_path}: create one with `token add BASE --tokens {tokens_path}`")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    store = Store(args.db or default_db_path(), synchronous=args.synchronous)
    broker = Broker(store, ttl=args.ttl, max_body=args.max_body, max_pending=args.max_pending,
                    ack_timeout=args.ack_timeout, rate=args.rate, burst=args.burst,
                    session_idle_timeout=args.session_idle_timeout, max_names=args.max_names, max_db=args.max_db,
                    max_links=args.max_links)
    verifier = TokenVerifier(tokens_path)
    broker.tokens_changed(verifier.ids())
    failures = AuthFailures()
    app = build_app(broker, verifier, args.allowed_host, args.port, failures, args.metrics_token)
    # log_config=None: uvicorn's records reach our handler (SafeFormatter) instead of its own.
    # X-Forwarded-For is read only from --trusted-proxy: uvicorn's default trusts loopback, so any
    # local client could choose the address the broker logs and throttles failed logins by.
    cap, descriptors = connection_cap(args.max_connections)
    connections = Connections(cap, args.read_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            http=connections.protocol(), timeout_keep_alive=KEEP_ALIVE_SECONDS,
                            backlog=accept_backlog(cap, descriptors),
                            log_config=None, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                            proxy_headers=bool(args.trusted_proxy), forwarded_allow_ips=args.trusted_proxy,
                            timeout_graceful_shutdown=3, lifespan="on")
    server = ShutdownServer(config, broker)
    # What the imports and the app made lives as long as the process: frozen (once its garbage
    # is gone), a full garbage collection no longer walks it. It is ~90k objects: each full pass
    # took ~50 ms, and every message in flight waited for it.
    gc.collect()
    gc.freeze()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload_tokens, verifier, broker)
        loop.set_exception_handler(exhausted_descriptors_logger())
        await broker.purge()  # mail whose TTL passed while the broker was down is never delivered late
        housekeeping = asyncio.create_task(broker.housekeeping(failures.flush))
        log.info("durability: synchronous=%s (%s)", store.synchronous, DURABILITY[store.synchronous])
        log.info("dispatch broker %s serving on %s://%s:%d/mcp (db %s, ttl %.0fs, metrics %s, at most %d "
                 "connections)", __version__, "https" if args.tls_cert else "http", args.host, args.port, store.path,
                 args.ttl, "on" if args.metrics_token else "off", connections.cap)
        try:
            await server.serve()
        finally:
            housekeeping.cancel()
            store.close()
            log.info("dispatch broker stopped")

    asyncio.run(run())
    return 0


def cmd_token_add(args: argparse.Namespace) -> int:
    """Mint a token for BASE, store its hash, print the token (only time it is shown).

    Example: python3 broker.pyz token add backend --tokens /etc/dispatch/tokens
    """
    token, plaintext = mint_token(Path(args.tokens) if args.tokens else default_tokens_path(), args.base)
    print(plaintext)
    print(f"token {token.id} for base {token.base} added", file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    """List tokens: id, base, created (never the token itself).

    Example: python3 broker.pyz token list --tokens /etc/dispatch/tokens
    """
    for t in read_tokens(Path(args.tokens) if args.tokens else default_tokens_path()):
        print(f"{t.id}  {t.base:<32}  {t.created}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Remove token ID. A running broker drops it when it re-reads the file on SIGHUP; under
    systemd, `systemctl restart dispatch` (LoadCredential copies the file only at start).

    Example: python3 broker.pyz token revoke 1a2b3c4d --tokens /etc/dispatch/tokens
    """
    revoke_token(Path(args.tokens) if args.tokens else default_tokens_path(), args.id)
    print(f"token {args.id} revoked", file=sys.stderr)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """Run the broker as your own service on this machine, and point all your sessions at it.

    Copies this broker file into your data directory (~/.local/share/dispatch, on macOS
    ~/Library/Application Support/dispatch; the mailbox and token hashes live there too), mints a
    token for --base, writes a systemd user unit (Linux) or a launchd agent (macOS), writes the
    plugin's config.toml (mode 0600) with the broker's URL and the token, then starts the service
    and waits for /healthz. Run again, it changes nothing and keeps the token and the mailbox.
    Where no service manager answers (a container), it says so and prints the serve command.

    Example: python3 broker.pyz install
    """
    layout = Layout.for_user()
    manager, why_not = service_manager(layout, args.files_only)
    install(layout, manager, why_not, args.base or default_base(), args.port, args.force)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Stop the service install made and remove its files, keeping the mailbox (--purge: not).

    Removes the unit or agent, the broker file, its unpacked cache and config.toml, if that still
    holds the token install minted (which is revoked). The mailbox and the tokens file stay, for a
    later install; --purge removes them and the logs too.

    Example: python3 broker.pyz uninstall
    """
    layout = Layout.for_user()
    uninstall(layout, service_manager(layout, args.files_only)[0], args.purge)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatch-broker", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, parent=sub):
        doc = fn.__doc__.strip()
        c = parent.add_parser(name, help=doc.splitlines()[0], description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        c.set_defaults(func=fn)
        return c

    env = os.environ.get
    s = command("serve", cmd_serve)
    # Defaults here are the built-in ones; the environment's values are put in their place by
    # environment_settings(), checked exactly as the flag's own values are.
    s.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    s.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="TCP port (default %(default)s)")
    s.add_argument("--db", help="SQLite file (default $STATE_DIRECTORY/dispatch.db or ./dispatch.db)")
    s.add_argument("--tokens", help="tokens file (default $CREDENTIALS_DIRECTORY/tokens or ./tokens)")
    s.add_argument("--ttl", type=parse_duration, default=DEFAULT_TTL,
                   help=f"how long undelivered mail is kept (default {format_duration(DEFAULT_TTL)})")
    s.add_argument("--max-body", type=positive_int, default=DEFAULT_MAX_BODY, help="largest body in bytes (default %(default)s)")
    s.add_argument("--max-pending", type=positive_int, default=DEFAULT_MAX_PENDING, help="unacked messages per recipient (default %(default)s)")
    s.add_argument("--max-names", type=positive_int, default=DEFAULT_MAX_NAMES, help="names one base may create (default %(default)s)")
    s.add_argument("--max-links", type=positive_int, default=DEFAULT_MAX_LINKS,
                   help="connections (MCP sessions and Dispatch-Session links) one token may hold (default %(default)s)")
    s.add_argument("--max-db", type=byte_size, default=DEFAULT_MAX_DB,
                   help=f"database size past which new mail is refused, e.g. 500M, 1G (default {format_size(DEFAULT_MAX_DB)})")
    s.add_argument("--rate", type=non_negative_number, default=DEFAULT_RATE, help="messages a second per base, one per recipient; 0 for no limit (default %(default)g)")
    s.add_argument("--burst", type=positive_int, default=DEFAULT_BURST, help="messages a base may send at once (default %(default)s)")
    s.add_argument("--ack-timeout", type=parse_duration, default=DEFAULT_ACK_TIMEOUT,
                   help=f"push again if not acked within (default {format_duration(DEFAULT_ACK_TIMEOUT)})")
    s.add_argument("--session-idle-timeout", type=parse_duration, default=DEFAULT_SESSION_IDLE_TIMEOUT,
                   help="forget a client connection that made no request for this long "
                        f"(default {format_duration(DEFAULT_SESSION_IDLE_TIMEOUT)})")
    s.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                   help="client connections open at once; past it the one waiting longest without a whole request "
                        "is closed (default %(default)s, at most half the process's file limit)")
    s.add_argument("--read-timeout", type=parse_duration, default=DEFAULT_READ_TIMEOUT,
                   help="close a connection whose request header, or then its body, has not arrived within this "
                        f"(default {format_duration(DEFAULT_READ_TIMEOUT)})")
    s.add_argument("--synchronous", choices=list(DURABILITY), default=DEFAULT_SYNCHRONOUS,
                   help="SQLite fsync level (default %(default)s: survives power loss)")
    s.add_argument("--allowed-host", action="append", type=host_name, default=[],
                   help="Host header the broker answers to besides loopback, e.g. dispatch.example.net (repeatable)")
    s.add_argument("--trusted-proxy", action="append", type=proxy_address, default=[],
                   help="address or network of a reverse proxy whose X-Forwarded-For names the client (repeatable); "
                        "by default the header is ignored")
    s.add_argument("--tls-cert", help="PEM certificate: serve HTTPS directly")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--metrics-token", type=metrics_token,
                   help="serve GET /metrics (Prometheus text) to this bearer token; off without one. Prefer DISPATCH_METRICS_TOKEN: flags show in ps")
    s.add_argument("--dev", action="store_true", help="mint a development token (base 'dev') and print it with the lines that connect Claude Code")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.serve = s  # for environment_settings()

    t = sub.add_parser("token", help="Manage bearer tokens (hashes in the tokens file).")
    tsub = t.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    for name, fn in (("add", cmd_token_add), ("list", cmd_token_list), ("revoke", cmd_token_revoke)):
        c = command(name, fn, tsub)
        if name == "add":
            c.add_argument("base", help="the participant base this token may identify as")
        if name == "revoke":
            c.add_argument("id", help="token id from `token list`")
        c.add_argument("--tokens", default=env("DISPATCH_TOKENS"), help="tokens file (default $CREDENTIALS_DIRECTORY/tokens or ./tokens)")

    i = command("install", cmd_install)
    i.add_argument("--base", help="the base of the token to mint (default: your user name, letters and digits)")
    i.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="loopback TCP port (default %(default)s)")
    i.add_argument("--force", action="store_true",
                   help="mint a new token (revoking the one config.toml holds) and replace a config.toml that "
                        "points elsewhere")
    u = command("uninstall", cmd_uninstall)
    u.add_argument("--purge", action="store_true", help="remove the mailbox, the tokens file and the logs too")
    for c in (i, u):
        c.add_argument("--files-only", action="store_true",
                       help="leave systemd and launchd alone: only write (remove) the files")
    return p


#: serve settings whose environment variable is not DISPATCH_<FLAG>; None: no variable.
SETTING_ENV = {"allowed_host": "DISPATCH_ALLOWED_HOSTS", "dev": None, "verbose": None, "help": None}


def environment_settings(serve: argparse.ArgumentParser, environ) -> dict[str, Any]:
    """dest -> value of each serve setting set in the environment, converted and checked exactly
    as its flag is (argparse checks neither `choices` nor ranges of a default). A bad value is a
    ConfigError naming the variable: DISPATCH_SYNCHRONOUS=OFF must not start a broker that
    answers sends without an fsync."""
    values = {}
    for action in serve._actions:
        variable = SETTING_ENV.get(action.dest, "DISPATCH_" + action.dest.upper())
        if not action.option_strings or variable is None or variable not in environ:
            continue
        text = environ[variable]
        many = isinstance(action, argparse._AppendAction)
        items = [item for item in text.split(",") if item] if many else [text]
        try:
            converted = [action.type(item) if action.type else item for item in items]
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{variable}={text!r}: {exc}") from None
        if action.choices and any(value not in action.choices for value in converted):
            raise ConfigError(f"{variable}={text!r}: use one of {', '.join(action.choices)}")
        values[action.dest] = converted if many else converted[0]
    return values


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    if args.command == "serve":
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # uvicorn installs its own once running
    try:
        if args.command == "serve":  # the environment fills in what the command line did not say
            p.serve.set_defaults(**environment_settings(p.serve, os.environ))
            args = p.parse_args(argv)
        return args.func(args)
    except (DispatchError, OSError, sqlite3.Error) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
