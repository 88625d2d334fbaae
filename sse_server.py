#!/usr/bin/env python3
"""sse_server.py - a Server-Sent Events publish/subscribe server in one file.

Standard library only (CPython 3.9+). Drop the file on a host and run it:

    python3 sse_server.py                  # http://127.0.0.1:8000/ serves a demo page
    python3 sse_server.py --help           # every option and limit

Endpoints
    GET  /events?topic=a&topic=b   subscribe: a text/event-stream that stays open;
                                   send Last-Event-ID (or ?lastEventId=) to resume
    POST /publish?topic=a          publish: form fields (topic, data, event, retry)
                                   or a raw UTF-8 body become one event
    GET  /.well-known/mercure      the Mercure protocol (draft-dunglas-mercure-07): subscribe
    POST /.well-known/mercure      with topic selectors (URI templates), publish a form
    GET  /healthz                  "ok"
    GET  /stats                    JSON counters
    GET  /metrics                  the same for Prometheus (loopback, or --metrics-token)
    GET  /<file>                   files under static/ (index.html at /)

Python API
    server = SSEServer(("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever).start()
    event_id, reached = server.broker.publish("news", {"a": 1}, event="update")
    server.shutdown(); server.server_close()

How it works: every connection has a thread of its own (BurstAcceptMixIn
starts them; the ThreadingHTTPServer base gives the rest of the HTTP
server). A subscriber's thread registers a Subscriber (topics, a queue, its
socket) with the Broker, then waits on its queue, writing what arrives, or a
heartbeat comment when nothing did for a while. Broker.publish formats an
event once; the fan-out writes it straight to every idle subscriber's
socket without waking its thread, and queues it for the busy ones. Nothing
ever waits for a client: a subscriber whose queue is full is dropped, so a
slow client only hurts itself. Event ids and a History (memory, an SQLite
file with --store, Redis with --redis) make reconnection lossless
(Last-Event-ID); JWT scopes, CORS, TLS and per-client limits are there for
exposed deployments. Every option is a field of Settings.

Roadmap (each name is real: a test resolves them all)
  One connection:
    SSEServer.serve_forever                   socketserver's loop
      BurstAcceptMixIn._handle_request_noblock  accept what waits; verify_request
        BurstAcceptMixIn.process_request      take a StartupTurn, start a thread
          BurstAcceptMixIn.process_request_thread   the connection's own thread
            SSERequestHandler.handle_one_request    read one request
              SSERequestHandler.parse_request       the request line, read_headers
              SSERequestHandler._dispatch           SSERequestHandler.routes
  A subscribe (GET /events):
    SSERequestHandler._handle_events
      SSERequestHandler._check_events_request   validate_topics, AccessPolicy.check_subscribe
      Broker.subscribe                        register; History.replay up to that mark
      SSERequestHandler._start_stream         head and first bytes; the replay
      StreamSink.pump                         park, write what is queued, heartbeats
      StreamSink.say_goodbye, StreamSink.close, Broker.unsubscribe
  A publish (POST /publish):
    SSERequestHandler._handle_publish
      RateLimiter.acquire, AccessPolicy.check_publisher, parse_publish
      Broker.publish                          an id and a frame, queued for fan-out
        Broker._flush_through                 one leader at a time takes the batch:
          History.append                      kept (with --store: synced) first,
          Broker._shares_locked               who gets what,
          Broker._write_shares                StreamSink.deliver to each subscriber
  The Mercure hub: the same chains, from other routes:
    SSERequestHandler._handle_mercure_subscribe   compile_selector, mercure_claims,
                                              then SSERequestHandler._stream
    SSERequestHandler._handle_mercure_publish     validate_iris, is_reserved_topic,
                                              then Broker.publish (private, IRI ids)
    Broker._subscribers_of_locked             exact topics, then selectors matching
                                              (Broker._patterns_matching_locked, cached)
Meant to be overridden: SSERequestHandler.routes with its handler methods (a
route family), SSEServer.verify_request (refuse a peer before it costs a
thread), handle_error and log_message. Meant to be implemented: History
(where events are kept: SSEServer(history=...)).

The premise of the I/O: every connection's socket is non-blocking. A read or
write is tried at once, one system call on every platform, and only when it
would block does the caller wait, in SocketIO.wait, with a deadline. So a
publisher's direct write to a subscriber can never wait for that client, and
the one place that waits is also where a connection gives back its start-up
turn. What the platform offers (poll or select, the selector for hang-ups,
MSG_NOSIGNAL, OS tuning) is detected once, in the "Platform" section.
"""

from __future__ import annotations

import argparse
import array
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import errno
import functools
import gc
import hashlib
import hmac
import http.cookies
import http.server
import io
import ipaddress
import json
import logging
import math
import mimetypes
import os
import queue
import random
import re
import secrets
import select
import selectors
import signal
import socket
import sys
import threading
import _thread
import time
import urllib.parse
import uuid
from http import HTTPStatus
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

__all__ = [
    "Settings", "SSEServer", "SSERequestHandler", "BurstAcceptMixIn", "Broker", "Subscriber",
    "StreamSink",
    "SocketIO", "Published", "Payload",
    "HTTPError", "ServiceUnavailable", "format_event", "format_comment", "format_retry",
    "encode_chunk", "split_lines", "parse_event_id", "format_reset_event", "validate_topics",
    "parse_query", "parse_publish", "PublishRequest", "resolve_static_path",
    "History", "Retention", "MemoryHistory", "SQLiteHistory", "RedisHistory", "StoreError",
    "open_history",
    "AccessPolicy", "RateLimiter", "decode_jwt", "encode_jwt", "HMACKey", "RSAPublicKey",
    "topic_allowed", "main",
]

__version__ = "1.0"

logger = logging.getLogger("sse_server")
access_logger = logging.getLogger("sse_server.access")     # one line per request

# --- Defaults and limits (each one is a command-line option or documented) ---
DEFAULT_PORT = 8000
HEARTBEAT_S = 15.0              # idle time before a ": heartbeat" comment
RETRY_MS = 3000                 # reconnection delay told to clients at connect
QUEUE_SIZE = 1000               # writes (an event or a batch) waiting before a subscriber is dropped
MAX_BODY_BYTES = 64 * 1024      # largest publish body accepted
HISTORY_SIZE = 1000             # events kept per topic for Last-Event-ID replay
MAX_TOPICS = 10_000             # topics holding history; least recently published dropped first
MAX_CLIENTS = 10_000            # concurrent subscribers; beyond it: 503
WRITE_TIMEOUT_S = 10.0          # a client that accepts no bytes for this long is dropped
REQUEST_TIMEOUT_S = 5.0         # whole request (line, headers, body) must arrive in this time
MAX_TOPIC_CHARS = 128
MAX_TOPICS_PER_REQUEST = 32
MAX_EVENT_NAME_CHARS = 128
MAX_QUERY_FIELDS = 100
MAX_HEADER_BYTES = 32 * 1024    # request line excluded: all header lines together
MAX_TOKEN_BYTES = 8192          # longest JWT accepted
JWT_LEEWAY_S = 30               # clock skew allowed on exp and nbf
JWT_COOKIE = "sse_token"        # cookie read for a JWT (EventSource withCredentials)
RETRY_AFTER_S = 5               # Retry-After sent with 503 when full
SHUTDOWN_GRACE_S = 1.5          # time streams get to say goodbye before sockets are cut
CLOSE_WAIT_S = 2.0              # longest shutdown waits for a fan-out (or a commit) under way
SHUTDOWN_RETRY_MS = (1000, 5000)  # reconnect spread told to clients at shutdown
MAX_CHUNK_BYTES = 256 * 1024    # replayed frames are joined into chunks up to this size
SELECTOR_SETS = 1000            # distinct mercure.subscribe lists kept compiled
PATTERN_CACHE_TOPICS = 10_000  # topics whose matching selectors (URI templates) are cached
FAN_OUT_SPLIT_SUBSCRIBERS = 500   # a fan-out to more is shared with a helper thread
THREAD_STACK_BYTES = 256 * 1024  # per-thread stack when run from the command line
STARTUP_TURNS = 1               # connections being set up at once (see BurstAcceptMixIn)
STARTUP_WAIT_S = 0.05           # start a connection anyway after waiting this long for a turn
ACCEPTS_PER_WAKEUP = 64         # connections taken from the backlog per wake-up of the accept loop
ACCEPT_BACKOFF_S = (0.05, 1.0)  # pause of the accept loop out of descriptors: first, longest
ACCEPT_WARNING_EVERY_S = 10.0   # at most one "out of descriptors" warning this often
HANGUP_CHECK_S = 1.0            # longest a hang-up goes unnoticed where the selector needs a re-poll
SELECT_MAX_SOCKETS = 500        # streams watched where only select() exists (512 on Windows)
FORGOTTEN_BUCKETS = 16384       # marks of topics --max-topics dropped (8 bytes each)
STORE_CACHE_SIZE = 100          # events per topic of a --store also kept in memory, for replay
STORE_RETRY_AFTER_S = 2         # Retry-After sent with 503 while the store cannot write
STORE_BUSY_TIMEOUT_S = 1.0      # wait this long for another program's write lock (a backup's)
STORE_CHECKPOINT_PAGES = 256    # the store's write-ahead log is folded into the file at this size
STORE_WAL_LIMIT_BYTES = 1 << 20  # and cut back to this size afterwards
REDIS_KEY = "sse:events"        # the Redis Stream every --redis instance reads and writes

# Topic names: ASCII letters, digits and - _ . : / @ (no spaces, no '*', which
# is kept for patterns, and no '+', which a query string turns into a space).
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_.:/@-]+")
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
EVENT_STREAM_CONTENT_TYPE = "text/event-stream; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
# A status's code and phrase, looked up once: reading an enum member's
# .value or .phrase is a descriptor call, and every response needs both.
_STATUS_CODES = {status: status.value for status in HTTPStatus}
_STATUS_PHRASES = {status: status.phrase for status in HTTPStatus}
# The demo page is written to work under this policy: no inline script or style.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


# --- Settings: every option, defined once --------------------------------------------------
#
# Each field of Settings is one option: its default, its command-line flag and
# its help text, side by side. build_parser() derives the command line from
# this list, main() builds a Settings from the arguments, SSEServer takes one
# (or keywords that override the defaults), and the handler reads
# self.server.settings. Adding an option is adding one field here.

def _option(default, flag: str, help: str, *, metavar: Optional[str] = None,
            type: Optional[Callable] = None, env: Optional[str] = None,
            group: Optional[str] = None, shown: Optional[str] = None,
            choices: Optional[Sequence[str]] = None, check: Optional[str] = None,
            secret: bool = False):
    """A Settings field. `shown` is how --help names the default (else it is
    the default itself); `check` is "positive" or "not_negative"; a `secret`
    is left out of the settings' repr (and so of logs and tracebacks)."""
    kind = ("flag" if isinstance(default, bool) else "list" if isinstance(default, tuple)
            else "value")
    return dataclasses.field(default=default, repr=not secret, metadata={
        "flag": flag, "help": help, "metavar": metavar, "type": type, "env": env,
        "group": group, "shown": shown, "choices": choices, "check": check, "kind": kind})


_SECURITY = "access control and hardening"
_STORE = "history across restarts"
_REDIS = "several instances (Redis)"
_MERCURE = "the Mercure hub (/.well-known/mercure)"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a server can be told. Checked when made: a value that cannot
    work raises ValueError, naming its command-line flag."""

    host: str = _option("127.0.0.1", "--host",
                        "address to bind; 0.0.0.0 or :: for every interface")
    port: int = _option(DEFAULT_PORT, "--port",
                        "port to bind; 0 picks a free one (the URL is printed)", type=int)
    static_dir: Optional[str] = _option(None, "--static", "folder served at /", metavar="DIR",
                                        shown="static/ beside this file")
    csp: Optional[str] = _option(None, "--csp", "Content-Security-Policy sent with HTML files",
                                 metavar="POLICY",
                                 shown="a strict one for the demo page, none for --static")
    heartbeat_s: float = _option(HEARTBEAT_S, "--heartbeat",
                                 "seconds of silence before a heartbeat comment",
                                 metavar="S", type=float, check="positive")
    retry_ms: int = _option(RETRY_MS, "--retry",
                            "reconnection delay sent to clients when they connect",
                            metavar="MS", type=int, check="not_negative")
    queue_size: int = _option(QUEUE_SIZE, "--queue-size",
                              "writes (each an event or a batch of events) a subscriber may "
                              "have waiting, once its socket buffer is full, before it is "
                              "dropped", metavar="N", type=int, check="positive")
    max_body_bytes: int = _option(MAX_BODY_BYTES, "--max-body",
                                  "largest publish body (413 beyond)", metavar="BYTES",
                                  type=int, check="positive")
    history_size: int = _option(HISTORY_SIZE, "--history",
                                "events kept per topic for Last-Event-ID replay (0: none)",
                                metavar="N", type=int, check="not_negative")
    history_ttl_s: Optional[float] = _option(None, "--history-ttl",
                                             "also forget events older than this many seconds",
                                             metavar="S", type=float, check="positive")
    max_topics: int = _option(MAX_TOPICS, "--max-topics",
                              "topics holding history; least recently published forgotten "
                              "first", metavar="N", type=int, check="positive")
    max_clients: int = _option(MAX_CLIENTS, "--max-clients",
                               "concurrent subscribers (503 with Retry-After beyond)",
                               metavar="N", type=int, check="positive")
    write_timeout_s: float = _option(WRITE_TIMEOUT_S, "--write-timeout",
                                     "drop a client that accepts no bytes for this long",
                                     metavar="S", type=float, check="positive")
    request_timeout_s: float = _option(REQUEST_TIMEOUT_S, "--request-timeout",
                                       "time a client has to send a whole request (and idle "
                                       "keep-alive time; streams have none)",
                                       metavar="S", type=float, check="positive")
    max_header_bytes: int = _option(MAX_HEADER_BYTES, "--max-header-bytes",
                                    "largest request header section (431 beyond)",
                                    metavar="BYTES", type=int, check="positive")
    log_level: str = _option("info", "--log-level", "logging verbosity (the access log is "
                             "at info)", choices=("debug", "info", "warning", "error"))
    cpu: Optional[int] = _option(None, "--cpu",
                                 "run on this one CPU (where the OS lets a process be pinned, "
                                 "as Linux does): threads hand the GIL over more cheaply on "
                                 "one core; see README, Performance", metavar="N", type=int,
                                 check="not_negative")
    publish_token: Optional[str] = _option(
        None, "--publish-token", "require 'Authorization: Bearer T' to publish; without it "
        "only loopback may publish", metavar="T", env="SSE_PUBLISH_TOKEN", secret=True,
        group=_SECURITY)
    jwt_secret: Optional[str] = _option(None, "--jwt-secret",
                                        "verify HS256 JWTs with this secret", metavar="S",
                                        env="SSE_JWT_SECRET", secret=True, group=_SECURITY)
    jwt_secret_file: Optional[str] = _option(
        None, "--jwt-secret-file", "read the JWT secret from this file (trailing newline "
        "ignored)", metavar="FILE", group=_SECURITY)
    jwt_public_key: Optional[str] = _option(
        None, "--jwt-public-key", "verify RS256 JWTs (as identity providers issue them) with "
        "this PEM public key file", metavar="FILE", group=_SECURITY)
    jwt_cookie: str = _option(JWT_COOKIE, "--jwt-cookie",
                              "cookie that may carry the JWT (EventSource withCredentials)",
                              metavar="NAME", group=_SECURITY)
    private_topics: tuple = _option((), "--private-topic",
                                    "topic (or prefix ending in *) that needs a JWT to "
                                    "subscribe; repeatable", metavar="PATTERN", group=_SECURITY)
    require_auth: bool = _option(False, "--require-auth",
                                 "every topic needs a JWT to subscribe (on the Mercure hub: "
                                 "no anonymous subscribers)", group=_SECURITY)
    mercure_subscriptions: bool = _option(
        False, "--subscriptions", "Mercure: publish an update at every subscribe and "
        "disconnect, and serve the subscriptions API (presence)", group=_MERCURE)
    cors_origins: tuple = _option((), "--cors-origin",
                                  "let browsers on this origin (or *, without credentials) "
                                  "use /events, /publish and the Mercure hub; repeatable",
                                  metavar="ORIGIN",
                                  group=_SECURITY)
    certfile: Optional[str] = _option(None, "--certfile", "serve HTTPS with this certificate",
                                      metavar="PEM", group=_SECURITY)
    keyfile: Optional[str] = _option(None, "--keyfile", "private key for --certfile",
                                     metavar="PEM", group=_SECURITY)
    max_clients_per_ip: int = _option(0, "--max-clients-per-ip",
                                      "concurrent streams per client address (503 beyond; "
                                      "0: no limit)", metavar="N", type=int,
                                      check="not_negative", group=_SECURITY)
    publish_rate: float = _option(0.0, "--publish-rate",
                                  "publishes per second per client address (429 beyond; "
                                  "0: no limit)", metavar="R", type=float,
                                  check="not_negative", group=_SECURITY)
    publish_burst: int = _option(20, "--publish-burst",
                                 "publishes allowed in a burst with --publish-rate",
                                 metavar="N", type=int, check="positive", group=_SECURITY)
    trusted_proxies: tuple = _option((), "--trusted-proxy",
                                     "a reverse proxy (IP address or CIDR block) whose "
                                     "X-Forwarded-For / Forwarded header names the client; "
                                     "repeatable", metavar="ADDR", group=_SECURITY)
    metrics_token: Optional[str] = _option(
        None, "--metrics-token", "let 'Authorization: Bearer T' read /metrics from anywhere; "
        "without it only loopback may", metavar="T", env="SSE_METRICS_TOKEN", secret=True,
        group=_SECURITY)
    store: Optional[str] = _option(None, "--store",
                                   "keep the history and the ids in this SQLite file (created "
                                   "if missing): acknowledged events survive a crash or a "
                                   "power cut, and clients resume across restarts",
                                   metavar="FILE", env="SSE_STORE", group=_STORE)
    store_cache_size: int = _option(STORE_CACHE_SIZE, "--store-cache",
                                    "events per topic of the store also kept in memory; "
                                    "replays that reach further back read the file",
                                    metavar="N", type=int, check="not_negative", group=_STORE)
    redis_url: Optional[str] = _option(None, "--redis",
                                       "share events, ids and replay through Redis: "
                                       "redis://[:password@]host:port/db or rediss://; needs "
                                       "'pip install redis'", metavar="URL",
                                       env="SSE_REDIS_URL", secret=True, group=_REDIS)
    redis_key: str = _option(REDIS_KEY, "--redis-key",
                             "the Redis Stream used; instances sharing it share events",
                             metavar="KEY", group=_REDIS)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata["kind"] == "list" and not isinstance(value, tuple):
                object.__setattr__(self, field.name, tuple(value))   # a list given by a caller
            check, flag = field.metadata["check"], field.metadata["flag"]
            if check is None or (value is None and field.default is None):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{flag} must be a number, not {value!r}")
            if check == "positive" and not value > 0:
                raise ValueError(f"{flag} must be greater than 0")
            if check == "not_negative" and not value >= 0:
                raise ValueError(f"{flag} must not be negative")
        if (self.private_topics or self.require_auth) and not (
                self.jwt_secret or self.jwt_secret_file or self.jwt_public_key):
            raise ValueError("--private-topic and --require-auth need --jwt-secret, "
                             "--jwt-secret-file or --jwt-public-key")
        if self.keyfile and not self.certfile:
            raise ValueError("--keyfile needs --certfile")
        try:
            parse_trusted_proxies(self.trusted_proxies)
        except ValueError as error:
            raise ValueError(f"--trusted-proxy: {error}") from None

    def retention(self) -> "Retention":
        """The history bounds these settings give (see Retention)."""
        return Retention(self.history_size, self.history_ttl_s, self.max_topics)


# --- Platform: what this host offers, detected once -------------------------------
#
# Everything that differs between Linux, macOS, BSD and Windows is decided
# here, by what the running Python has (never by sys.platform); the rest of
# the file only uses these names. The optional OS tuning of main() (futex
# hash, open-files limit, thread stacks) is tried the same way, and silently
# skipped where the facility is missing; --cpu, being asked for, is refused
# with a clear error instead (_pin_to_cpu).

try:
    import ssl
except ImportError:     # a Python built without OpenSSL still serves plain HTTP
    ssl = None
try:
    import sqlite3
except ImportError:     # some small builds leave it out; only --store needs it
    sqlite3 = None
try:
    import fcntl        # POSIX: flock() (Linux, macOS, BSD)
except ImportError:
    fcntl = None
try:
    import msvcrt       # Windows: locking()
except ImportError:
    msvcrt = None

# Where a non-blocking call stopped: for a plain socket BlockingIOError; a TLS
# socket may need to read to write (or the other way round) for its records.
_TLS_WANTS_READ = (ssl.SSLWantReadError,) if ssl else ()
_TLS_WANTS_WRITE = (ssl.SSLWantWriteError,) if ssl else ()
_READ_BLOCKED = (BlockingIOError, *_TLS_WANTS_READ)
_WRITE_BLOCKED = (BlockingIOError, *_TLS_WANTS_WRITE)

# send() flags for plain sockets. MSG_NOSIGNAL (Linux, BSD) keeps a write to
# a vanished peer from raising SIGPIPE in a program that restored SIGPIPE's
# default action; without it Python's own start-up (SIG_IGN) is what protects
# the process, and Windows has no SIGPIPE at all.
SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)

def _socket_fds_readable() -> bool:
    """Can a socket's descriptor be read with os.readv? Yes on POSIX; on
    Windows there is no os.readv and a socket is no C file descriptor."""
    if not hasattr(os, "readv"):
        return False
    try:
        ours, peer = socket.socketpair()
    except OSError:
        return False
    with ours, peer:
        try:
            peer.send(b"x")
            return os.readv(ours.fileno(), [bytearray(1)]) == 1
        except OSError:
            return False


if _socket_fds_readable():
    def recv_plain(sock: socket.socket, buffer) -> int:
        """One read of a plain socket. os.readv parses its arguments with
        Argument Clinic, socket.recv_into with the older parser, whose buffers
        cost every connection's thread one more 4 KiB page of C stack for as
        long as it lives (measured: 14.9 against 18.9 KiB per subscriber)."""
        return os.readv(sock.fileno(), [buffer])
else:
    def recv_plain(sock: socket.socket, buffer) -> int:
        """One read of a plain socket."""
        return sock.recv_into(buffer)

def wait_with_poll(sock: socket.socket, for_write: bool, timeout_s: float) -> bool:
    """Wait until `sock` can be written (or read); False if `timeout_s` passed.
    A peer that hung up counts as ready: the next call reports it."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT if for_write else select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


def wait_with_select(sock: socket.socket, for_write: bool, timeout_s: float) -> bool:
    """The same with select(), which every platform has (Windows has no poll)."""
    waiting = ([], [sock], [sock]) if for_write else ([sock], [], [sock])
    return any(select.select(*waiting, max(0.0, timeout_s)))


wait_ready = wait_with_poll if hasattr(select, "poll") else wait_with_select


def lock_file(file) -> Optional[bool]:
    """Lock an open file against other processes for as long as it stays
    open; the OS lets go when the process ends, however it ends. False if
    another process holds it, None where there is no such lock."""
    if fcntl is not None and hasattr(fcntl, "flock"):
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    if msvcrt is not None:
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    return None


def hangup_selector() -> tuple[selectors.BaseSelector, Optional[int]]:
    """The best selector this platform has for watching many sockets (epoll,
    kqueue, devpoll, poll or select), and how many it can watch (None: as
    many as the process may open)."""
    selector = selectors.DefaultSelector()
    return selector, SELECT_MAX_SOCKETS if isinstance(selector, selectors.SelectSelector) else None


# --- Errors -------------------------------------------------------------------

class HTTPError(Exception):
    """An error answered to the client with `status` and a one-line reason."""

    status = HTTPStatus.BAD_REQUEST

    def __init__(self, reason: str, *, status: Optional[HTTPStatus] = None,
                 headers: Iterable[tuple[str, str]] = ()):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
        self.headers = list(headers)


class BadRequest(HTTPError):
    status = HTTPStatus.BAD_REQUEST


class InvalidEvent(BadRequest, ValueError):
    """An event field that cannot be sent (a 400 over HTTP, a ValueError to
    a Python caller of Broker.publish)."""


class Unauthorized(HTTPError):
    status = HTTPStatus.UNAUTHORIZED

    def __init__(self, reason: str, error: Optional[str] = None):
        challenge = f'Bearer error="{error}"' if error else "Bearer"
        super().__init__(reason, headers=[("WWW-Authenticate", challenge)])


class Forbidden(HTTPError):
    status = HTTPStatus.FORBIDDEN


class NotFound(HTTPError):
    status = HTTPStatus.NOT_FOUND


class Conflict(HTTPError):
    status = HTTPStatus.CONFLICT


class MethodNotAllowed(HTTPError):
    status = HTTPStatus.METHOD_NOT_ALLOWED

    def __init__(self, method: str, allowed: Iterable[str]):
        allow = ", ".join(allowed)
        super().__init__(f"method {method} not allowed here; use {allow}",
                         headers=[("Allow", allow)])


class PayloadTooLarge(HTTPError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class TooManyRequests(HTTPError):
    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(reason, headers=[("Retry-After", str(retry_after_s))])


class ServiceUnavailable(HTTPError):
    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, reason: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(reason, headers=[("Retry-After", str(retry_after_s))])
        self.retry_after_s = retry_after_s


# --- Wire format: pure functions, no I/O -----------------------------------------

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """Split on CRLF, CR and LF: the line ends the event-stream parser knows.

    str.splitlines() would also split on \\v, \\f, \\x1c, \\u2028 and others,
    which a browser keeps inside one line.
    """
    return _LINE_BREAK.split(text)


def _check_field(name: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise InvalidEvent(f"{name} must not contain CR, LF or NUL: {value!r}")


def check_event_fields(event: Optional[str], retry: Optional[int]) -> None:
    """The checks an event's name and retry must pass (InvalidEvent if not):
    made once per publish, by the broker, before anything is spent on it."""
    if event is not None:
        _check_field("event name", event)
        if len(event) > MAX_EVENT_NAME_CHARS:
            raise InvalidEvent(f"event name longer than {MAX_EVENT_NAME_CHARS} characters")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
        raise InvalidEvent(f"retry must be a non-negative integer, not {retry!r}")


def format_event(data: str, *, event: Optional[str] = None, id: Optional[str] = None,
                 retry: Optional[int] = None) -> bytes:
    """Encode one event: `id:`, `event:`, `retry:`, one `data:` line per line of
    data, and the blank line that dispatches it. `event` "message" (the default
    type) is left out; empty data still gives one `data:` line."""
    check_event_fields(event, retry)
    if id is not None:
        _check_field("id", id)
    return _encode_event(data, event, id, retry)


def _encode_event(data: str, event: Optional[str], id: Optional[str],
                  retry: Optional[int]) -> bytes:
    """format_event without the checks, for fields already checked."""
    lines = []
    if id is not None:
        lines.append(f"id: {id}\n")
    if event and event != "message":
        lines.append(f"event: {event}\n")
    if retry is not None:
        lines.append(f"retry: {retry}\n")
    lines.extend(f"data: {line}\n" for line in split_lines(data))
    lines.append("\n")
    return "".join(lines).encode("utf-8")


def format_comment(text: str) -> bytes:
    """Encode a comment (every line starts with ':'). No blank line follows:
    some clients turn a blank line after a comment into an empty event."""
    return "".join(f": {line}\n" for line in split_lines(text)).encode("utf-8")


def format_retry(milliseconds: int) -> bytes:
    """A bare `retry:` line; browsers apply it at once, no blank line needed."""
    if milliseconds is None:
        raise InvalidEvent("retry must be a non-negative integer, not None")
    check_event_fields(None, milliseconds)
    return b"retry: %d\n" % milliseconds


def encode_chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk. An empty payload would end the body, so refuse it."""
    if not payload:
        raise ValueError("an empty chunk terminates the body; use LAST_CHUNK")
    return b"%X\r\n%s\r\n" % (len(payload), payload)


LAST_CHUNK = b"0\r\n\r\n"


class Payload:
    """Events ready for the wire, one object shared by every subscriber that
    gets them: the raw frames (for HTTP/1.0 streams) and the same bytes as one
    HTTP/1.1 chunk, each made once. Whoever writes to a stream picks its
    framing (see StreamSink); the broker never does."""

    __slots__ = ("raw", "chunk", "events")

    def __init__(self, raw: bytes, events: int = 1):
        self.raw = raw
        self.chunk = encode_chunk(raw)
        self.events = events    # how many events the frames hold


CONNECTED_COMMENT = format_comment("connected")
HEARTBEAT_COMMENT = format_comment("heartbeat")


def format_event_id(run_id: str, seq: int, iri: bool = False) -> str:
    """"<run>-<seq>"; as an IRI (for the Mercure route) "urn:sse:<run>-<seq>"."""
    return f"{MERCURE_ID_PREFIX}{run_id}-{seq}" if iri else f"{run_id}-{seq}"


def check_publisher_id(text: str, run_id: Optional[str]) -> str:
    """A publisher's own id for an event (Mercure's `id` field): no line
    break or NUL, not "#..." (the draft's rules), at most MAX_IRI_CHARS, and
    not one that could be mistaken for a position in our numbering."""
    if not text or len(text) > MAX_IRI_CHARS:
        raise BadRequest(f"id must be 1 to {MAX_IRI_CHARS} characters")
    if text.startswith("#") or any(char in text for char in "\r\n\0"):
        raise BadRequest("id must not start with '#' or hold a line break or NUL")
    if (text == EARLIEST or text.startswith(MERCURE_ID_PREFIX) or
            (run_id is not None and parse_event_id(text, run_id) is not None)):
        raise BadRequest(f"id {text[:80]!r} is of the hub's own form; choose another")
    return text


def native_id(text: str) -> str:
    """An id without the IRI form's prefix: both forms name the same event."""
    return text[len(MERCURE_ID_PREFIX):] if text.startswith(MERCURE_ID_PREFIX) else text


def parse_event_id(text: Optional[str], run_id: str) -> Optional[int]:
    """The sequence number in an id of this run ("<run>-<seq>", or its IRI
    form), else None.

    An id from another run of the server, or garbage, gives None: it is never
    mistaken for a position in this run."""
    if not text:
        return None
    run, sep, seq = native_id(text).rpartition("-")
    if not sep or run != run_id or not seq.isascii() or not seq.isdigit():
        return None
    return int(seq)


class Topics(tuple):
    """Topic names that validate_topics() has checked (a tuple: no
    duplicates, in order). Checking it again costs nothing."""

    __slots__ = ()


def validate_topics(names: Iterable[str]) -> Topics:
    """Check topic names; returns them without duplicates, in order."""
    if type(names) is Topics:
        return names
    topics = Topics(dict.fromkeys(names))
    if not topics:
        raise BadRequest("missing topic: add ?topic=NAME")
    if len(topics) > MAX_TOPICS_PER_REQUEST:
        raise BadRequest(f"too many topics: at most {MAX_TOPICS_PER_REQUEST} per request")
    for topic in topics:
        if not isinstance(topic, str) or not topic:
            raise BadRequest("empty topic name" if topic == "" else f"invalid topic {topic!r}")
        if len(topic) > MAX_TOPIC_CHARS:
            raise BadRequest(f"topic name longer than {MAX_TOPIC_CHARS} characters")
        if not TOPIC_PATTERN.fullmatch(topic):
            raise BadRequest(f"invalid topic name {topic!r}: use letters, digits and - _ . : / @")
    return topics


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def parse_query(text: str) -> dict[str, list[str]]:
    """Parse a query string or form body strictly: bad percent-encoding,
    invalid UTF-8 or too many fields is a 400, never a silent guess."""
    if "%" not in text and "+" not in text:     # nothing to decode: the common case
        pairs = [pair.partition("=")[::2] for pair in text.split("&") if pair]
        if len(pairs) > MAX_QUERY_FIELDS:
            raise BadRequest(f"too many fields: at most {MAX_QUERY_FIELDS}")
        return _group_fields(pairs)
    if _BAD_PERCENT.search(text):
        raise BadRequest("invalid percent-encoding")
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, encoding="utf-8",
                                       errors="strict", max_num_fields=MAX_QUERY_FIELDS)
    except UnicodeDecodeError:
        raise BadRequest("percent-encoded text is not valid UTF-8") from None
    except ValueError:
        raise BadRequest(f"too many fields: at most {MAX_QUERY_FIELDS}") from None
    return _group_fields(pairs)


def _group_fields(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    return fields


def _single(fields: dict[str, list[str]], name: str) -> Optional[str]:
    values = fields.get(name, [])
    if len(values) > 1:
        raise BadRequest(f"field {name!r} given more than once")
    return values[0] if values else None


class PublishRequest(NamedTuple):
    topics: Topics
    data: str
    event: Optional[str]
    retry: Optional[int]


def parse_publish(query: dict[str, list[str]], content_type: Optional[str],
                  body: bytes) -> PublishRequest:
    """Turn a POST /publish (its parsed query and its body) into a PublishRequest.

    A form body (application/x-www-form-urlencoded) carries the fields topic
    (repeatable), data (required: "data=" for an empty event), event and
    retry; any other body is the data itself,
    with topic, event and retry in the query string. The event name and retry
    value are checked where every publish is, in Broker.publish."""
    fields = {name: list(values) for name, values in query.items()}
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body is not valid UTF-8") from None
    if media_type == FORM_CONTENT_TYPE:
        for name, values in parse_query(text).items():
            fields.setdefault(name, []).extend(values)
        if "data" not in fields:    # `curl -d hello` sends a form whose field is "hello"
            raise BadRequest("the form has no data field: send data=... (curl -d data=hello), "
                             "or the data itself with another Content-Type (curl -H "
                             "'Content-Type: text/plain' --data-binary hello)")
        data = _single(fields, "data")
    else:
        data = text
    retry_text = _single(fields, "retry")
    retry = None
    if retry_text is not None:
        if not re.fullmatch(r"[0-9]{1,9}", retry_text):
            raise BadRequest("retry must be a whole number of milliseconds")
        retry = int(retry_text)
    return PublishRequest(validate_topics(fields.get("topic", [])), data,
                          _single(fields, "event") or None, retry)


MAX_HEADER_LINE_BYTES = 65536   # one request or header line
MAX_HEADER_COUNT = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")


class Headers:
    """Request headers: names case-insensitive, repeatable."""

    __slots__ = ("_fields",)

    def __init__(self):
        self._fields: dict[str, list[str]] = {}    # lower-case name -> values in order

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        values = self._fields.get(name.lower())
        return values[0] if values else default

    __getitem__ = get

    def get_all(self, name: str) -> list[str]:
        return list(self._fields.get(name.lower(), ()))

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._fields


def read_headers(readline: Callable[[int], bytes], max_bytes: int) -> Headers:
    """Read a header section strictly (RFC 9112): a line without a colon, a
    name that is not a token, whitespace before the colon, a folded line
    (obs-fold) or a CR/NUL inside a value is a 400; too much is a 431.
    End of input ends the section (the request is then judged as it stands)."""
    headers = Headers()
    fields = headers._fields
    count = total = 0
    while True:
        line = readline(MAX_HEADER_LINE_BYTES + 1)
        total += len(line)
        if len(line) > MAX_HEADER_LINE_BYTES or total > max_bytes:
            raise HTTPError(f"request header section larger than {max_bytes} bytes",
                            status=HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if line in (b"\r\n", b"\n", b""):
            return headers
        count += 1
        if count > MAX_HEADER_COUNT:
            raise HTTPError(f"more than {MAX_HEADER_COUNT} request headers",
                            status=HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        text = line.decode("latin-1").rstrip("\n")
        text = text[:-1] if text.endswith("\r") else text
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest("malformed header line" if not text[:1].isspace()
                             else "folded header lines (obs-fold) are not allowed")
        value = value.strip(" \t")
        if "\r" in value or "\0" in value:
            raise BadRequest(f"invalid character in header {name}")
        fields.setdefault(name.lower(), []).append(value)


def resolve_static_path(root: str, url_path: str) -> Optional[str]:
    """The file under `root` that `url_path` names, or None.

    Refuses anything that could leave the folder: '..' and '.' segments (also
    percent-encoded), backslashes, NUL, a colon (a Windows drive or stream),
    hidden files, and symlinks that point outside. A folder gives its index.html."""
    try:
        path = urllib.parse.unquote(url_path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "\0" in path or "\\" in path or ":" in path:    # ':' names a drive on Windows
        return None
    parts = [part for part in path.split("/") if part]
    if any(part.startswith(".") for part in parts):
        return None
    root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(root, *parts))
    if os.path.isdir(candidate):
        candidate = os.path.join(candidate, "index.html")
    try:
        inside = os.path.commonpath([root, candidate]) == root
    except ValueError:      # on another drive (Windows)
        return None
    return candidate if inside and os.path.isfile(candidate) else None


# --- Access control: publish token, JWT (HS256), topic selectors, rate limits ---

@functools.lru_cache(maxsize=1024)     # asked on every publish: parsing costs ~30 µs
def is_loopback(host: str) -> bool:
    address = _address(host)
    return address is not None and address.is_loopback


def _address(text: str):
    """An IP address from text (IPv4-mapped IPv6 as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def parse_trusted_proxies(specs: Iterable[str]) -> list:
    """--trusted-proxy values (addresses or CIDR blocks) as networks."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR block: {spec!r}") from None
    return networks


def _is_trusted(host: str, networks: list) -> bool:
    address = _address(host)
    return address is not None and any(address in network for network in networks)


_PORT = re.compile(r":[0-9]{1,5}")


def _forwarded_address(text: str) -> str:
    """One hop of a forwarding header: 192.0.2.1, 192.0.2.1:80, [2001:db8::1]
    or [2001:db8::1]:443 (quoted or not), or a bare IPv6 address."""
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    host = value
    if value.startswith("["):
        host, bracket, port = value[1:].partition("]")
        if not bracket or (port and not _PORT.fullmatch(port)):
            host = ""
    elif value.count(":") == 1:
        host, port = value.split(":")
        if not _PORT.fullmatch(":" + port):
            host = ""
    address = _address(host)
    if address is None:
        raise BadRequest(f"malformed forwarding header: {text.strip()[:64]!r} is not an address")
    return str(address)


def forwarded_chain(headers: "Headers") -> list[str]:
    """The client addresses a proxy chain reports, nearest last: from
    X-Forwarded-For (what nginx, Caddy and cloud load balancers append to)
    or, without it, from the `for=` parameters of Forwarded (RFC 7239)."""
    lines = headers.get_all("X-Forwarded-For")
    if lines:
        return [_forwarded_address(hop) for line in lines for hop in line.split(",")]
    chain = []
    for line in headers.get_all("Forwarded"):
        for element in line.split(","):
            for pair in element.split(";"):
                name, equals, value = pair.strip().partition("=")
                if not equals:
                    raise BadRequest("malformed Forwarded header")
                if name.lower() == "for":
                    chain.append(_forwarded_address(value))
    return chain


def client_host(peer: str, headers: "Headers", trusted_proxies: list) -> str:
    """The address a request comes from. From a trusted proxy, it is the
    rightmost address of its forwarding chain that is not itself a trusted
    proxy (the hops left of it could be anyone's invention); from any other
    peer, forwarding headers are ignored. A malformed chain is a 400."""
    if not trusted_proxies or not _is_trusted(peer, trusted_proxies):
        return peer
    chain = forwarded_chain(headers)
    for hop in reversed(chain):
        if not _is_trusted(hop, trusted_proxies):
            return hop
    return chain[0] if chain else peer


def _b64url_decode(part: str) -> bytes:
    """Strict base64url without padding, as JWTs use it."""
    if not _BASE64URL.fullmatch(part) or len(part) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


# RS256 (RFC 7518 3.3): RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 8.2.2), for
# the tokens identity providers issue. Verifying needs no library: one
# modular exponentiation and an exact comparison of the whole encoded block.

RSA_MIN_BITS = 2048             # smaller keys are refused when loaded
_RSA_ENCRYPTION_OID = bytes.fromhex("2a864886f70d010101")          # 1.2.840.113549.1.1.1
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")   # RFC 8017 9.2


def _der_read(data: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    """The contents of the DER element with `tag` at `offset`, and the
    offset after it. Strict: definite, minimal lengths only."""
    if offset + 2 > len(data) or data[offset] != tag:
        raise ValueError(f"expected DER tag {tag:#04x} at byte {offset}")
    length, offset = data[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or offset + count > len(data) or data[offset] == 0:
            raise ValueError("bad DER length")
        length, offset = int.from_bytes(data[offset:offset + count], "big"), offset + count
        if length < 0x80:
            raise ValueError("bad DER length (not minimal)")
    if offset + length > len(data):
        raise ValueError("truncated DER")
    return data[offset:offset + length], offset + length


def _der_positive_integer(data: bytes, offset: int) -> tuple[int, int]:
    contents, offset = _der_read(data, offset, 0x02)
    if not contents or contents[0] & 0x80 or (
            len(contents) > 1 and contents[0] == 0 and not contents[1] & 0x80):
        raise ValueError("not a minimal positive DER INTEGER")
    return int.from_bytes(contents, "big"), offset


class RSAPublicKey(NamedTuple):
    """An RSA public key that verifies RS256 signatures."""
    n: int      # the modulus
    e: int      # the public exponent

    alg = "RS256"

    @classmethod
    def from_pem(cls, text: str) -> "RSAPublicKey":
        """A PEM "PUBLIC KEY" (SubjectPublicKeyInfo, what identity providers
        publish) or "RSA PUBLIC KEY" (PKCS #1). ValueError if it is not one."""
        match = re.search(r"-----BEGIN (RSA )?PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)"
                          r"-----END (RSA )?PUBLIC KEY-----", text)
        if not match or match.group(1) != match.group(3):
            raise ValueError("not a PEM public key (-----BEGIN PUBLIC KEY-----); a "
                             "certificate's key can be taken out with: openssl x509 -pubkey "
                             "-noout -in cert.pem")
        try:
            der = base64.b64decode("".join(match.group(2).split()), validate=True)
        except binascii.Error:
            raise ValueError("the PEM key is not valid base64") from None
        if not match.group(1):      # SubjectPublicKeyInfo around an RSAPublicKey
            info, end = _der_read(der, 0, 0x30)
            if end != len(der):
                raise ValueError("bytes after the key")
            algorithm, offset = _der_read(info, 0, 0x30)
            oid, after_oid = _der_read(algorithm, 0, 0x06)
            if oid != _RSA_ENCRYPTION_OID:
                raise ValueError("not an RSA key (RS256 needs one)")
            if algorithm[after_oid:] not in (b"", b"\x05\x00"):     # parameters: NULL
                raise ValueError("bad RSA key parameters")
            bits, end = _der_read(info, offset, 0x03)
            if end != len(info) or not bits or bits[0] != 0:
                raise ValueError("bad public key bit string")
            der = bits[1:]
        sequence, end = _der_read(der, 0, 0x30)
        if end != len(der):
            raise ValueError("bytes after the key")
        n, offset = _der_positive_integer(sequence, 0)
        e, offset = _der_positive_integer(sequence, offset)
        if offset != len(sequence):
            raise ValueError("bytes after the key's exponent")
        if n.bit_length() < RSA_MIN_BITS:
            raise ValueError(f"a {n.bit_length()}-bit RSA key; at least {RSA_MIN_BITS} bits")
        if e < 3 or e % 2 == 0 or e >= n:
            raise ValueError("bad RSA public exponent")
        return cls(n, e)

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        """RSASSA-PKCS1-v1_5 verification with SHA-256 (RFC 8017 8.2.2): the
        signature is exactly as long as the modulus, below it, and opens to
        the one block that encodes this message's digest."""
        size = (self.n.bit_length() + 7) // 8
        if len(signature) != size:
            return False
        s = int.from_bytes(signature, "big")
        if s >= self.n:
            return False
        encoded = pow(s, self.e, self.n).to_bytes(size, "big")
        digest_info = _SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
        expected = (b"\x00\x01" + b"\xff" * (size - 3 - len(digest_info)) + b"\x00"
                    + digest_info)
        return hmac.compare_digest(encoded, expected)


class HMACKey(NamedTuple):
    """An HS256 secret."""
    secret: bytes

    alg = "HS256"

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        expected = hmac.new(self.secret, signing_input, hashlib.sha256).digest()
        return hmac.compare_digest(signature, expected)


def decode_jwt(token: str, keys, *, now: float, leeway_s: float = JWT_LEEWAY_S) -> dict:
    """Verify a JSON Web Token and return its claims. `keys`: an HS256
    secret (bytes), an HMACKey or RSAPublicKey, or a list of them.

    The key fixes the algorithm: a token must name the alg of one of the
    keys (never "none", never one the token picks), so an RS256 public key
    can never serve as an HS256 secret. `exp` and `nbf` are enforced with
    `leeway_s` of clock skew."""
    if isinstance(keys, (bytes, str)):
        keys = [HMACKey(keys.encode("utf-8") if isinstance(keys, str) else keys)]
    elif hasattr(keys, "verify"):
        keys = [keys]
    by_alg = {key.alg: key for key in keys}
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized(f"token longer than {MAX_TOKEN_BYTES} bytes", error="invalid_token")
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthorized("malformed token", error="invalid_token")
    try:
        header = json.loads(_b64url_decode(parts[0]))
        claims = json.loads(_b64url_decode(parts[1]))
        signature = _b64url_decode(parts[2])
    except ValueError:      # bad base64, bad UTF-8 and bad JSON are all ValueErrors
        raise Unauthorized("malformed token", error="invalid_token") from None
    key = by_alg.get(header.get("alg")) if isinstance(header, dict) else None
    if key is None:
        raise Unauthorized(f"token algorithm must be {' or '.join(by_alg)}",
                           error="invalid_token")
    if not key.verify(f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
        raise Unauthorized("bad token signature", error="invalid_token")
    if not isinstance(claims, dict):
        raise Unauthorized("token claims must be a JSON object", error="invalid_token")
    for name in ("exp", "nbf"):
        value = claims.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise Unauthorized(f"token claim {name} must be a number", error="invalid_token")
    if claims.get("exp") is not None and now > claims["exp"] + leeway_s:
        raise Unauthorized("token expired", error="invalid_token")
    if claims.get("nbf") is not None and now + leeway_s < claims["nbf"]:
        raise Unauthorized("token not valid yet", error="invalid_token")
    return claims


def encode_jwt(claims: dict, secret: bytes) -> str:
    """Mint an HS256 token (for tests, tools and the README's example)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." +
                     b64(json.dumps(claims).encode()))
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def validate_selector(selector: str) -> str:
    """A topic selector: "*", an exact topic, or a prefix ending in "*"."""
    if selector != "*":
        validate_topics([selector[:-1] if selector.endswith("*") else selector])
    return selector


def topic_allowed(selectors: Iterable[str], topic: str) -> bool:
    for selector in selectors:
        if selector == topic or selector == "*" or (
                selector.endswith("*") and topic.startswith(selector[:-1])):
            return True
    return False


def _claimed_selectors(claims: dict, action: str) -> list[str]:
    scope = claims.get("sse")
    selectors = scope.get(action) if isinstance(scope, dict) else None
    if not isinstance(selectors, list):
        return []
    return [selector for selector in selectors if isinstance(selector, str)]


class AccessPolicy:
    """Who may subscribe to and publish on which topic. Pure: no sockets.

    - Publishing: `Authorization: Bearer <publish_token>` always works when a
      publish token is set. With a JWT key (an HS256 secret, an RS256 public
      key, or both), a token whose sse.publish
      claim covers every target topic works too. With neither configured,
      only loopback clients may publish.
    - Subscribing: a topic matching a private pattern (or every topic, with
      require_auth) needs a token whose sse.subscribe claim covers it."""

    def __init__(self, *, publish_token: Optional[str] = None, jwt_secret: Optional[str] = None,
                 jwt_public_key: Optional[RSAPublicKey] = None,
                 private_topics: Iterable[str] = (), require_auth: bool = False,
                 metrics_token: Optional[str] = None, clock: Callable[[], float] = time.time):
        self.publish_token = publish_token
        self.metrics_token = metrics_token
        self.jwt_keys: list = []    # the key fixes the algorithm (see decode_jwt)
        if jwt_secret:
            self.jwt_keys.append(HMACKey(jwt_secret.encode("utf-8")))
        if jwt_public_key is not None:
            self.jwt_keys.append(jwt_public_key)
        self.private_topics = [validate_selector(pattern) for pattern in private_topics]
        self.require_auth = require_auth
        self._clock = clock
        self._selector_sets: dict[tuple, SelectorSet] = {}
        if (self.private_topics or require_auth) and not self.jwt_keys:
            raise ValueError("private topics and require_auth need a JWT key")

    def claims(self, token: Optional[str]) -> Optional[dict]:
        """The verified claims of `token` (401 if it is bad); None without
        a token or without a key to check one with."""
        if token is None or not self.jwt_keys:
            return None
        return decode_jwt(token, self.jwt_keys, now=self._clock())


    def selector_set(self, selectors: tuple) -> SelectorSet:
        """One SelectorSet per distinct list, shared by the subscribers
        whose tokens carry it (so its cache serves them all)."""
        found = self._selector_sets.get(selectors)
        if found is None:
            if len(self._selector_sets) >= SELECTOR_SETS:
                self._selector_sets.clear()
            found = self._selector_sets[selectors] = SelectorSet(selectors)
        return found

    def check_subscribe(self, topics: Iterable[str], token: Optional[str]) -> Optional[float]:
        """Raise 401/403 unless allowed; returns the token's `exp` when the
        stream is allowed only because of the token (it must end then)."""
        guarded = [t for t in topics if self.require_auth or topic_allowed(self.private_topics, t)]
        claims = self.claims(token)            # a bad token is refused even for public topics
        if not guarded:
            return None
        if claims is None:
            raise Unauthorized(f"topic {guarded[0]!r} needs a token", error="invalid_token")
        allowed = _claimed_selectors(claims, "subscribe")
        for topic in guarded:
            if not topic_allowed(allowed, topic):
                raise Forbidden(f"the token does not allow subscribing to {topic!r}")
        return claims.get("exp")

    def check_publisher(self, client_host: str, bearer: Optional[str],
                        token: Optional[str], *, mercure: bool = False) -> Optional[list[str]]:
        """Who is publishing: raises 401/403, or returns the topic selectors
        the publisher may use (None: every topic), from the token's
        sse.publish claim (mercure.publish on the Mercure route). Runs
        before the body is read."""
        if self.publish_token and bearer is not None and hmac.compare_digest(
                bearer.encode("utf-8"), self.publish_token.encode("utf-8")):
            return None
        if self.jwt_keys:
            claims = self.claims(token)
            if claims is None:      # (the Mercure draft: no error code when no token came)
                raise Unauthorized("publishing needs a token",
                                   error=None if mercure else "invalid_token")
            if not mercure:
                return _claimed_selectors(claims, "publish")
            scope = mercure_claims(claims)
            if scope is None or not scope.publish:
                raise Forbidden("the token has no mercure.publish selectors")
            return list(scope.publish)
        if self.publish_token:
            raise Unauthorized("publishing needs Authorization: Bearer <publish token>")
        if not is_loopback(client_host):
            raise Forbidden("publishing is allowed from loopback only; start the server "
                            "with --publish-token to publish from elsewhere")
        return None

    def check_metrics(self, client_host: str, bearer: Optional[str]) -> None:
        """GET /metrics: from loopback, or with `Authorization: Bearer
        <metrics token>` from anywhere (the counters say how busy the server
        is and how it is used, which is nobody else's business)."""
        if self.metrics_token and bearer is not None and hmac.compare_digest(
                bearer.encode("utf-8"), self.metrics_token.encode("utf-8")):
            return
        if self.metrics_token and not is_loopback(client_host):
            raise Unauthorized("metrics need Authorization: Bearer <metrics token>")
        if not is_loopback(client_host):
            raise Forbidden("metrics are served to loopback only; start the server with "
                            "--metrics-token to scrape from elsewhere")

    @staticmethod
    def check_publish_topics(allowed: Optional[list[str]], topics: Iterable[str]) -> None:
        if allowed is None:
            return
        for topic in topics:
            if not topic_allowed(allowed, topic):
                raise Forbidden(f"the token does not allow publishing to {topic!r}")


class RateLimiter:
    """Token bucket per key (client address): `rate_per_s` on average, bursts
    of `burst`. Remembers at most `max_keys` keys, the least recent go first
    (a forgotten key just starts again with a full bucket)."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()   # guards _buckets
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def acquire(self, key: str) -> float:
        """Take one token: 0 if allowed, else the seconds until one is free."""
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - stamp) * self.rate_per_s)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate_per_s
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


# --- Mercure: IRI topics, selectors (exact, *, RFC 6570 URI templates), claims -----------
#
# The Mercure protocol (draft-dunglas-mercure-07) names topics with IRIs or
# any string, and subscribers (and the selectors in tokens) pick them with
# "topic selectors": "*" (every topic), the topic itself, or a URI Template
# (RFC 6570) that the topic is an expansion of. A template is compiled once
# (compile_selector is cached) and matched without regular expressions: a
# walk over the topic that never backtracks, so no crafted template can make
# a match cost more than (template parts x topic length).

MAX_IRI_CHARS = 2048            # longest Mercure topic, selector or id
MERCURE_PATH = "/.well-known/mercure"
MERCURE_SUBSCRIPTIONS = MERCURE_PATH + "/subscriptions"    # the subscriptions API
MERCURE_CONTEXT = "https://mercure.rocks/"                  # its JSON-LD @context
MERCURE_COOKIE = "mercureAuthorization"
MERCURE_ID_PREFIX = "urn:sse:"  # hub-assigned ids on the Mercure route: urn:sse:<run>-<seq>
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def validate_iris(names: Iterable[str], what: str = "topic") -> Topics:
    """Check Mercure topics (or selectors): any non-empty string of at most
    MAX_IRI_CHARS without control characters. Returns them as Topics
    (without duplicates, in order: the first is the canonical topic)."""
    topics = Topics(dict.fromkeys(names))
    if not topics:
        raise BadRequest(f"missing {what}: add {what}=...")
    if len(topics) > MAX_TOPICS_PER_REQUEST:
        raise BadRequest(f"too many {what}s: at most {MAX_TOPICS_PER_REQUEST} per request")
    for name in topics:
        if not name:
            raise BadRequest(f"empty {what}")
        if len(name) > MAX_IRI_CHARS:
            raise BadRequest(f"{what} longer than {MAX_IRI_CHARS} characters")
        if _CONTROL_CHARS.search(name):
            raise BadRequest(f"{what} {name[:80]!r} contains a control character")
    return topics


# RFC 6570, section 2.2 and appendix A: for each operator, what an expansion
# starts with, and the characters its values may use besides unreserved ones
# and %XX (the separators, and "=" of the named operators; reserved
# characters too for + and #). A value may be empty or the variable
# undefined, so every expression may also expand to nothing.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_RESERVED = frozenset(":/?#[]@!$&'()*+,;=")
_TEMPLATE_OPERATORS = {
    "": ("", ","), "+": ("", ",", *_RESERVED), "#": ("#", ",", *_RESERVED),
    ".": (".", ".,"), "/": ("/", "/,"), ";": (";", ";,="), "?": ("?", "&,="),
    "&": ("&", "&,="),
}
_VARSPEC = re.compile(r"(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})(?:\.?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2}))*"
                      r"(?::[1-9][0-9]{0,3}|\*)?")
_HEX = frozenset("0123456789abcdefABCDEF")


class URITemplate:
    """An RFC 6570 template (levels 1 to 4) as a matcher: matches(topic) is
    true if some values of its variables expand it to `topic`. `{id}`
    matches one path segment (unreserved characters and %XX: no "/"), `{+id}`
    and `{#id}` reserved characters too, `{/a,b}` `{.a}` `{;a}` `{?a,b}`
    `{&a}` what their expansions start with and separate by."""

    __slots__ = ("text", "_parts")

    def __init__(self, text: str):
        self.text = text
        self._parts: list = []      # literal strings, and (first, allowed) per expression
        position = 0
        while position < len(text):
            start = text.find("{", position)
            if start < 0:
                start = len(text)
            literal = text[position:start]
            if "}" in literal:
                raise ValueError(f"'}}' without '{{' at {position + literal.index('}')}")
            if literal:
                self._parts.append(literal)
            if start == len(text):
                break
            end = text.find("}", start)
            if end < 0:
                raise ValueError(f"'{{' at {start} is never closed")
            expression = text[start + 1:end]
            operator = expression[:1] if expression[:1] in "+#./;?&" else ""
            names = expression[len(operator):]
            if not names or not all(_VARSPEC.fullmatch(spec) for spec in names.split(",")):
                raise ValueError(f"invalid expression {{{expression}}}")
            first, *extra = _TEMPLATE_OPERATORS[operator]
            allowed = _UNRESERVED.union(*extra)
            self._parts.append((first, allowed))
            position = end + 1

    def matches(self, topic: str) -> bool:
        positions = {0}     # where in `topic` the parts so far can have ended
        for part in self._parts:
            if type(part) is str:
                positions = {p + len(part) for p in positions if topic.startswith(part, p)}
            else:
                positions = self._expansion_ends(topic, positions, *part)
            if not positions:
                return False
        return len(topic) in positions

    @staticmethod
    def _expansion_ends(topic: str, starts: set, first: str, allowed: frozenset) -> set:
        """Where an expression can end, having started at one of `starts`.
        Each position is walked from once: from a position the walk goes on
        the same way whoever reached it, so the cost stays linear."""
        ends = set(starts)      # an expansion to nothing
        for p in sorted(starts):
            if first:
                if not topic.startswith(first, p):
                    continue
                p += len(first)
                if p in ends:
                    continue
                ends.add(p)
            while p < len(topic):
                char = topic[p]
                if char in allowed or char >= "\xa0":   # IRI characters beyond ASCII too
                    p += 1
                elif char == "%" and topic[p + 1:p + 2] in _HEX and topic[p + 2:p + 3] in _HEX:
                    p += 3
                else:
                    break
                if p in ends:
                    break
                ends.add(p)
        return ends


class _Everything:
    __slots__ = ()
    text = "*"

    @staticmethod
    def matches(topic: str) -> bool:
        return True


class _Exactly(NamedTuple):
    text: str

    def matches(self, topic: str) -> bool:
        return topic == self.text


class _TemplateOrItself(NamedTuple):
    text: str
    template: URITemplate

    def matches(self, topic: str) -> bool:
        # The draft's rule 2: a selector also matches itself, so that a
        # template in a token can allow the same template in a subscription.
        return topic == self.text or self.template.matches(topic)


@functools.lru_cache(maxsize=4096)
def compile_selector(text: str):
    """A topic selector as an object with .text and .matches(topic): "*",
    a URI template, or (no braces) the topic itself. One object per distinct
    selector is shared by everyone using it. ValueError if a template is
    invalid."""
    if text == "*":
        return _Everything()
    if "{" not in text and "}" not in text:
        return _Exactly(text)
    return _TemplateOrItself(text, URITemplate(text))


def is_pattern(selector: str) -> bool:
    """Does this selector select more than the one topic of its own name?"""
    return selector == "*" or "{" in selector


class SelectorSet:
    """The selectors of a token's mercure.subscribe claim, compiled, with the
    answer for recent topic lists cached: deciding whether a subscriber may
    see a private update is then one dictionary lookup."""

    __slots__ = ("selectors", "_answers")
    CACHE_SIZE = 1024

    def __init__(self, selectors: Iterable[str]):
        self.selectors = tuple(compile_selector(text) for text in selectors)
        self._answers: dict[tuple, bool] = {}

    def matches_any(self, topics: tuple) -> bool:
        answer = self._answers.get(topics)
        if answer is None:
            answer = any(s.matches(t) for t in topics for s in self.selectors)
            if len(self._answers) >= self.CACHE_SIZE:
                self._answers.clear()
            self._answers[topics] = answer
        return answer


class MercureClaims(NamedTuple):
    """The `mercure` claim of a token: selectors for publish and subscribe,
    and the payload shown in subscription events."""
    publish: tuple
    subscribe: tuple
    payload: object


def mercure_claims(claims: Optional[dict]) -> Optional[MercureClaims]:
    """The token's `mercure` claim, checked; None without a token (or
    without the claim). A claim of the wrong shape is a 401, never read as
    "no rights"."""
    if claims is None or "mercure" not in claims:
        return None
    scope = claims["mercure"]
    if not isinstance(scope, dict):
        raise Unauthorized("token claim mercure must be a JSON object", error="invalid_token")
    lists = {}
    for name in ("publish", "subscribe"):
        value = scope.get(name, [])
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise Unauthorized(f"token claim mercure.{name} must be a list of strings",
                               error="invalid_token")
        try:
            for selector in value:
                compile_selector(selector)
        except ValueError as error:
            raise Unauthorized(f"token claim mercure.{name}: invalid selector: {error}",
                               error="invalid_token") from None
        lists[name] = tuple(value)
    return MercureClaims(lists["publish"], lists["subscribe"], scope.get("payload"))


def is_reserved_topic(topic: str) -> bool:
    """Topics under /.well-known/mercure (the hub's own, such as subscription
    events), as a path or in an absolute IRI of any host."""
    path = urllib.parse.urlsplit(topic).path if "://" in topic else topic
    return path == MERCURE_PATH or path.startswith(MERCURE_PATH + "/")


def encode_data(data: object) -> str:
    """str as is; bytes as UTF-8; anything else (dict, list, numbers) as JSON."""
    if isinstance(data, str):
        return data
    if isinstance(data, (bytes, bytearray)):
        return bytes(data).decode("utf-8")
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# --- Connection I/O: sockets, waits, and the owner of each stream ---------------------

class StartupTurn:
    """A connection's turn to be set up (see BurstAcceptMixIn), held by its
    thread until it first waits for anything. Taking one waits at most
    `wait_s`, then goes ahead without. release() may be called often."""

    __slots__ = ("_semaphore",)

    def __init__(self, semaphore: Optional[threading.Semaphore], wait_s: float = 0.0):
        if semaphore is not None and not semaphore.acquire(timeout=wait_s):
            semaphore = None
        self._semaphore = semaphore

    def release(self) -> None:
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is not None:
            semaphore.release()


class SocketIO:
    """A connection's non-blocking socket, with every wait made explicit.

    Each call is tried at once (one system call); only when the socket would
    block does it wait, in wait(), which is the single place where a
    connection waits for its client. That is also where it gives back its
    start-up turn, so a silent or slow client never holds one. A client that
    takes no byte for `write_timeout_s` is a socket.timeout."""

    __slots__ = ("sock", "turn", "write_timeout_s", "tls", "sent")

    def __init__(self, sock: socket.socket, turn: StartupTurn, write_timeout_s: float, *,
                 tls: bool = False):
        sock.setblocking(False)
        self.sock = sock
        self.turn = turn
        self.write_timeout_s = write_timeout_s
        self.tls = tls      # TLS: no direct writes from other threads, no send() flags
        self.sent = 0       # bytes written through it, for the access log (publishers'
                            # direct writes to a stream are counted by its StreamSink)

    def before_wait(self) -> None:
        """The connection is about to wait (for its client, its next request
        or its next event): let the next connection be set up."""
        self.turn.release()

    def wait(self, for_write: bool, deadline: float) -> None:
        self.before_wait()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait_ready(self.sock, for_write, remaining):
            raise socket.timeout("timed out waiting for the client")

    def recv_into(self, buffer, deadline: float) -> int:
        while True:
            try:
                return self.sock.recv_into(buffer) if self.tls else recv_plain(self.sock, buffer)
            except _READ_BLOCKED:
                self.wait(False, deadline)
            except _TLS_WANTS_WRITE:
                self.wait(True, deadline)

    def send_all(self, data: bytes) -> None:
        flags = 0 if self.tls else SEND_FLAGS
        self.sent += len(data)      # (counted up front: a failure ends the connection)
        view = None
        while data:
            try:
                sent = self.sock.send(data, flags)
            except _WRITE_BLOCKED:
                self.wait(True, time.monotonic() + self.write_timeout_s)
                continue
            except _TLS_WANTS_READ:
                self.wait(False, time.monotonic() + self.write_timeout_s)
                continue
            if sent == len(data):
                return
            view = view if view is not None else memoryview(data)
            data = view = view[sent:]

    def handshake(self, deadline: float) -> None:
        """The TLS handshake, in the connection's own thread (never the
        accept loop): a stalled or plain-HTTP client only ties up itself."""
        while True:
            try:
                return self.sock.do_handshake()
            except _TLS_WANTS_READ:
                self.wait(False, deadline)
            except _TLS_WANTS_WRITE:
                self.wait(True, deadline)


class StreamEnd(NamedTuple):
    """Put last into a stream's queue: why it ends (the access log's and the
    metrics' word for it), and the comment it says goodbye with, if any."""
    reason: str
    last_words: Optional[str]


SHUTDOWN = StreamEnd("shutdown", None)          # the server is stopping (says `retry:`)
TOKEN_EXPIRED = StreamEnd("token_expired", "token expired")   # the JWT that allowed it
DROPPED = StreamEnd("slow", None)               # its queue was full: cut at once
CLIENT_GONE = StreamEnd("client_gone", None)    # the client hung up

MAX_UNREAD_TLS_BYTES = 16 * 1024    # a TLS stream's client sending more is just unwatched
_read_raw = socket.socket.recv      # the TCP bytes under a TLS socket, past its TLS layer


class StreamSink:
    """The one owner of a stream's socket: every write to the stream goes
    through it, whether from a publisher's fan-out, the stream's own thread
    (start, replay, queued events, heartbeats, last words), or shutdown.

    A publisher never waits for a client: while the stream is idle it writes
    straight to the socket with one non-blocking send, and its thread never
    wakes; otherwise it puts wire-ready bytes in the queue, which the thread
    writes. One field, `state`, says who may do what; it changes only under
    `lock`:

      THREAD  The stream's thread owns the socket (it is writing). Deliveries
              are queued; past `queue_size` waiting writes the stream is
              dropped (ENDED, and the socket cut so the thread stops waiting).
      IDLE    The thread waits on an empty queue. A delivery is written
              directly, under the lock; whatever did not fit is queued and the
              state is THREAD again, so the rest goes first and bytes never
              interleave. Only a plain socket gets here: TLS (whose records
              one thread must write) and socketless sinks stay THREAD.
      ENDED   The stream is over: nothing more is accepted, the reason is the
              last thing in the queue, and only the thread still writes (its
              last words). The socket may still be cut.
      CLOSED  The thread has let go of the socket, which is about to close and
              whose number the OS may reuse: nobody touches it any more.

    THREAD -> IDLE (park), IDLE -> THREAD (claim, or a partial direct write),
    THREAD or IDLE -> ENDED (end, or a drop), any -> CLOSED (close). The
    queue holds wire-ready bytes, then maybe one StreamEnd."""

    # (Every slot costs each of 10,000 subscribers, and the fan-out touches
    # this object once per delivery: keep it small, its socket at hand.)
    __slots__ = ("queue", "lock", "state", "io", "sock", "chunked", "events", "direct_bytes")

    THREAD, IDLE, ENDED, CLOSED = "thread", "idle", "ended", "closed"

    def __init__(self, io: Optional[SocketIO] = None, *, chunked: bool = True):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.state = self.THREAD    # its thread owns the socket until it first parks
        self.io = io                # None: an in-process subscriber, read from the queue
        self.sock = io.sock if io is not None else None     # for direct writes
        self.chunked = chunked      # HTTP/1.1 chunked framing (else HTTP/1.0: raw)
        self.events = 0             # events handed to it (written or queued)
        self.direct_bytes = 0       # bytes publishers wrote to it directly

    # Called by anyone: publishers, the hang-up watcher, shutdown

    def deliver(self, payload: Payload, queue_size: int) -> Optional[bool]:
        """Hand over events: True when written or queued, False when the queue
        was full (the stream is now dropped), None when it had already ended."""
        data = payload.chunk if self.chunked else payload.raw
        with self.lock:
            state = self.state
            if state is self.IDLE:
                self.events += payload.events
                try:    # one send that never waits (IDLE: a plain, non-blocking socket)
                    sent = self.sock.send(data, SEND_FLAGS)
                except OSError:     # no room, or the peer is gone: the thread finds out which
                    sent = 0
                self.direct_bytes += sent
                if sent == len(data):
                    return True
                data = data[sent:]
                self.state = self.THREAD
            elif state is not self.THREAD:
                return None
            elif self.queue.qsize() >= queue_size:
                self._end_locked(DROPPED)
                self._cut_locked()
                return False
            else:
                self.events += payload.events
            self.queue.put(data)
            return True

    def end(self, why: StreamEnd) -> bool:
        """End the stream; its thread finds `why` last in the queue. False if
        it had already ended (the first reason stands)."""
        with self.lock:
            if self.state is self.ENDED or self.state is self.CLOSED:
                return False
            self._end_locked(why)
            return True

    def cut(self) -> None:
        """Shut the socket both ways, so a thread waiting to write to a stuck
        client gives up now. Never once the socket is let go (CLOSED)."""
        with self.lock:
            self._cut_locked()

    def _end_locked(self, why: StreamEnd) -> None:
        self.state = self.ENDED
        self.queue.put(why)

    def check_hangup(self) -> Optional[bool]:
        """The socket is readable, and a stream reads nothing after its
        request: did the client leave? True if so (the stream is ended);
        False if it sent bytes instead (stop watching it); None if it cannot
        tell yet (TLS records: watch on). Called by the hang-up watcher."""
        with self.lock:
            if self.state is self.CLOSED or self.sock is None:
                return False
            try:
                if self.io.tls:
                    # A TLS client says goodbye with a close_notify record, then
                    # its FIN. The records go unread at the socket level (nobody
                    # reads TLS on a stream again), so the FIN shows next.
                    data = _read_raw(self.sock, MAX_UNREAD_TLS_BYTES)
                else:
                    data = self.sock.recv(1, socket.MSG_PEEK)
            except _READ_BLOCKED:
                return None     # a stale readiness report
            except OSError:
                data = b""      # reset by the peer
            if not data:
                if self.state is not self.ENDED:
                    self._end_locked(CLIENT_GONE)
                return True
            return None if self.io.tls and len(data) < MAX_UNREAD_TLS_BYTES else False

    def _cut_locked(self) -> None:
        if self.state is not self.CLOSED and self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:     # the peer already reset it
                pass

    # Called by the stream's own thread only

    def park(self) -> None:
        """About to wait on the queue: if nothing is waiting in it, publishers
        may write to the socket directly until it is claimed back."""
        with self.lock:
            if (self.state is self.THREAD and self.io is not None and not self.io.tls
                    and self.queue.empty()):
                self.state = self.IDLE

    def claim(self) -> bool:
        """Take the socket back to write a heartbeat. False if something is
        queued (write that instead) or the stream has ended."""
        with self.lock:
            if self.state is self.ENDED or self.state is self.CLOSED or not self.queue.empty():
                return False
            self.state = self.THREAD
            return True

    def write(self, payload: bytes, *, head: bytes = b"", last: bool = False) -> None:
        """Write `payload` in the stream's framing, after `head` (the response
        head, unframed), and the terminating chunk if `last`."""
        data = head + (encode_chunk(payload) if self.chunked else payload)
        self.io.send_all(data + LAST_CHUNK if last and self.chunked else data)

    def write_replay(self, frames: list[bytes]) -> None:
        """Replayed events, joined into as few chunks as possible."""
        with self.lock:     # publishers count their deliveries meanwhile
            self.events += len(frames)
        batch, size = [], 0
        for frame in frames:
            batch.append(frame)
            size += len(frame)
            if size >= MAX_CHUNK_BYTES:
                self.write(b"".join(batch))
                batch, size = [], 0
        if batch:
            self.write(b"".join(batch))

    def pump(self, heartbeat_s: float, deadline: Optional[float] = None) -> StreamEnd:
        """The stream's loop: write what arrives in the queue, a heartbeat
        after `heartbeat_s` of silence, until the stream ends; at `deadline`
        (monotonic: the token's expiry) it ends itself. Returns why it ended."""
        while True:
            self.park()
            timeout = heartbeat_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    self.end(TOKEN_EXPIRED)
                    timeout = 0
            try:
                item = self.queue.get(timeout=timeout)
            except queue.Empty:
                if (deadline is None or time.monotonic() < deadline) and self.claim():
                    self.write(HEARTBEAT_COMMENT)
                continue
            # Everything queued (wire-ready bytes) goes out in one write.
            pieces = []
            while not isinstance(item, StreamEnd):
                pieces.append(item)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    item = None
                    break
            if pieces:
                self.io.send_all(b"".join(pieces))
                del pieces
            if item is not None:
                return item

    def say_goodbye(self, end: StreamEnd) -> None:
        """The last words of an ending that has them, and the body's end."""
        if end is SHUTDOWN:     # reconnect, spread out, to whichever instance is up
            self.write(format_retry(random.randint(*SHUTDOWN_RETRY_MS)), last=True)
        elif end.last_words:
            self.write(format_comment(end.last_words), last=True)

    def close(self) -> Optional[StreamEnd]:
        """The thread lets go of the socket (call before it is closed).
        Returns why the stream was ended, if it was, and drops what waited."""
        with self.lock:
            self.state = self.CLOSED
        why = None
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, StreamEnd):
                why = item
        return why


# --- Broker: the topic registry ---------------------------------------------------

def _prepare_event(topics, data: object, event: Optional[str],
                   retry: Optional[int]) -> tuple[Topics, str]:
    """Validate a publish call, once, before anything is spent on it."""
    topic_list = validate_topics([topics] if isinstance(topics, str) else topics)
    text = encode_data(data)
    check_event_fields(event, retry)
    return topic_list, text


class Published(NamedTuple):
    id: str             # the event's id, "<run>-<seq>"
    subscribers: int    # how many subscribers it was handed to


class Subscriber(StreamSink):
    """A StreamSink the broker has registered: it gets the events of its
    `topics` and of every topic one of its `patterns` (compiled selectors,
    see compile_selector) matches; a private event only if `authorized`
    (the SelectorSet of its token) matches one of the event's topics."""

    __slots__ = ("topics", "patterns", "authorized")

    def __init__(self, topics: Iterable[str], io: Optional[SocketIO] = None, *,
                 chunked: bool = True, patterns: tuple = (),
                 authorized: Optional[SelectorSet] = None):
        super().__init__(io, chunked=chunked)
        self.topics = validate_topics(topics)
        self.patterns = patterns
        self.authorized = authorized

    def may_see(self, topics: tuple, private: bool) -> bool:
        """May an event of `topics` reach this subscriber, as far as
        privacy goes? (Which topics it gets is the broker's business.)"""
        return not private or (self.authorized is not None and
                               self.authorized.matches_any(topics))

    def selects(self, topic: str) -> bool:
        return topic in self.topics or any(p.matches(topic) for p in self.patterns)

    def wants(self, topics: tuple, private: bool) -> bool:
        """Should it get an event of `topics`? (What a replay asks.)"""
        return self.may_see(topics, private) and any(self.selects(t) for t in topics)


class _Event:
    __slots__ = ("seq", "id", "frame", "topics", "created", "reached", "refused", "private",
                 "named")

    def __init__(self, seq: int, id: Optional[str], frame: bytes, created: float,
                 topics: tuple[str, ...] = (), private: bool = False, named: bool = False):
        self.seq = seq              # the broker's order (in a local history, the id's number)
        self.id = id                # None for a notice that is not an event (a reset)
        self.frame = frame          # the event's bytes (kept in history)
        self.topics = topics
        self.created = created      # by the broker's clock: for the delivery histogram
        self.reached = 0
        self.refused: Optional[ServiceUnavailable] = None   # why its history could not keep it
        self.private = private      # only for subscribers whose token allows one of its topics
        self.named = named          # its id is the publisher's (else the history's numbering)


DELIVERY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0)


class Histogram:
    """Counts of observations at or below each bound (seconds), with their
    sum, as Prometheus keeps them. Not locked: its owner's lock guards it."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)     # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, observations <= le)], ending with ("+Inf", count)."""
        running, buckets = 0, []
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


class _HelperThread:
    """A thread that runs one function call at a time for another thread."""

    def __init__(self, name: str):
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def start(self, function: Callable, *args) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((function, args))

    def result(self):
        outcome = self._results.get()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, args = job
            try:
                self._results.put(function(*args))
            except BaseException as error:      # handed to the waiting thread
                self._results.put(error)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class Broker:
    """Thread-safe topic registry, in front of a History (see there).

    Publishers never wait for subscribers: an idle subscriber is written to
    directly, a busy one gets the bytes in its queue, and a subscriber with
    `queue_size` writes still waiting is dropped (its client reconnects and
    catches up from history with Last-Event-ID). Without `history`, events
    are kept in memory (a MemoryHistory with the default Retention)."""

    def __init__(self, *, queue_size: int = QUEUE_SIZE, max_subscribers: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic, history: Optional[History] = None):
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.history = history or MemoryHistory(clock=clock)
        self._clock = clock
        self._started = clock()
        self.start_time_s = time.time()
        # Locking rule: _lock guards every attribute below. publish() assigns
        # the id and queues the event for fan-out under it; the fan-out leader
        # has the history keep a batch (outside the lock), then, under it,
        # moves _last_id past the batch and works out who gets it; subscribe()
        # registers and notes _last_id under it too. So a subscriber gets each
        # event exactly once: live if it was registered before the batch was
        # shared out, else in its replay (up to the _last_id it noted).
        # The writes happen outside the lock, one leader at a time
        # (_flushing), in seq order; see _flush_through.
        self._lock = threading.Lock()
        self._last_id = self.history.last_id    # newest event handed out (or kept at start)
        self._seq = parse_event_id(self._last_id, self.history.run_id) or 0
        self._subscribers_by_topic: dict[str, set[Subscriber]] = {}
        # Subscribers by selector ("*" or a URI template), each selector's
        # compiled form, and for recently published topics which selectors
        # match them (bounded; cleared when a new selector comes).
        self._subscribers_by_pattern: dict[str, set[Subscriber]] = {}
        self._patterns: dict[str, object] = {}
        self._patterns_of_topic: dict[str, tuple[str, ...]] = {}
        self._ids_in_flight: set[str] = set()  # publishers' ids being published now
        self._subscriber_count = 0
        self._closed = False
        self._pending: list[_Event] = []   # published, not yet handed out
        self._flushing = False              # a leader is writing a batch
        self._flushed_seq = self._seq       # every event up to this seq is out
        self._flushed = threading.Condition(self._lock)
        self._helper = _HelperThread("fan-out")    # used by the leader only
        self.events_published = 0
        self.events_delivered = 0
        self.clients_dropped: collections.Counter[str] = collections.Counter()   # by reason
        # From publish until the fan-out has written the event to every idle
        # subscriber's socket and queued it for the busy ones.
        self.delivery_seconds = Histogram(DELIVERY_BUCKETS_S)
        self.subscriptions_total = 0
        self.history.start(self.hand_out)

    @property
    def run_id(self) -> Optional[str]:
        return self.history.run_id

    # Publishing

    def publish(self, topics, data: object, *, event: Optional[str] = None,
                retry: Optional[int] = None, private: bool = False,
                iri_id: bool = False, event_id: Optional[str] = None) -> Published:
        """Send one event to every subscriber of `topics` (a name or a list).

        Returns (id, subscribers reached). Never blocks on a client; waits
        for the history to keep the event (with --store, a sync to disk)
        and raises ServiceUnavailable if it cannot, or once the broker is
        closed. A `private` event reaches only subscribers whose token
        allows one of its topics; `iri_id` gives the id its IRI form
        (urn:sse:..., for the Mercure route). `event_id` is the publisher's
        own id: BadRequest if it is of the wrong form, whatever the history;
        used if the history keeps such ids (else ignored, as the Mercure
        draft allows), Conflict (409) while an event of that id is held."""
        topic_list, text = _prepare_event(topics, data, event, retry)
        if event_id is not None:
            event_id = check_publisher_id(event_id, self.history.run_id)
        if self._closed:
            raise ServiceUnavailable("server is shutting down")
        if event_id is not None and self.history.keeps_publisher_ids:
            return self._publish_named(topic_list, text, event, retry, private, event_id)
        return self._publish(topic_list, text, event, retry, private, iri_id)

    def _publish_named(self, topic_list, text, event, retry, private, event_id) -> Published:
        """Publish under the publisher's id, once no held event has it. An
        id is claimed (under the lock) before the history is asked (outside
        it), so two publishers of one id cannot both pass."""
        with self._lock:
            if event_id in self._ids_in_flight:
                raise Conflict(f"id {event_id[:80]!r} is being published right now")
            self._ids_in_flight.add(event_id)
        try:
            if self.history.find(event_id) is not None:
                raise Conflict(f"id {event_id[:80]!r} is still held in the history; "
                               "ids must be unique")
            return self._publish(topic_list, text, event, retry, private, False, event_id)
        finally:
            with self._lock:
                self._ids_in_flight.discard(event_id)

    def _publish(self, topic_list, text, event, retry, private, iri_id,
                 named: Optional[str] = None) -> Published:
        if self.history.shared:     # it numbers the event and hands it back to us
            event_id = self.history.add(topic_list, text, event, retry, private=private,
                                        iri_id=iri_id)
            with self._lock:
                return Published(event_id,
                                 len(self._subscribers_of_locked(topic_list, private)))
        with self._lock:
            if self._closed:        # (checked again: close() may have come meanwhile)
                raise ServiceUnavailable("server is shutting down")
            self._seq += 1
            event_id = named or format_event_id(self.history.run_id, self._seq, iri_id)
            item = _Event(self._seq, event_id, _encode_event(text, event, event_id, retry),
                          self._clock(), topic_list, private, named is not None)
            self._pending.append(item)
            self._flush_through(item.seq)
        if item.refused:    # each of the batch's publishers raises an error of its own
            raise ServiceUnavailable(item.refused.reason, item.refused.retry_after_s)
        return Published(event_id, item.reached)

    def hand_out(self, entries: Iterable[tuple[Optional[str], bytes, Optional[tuple], bool]]
                 ) -> None:
        """Fan out (id, frame, topics, private) that a shared history has
        kept, in its order, whoever published them. Topics None: every
        subscriber (a notice with no id, such as a reset)."""
        with self._lock:
            for event_id, frame, topics, private in entries:
                if topics is None:
                    topics = (*self._subscribers_by_topic, *self._subscribers_by_pattern)
                    topics = topics or ("*",)
                self._seq += 1
                self._pending.append(_Event(self._seq, event_id, frame, self._clock(), topics,
                                            private))
            self._flush_through(self._seq)

    # Fan-out by group commit: events wait in _pending; one publisher at a
    # time (the leader) takes all of them, has the history keep them (one
    # transaction, one sync, for the whole batch), and writes each
    # subscriber's share with one write, outside the broker lock, then wakes
    # the publishers whose events it sent. A publisher leads at most until
    # its own event is out. Leaders take turns in seq order, so every stream
    # stays in id order.

    def _flush_through(self, seq: int) -> None:
        """Return once event `seq` was handed out. Called with _lock held and
        returns with it held, but lets go of it while it waits for another
        leader and while it leads (the history's write and the fan-out)."""
        while self._flushed_seq < seq:
            if self._flushing:
                self._flushed.wait()
                continue
            self._flushing = True
            batch, self._pending = self._pending, []
            dropped: list[Subscriber] = []
            try:
                if self._keep_unlocked(batch):
                    self._last_id = next((self._position_of(item) for item in reversed(batch)
                                          if item.id), self._last_id)
                    shares = self._shares_locked(batch)
                    self._lock.release()
                    try:
                        dropped = self._write_shares(shares)
                    finally:
                        self._lock.acquire()
            finally:
                written = self._clock()
                self._flushing = False
                self._flushed_seq = batch[-1].seq
                self._flushed.notify_all()
            for subscriber in dropped:
                self._remove_locked(subscriber)
            for item in batch:
                if item.id and not item.refused:
                    self.events_published += 1
                    self.events_delivered += item.reached
                    self.delivery_seconds.observe(written - item.created)
            if dropped:
                self.clients_dropped["slow"] += len(dropped)

    def _keep_unlocked(self, batch: list[_Event]) -> bool:
        """Have the history keep the batch; called with _lock held, which it
        lets go of meanwhile (the history may write to disk) and takes back.
        False if it could not: then nobody sees the batch."""
        if self.history.shared:     # it kept them before handing them out
            return True
        self._lock.release()
        try:
            self.history.append(batch)
            return True
        except BaseException as error:
            # Whatever went wrong, no publisher of the batch may be told it was kept.
            refused = error if isinstance(error, ServiceUnavailable) else ServiceUnavailable(
                "the events could not be kept; see the server's log")
            for item in batch:
                item.refused = refused
            if refused is not error:
                raise       # a bug: the leader's own request reports it
            return False
        finally:
            self._lock.acquire()

    def _position_of(self, item: _Event) -> str:
        """The id of `item` in the history's numbering (a publisher's own id
        is not a position)."""
        return format_event_id(self.history.run_id, item.seq) if item.named else item.id

    def _shares_locked(self, batch: list[_Event]) -> list[tuple[list[Subscriber], list[_Event]]]:
        """Group the batch by who gets what: [(subscribers, their events)]."""
        by_topics: dict[tuple, list[_Event]] = {}
        for item in batch:
            by_topics.setdefault((item.topics, item.private), []).append(item)
        if len(by_topics) == 1:     # the usual case: everyone gets the whole batch
            ((topics, private), events), = by_topics.items()
            return [(self._subscribers_of_locked(topics, private), events)]
        events_of: dict[Subscriber, list[_Event]] = {}
        for item in batch:
            for subscriber in self._subscribers_of_locked(item.topics, item.private):
                events_of.setdefault(subscriber, []).append(item)
        return [([subscriber], events) for subscriber, events in events_of.items()]

    def _subscribers_of_locked(self, topics: tuple[str, ...],
                               private: bool = False) -> list[Subscriber]:
        """Who gets an event of `topics`: exact topics are one dictionary
        lookup each; the selectors matching a topic are worked out once per
        topic (see _patterns_matching_locked), however many use them."""
        by_topic = self._subscribers_by_topic
        if len(topics) == 1 and not self._patterns:
            subscribers = list(by_topic.get(topics[0], ()))
        else:
            found: set[Subscriber] = set()
            for topic in topics:
                found.update(by_topic.get(topic, ()))
                if self._patterns:
                    for pattern in self._patterns_matching_locked(topic):
                        found.update(self._subscribers_by_pattern.get(pattern, ()))
            subscribers = list(found)
        if private:
            subscribers = [s for s in subscribers if s.may_see(topics, True)]
        return subscribers

    def _patterns_matching_locked(self, topic: str) -> tuple[str, ...]:
        patterns = self._patterns_of_topic.get(topic)
        if patterns is None:
            patterns = tuple(text for text, selector in self._patterns.items()
                             if selector.matches(topic))
            if len(self._patterns_of_topic) >= PATTERN_CACHE_TOPICS:
                self._patterns_of_topic.clear()
            self._patterns_of_topic[topic] = patterns
        return patterns

    def _write_shares(self, shares) -> list[Subscriber]:
        """Write (or queue) each subscriber's share. Returns those dropped.

        A share for very many subscribers is split with a helper thread:
        os.write releases the GIL, so two threads keep two cores busy in the
        kernel. Each subscriber is written by one thread, so its order holds."""
        dropped = []
        for subscribers, events in shares:
            payload = Payload(b"".join([item.frame for item in events]), len(events))
            if len(subscribers) >= FAN_OUT_SPLIT_SUBSCRIBERS:
                half = len(subscribers) // 2
                self._helper.start(self._write_share, subscribers[half:], payload)
                reached, mine_dropped = self._write_share(subscribers[:half], payload)
                more_reached, more_dropped = self._helper.result()
                reached += more_reached
                mine_dropped += more_dropped
            else:
                reached, mine_dropped = self._write_share(subscribers, payload)
            for item in events:
                item.reached += reached
            dropped += mine_dropped
        return dropped

    def _write_share(self, subscribers: list[Subscriber],
                     payload: Payload) -> tuple[int, list[Subscriber]]:
        """Returns how many subscribers took the payload, and who was dropped."""
        reached = 0
        dropped = []
        for subscriber in subscribers:
            outcome = subscriber.deliver(payload, self.queue_size)
            if outcome:
                reached += 1
            elif outcome is False:
                dropped.append(subscriber)
                logger.warning("dropped a slow subscriber of %s: %d writes waiting",
                               ",".join(subscriber.topics), self.queue_size)
        return reached, dropped

    # Subscribing

    def subscribe(self, topics: Iterable[str], *, last_event_id: Optional[str] = None,
                  io: Optional[SocketIO] = None, chunked: bool = True,
                  patterns: Iterable[str] = (),
                  authorized: Optional[SelectorSet] = None) -> tuple[Subscriber, list[bytes]]:
        """Register a subscriber. Returns it and the frames to replay first.
        With `io` (its connection) publishers write to it directly while it
        is idle; without, everything waits in its queue (see StreamSink).
        `patterns` are selectors ("*", URI templates) beside the exact
        `topics`; `authorized` lets private events through (see Subscriber).

        With `last_event_id`, the replay holds every retained event of these
        topics after that id, oldest first; if events may have been missed
        (foreign id, or history no longer reaching back that far) it starts
        with a `reset` event that says why. The history is read outside the
        lock (it may be a file or Redis): events handed out after the
        registration reach the subscriber live, so the replay stops before them."""
        subscriber = Subscriber(topics, io, chunked=chunked, authorized=authorized,
                                patterns=tuple(compile_selector(p) for p in patterns))
        with self._lock:
            self._register_locked(subscriber)
            upto = self._last_id
        if not last_event_id:
            return subscriber, []
        try:
            return subscriber, self.history.replay(subscriber, self.position(last_event_id),
                                                   upto)
        except ServiceUnavailable:
            self.unsubscribe(subscriber)
            raise

    @property
    def last_event_id(self) -> Optional[str]:
        """The newest event handed out (or kept at start); None if none."""
        return self._last_id

    def position(self, last_event_id: str) -> str:
        """Where a Last-Event-ID points in the history's numbering: itself,
        or, for a publisher's own id, the id of the event that has it (the
        id itself if no held event has it: a replay then says unknown-id)."""
        history = self.history
        if (history.keeps_publisher_ids and last_event_id != EARLIEST and
                parse_event_id(last_event_id, history.run_id) is None):
            return history.find(last_event_id) or last_event_id
        return last_event_id

    def _register_locked(self, subscriber: Subscriber) -> None:
        if self._closed:
            raise ServiceUnavailable("server is shutting down")
        if self._subscriber_count >= self.max_subscribers:
            raise ServiceUnavailable(
                f"too many subscribers (limit {self.max_subscribers}); try again later")
        for topic in subscriber.topics:
            self._subscribers_by_topic.setdefault(topic, set()).add(subscriber)
        for pattern in subscriber.patterns:
            if pattern.text not in self._patterns:  # the cached matches lack it
                self._patterns[pattern.text] = pattern
                self._patterns_of_topic.clear()
            self._subscribers_by_pattern.setdefault(pattern.text, set()).add(subscriber)
        self._subscriber_count += 1
        self.subscriptions_total += 1

    def count_dropped(self, reason: str) -> None:
        """Count a subscriber its connection dropped ("write_timeout",
        "token_expired"); the fan-out counts the slow ones itself."""
        with self._lock:
            self.clients_dropped[reason] += 1

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._remove_locked(subscriber)

    def _remove_locked(self, subscriber: Subscriber) -> None:
        removed = self._discard_locked(self._subscribers_by_topic, subscriber.topics, subscriber)
        for pattern in subscriber.patterns:
            if self._discard_locked(self._subscribers_by_pattern, [pattern.text], subscriber):
                removed = True
                if pattern.text not in self._subscribers_by_pattern:
                    del self._patterns[pattern.text]    # nobody uses it now
        if removed:
            self._subscriber_count -= 1

    @staticmethod
    def _discard_locked(index: dict, keys: Iterable[str], subscriber: Subscriber) -> bool:
        """Take `subscriber` out of index[key] for each key; was it there?"""
        removed = False
        for key in keys:
            subscribers = index.get(key)
            if subscribers and subscriber in subscribers:
                removed = True
                subscribers.discard(subscriber)
                if not subscribers:
                    del index[key]
        return removed

    def close(self) -> list[Subscriber]:
        """Refuse new subscribers, tell every stream to end, and close the
        history. Returns the subscribers."""
        with self._lock:
            self._closed = True
            subscribers = set()
            for index in (self._subscribers_by_topic, self._subscribers_by_pattern):
                for some in index.values():
                    subscribers.update(some)
                index.clear()
            self._subscriber_count = 0
        for subscriber in subscribers:
            subscriber.end(SHUTDOWN)
        with self._lock:        # a fan-out in progress still needs its helper
            leader_done = self._flushed.wait_for(lambda: not self._flushing,
                                                 timeout=CLOSE_WAIT_S)
        if not leader_done:     # a history stuck in a write (a hung disk): leave it be
            logger.warning("a fan-out was still running %ss after shutdown began; "
                           "closing without waiting for it", CLOSE_WAIT_S)
            return list(subscribers)
        self._helper.close()
        self.history.close()
        return list(subscribers)

    # Introspection

    def health(self) -> tuple[bool, str]:
        """(healthy, reason) for /healthz."""
        return self.history.health()

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return self._subscriber_count

    def stats(self) -> dict:
        with self._lock:
            stats = {
                "subscribers": self._subscriber_count,
                "topics": len(self._subscribers_by_topic),
                "selectors": len(self._subscribers_by_pattern),
                "events_published": self.events_published,
                "events_delivered": self.events_delivered,
                "clients_dropped": sum(self.clients_dropped.values()),
                "clients_dropped_by_reason": dict(self.clients_dropped),
                "subscriptions_total": self.subscriptions_total,
                "last_event_id": self._last_id,
                "uptime_s": round(self._clock() - self._started, 3),
                "start_time_s": round(self.start_time_s, 3),
                "delivery_seconds": {"buckets": self.delivery_seconds.cumulative(),
                                     "sum": self.delivery_seconds.sum,
                                     "count": self.delivery_seconds.count},
            }
        stats.update(self.history.stats())      # outside the lock: it may read a file
        return stats


# --- History: where events are kept for replay --------------------------------------------

RESET_MESSAGES = {
    "unknown-id": "Last-Event-ID is not from this server run; replaying all retained events",
    "history-exceeded": "events after Last-Event-ID are no longer retained; some were missed",
}


def format_reset_event(reason: str, last_event_id: str) -> bytes:
    """The `reset` event that starts a replay which may have missed events.
    It carries no id, so the client's last event id is left as it was."""
    data = {"reason": reason, "lastEventId": last_event_id, "message": RESET_MESSAGES[reason]}
    return format_event(json.dumps(data, ensure_ascii=False), event="reset")


class Presence:
    """Mercure's active subscriptions (--subscriptions): which selectors
    this instance's hub streams hold, with the payload of their tokens. On
    every subscribe and disconnect it publishes the subscription update, a
    private one on the subscription's own topic, and it answers the
    subscriptions API from what it holds."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self._lock = threading.Lock()
        self._active: dict[str, tuple[Topics, object]] = {}   # subscriber: selectors, payload

    @staticmethod
    def topic_of(selector: str, subscriber: str) -> str:
        """The subscription's IRI: both parts percent-encoded, as the draft says."""
        quote = functools.partial(urllib.parse.quote, safe="")
        return f"{MERCURE_SUBSCRIPTIONS}/{quote(selector)}/{quote(subscriber)}"

    def document(self, selector: str, subscriber: str, payload: object,
                 active: bool = True) -> dict:
        found = {"id": self.topic_of(selector, subscriber), "type": "Subscription",
                 "topic": selector, "subscriber": subscriber, "active": active}
        if payload is not None:
            found["payload"] = payload
        return found

    def joined(self, selectors: Topics, payload: object) -> str:
        """A hub stream began; returns its subscriber id."""
        subscriber = f"urn:uuid:{uuid.uuid4()}"
        with self._lock:
            self._active[subscriber] = (selectors, payload)
        self._announce(subscriber, selectors, payload, True)
        return subscriber

    def left(self, subscriber: str) -> None:
        with self._lock:
            selectors, payload = self._active.pop(subscriber)
        self._announce(subscriber, selectors, payload, False)

    def _announce(self, subscriber: str, selectors: Topics, payload: object,
                  active: bool) -> None:
        for selector in selectors:
            update = {"@context": MERCURE_CONTEXT,
                      **self.document(selector, subscriber, payload, active)}
            try:
                self.broker.publish(validate_iris([update["id"]]), json.dumps(update),
                                    private=True, iri_id=True)
            except HTTPError as error:  # shutting down, the history refused it, or
                # a selector too long to name: presence is best effort, streams go on
                logger.debug("no subscription update for %s: %s", subscriber, error.reason)

    def documents(self, selector: Optional[str] = None,
                  subscriber: Optional[str] = None) -> list[dict]:
        """The active subscriptions, of one selector, or one subscriber's."""
        with self._lock:
            active = list(self._active.items())
        return [self.document(held, who, payload) for who, (selectors, payload) in active
                for held in selectors if (selector is None or held == selector) and
                (subscriber is None or who == subscriber)]


def _replay_bounds(last_event_id: str, upto: Optional[str],
                   run_id: str) -> tuple[int, int, Optional[str]]:
    """A replay's range as seqs of this run, after < seq <= upto, and
    "unknown-id" if last_event_id is not in it (then everything kept is
    replayed: the client's id means nothing here)."""
    limit = parse_event_id(upto, run_id) or 0
    after = parse_event_id(last_event_id, run_id)
    if after is None or after > limit:
        return 0, limit, "unknown-id"
    return after, limit, None


EARLIEST = "earliest"   # a Last-Event-ID asking for all that is kept (Mercure's reserved value)


def _with_reset(reason: Optional[str], last_event_id: str, frames: list[bytes]) -> list[bytes]:
    if not reason or last_event_id == EARLIEST:     # what it asked for: nothing is missing
        return frames
    return [format_reset_event(reason, last_event_id), *frames]


def starts_with_reset(frames: list[bytes]) -> bool:
    """Does this replay begin by saying events may be missing?"""
    return bool(frames) and frames[0].startswith(b"event: reset\n")


class History:
    """The seam between the broker and where events are kept, so that the
    registry and the fan-out are the same whatever keeps them:
    MemoryHistory (the default), SQLiteHistory (--store, across restarts)
    and RedisHistory (--redis, shared by several instances).

    The broker's side of the contract:
    - `run_id` and `last_id` are read once, at start: the prefix of this
      history's ids, and the id of the newest event it kept before (None if
      none), from which the numbering continues.
    - start(hand_out) is called once the broker exists.
    - append(batch) is called by the fan-out leader with events in seq
      order, outside the broker's lock, before any subscriber sees them.
      When it returns they are kept (by the store: synced to disk). If they
      cannot be, it raises ServiceUnavailable, and nobody sees them.
    - replay(selection, last_event_id, upto) is called by subscribe(),
      outside the broker's lock: the frames of kept events that
      `selection` (the Subscriber) wants, after last_event_id up to `upto`
      (the newest event handed out when the subscriber was registered;
      None: none since start), oldest first, after a `reset` event if some
      may be missing. selection.wants(topics, private) says which; its
      `topics` are the exact ones, and it has `patterns` (selectors that
      may match any topic) only on the Mercure route. A private event must
      never be replayed to a selection that does not want it.
    - A history that `keeps_publisher_ids` keeps events published under a
      publisher's own id (event.named; the Mercure hub's `id` field) and
      find(event_id) gives the id, in its numbering, of the held event that
      has it, or None. Others get no such events: the broker numbers them.
    - A shared history (`shared`) numbers events itself: publish() calls
      add() instead of queueing, and the history gives every event back,
      whichever instance published it, through hand_out() in its order.
    None of these is called with the broker's lock held, so disk and
    network I/O never stalls the registry."""

    shared = False
    keeps_publisher_ids = False
    run_id: Optional[str] = None
    last_id: Optional[str] = None

    def start(self, hand_out: Callable) -> None:
        pass

    def append(self, batch: list[_Event]) -> None:
        raise NotImplementedError

    def add(self, topics: Topics, text: str, event: Optional[str], retry: Optional[int], *,
            private: bool = False, iri_id: bool = False) -> str:
        raise NotImplementedError

    def replay(self, selection: Subscriber, last_event_id: str,
               upto: Optional[str]) -> list[bytes]:
        raise NotImplementedError

    def find(self, event_id: str) -> Optional[str]:
        return None

    def stats(self) -> dict:
        return {}

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def close(self) -> None:
        pass


class Retention:
    """The one policy for what a local history keeps, asked by each
    mechanism (MemoryHistory, SQLiteHistory and the store's cache): the
    newest `history_size` events of each topic, none older than
    `history_ttl_s`, for the `max_topics` topics published to most recently.
    And what was forgotten, so that a replay that may miss events says so:

    - Each topic's history knows `evicted_through`, the newest of its seqs
      it no longer keeps.
    - A topic that max_topics drops leaves a mark in one of `buckets` hash
      buckets: the highest seq of any dropped topic hashing there. A topic
      with no history (new, or dropped) counts its bucket's mark as
      evicted. So a real loss always resets, and a needless reset needs a
      dropped topic with newer events in the same bucket: rare, in bounded
      memory, however many topics come and go.
    - Seqs up to `floor` count as forgotten for every topic (the store's
      cache: what the file held before the cache started).
    Not locked: its history's lock guards it."""

    def __init__(self, history_size: int = HISTORY_SIZE, history_ttl_s: Optional[float] = None,
                 max_topics: int = MAX_TOPICS, *, floor: int = 0,
                 buckets: int = FORGOTTEN_BUCKETS):
        self.history_size = history_size
        self.history_ttl_s = history_ttl_s
        self.max_topics = max_topics
        self.floor = floor
        self._marks = array.array("q", bytes(8 * buckets))
        self.changed: set[int] = set()     # buckets raised since a store last saved them

    def bounded(self, history_size: int, floor: int) -> "Retention":
        """The same policy for at most `history_size` events per topic (a cache)."""
        return Retention(min(history_size, self.history_size), self.history_ttl_s,
                         self.max_topics, floor=floor, buckets=len(self._marks))

    def excess(self, count: int) -> int:
        """How many of a topic's `count` events are too many to keep."""
        return max(0, count - self.history_size)

    def cutoff(self, now: float) -> Optional[float]:
        """Events kept before this time are too old (None: no TTL)."""
        return None if self.history_ttl_s is None else now - self.history_ttl_s

    def drop_topics(self, topics: collections.OrderedDict) -> list[tuple[str, object]]:
        """Take the least recently published topics beyond max_topics out
        of `topics` (oldest first); the caller forgets() each."""
        dropped = []
        while len(topics) > self.max_topics:
            dropped.append(topics.popitem(last=False))
        return dropped

    def _bucket(self, topic: str) -> int:
        # crc32, not hash(): the store's marks must mean the same after a restart.
        return binascii.crc32(topic.encode("utf-8")) % len(self._marks)

    def forget(self, topic: str, through: int) -> None:
        """`topic` was dropped with events up to seq `through`."""
        bucket = self._bucket(topic)
        if through > self._marks[bucket]:
            self._marks[bucket] = through
            self.changed.add(bucket)

    def forgotten_through(self, topic: str) -> int:
        """What a topic with no history counts as evicted from it."""
        return max(self.floor, self._marks[self._bucket(topic)])

    def newest_forgotten(self) -> int:
        return max(self.floor, max(self._marks))

    def saved_marks(self) -> list[tuple[int, int]]:
        """(bucket, mark) of the buckets raised since the last call."""
        changed, self.changed = self.changed, set()
        return [(bucket, self._marks[bucket]) for bucket in sorted(changed)]

    def load_marks(self, floor: int, buckets: int, marks: Iterable[tuple[int, int]]) -> None:
        """Take the marks a store kept (`buckets` of them) instead of ours."""
        self.floor = floor
        self._marks = array.array("q", bytes(8 * buckets))
        for bucket, mark in marks:
            self._marks[bucket] = mark
        self.changed = set()


class _TopicHistory:
    __slots__ = ("events", "kept_at", "evicted_through")

    def __init__(self, evicted_through: int, timed: bool):
        self.events: collections.deque = collections.deque()
        # With a TTL, when each event was kept (an empty deque is ~770 bytes,
        # so topics without a TTL have none).
        self.kept_at: Optional[collections.deque] = collections.deque() if timed else None
        self.evicted_through = evicted_through  # highest seq of this topic no longer retained


class MemoryHistory(History):
    """What `retention` keeps, in memory; gone when the process ends.
    SQLiteHistory keeps one in front of its file as a cache."""

    def __init__(self, retention: Optional[Retention] = None, *,
                 clock: Callable[[], float] = time.monotonic, run_id: Optional[str] = None):
        self.retention = retention or Retention()
        self.run_id = run_id or secrets.token_hex(4)
        self._clock = clock
        # Locking rule: _lock guards _topics and the retention's marks; it is
        # held for no I/O.
        self._lock = threading.Lock()
        self._topics: collections.OrderedDict[str, _TopicHistory] = collections.OrderedDict()
        self._named: dict[str, _Event] = {}    # held events by their publisher's id

    keeps_publisher_ids = True

    def append(self, batch: list[_Event]) -> None:
        with self._lock:
            for item in batch:
                self._remember(item)

    def find(self, event_id: str) -> Optional[str]:
        with self._lock:
            event = self._named.get(event_id)
            if event is None:
                return None
            for topic in event.topics:      # (a TTL may have let it go meanwhile)
                if topic in self._topics:
                    self._expire(self._topics[topic])
            event = self._named.get(event_id)
            return None if event is None else format_event_id(self.run_id, event.seq)

    def _holds(self, event: _Event) -> bool:
        """Is `event` still in one of its topics' histories? (Each is in seq
        order and loses events from its oldest end only.)"""
        for topic in event.topics:
            history = self._topics.get(topic)
            if history is not None and history.events and history.events[0].seq <= event.seq:
                return True
        return False

    def _let_go(self, event: _Event) -> None:
        """`event` left a topic's history: once it is in none, its
        publisher's id may be used again."""
        if event.named and self._named.get(event.id) is event and not self._holds(event):
            del self._named[event.id]

    def _remember(self, event: _Event) -> None:
        retention = self.retention
        if event.named:
            self._named[event.id] = event
        for topic in event.topics:
            history = self._topics.get(topic)
            if history is None:
                history = self._topics[topic] = _TopicHistory(
                    retention.forgotten_through(topic), timed=retention.history_ttl_s is not None)
                for name, dropped in retention.drop_topics(self._topics):
                    retention.forget(name, dropped.events[-1].seq if dropped.events
                                     else dropped.evicted_through)
                    if self._named:
                        for gone in dropped.events:
                            self._let_go(gone)
            else:
                self._topics.move_to_end(topic)
            history.events.append(event)
            if history.kept_at is not None:
                history.kept_at.append(self._clock())
            if retention.excess(len(history.events)):
                self._evict_oldest(history)
            self._expire(history)

    def _evict_oldest(self, history: _TopicHistory) -> None:
        event = history.events.popleft()
        history.evicted_through = event.seq
        if history.kept_at:
            history.kept_at.popleft()
        if event.named:
            self._let_go(event)

    def _expire(self, history: _TopicHistory) -> None:
        cutoff = self.retention.cutoff(self._clock())
        while cutoff is not None and history.kept_at and history.kept_at[0] < cutoff:
            self._evict_oldest(history)

    def replay(self, selection: Subscriber, last_event_id: str,
               upto: Optional[str]) -> list[bytes]:
        after, limit, reason = _replay_bounds(last_event_id, upto, self.run_id)
        complete, frames = self.events_between(selection, after, limit)
        return _with_reset(reason or (None if complete else "history-exceeded"),
                           last_event_id, frames)

    def topics_selected(self, selection: Subscriber) -> list[str]:
        """The topics with history that `selection` picks (its patterns
        are tried on each topic kept). Called with _lock held."""
        if not selection.patterns:
            return list(selection.topics)
        return [*selection.topics, *(name for name in self._topics if name not in
                                     selection.topics and selection.selects(name))]

    def events_between(self, selection: Subscriber, after: int,
                       upto: int) -> tuple[bool, list[bytes]]:
        """The frames of the kept events `selection` wants with after < seq
        <= upto, oldest first, and whether that is all of them (none was
        evicted; with patterns, no topic was forgotten since)."""
        events: dict[int, bytes] = {}
        complete = not selection.patterns or self.retention.newest_forgotten() <= after
        with self._lock:
            for topic in self.topics_selected(selection):
                history = self._topics.get(topic)
                if history is None:
                    complete = complete and self.retention.forgotten_through(topic) <= after
                    continue
                self._expire(history)
                complete = complete and history.evicted_through <= after
                for event in reversed(history.events):
                    if event.seq <= after:
                        break
                    if event.seq <= upto and (not event.private or
                                              selection.may_see(event.topics, True)):
                        events[event.seq] = event.frame
        return complete, [events[seq] for seq in sorted(events)]

    def stats(self) -> dict:
        with self._lock:
            return {"run_id": self.run_id, "topics_with_history": len(self._topics),
                    "events_retained": sum(len(h.events) for h in self._topics.values())}


# --- Store: the history in an SQLite file (--store), kept across restarts ----------------

STORE_FORMAT = "3"              # the layout of the file, kept in it (1: no forgotten table;
                                # 2: no events.private_topics nor events.event_id)
STORE_SCHEMA = (
    # format, run_id, forgotten_buckets (how many, see Retention), and
    # forgotten_through: seqs up to it count as forgotten for every topic
    # (what format 1 kept, one mark for all topics; 0 in a new file).
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    # One row per topic with history: what was evicted from it, and its newest
    # seq (so --max-topics forgets the least recently published first, and
    # the newest of them all is where the numbering goes on after a restart).
    "CREATE TABLE IF NOT EXISTS topics (topic TEXT PRIMARY KEY, "
    "evicted_through INTEGER NOT NULL, last_seq INTEGER NOT NULL) WITHOUT ROWID",
    # One row per event and topic (an event on two topics has two): its bytes
    # on the wire, id included, and when it was kept (Unix time, for the TTL).
    # private_topics: NULL, or for a private event all its topics (JSON), which
    # a replay needs to tell who may see it. event_id: NULL, or the id its
    # publisher gave it (Mercure's `id`), which a Last-Event-ID may name.
    "CREATE TABLE IF NOT EXISTS events (topic TEXT NOT NULL, seq INTEGER NOT NULL, "
    "created REAL NOT NULL, frame BLOB NOT NULL, private_topics TEXT, event_id TEXT, "
    "PRIMARY KEY (topic, seq)) WITHOUT ROWID",
    # The marks of topics --max-topics dropped, by hash bucket (see Retention).
    "CREATE TABLE IF NOT EXISTS forgotten (bucket INTEGER PRIMARY KEY, "
    "through INTEGER NOT NULL)",
)


class StoreError(Exception):
    """A --store file that cannot be used; the message is one line for the user."""

    @classmethod
    def in_use(cls, path: str) -> "StoreError":
        return cls(f"{path} is in use by another server (one server per file; several "
                   "instances share events with --redis)")


class SQLiteHistory(History):
    """The history and the id sequence in an SQLite file, so that a restart
    (an upgrade, a crash, a power cut) forgets nothing that was acknowledged
    and a client resumes with its Last-Event-ID as if nothing had happened.

    - Durable: append() returns after its transaction is committed and synced
      (write-ahead log, synchronous=FULL), one transaction per fan-out batch,
      so concurrent publishers share one sync.
    - One server per file: a second server is refused (see _claim). Other
      programs may read it meanwhile, so it can be backed up while running.
    - Bounded by the same Retention as the memory history; old rows are
      deleted in the transaction that adds new ones,
      and SQLite reuses their pages, so the file stays about the size of what
      is retained.
    - Fast replay: the newest `cache_size` events of each topic are also kept
      in memory (a MemoryHistory); a replay they cover never reads the file.
    - A failing disk (full, read-only, I/O error) makes append() raise
      ServiceUnavailable (publishers get 503), logged once; the next append
      that works ends it."""

    def __init__(self, path: str, retention: Optional[Retention] = None, *,
                 cache_size: int = STORE_CACHE_SIZE, clock: Callable[[], float] = time.time):
        self.path = path
        self.retention = retention or Retention()
        self._clock = clock         # Unix time: `created` must mean the same after a restart
        # Locking rule: _lock guards the connection (one statement at a time)
        # and every attribute below; it is never held with the broker's lock.
        self._lock = threading.Lock()
        self._owner = self._claim(path)     # held until close()
        try:
            self._db = self._open(path, exclusive=self._owner is None)
            try:
                last_seq = self._load()
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            if self._owner is not None:
                self._owner.close()
            raise
        self.last_id = format_event_id(self.run_id, last_seq) if last_seq else None
        self.error: Optional[str] = None    # why the last append failed; None once one works
        self._closed = False
        self.commits = 0
        self.commit_seconds = 0.0
        self._cache = MemoryHistory(self.retention.bounded(cache_size, floor=last_seq),
                                    clock=clock, run_id=self.run_id)

    @staticmethod
    def _claim(path: str):
        """One server per file: lock PATH.lock for as long as this one runs
        (it stays on disk, harmless). Returns that open file, or None where
        the platform has no file locks: then SQLite's exclusive mode refuses
        a second server instead (and refuses backups while running, too)."""
        if os.path.isdir(path):
            raise StoreError(f"{path} is a directory; give a file name such as "
                             f"{os.path.join(path, 'events.db')}")
        if sqlite3 is None:
            raise StoreError("this Python was built without the sqlite3 module, which "
                             "--store needs")
        try:
            owner = open(path + ".lock", "a+b")
        except OSError as error:
            raise StoreError(f"cannot open {path}: {error.strerror}") from None
        locked = lock_file(owner)
        if locked is False:
            owner.close()
            raise StoreError.in_use(path)
        if locked is None:
            owner.close()
            return None
        return owner

    @staticmethod
    def _open(path: str, exclusive: bool):
        try:
            db = sqlite3.connect(path, timeout=STORE_BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open {path}: {error}") from None
        try:
            # Before anything changes the file (even its journal mode): is it ours?
            tables = {name for name, in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and not {"meta", "topics", "events"} <= tables:
                raise StoreError(f"{path} is an SQLite database of something else; "
                                 "give the store a file of its own")
            if exclusive:   # held from the first write below until close()
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StoreError(f"{path}: SQLite cannot keep a write-ahead log here")
            # FULL: a commit is on disk when it returns. (NORMAL, in WAL mode,
            # survives a crash of the process but can lose the last commits to
            # a power cut.)
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA wal_autocheckpoint={STORE_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={STORE_WAL_LIMIT_BYTES}")
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            db.close()
            if "locked" in str(error) and exclusive:
                raise StoreError.in_use(path) from None
            raise StoreError(f"cannot use {path}: {error}") from None
        except sqlite3.DatabaseError as error:
            db.close()
            raise StoreError(f"{path} is not an SQLite database ({error})") from None
        except BaseException:
            db.close()
            raise
        return db

    def _load(self) -> int:
        """Create the tables if new, read the run id and what is kept; returns
        the newest seq ever given. The transaction was begun by _open."""
        db = self._db
        try:
            for statement in STORE_SCHEMA:
                db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if not meta:
                meta = {"format": STORE_FORMAT, "run_id": secrets.token_hex(4),
                        "forgotten_through": "0"}
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            if meta.get("format") in ("1", "2"):    # older files: add what is missing
                # (format 1's one mark becomes the floor of every topic)
                columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
                for column in ("private_topics", "event_id"):
                    if column not in columns:
                        db.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
                meta["format"] = STORE_FORMAT
                db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (STORE_FORMAT,))
            if "forgotten_buckets" not in meta:
                meta["forgotten_buckets"] = str(FORGOTTEN_BUCKETS)
                db.execute("INSERT INTO meta VALUES ('forgotten_buckets', ?)",
                           (meta["forgotten_buckets"],))
            if meta.get("format") != STORE_FORMAT:
                raise StoreError(f"{self.path} was written in another format "
                                 f"({meta.get('format')!r}, this server reads {STORE_FORMAT!r})")
            db.execute("CREATE INDEX IF NOT EXISTS events_by_publisher_id ON events (event_id) "
                       "WHERE event_id IS NOT NULL")
            db.execute("COMMIT")
            self.run_id = meta["run_id"]
            self._read_counts()
            newest = db.execute("SELECT MAX(last_seq) FROM topics").fetchone()[0] or 0
        except sqlite3.Error as error:
            raise StoreError(f"cannot use {self.path}: {error}") from None
        # Every event updates its topics' last_seq, and a topic row is only
        # deleted with its mark raised past it: so this is every seq given.
        return max(newest, self.retention.newest_forgotten())

    def _read_counts(self) -> None:
        """What the file keeps, as append() tracks it between transactions."""
        db = self._db
        # Topic: rows kept, least recently published first (for --max-topics).
        self._topics: collections.OrderedDict[str, int] = collections.OrderedDict(db.execute(
            "SELECT topic, (SELECT COUNT(*) FROM events WHERE events.topic = topics.topic) "
            "FROM topics ORDER BY last_seq"))
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN "
                               "('forgotten_through', 'forgotten_buckets')"))
        self.retention.load_marks(int(meta["forgotten_through"]),
                                  int(meta["forgotten_buckets"]),
                                  db.execute("SELECT bucket, through FROM forgotten"))
        self._stale = False     # True while a transaction may have changed them

    def append(self, batch: list[_Event]) -> None:
        now = self._clock()
        rows = [(topic, item.seq, now, item.frame,
                 json.dumps(item.topics) if item.private else None,
                 item.id if item.named else None)
                for item in batch for topic in item.topics]
        added: dict[str, list[int]] = {}     # topic: [its newest seq in the batch, rows]
        for item in batch:
            for topic in item.topics:
                seen = added.setdefault(topic, [0, 0])
                seen[0] = item.seq
                seen[1] += 1
        with self._lock:
            if self._closed:    # a publish racing the shutdown
                raise ServiceUnavailable("server is shutting down")
            started = time.monotonic()
            try:
                self._write(rows, added, now)
            except sqlite3.Error as error:
                self._rollback()
                if self.error is None:
                    logger.error("event store %s failed: %s; publishing answers 503 until "
                                 "it works again", self.path, error)
                self.error = str(error)
                raise ServiceUnavailable(f"the event store cannot keep events: {error}",
                                         retry_after_s=STORE_RETRY_AFTER_S) from None
            self.commits += 1
            self.commit_seconds += time.monotonic() - started
            if self.error is not None:
                logger.warning("event store %s works again", self.path)
                self.error = None
        self._cache.append(batch)

    def _write(self, rows: list[tuple], added: dict[str, list[int]], now: float) -> None:
        """One transaction: the new rows, the topics' marks, the bounds."""
        db = self._db
        self._recover_if_stale()
        db.execute("BEGIN IMMEDIATE")
        self._stale = True
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
        for topic, (newest, count) in added.items():
            kept = self._topics.pop(topic, None)
            if kept is None:
                db.execute("INSERT INTO topics VALUES (?, ?, ?)",
                           (topic, self.retention.forgotten_through(topic), newest))
                kept = 0
            else:
                db.execute("UPDATE topics SET last_seq = ? WHERE topic = ?", (newest, topic))
            kept += count
            self._topics[topic] = kept - self._trim(topic, kept, now)   # the most recent now
        for topic, _ in self.retention.drop_topics(self._topics):
            evicted, last = db.execute("SELECT evicted_through, last_seq FROM topics "
                                       "WHERE topic = ?", (topic,)).fetchone()
            db.execute("DELETE FROM events WHERE topic = ?", (topic,))
            db.execute("DELETE FROM topics WHERE topic = ?", (topic,))
            self.retention.forget(topic, max(evicted, last))
        db.executemany("INSERT OR REPLACE INTO forgotten VALUES (?, ?)",
                       self.retention.saved_marks())
        db.execute("COMMIT")
        self._stale = False

    def _trim(self, topic: str, kept: int, now: float) -> int:
        """Delete what the retention no longer keeps of `topic`, which has
        `kept` rows. Returns how many rows went."""
        db = self._db
        cut = 0
        excess = self.retention.excess(kept)
        if excess:      # the seq of the newest row to go
            cut = db.execute("SELECT seq FROM events WHERE topic = ? ORDER BY seq "
                             "LIMIT 1 OFFSET ?", (topic, excess - 1)).fetchone()[0]
        cutoff = self.retention.cutoff(now)
        if cutoff is not None:
            expired = db.execute("SELECT MAX(seq) FROM events WHERE topic = ? AND created < ?",
                                 (topic, cutoff)).fetchone()[0]
            cut = max(cut, expired or 0)
        if not cut:
            return 0
        db.execute("UPDATE topics SET evicted_through = MAX(evicted_through, ?) "
                   "WHERE topic = ?", (cut, topic))
        return db.execute("DELETE FROM events WHERE topic = ? AND seq <= ?",
                          (topic, cut)).rowcount

    def _recover_if_stale(self) -> None:
        """After a transaction that failed: end what is left of it, and take
        the counts from what the file says again."""
        if self._stale:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._read_counts()

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:   # the next _write tries again
            pass

    def replay(self, selection: Subscriber, last_event_id: str,
               upto: Optional[str]) -> list[bytes]:
        after, limit, reason = _replay_bounds(last_event_id, upto, self.run_id)
        # The cache keeps no more than the file, so where it is complete the
        # file has nothing more; only a client further behind costs a read.
        complete, frames = self._cache.events_between(selection, after, limit)
        if not complete:
            complete, frames = self._read(selection, after, limit)
        return _with_reset(reason or (None if complete else "history-exceeded"),
                           last_event_id, frames)

    keeps_publisher_ids = True

    def find(self, event_id: str) -> Optional[str]:
        found = self._cache.find(event_id)      # (what the cache holds, the file holds)
        if found is not None:
            return found
        cutoff = self.retention.cutoff(self._clock())
        with self._reading("an id lookup") as db:
            row = db.execute(
                "SELECT seq FROM events WHERE event_id = ? AND created >= ? LIMIT 1",
                (event_id, -math.inf if cutoff is None else cutoff)).fetchone()
        return None if row is None else format_event_id(self.run_id, row[0])

    @contextlib.contextmanager
    def _reading(self, what: str):
        """The file, to read with the lock held: ServiceUnavailable (503) once
        closed, or if SQLite fails (logged, naming `what` was being read)."""
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("server is shutting down")
            try:
                self._recover_if_stale()
                yield self._db
            except sqlite3.Error as error:
                logger.warning("event store %s: %s failed: %s", self.path, what, error)
                raise ServiceUnavailable(f"the event store cannot be read: {error}",
                                         retry_after_s=STORE_RETRY_AFTER_S) from None

    def _read(self, selection: Subscriber, after: int, upto: int) -> tuple[bool, list[bytes]]:
        """As MemoryHistory.events_between, from the file."""
        with self._reading("a replay") as db:
            topics = list(selection.topics)
            gone = self.retention.newest_forgotten() if selection.patterns else 0
            topics += [name for name in self._topics if name not in selection.topics
                       and selection.patterns and selection.selects(name)]
            if not topics:
                return gone <= after, []
            marks = ",".join("?" * len(topics))
            where = f"topic IN ({marks}) AND seq > ? AND seq <= ?"
            params = [*topics, after, upto]
            evicted = dict(db.execute(f"SELECT topic, evicted_through FROM topics "
                                      f"WHERE topic IN ({marks})", topics))
            gone = max(gone, *(evicted.get(topic, self.retention.forgotten_through(topic))
                               for topic in topics))
            cutoff = self.retention.cutoff(self._clock())
            if cutoff is not None:
                expired = db.execute(f"SELECT MAX(seq) FROM events WHERE {where} "
                                     f"AND created < ?", [*params, cutoff]).fetchone()[0]
                gone = max(gone, expired or 0)
                where += " AND created >= ?"
                params.append(cutoff)
            rows = db.execute(f"SELECT seq, frame, private_topics FROM events "
                              f"WHERE {where} ORDER BY seq", params).fetchall()
        frames = {seq: frame for seq, frame, private_topics in rows     # an event on two
                  if private_topics is None or selection.may_see(       # topics is there twice
                      tuple(json.loads(private_topics)), True)}
        return gone <= after, list(frames.values())

    def stats(self) -> dict:
        cached = self._cache.stats()["events_retained"]
        with self._lock:
            retained = sum(self._topics.values())
            return {"run_id": self.run_id, "topics_with_history": len(self._topics),
                    "events_retained": retained,
                    "store": {"path": self.path, "size_bytes": self.size_bytes(),
                              "events_retained": retained, "events_cached": cached,
                              "commits": self.commits,
                              "commit_seconds": round(self.commit_seconds, 6),
                              "error": self.error}}

    def size_bytes(self) -> int:
        """The file and its write-ahead log, on disk."""
        size = 0
        for name in (self.path, self.path + "-wal"):
            try:
                size += os.path.getsize(name)
            except OSError:
                pass
        return size

    def health(self) -> tuple[bool, str]:
        error = self.error      # not under the lock: a sync that hangs must not hang /healthz
        if error is None:
            return True, "ok"
        return False, f"degraded: the event store cannot keep events ({error})"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()      # the last connection: SQLite checkpoints the log into the file
            if self._owner is not None:
                self._owner.close()


# --- Metrics: the Prometheus text exposition of server.stats() --------------------------

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DROP_REASONS = ("slow", "write_timeout", "token_expired")


def format_metrics(stats: dict) -> bytes:
    """server.stats() in the Prometheus text format 0.0.4: one prefix (sse_),
    HELP and TYPE for every metric, counters ending in _total, base units
    (seconds). No label grows with the number of topics or clients."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            label_text = ("{" + ",".join(f'{key}="{val}"' for key, val in labels) + "}"
                          if labels else "")
            lines.append(f"{name}{suffix}{label_text} {value}")

    def single(name, kind, help_text, value):
        metric(name, kind, help_text, [("", (), value)])

    single("sse_subscribers", "gauge", "Open event streams.", stats["subscribers"])
    single("sse_mercure_subscribers", "gauge", "Open event streams on /.well-known/mercure.",
           stats.get("mercure_subscribers", 0))
    single("sse_connections", "gauge", "Open connections (streams, publishers, others).",
           stats["connections"])
    single("sse_topics", "gauge", "Topics with at least one subscriber.", stats["topics"])
    single("sse_events_published_total", "counter", "Events published.",
           stats["events_published"])
    single("sse_events_delivered_total", "counter",
           "Events handed to subscribers (one per subscriber reached).",
           stats["events_delivered"])
    single("sse_subscriptions_total", "counter", "Streams opened.", stats["subscriptions_total"])
    if stats.get("events_retained") is not None:
        single("sse_events_retained", "gauge", "Events kept for Last-Event-ID replay.",
               stats["events_retained"])
    metric("sse_publish_requests_total", "counter", "POST /publish requests by status code.",
           [("", (("code", code),), count)
            for code, count in sorted(stats["publish_requests"].items())])
    dropped = stats["clients_dropped_by_reason"]
    metric("sse_clients_dropped_total", "counter",
           "Streams the server ended on a client: too slow, writes timed out, token expired.",
           [("", (("reason", reason),), dropped.get(reason, 0)) for reason in DROP_REASONS])
    single("sse_start_time_seconds", "gauge", "When the server started (Unix time).",
           stats["start_time_s"])
    delivery = stats["delivery_seconds"]
    metric("sse_delivery_seconds", "histogram",
           "From publish until the fan-out wrote the event to every idle subscriber's "
           "socket and queued it for the busy ones.",
           [*[("_bucket", (("le", le),), count) for le, count in delivery["buckets"]],
            ("_sum", (), repr(delivery["sum"])), ("_count", (), delivery["count"])])
    store = stats.get("store")
    if store is not None:
        single("sse_store_up", "gauge", "1 while the event store can write (--store).",
               int(store["error"] is None))
        single("sse_store_size_bytes", "gauge", "The store's file and its write-ahead log.",
               store["size_bytes"])
        single("sse_store_commits_total", "counter",
               "Transactions committed and synced to disk (one per fan-out batch).",
               store["commits"])
        single("sse_store_commit_seconds_total", "counter",
               "Time spent committing and syncing.", repr(store["commit_seconds"]))
    redis = stats.get("redis")
    if redis is not None:
        single("sse_redis_connected", "gauge", "1 while the Redis reader is connected.",
               int(bool(redis["connected"])))
        single("sse_redis_reconnects_total", "counter", "Times the Redis connection was lost.",
               redis["reconnects"])
    return ("\n".join(lines) + "\n").encode("utf-8")


# --- Redis mode: several instances share one event stream -------------------------------

REDIS_MIN_STREAM_LEN = 100      # never trim below this: readers must see entries first
REDIS_BLOCK_MS = 250            # XREAD wait; bounds how long shutdown waits for the reader
REDIS_BACKOFF_S = (0.1, 2.0)    # reconnect delays, doubling from the first to the second
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def _stream_position(entry_id: str) -> tuple[int, int]:
    milliseconds, sequence = entry_id.split("-")
    return int(milliseconds), int(sequence)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and /stats."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RedisHistory(History):
    """--redis: the history is one Redis Stream that several instances share.

    add() appends with XADD (trimmed to about history_size entries); the
    stream id is the event id, global and ordered across instances. One
    reader thread per instance follows the stream with XREAD and hands each
    entry to its broker's fan-out (hand_out), so local delivery is as fast as
    in memory. Replay reads the stream with XRANGE up to the entry the
    broker last handed out when the subscriber was registered: older entries
    come from the replay, newer ones live, none twice.
    """

    shared = True

    def __init__(self, url: str, *, key: str = REDIS_KEY, history_size: int = HISTORY_SIZE):
        try:
            import redis
        except ImportError:
            raise RuntimeError("--redis needs the redis package: pip install redis") from None
        self._redis_errors = redis.RedisError
        self._no_such_key = redis.ResponseError
        self.url = redact_url(url)
        self.key = key
        self.stream_len = max(history_size, REDIS_MIN_STREAM_LEN)
        # Two connections: the reader's XREAD blocks, publishers must not wait on it.
        self._client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                            socket_connect_timeout=2)
        self._reader_client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2,
            socket_timeout=REDIS_BLOCK_MS / 1000 + 5)
        # Locking rule: _lock guards the reader's state below. _read_from (the
        # last entry read) belongs to the reader thread alone.
        self._lock = threading.Lock()
        self._start_id: Optional[str] = None    # where the reader began (None: not yet)
        self.redis_connected = False
        self.redis_error: Optional[str] = None
        self.redis_reconnects = 0
        self._read_from: Optional[str] = None
        self._hand_out: Optional[Callable] = None
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._follow, name="redis-reader", daemon=True)

    def start(self, hand_out: Callable) -> None:
        self._hand_out = hand_out
        self._reader.start()

    def add(self, topics: Topics, text: str, event: Optional[str], retry: Optional[int], *,
            private: bool = False, iri_id: bool = False) -> str:
        """Append to the stream; every instance delivers it. Returns its id."""
        # Topics joined by commas, as /events names have none; a list in
        # JSON where a Mercure topic (an IRI) could.
        joined = ",".join(topics)
        if "," in joined or joined.startswith("["):
            joined = json.dumps(topics)
        fields = {"topics": joined, "data": text}
        if event:
            fields["event"] = event
        if retry is not None:
            fields["retry"] = str(retry)
        if private:
            fields["private"] = "1"
        if iri_id:
            fields["iri"] = "1"
        try:
            entry_id = self._client.xadd(self.key, fields, maxlen=self.stream_len,
                                         approximate=True)
        except self._redis_errors as error:
            raise ServiceUnavailable(f"redis is unavailable: {error}", retry_after_s=2) from None
        return MERCURE_ID_PREFIX + entry_id if iri_id else entry_id

    @staticmethod
    def _topics_of(fields: dict) -> tuple[str, ...]:
        joined = fields.get("topics", "")
        if joined.startswith("["):
            return tuple(json.loads(joined))
        return tuple(topic for topic in joined.split(",") if topic)

    def replay(self, selection: Subscriber, last_event_id: str,
               upto: Optional[str]) -> list[bytes]:
        if upto is None:        # nothing handed out yet: up to where the reader began
            with self._lock:
                upto = self._start_id
            if upto is None:
                raise ServiceUnavailable("not connected to redis yet; cannot replay",
                                         retry_after_s=2)
        try:
            return self._replay(selection, native_id(last_event_id), native_id(upto))
        except self._redis_errors as error:
            raise ServiceUnavailable(f"redis is unavailable: {error}", retry_after_s=2) from None

    def _replay(self, selection: Subscriber, last_event_id: str, upto: str) -> list[bytes]:
        reason = None
        start = "(" + last_event_id     # exclusive
        if not _STREAM_ID.fullmatch(last_event_id) or (
                _stream_position(last_event_id) > _stream_position(upto)):
            reason, start = "unknown-id", "-"
        elif self._gap_after(self._client, last_event_id):
            reason = "history-exceeded"
        frames = [self._frame(entry_id, fields)
                  for entry_id, fields in self._client.xrange(self.key, min=start, max=upto)
                  if selection.wants(self._topics_of(fields), "private" in fields)]
        return _with_reset(reason, last_event_id, frames)

    @staticmethod
    def _frame(entry_id: str, fields: dict) -> bytes:
        retry = fields.get("retry")
        event_id = MERCURE_ID_PREFIX + entry_id if "iri" in fields else entry_id
        return format_event(fields.get("data", ""), event=fields.get("event"), id=event_id,
                            retry=int(retry) if retry and retry.isdigit() else None)

    def _follow(self) -> None:
        """The reader: hand every new entry to the broker, in stream order; on
        a Redis failure, back off and resume after the last entry read."""
        backoff_s = REDIS_BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                if self._read_from is None:      # start at the current end
                    newest = self._reader_client.xrevrange(self.key, count=1)
                    self._read_from = newest[0][0] if newest else "0-0"
                    with self._lock:
                        self._start_id = self._read_from
                response = self._reader_client.xread({self.key: self._read_from},
                                                     count=self.stream_len, block=REDIS_BLOCK_MS)
                with self._lock:
                    if not self.redis_connected:
                        logger.info("connected to redis at %s", self.url)
                    self.redis_connected, self.redis_error = True, None
                backoff_s = REDIS_BACKOFF_S[0]
                for _, entries in response:
                    # A full batch means the reader may have fallen so far behind
                    # that Redis trimmed entries it never read.
                    if (len(entries) >= self.stream_len and
                            self._gap_after(self._reader_client, self._read_from)):
                        self._announce_gap()
                    self._hand_out([(MERCURE_ID_PREFIX + entry_id if "iri" in fields
                                     else entry_id, self._frame(entry_id, fields),
                                     self._topics_of(fields), "private" in fields)
                                    for entry_id, fields in entries])
                    self._read_from = entries[-1][0]
            except self._redis_errors as error:
                with self._lock:
                    if self.redis_connected:
                        logger.warning("lost redis at %s: %s", self.url, error)
                        self.redis_reconnects += 1
                    self.redis_connected, self.redis_error = False, str(error)
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, REDIS_BACKOFF_S[1])

    def _gap_after(self, client, entry_id: str) -> bool:
        """Were entries after `entry_id` trimmed away? Trimming removes the
        oldest entries, so if `entry_id` is still in the stream nothing after it
        is gone. If it is not, and entries were trimmed, and the oldest kept
        entry is newer than it, entries after it may be gone: say so (this errs
        on the side of a warning only when the kept entry is exactly the next)."""
        if client.xrange(self.key, min=entry_id, max=entry_id, count=1):
            return False
        try:
            info = client.xinfo_stream(self.key)
        except self._no_such_key:   # nothing was ever published
            return False
        first = info.get("first-entry")
        return bool(info.get("entries-added", 0) > info.get("length", 0) and first and
                    _stream_position(first[0]) > _stream_position(entry_id))

    def _announce_gap(self) -> None:
        """Tell every local subscriber it missed events (as a replay would)."""
        logger.warning("redis reader fell behind: entries after %s were trimmed unread",
                       self._read_from)
        self._hand_out([(None, format_reset_event("history-exceeded", self._read_from), None,
                         False)])

    def health(self) -> tuple[bool, str]:
        with self._lock:
            if self.redis_connected:
                return True, "ok"
            return False, f"degraded: redis unavailable ({self.redis_error or 'connecting'})"

    def stats(self) -> dict:
        with self._lock:
            return {"redis": {"url": self.url, "key": self.key,
                              "connected": self.redis_connected, "error": self.redis_error,
                              "reconnects": self.redis_reconnects,
                              "stream_length_limit": self.stream_len}}

    def close(self) -> None:
        self._stop.set()
        if self._reader.ident is not None:
            self._reader.join()
        self._client.close()
        self._reader_client.close()


# --- HTTP handler ---------------------------------------------------------------------

class _RequestReader(io.RawIOBase):
    """The raw stream under a handler's rfile: socket reads that share one
    deadline, so a request trickled in a byte at a time (slowloris) still
    ends when the deadline passes. A per-read timeout would restart with
    every byte. Let go once a stream starts: nothing more is read then."""

    def __init__(self, io: SocketIO):
        self._io = io
        self.deadline = 0.0     # set for each request (monotonic)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._io.recv_into(buffer, self.deadline)


def _apply_threading_hooks() -> None:
    """Do for a thread started with _thread what threading.Thread does:
    install the functions given to threading.settrace() and setprofile()
    (debuggers, coverage tools). Python 3.9 has no public way to read them."""
    if hasattr(threading, "gettrace"):
        if threading.gettrace() is not None:
            sys.settrace(threading.gettrace())
        if threading.getprofile() is not None:
            sys.setprofile(threading.getprofile())


class _ClientGone(Exception):
    """The client closed the connection in the middle of its request."""


_REQUEST_TARGET = re.compile(r"[\x21-\x7e]+")
_COMMON_WORDS = {word: word for word in ("GET", "HEAD", "POST", "OPTIONS", "HTTP/1.1", "HTTP/1.0")}
_TOKEN_IN_QUERY = re.compile(r"((?:^|[?&])(?:access_token|authorization)=)[^&\s\"]*")


def redact_tokens(text: str) -> str:
    """Text for the log: tokens in query strings (EventSource cannot send
    headers, so they come there) never reach it."""
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", text)


CORS_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"


def cors_headers(allowed_origins: list[str],
                 origin: Optional[str]) -> Sequence[tuple[str, str]]:
    """CORS answer headers for a request from `origin`; none for other origins.
    A listed origin may send credentials (cookies); "*" never may."""
    if not allowed_origins:
        return ()
    vary = [] if list(allowed_origins) == ["*"] else [("Vary", "Origin")]
    if origin and origin in allowed_origins:
        return [("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"), *vary]
    if "*" in allowed_origins:
        return [("Access-Control-Allow-Origin", "*"), *vary]
    return vary


class SSERequestHandler(http.server.BaseHTTPRequestHandler):
    """Routes requests; streams events for GET /events."""

    # Slots, not a dict per handler: a stream's handler lives as long as its
    # connection, and the dict cost ~800 bytes per subscriber. (Attributes
    # not listed here, a subclass's say, still work: they go in a dict.)
    __slots__ = ("request", "client_address", "server", "connection", "rfile",
                 "raw_requestline", "requestline", "command", "path", "request_version",
                 "headers", "close_connection", "startup_turn", "client_host", "_io",
                 "_reader", "_body_pending", "_cors", "_stream_deadline", "_started",
                 "_status")

    protocol_version = "HTTP/1.1"      # keep-alive for publishers, chunked streams
    server_version = f"sse_server/{__version__}"
    rbufsize = 8192                    # request read buffer
    # The routes, (method, path) -> handler, are at the end of the class body.
    methods = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")  # others: 501
    cors_paths = ("/events", "/publish", MERCURE_PATH, MERCURE_SUBSCRIPTIONS,
                  MERCURE_SUBSCRIPTIONS + "/*")

    def __init__(self, request, client_address, server,
                 startup_turn: Optional[StartupTurn] = None):
        self.startup_turn = startup_turn or StartupTurn(None)
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.server.tls_context is not None
        settings = self.server.settings
        self._io = SocketIO(self.connection, self.startup_turn, settings.write_timeout_s, tls=tls)
        if tls:
            self._io.handshake(time.monotonic() + settings.request_timeout_s)
        self._reader = _RequestReader(self._io)
        self.rfile = io.BufferedReader(self._reader, self.rbufsize)
        self._body_pending = False

    def finish(self) -> None:
        if self.rfile is not None:      # a stream already let it go
            self.rfile.close()

    def handle_one_request(self) -> None:
        """Read, parse and answer one request: the base class's loop body,
        with one deadline for the whole request, and with no locals left
        holding the method it calls (a stream's call lasts for hours)."""
        self._started = time.monotonic()
        self._reader.deadline = self._started + self.server.settings.request_timeout_s
        self._cors = ()
        self.client_host = self.client_address[0]   # until a trusted proxy says otherwise
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            elif not self.raw_requestline:
                self.close_connection = True
            elif self.parse_request():
                self._dispatch()
        except socket.timeout as error:     # the request, or a response, took too long
            self.log_error("request timed out: %r", error)
            self.close_connection = True
        # One request's worth at most: a client pipelining requests back to
        # back never has to wait, and must not keep the turn while it does.
        self._io.before_wait()

    def parse_request(self) -> bool:
        """Parse the request line and headers (instead of the standard
        library's, which runs the lenient and slow email parser). Returns
        False after answering a malformed request."""
        self.command = None
        self.request_version = "HTTP/0.9"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split(" ")
        if len(words) != 3 or not words[0] or not words[1]:
            self.send_error(HTTPStatus.BAD_REQUEST, "malformed request line")
            return False
        command, path, version = words
        # The usual strings, shared: a stream keeps these for as long as it runs.
        command = _COMMON_WORDS.get(command, command)
        version = _COMMON_WORDS.get(version, version)
        match = _HTTP_VERSION.fullmatch(version)
        if not match:
            self.send_error(HTTPStatus.BAD_REQUEST, f"bad HTTP version {version!r}")
            return False
        if match.group(1) != "1":
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"{version} not supported")
            return False
        self.command, self.path, self.request_version = command, path, version
        try:
            self.headers = read_headers(self.rfile.readline,
                                        self.server.settings.max_header_bytes)
        except HTTPError as error:
            self.send_error(error.status, error.reason)
            return False
        tokens = {token.strip().lower()
                  for token in self.headers.get("Connection", "").split(",")}
        if "close" in tokens:
            self.close_connection = True
        elif version != "HTTP/1.0" or "keep-alive" in tokens:
            self.close_connection = False
        if (self.headers.get("Expect", "").lower() == "100-continue" and
                version != "HTTP/1.0"):
            self._io.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    # Dispatch: the routes table, else a static file for GET and HEAD.

    def _route_of(self, path: str) -> str:
        """The routes table's path for `path`: itself, or "<folder>/*" for
        a path below a folder whose subtree is one route."""
        if "/" in path[1:]:
            folder = path[:path.rindex("/")]
            while folder:
                if (folder + "/*") in self._subtrees():
                    return folder + "/*"
                folder = folder[:folder.rfind("/")]
        return path

    @classmethod
    @functools.lru_cache(maxsize=None)
    def _subtrees(cls) -> frozenset:
        return frozenset(path for _, path in cls.routes if path.endswith("/*"))

    def _dispatch(self) -> None:
        if self.command not in self.methods:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"unsupported method {self.command!r}")
            return
        url = None
        self._status = 0
        try:
            if not _REQUEST_TARGET.fullmatch(self.path):
                self.close_connection = True
                raise BadRequest("request target must be printable ASCII (percent-encode the rest)")
            url = urllib.parse.urlsplit(self.path)
            if self.server.trusted_proxies:
                self.client_host = client_host(self.client_address[0], self.headers,
                                               self.server.trusted_proxies)
            route = self._route_of(url.path)
            if route in self.cors_paths:
                self._cors = cors_headers(self.server.settings.cors_origins,
                                          self.headers.get("Origin"))
            length = self._content_length()
            self._body_pending = length > 0
            methods = [method for method, path in self.routes if path == route]
            if methods:
                handler = self.routes.get((self.command, route))
            else:
                methods = list(self.static_routes)
                handler = self.static_routes.get(self.command)
            if self.command == "OPTIONS":
                allow = ", ".join([*methods, "OPTIONS"])
                headers = [("Allow", allow)]
                if any(name == "Access-Control-Allow-Origin" for name, _ in self._cors):
                    # a CORS preflight from an allowed origin
                    headers += [("Access-Control-Allow-Methods", allow),
                                ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                                ("Access-Control-Max-Age", "600")]
                self._respond(HTTPStatus.NO_CONTENT, b"", headers=headers)
            elif handler is None:
                if methods == list(self.static_routes) and not self._static_path(url.path):
                    raise NotFound(f"no such resource: {url.path}")
                raise MethodNotAllowed(self.command, [*methods, "OPTIONS"])
            else:
                handler(self, url)
        except HTTPError as error:
            if self._body_pending:
                self.close_connection = True
            self._respond(error.status, error.reason.encode("utf-8") + b"\n",
                          headers=error.headers)
        except _ClientGone:
            self.close_connection = True
        if url is not None and (url.path == "/publish" or (
                url.path == MERCURE_PATH and self.command == "POST")):
            self.server.count_publish_request(self._status)

    def _content_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise HTTPError("chunked request bodies are not supported; send Content-Length",
                            status=HTTPStatus.LENGTH_REQUIRED)
        values = self.headers.get_all("Content-Length")
        if not values:
            return 0
        if len(set(values)) > 1 or not values[0].strip().isdigit() or not values[0].isascii():
            self.close_connection = True
            raise BadRequest("invalid Content-Length")
        return int(values[0])

    def _read_body(self) -> bytes:
        length = self._content_length()
        limit = self.server.settings.max_body_bytes
        if length > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise _ClientGone()
        self._body_pending = False
        return body

    # Plain responses: one send each (status line, headers and body together),
    # so a keep-alive publisher never waits on Nagle + delayed ACK.

    def _respond(self, status: HTTPStatus, body: bytes, *,
                 content_type: str = TEXT_CONTENT_TYPE,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        if status != HTTPStatus.NO_CONTENT:
            headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                       *headers]
        head = self._head(status, headers)
        self._status = code = _STATUS_CODES[status]
        self._io.send_all(head if self.command == "HEAD" else head + body)
        self.log_request(code, len(body) if self.command != "HEAD" else 0)

    _date_cache = (0, "")     # (second, Date header text): formatting it is not free

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        cached_second, text = SSERequestHandler._date_cache
        if cached_second != second:
            text = super().date_time_string(second)
            SSERequestHandler._date_cache = (second, text)
        return text

    def _head(self, status: HTTPStatus, headers: Iterable[tuple[str, str]]) -> bytes:
        """Status line and headers (with CORS and Connection: close as due).
        Every value is checked: no CR, LF or NUL reaches the wire."""
        lines = [f"{self.protocol_version} {_STATUS_CODES[status]} {_STATUS_PHRASES[status]}",
                 f"Server: {self.version_string()}", f"Date: {self.date_time_string()}"]
        for name, value in [*headers, *self._cors]:
            _check_field(name, value)
            lines.append(f"{name}: {value}")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _respond_json(self, payload: dict, content_type: str = JSON_CONTENT_TYPE) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"
        self._respond(HTTPStatus.OK, body, content_type=content_type)

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """BaseHTTPRequestHandler calls this for requests it cannot parse
        (400, 414, 431, 501, 505): answer in plain text and close."""
        self.close_connection = True
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        if not hasattr(self, "command") or self.command is None:
            self.command = ""
        try:
            self._respond(status, f"{message or status.phrase}\n".encode("utf-8", "replace"))
        except OSError:
            pass    # the client is already gone

    def address_string(self) -> str:
        return self.client_host     # behind a trusted proxy, the forwarded client's

    def log_request(self, code="-", size="-", extra: str = "") -> None:
        """The access log, one line per request: Common Log Format (client,
        time the request arrived, request line, status, bytes) and how long it
        took. A stream's line is written when it ends, with `extra` (events
        sent and why it ended). Query tokens never reach the log."""
        if not access_logger.isEnabledFor(logging.INFO):
            return      # skip the formatting: it costs every request
        now = time.monotonic()
        arrived = time.time() - (now - self._started)
        request_line = json.dumps(redact_tokens(self.requestline or ""),
                                  ensure_ascii=True)      # quoted, escaped: no log injection
        access_logger.info("%s - - [%s] %s %s %s %.3fs%s", self.client_host,
                           time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(arrived)),
                           request_line, code, size, now - self._started, extra)

    def log_message(self, format: str, *args) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return      # skip the formatting
        logger.info("%s %s", self.address_string(), redact_tokens(format % args))

    def _bearer(self) -> Optional[str]:
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        return credentials.strip() if scheme.lower() == "bearer" else None

    def _cookie(self, name: str) -> Optional[str]:
        if "Cookie" not in self.headers:
            return None
        cookies = http.cookies.SimpleCookie()
        try:
            cookies.load(self.headers["Cookie"])
        except http.cookies.CookieError:
            return None
        morsel = cookies.get(name)
        return morsel.value if morsel else None

    def _token(self, query: dict[str, list[str]]) -> Optional[str]:
        """A JWT from the Authorization header, the cookie, or ?access_token=."""
        return (self._bearer() or self._cookie(self.server.settings.jwt_cookie) or
                _single(query, "access_token"))

    # Small endpoints

    def _handle_healthz(self, url) -> None:
        healthy, reason = self.server.broker.health()
        if not healthy:
            raise ServiceUnavailable(reason, retry_after_s=2)
        self._respond(HTTPStatus.OK, b"ok\n")

    def _handle_stats(self, url) -> None:
        self._respond_json(self.server.stats())

    def _handle_metrics(self, url) -> None:
        self.server.access.check_metrics(self.client_host, self._bearer())
        self._respond(HTTPStatus.OK, format_metrics(self.server.stats()),
                      content_type=METRICS_CONTENT_TYPE)

    def _static_path(self, url_path: str) -> Optional[str]:
        return resolve_static_path(self.server.static_dir, url_path)

    def _handle_static(self, url) -> None:
        path = self._static_path(url.path)
        if path is None:
            raise NotFound(f"no such resource: {url.path}")
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type in ("application/javascript",
                                                               "image/svg+xml"):
            content_type += "; charset=utf-8"
        with open(path, "rb") as file:
            body = file.read()
        headers = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")]
        if content_type.startswith("text/html") and self.server.csp:
            headers.append(("Content-Security-Policy", self.server.csp))
        self._respond(HTTPStatus.OK, body, content_type=content_type, headers=headers)

    # Publish

    def _check_publish_rate(self) -> None:
        if self.server.publish_limiter is not None:
            wait_s = self.server.publish_limiter.acquire(self.client_host)
            if wait_s:
                raise TooManyRequests(f"publishing too fast from {self.client_host}; slow down",
                                      retry_after_s=max(1, math.ceil(wait_s)))

    def _handle_publish(self, url) -> None:
        self._check_publish_rate()
        query = parse_query(url.query)
        access = self.server.access
        allowed = access.check_publisher(self.client_host, self._bearer(), self._token(query))
        request = parse_publish(query, self.headers.get("Content-Type"), self._read_body())
        access.check_publish_topics(allowed, request.topics)
        result = self.server.broker.publish(request.topics, request.data,
                                            event=request.event, retry=request.retry)
        self._respond_json({"id": result.id, "topics": request.topics,
                            "subscribers": result.subscribers})

    # Subscribe: the stream

    def _handle_events(self, url) -> None:
        """GET /events: check, then stream (see _stream)."""
        topics, last_event_id = self._check_events_request(url.query)
        self._stream(topics, last_event_id)

    def _stream(self, topics: Topics, last_event_id: Optional[str], *,
                mercure: bool = False, presence: Optional[tuple[Topics, object]] = None,
                **options) -> None:
        """Subscribe, stream until the stream ends. It runs for as long as
        the connection lasts, so what this frame holds is held per
        subscriber: the request's leftovers are let go early. `options`
        go to Broker.subscribe (patterns, authorized); with `presence`
        (selectors, payload) and --subscriptions, the stream is announced."""
        self.close_connection = True    # the stream ends only by closing
        host = self.client_host
        self.server.take_stream_quota(host)
        try:
            subscriber, replay = self.server.broker.subscribe(
                topics, last_event_id=last_event_id, io=self._io,
                chunked=self.request_version != "HTTP/1.0", **options)
        except BaseException:
            self.server.return_stream_quota(host)
            raise
        headers = []
        if mercure and last_event_id:   # where the replay starts from (the draft's rule)
            headers.append(("Last-Event-ID", EARLIEST if last_event_id == EARLIEST or
                            starts_with_reset(replay) else last_event_id))
        del topics, last_event_id, options
        self.server.stream_started(self.connection, subscriber, mercure)
        announced = (self.server.presence.joined(*presence)
                     if presence and self.server.presence else None)
        del presence
        sent_before, reason = self._io.sent, "client_gone"
        try:
            self._start_stream(subscriber, replay, headers)
            del replay, headers
            self._io.before_wait()      # set up: let the next connection in
            end = subscriber.pump(self.server.settings.heartbeat_s, self._stream_deadline)
            reason = end.reason
            if end is TOKEN_EXPIRED:
                self.server.broker.count_dropped("token_expired")
            subscriber.say_goodbye(end)
        except socket.timeout:
            reason = "write_timeout"
            self.server.broker.count_dropped(reason)
            logger.warning("dropped %s: it accepted no bytes for %ss (--write-timeout)",
                           self.address_string(), self.server.settings.write_timeout_s)
        except OSError as error:    # peer gone, or cut by the broker or shutdown
            logger.debug("stream to %s ended: %r", self.address_string(), error)
        finally:
            why = subscriber.close()    # nobody touches the socket from here on: it will close
            self.server.broker.unsubscribe(subscriber)
            if announced:
                self.server.presence.left(announced)
            self.server.stream_ended(self.connection, mercure)
            self.server.return_stream_quota(host)
        if why is not None and reason == "client_gone":     # the write failed: it was cut
            reason = why.reason
        self.log_request(200, self._io.sent - sent_before + subscriber.direct_bytes,
                         f" events={subscriber.events} end={reason}")

    def _check_events_request(self, query_text: str) -> tuple[Topics, Optional[str]]:
        """Topics, Last-Event-ID and access of a GET /events (an HTTPError if
        not allowed). Sets the stream's deadline if a token with exp allowed it."""
        query = parse_query(query_text)
        topics = validate_topics(query.get("topic", []))
        last_event_id = self.headers.get("Last-Event-ID") or _single(query, "lastEventId")
        if self._body_pending:
            raise BadRequest("GET /events takes no body")
        expires = self.server.access.check_subscribe(topics, self._token(query))
        # The stream ends when the token that allowed it expires (a monotonic deadline).
        self._stream_deadline = (None if expires is None else
                                 time.monotonic() + max(0.0, expires - time.time()))
        return topics, last_event_id

    def _start_stream(self, sink: StreamSink, replay: list[bytes],
                      headers: Sequence[tuple[str, str]] = ()) -> None:
        """Response head and first bytes at once (so EventSource fires `open`
        and proxies see a start), then the replay."""
        if access_logger.isEnabledFor(logging.DEBUG):   # its line comes when it ends
            access_logger.debug("%s stream started: %s", self.client_host,
                                redact_tokens(self.requestline))
        head = self._head(HTTPStatus.OK, [
            ("Content-Type", EVENT_STREAM_CONTENT_TYPE), ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"), *headers,
            *([("Transfer-Encoding", "chunked")] if sink.chunked else [])])
        sink.write(CONNECTED_COMMENT + format_retry(self.server.settings.retry_ms), head=head)
        sink.write_replay(replay)
        # Nothing more is read from a stream: free what parsing the request
        # needed (a read buffer, the headers; the request line stays for the log).
        self.rfile.close()
        self.rfile = self._reader = self.headers = None
        self.raw_requestline = self.path = None
        if not access_logger.isEnabledFor(logging.INFO):
            self.requestline = None     # no line will be logged: let it go too

    # Mercure (draft-dunglas-mercure-07): the same broker through the hub's
    # routes. Its tokens carry a `mercure` claim, found in the Authorization
    # header, else the `authorization` query parameter, else the cookie.

    def _mercure_token(self, query: dict[str, list[str]], *,
                       publishing: bool = False) -> Optional[str]:
        token = self._bearer()
        if token is None:
            token = _single(query, "authorization")
        if token is not None:
            return token
        token = self._cookie(MERCURE_COOKIE)
        if token is not None and publishing and not self._origin_may_publish():
            # A browser sends the cookie with any form POST, whichever site
            # made it: publishing by cookie is for pages of allowed origins.
            raise Forbidden("publishing with the mercureAuthorization cookie needs an "
                            "Origin that is this hub's own or one of --cors-origin")
        return token

    def _origin_may_publish(self) -> bool:
        origin = self.headers.get("Origin")
        if not origin:
            return False
        scheme = "https" if self.server.settings.certfile else "http"
        return (origin in self.server.settings.cors_origins or
                origin == f"{scheme}://{self.headers.get('Host', '')}")

    def _handle_mercure_subscribe(self, url) -> None:
        """GET /.well-known/mercure?topic=SELECTOR (repeatable): a stream of
        the updates whose topics (canonical or alternate) a selector matches;
        private ones only if the token's mercure.subscribe allows them.

        The check is a function of its own so that this frame, which lasts
        as long as the stream, keeps only what the stream needs (the query,
        the token's claims and the selector list are let go), and _stream is
        called with plain keywords: a call with **options would run it in a
        C frame of its own, a page deeper in the thread's stack."""
        topics, last_event_id, patterns, authorized, presence = (
            self._check_mercure_request(url.query))
        self._stream(topics, last_event_id, mercure=True, presence=presence,
                     patterns=patterns, authorized=authorized)

    def _check_mercure_request(self, query_text: str) -> tuple:
        """(exact topics, Last-Event-ID, template selectors, the selectors
        that allow private updates or None, (selectors, payload) for
        --subscriptions or None) of a hub subscribe, or an HTTPError. Sets
        the stream's deadline if the token has exp."""
        query = parse_query(query_text)
        selectors = validate_iris(query.get("topic", []), "topic")
        for selector in selectors:
            try:
                compile_selector(selector)
            except ValueError as error:
                raise BadRequest(f"invalid URI template {selector[:80]!r}: {error}") from None
        # The header wins over the query parameter (the draft's rule).
        last_event_id = self.headers.get("Last-Event-ID") or _single(query, "lastEventID")
        if self._body_pending:
            raise BadRequest("GET /.well-known/mercure takes no body")
        access = self.server.access
        claims = access.claims(self._mercure_token(query))     # a bad token: 401
        if claims is None and access.require_auth:     # (no token: no error code, RFC 6750)
            raise Unauthorized("subscribing needs a token (--require-auth)")
        scope = mercure_claims(claims)
        expires = claims.get("exp") if claims else None
        self._stream_deadline = (None if expires is None else
                                 time.monotonic() + max(0.0, expires - time.time()))
        return (Topics(s for s in selectors if not is_pattern(s)), last_event_id,
                [s for s in selectors if is_pattern(s)],
                access.selector_set(scope.subscribe) if scope and scope.subscribe else None,
                (selectors, scope.payload if scope else None) if self.server.presence else None)

    def _handle_mercure_publish(self, url) -> None:
        """POST /.well-known/mercure, a form: topic (repeatable: the first is
        canonical, the others alternates), data, private, type, retry, id
        (the publisher's own; see Broker.publish). Answers the update's id
        as text/plain."""
        self._check_publish_rate()
        query = parse_query(url.query)
        access = self.server.access
        allowed = access.check_publisher(self.client_host, self._bearer(),
                                         self._mercure_token(query, publishing=True),
                                         mercure=True)
        media_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media_type != FORM_CONTENT_TYPE:
            raise HTTPError(f"publish with Content-Type: {FORM_CONTENT_TYPE}",
                            status=HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        try:
            fields = parse_query(self._read_body().decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("body is not valid UTF-8") from None
        topics = validate_iris(fields.get("topic", []), "topic")
        for topic in topics:
            if is_reserved_topic(topic):
                raise Forbidden(f"topic {topic[:80]!r} is under {MERCURE_PATH}/, "
                                "which is the hub's own")
        if allowed is not None:
            selectors = [compile_selector(text) for text in allowed]
            for topic in topics:
                if not any(selector.matches(topic) for selector in selectors):
                    raise Forbidden(f"the token does not allow publishing to {topic[:80]!r}")
        retry = _single(fields, "retry")
        if retry is not None and not re.fullmatch(r"[0-9]{1,9}", retry):
            raise BadRequest("retry must be a whole number of milliseconds")
        result = self.server.broker.publish(
            topics, _single(fields, "data") or "", event=_single(fields, "type") or None,
            retry=None if retry is None else int(retry), private="private" in fields,
            iri_id=True, event_id=_single(fields, "id"))
        self._respond(HTTPStatus.OK, result.id.encode("utf-8"))

    def _handle_mercure_subscriptions(self, url) -> None:
        """GET /.well-known/mercure/subscriptions[/{topic}[/{subscriber}]]:
        the active subscriptions as JSON-LD, for a token whose
        mercure.subscribe matches the path asked for (as sent, encoded)."""
        presence = self.server.presence
        if presence is None:
            raise NotFound("the subscriptions API is off; start the hub with --subscriptions")
        access = self.server.access
        claims = access.claims(self._mercure_token(parse_query(url.query)))
        if claims is None:
            raise Unauthorized("the subscriptions API needs a token")
        scope = mercure_claims(claims)
        if not (scope and any(compile_selector(s).matches(url.path) for s in scope.subscribe)):
            raise Forbidden(f"the token's mercure.subscribe does not match {url.path[:120]}")
        parts = url.path[len(MERCURE_SUBSCRIPTIONS):].split("/")[1:]
        if len(parts) > 2 or "" in parts:
            raise NotFound(f"no such resource: {url.path}")
        selector, subscriber = [urllib.parse.unquote(part) for part in parts] + [None] * (
            2 - len(parts))
        found = presence.documents(selector, subscriber)
        last_id = self.server.broker.last_event_id
        last_id = MERCURE_ID_PREFIX + native_id(last_id) if last_id else EARLIEST
        if subscriber is not None:
            if not found:
                raise NotFound("no such active subscription")
            answer = {"@context": MERCURE_CONTEXT, **found[0], "lastEventID": last_id}
        else:
            answer = {"@context": MERCURE_CONTEXT, "id": url.path, "type": "Subscriptions",
                      "lastEventID": last_id, "subscriptions": found}
        self._respond_json(answer, "application/ld+json")

    # The routes: (method, path) -> handler(self, url). A family of routes is
    # a block of lines here plus its methods; a subclass extends the table
    # with {**SSERequestHandler.routes, ...}. Any other GET or HEAD is a file.
    routes = {
        ("GET", "/events"): _handle_events,
        ("POST", "/publish"): _handle_publish,
        ("GET", MERCURE_PATH): _handle_mercure_subscribe,
        ("POST", MERCURE_PATH): _handle_mercure_publish,
        ("GET", MERCURE_SUBSCRIPTIONS): _handle_mercure_subscriptions,      # and below it
        ("GET", MERCURE_SUBSCRIPTIONS + "/*"): _handle_mercure_subscriptions,
        ("GET", "/healthz"): _handle_healthz,
        ("HEAD", "/healthz"): _handle_healthz,
        ("GET", "/stats"): _handle_stats,
        ("HEAD", "/stats"): _handle_stats,
        ("GET", "/metrics"): _handle_metrics,
        ("HEAD", "/metrics"): _handle_metrics,
    }
    static_routes = {"GET": _handle_static, "HEAD": _handle_static}


class HangupWatcher:
    """One thread that notices when stream clients hang up.

    A stream's thread only learns its client left when a write fails, which
    can take two heartbeats. Watching every stream socket in one selector
    frees the thread and its --max-clients place at once. Streams never read
    after their request, so a readable stream socket means EOF, a reset, or
    bytes the client should not have sent (over TLS: records, such as the
    close_notify before EOF); its StreamSink tells which (check_hangup).

    The selector is the platform's best (hangup_selector): epoll and kqueue
    see a socket as soon as it is registered; poll and select read their set
    once per call, so the loop calls again every HANGUP_CHECK_S. Where the
    selector has a size limit (select() on Windows) the streams beyond it are
    not watched (logged once); their heartbeats find out instead.
    """

    def __init__(self, on_readable: Callable[[socket.socket], Optional[bool]]):
        # Called with a readable socket, on this thread: None to watch on.
        self._on_readable = on_readable
        # _lock guards everything below; select() itself runs unlocked, so
        # watch() and forget() never wait on it.
        self._lock = threading.Lock()
        self._selector: Optional[selectors.BaseSelector] = None
        self._capacity: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._wakeup: Optional[tuple[socket.socket, socket.socket]] = None
        self._closed = False
        self._told_full = False

    def watch(self, sock: socket.socket) -> bool:
        """Watch a stream socket; False if it cannot be (heartbeats then do it)."""
        with self._lock:
            if self._closed:
                return False
            if self._thread is None:
                self._selector, self._capacity = hangup_selector()
                self._wakeup = socket.socketpair()
                self._selector.register(self._wakeup[0], selectors.EVENT_READ)
                self._thread = threading.Thread(target=self._run, name="hangup-watcher",
                                                daemon=True)
                self._thread.start()
            if self._capacity is not None and not self._room_for(sock):
                if not self._told_full:
                    self._told_full = True
                    logger.warning("the %s here watches at most %d streams for hang-ups; "
                                   "beyond that, heartbeats notice departed clients",
                                   type(self._selector).__name__, self._capacity)
                return False
            self._selector.register(sock, selectors.EVENT_READ)
            return True

    def _room_for(self, sock: socket.socket) -> bool:
        """select() takes a bounded number of sockets (and, on POSIX, only
        descriptors below FD_SETSIZE: a probe of this one finds out)."""
        if len(self._selector.get_map()) > self._capacity:     # the wake-up socket is one
            return False
        try:
            select.select([sock], [], [], 0)
        except ValueError:
            return False
        return True

    def forget(self, sock: socket.socket) -> None:
        """Stop watching; call before the socket is closed (its number is reused)."""
        fd = sock.fileno()
        if fd < 0:      # closed already, so forgotten already (its stream ended)
            return
        with self._lock:
            if self._selector is not None:
                key = self._selector.get_map().get(fd)
                if key is not None and key.fileobj is sock:
                    self._selector.unregister(sock)

    def _run(self) -> None:
        while True:
            try:
                ready = self._selector.select(HANGUP_CHECK_S)
            except OSError:     # select() on a socket closed meanwhile: try again
                ready = []
            with self._lock:
                if self._closed:
                    break
                readable = [key.fileobj for key, _ in ready
                            if key.fileobj is not self._wakeup[0]]
            for sock in readable:   # (outside the lock: watch() and forget() never wait)
                if self._on_readable(sock) is not None:
                    self.forget(sock)
        self._selector.close()
        for sock in self._wakeup:
            sock.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._wakeup[1].send(b"x")
        if thread is not None:
            thread.join()


# --- Server ---------------------------------------------------------------------------

# accept() fails so when the process or the system is out of descriptors
# (or of memory for them); anything else it raises is about one connection.
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class BurstAcceptMixIn:
    """Mix-in for a socketserver TCP server, in place of ThreadingMixIn: each
    connection gets its own thread, for as long as it lasts, but thousands
    can arrive at once without the server slowing to a crawl.

    Premise: a new connection's thread needs the GIL for ~100 us of parsing
    and subscribing, and then mostly waits. With hundreds starting together
    every system call becomes a GIL hand-off between them (measured: three
    times the CPU per connection). So:

    - The listener is non-blocking and each wake-up of serve_forever accepts
      up to ACCEPTS_PER_WAKEUP waiting connections; verify_request() is asked
      about each, as socketserver does.
    - Connections are set up STARTUP_TURNS at a time. The accept loop takes a
      StartupTurn before it starts a connection's thread (waiting at most
      STARTUP_WAIT_S, then starting it anyway); the thread gives the turn
      back the first time it is about to wait for anything (SocketIO
      .before_wait: its client's bytes, room to write, its next request or
      event) or when it ends. A silent, slow or pipelining client holds none.
    - Threads are started with _thread.start_new_thread, the documented
      low-level API: a threading.Thread costs ~2.5 KiB more per connection
      and a start-up handshake in which the accepting thread sleeps until
      the new one runs. They are therefore daemonic and not listed by
      threading.enumerate(); the server counts them (`_connections`).

    Call chain: serve_forever -> _handle_request_noblock -> verify_request ->
    process_request -> [new thread] process_request_thread -> finish_request
    (the handler) -> shutdown_request. finish_request() gets the turn as a
    fourth argument for the handler class."""

    def __init__(self, *args, **kwargs):
        # _connections_lock guards _connections (and what a subclass adds under
        # it); the condition is notified whenever a handler thread ends.
        self._connections_lock = threading.Lock()
        self._handler_done = threading.Condition(self._connections_lock)
        self._connections: dict[socket.socket, Optional[StreamSink]] = {}
        self._startup_turns = threading.BoundedSemaphore(STARTUP_TURNS)
        self._stopping = threading.Event()      # set by shutdown(): ends an accept pause
        self._accept_pause_s = 0.0              # > 0 while out of file descriptors
        self._accept_warned_at = -math.inf
        # One bound method for every handler thread to run (each thread keeps
        # what it was started with for as long as it lives).
        self._thread_main = self.process_request_thread
        super().__init__(*args, **kwargs)

    def server_activate(self) -> None:
        super().server_activate()
        self.socket.setblocking(False)      # accept until the backlog is empty

    def _handle_request_noblock(self) -> None:
        """Called by serve_forever when the listening socket is readable."""
        for _ in range(ACCEPTS_PER_WAKEUP):     # bounded, so shutdown is noticed
            try:
                request, client_address = self.get_request()
            except OSError as error:    # BlockingIOError: the backlog is empty
                if error.errno in _OUT_OF_DESCRIPTORS:
                    self._pause_accepting(error)
                return
            if self._accept_pause_s:
                self._accept_pause_s = 0.0
                logger.warning("accepting connections again")
            if not self.verify_request(request, client_address):
                self.shutdown_request(request)
                continue
            turn = StartupTurn(self._startup_turns, STARTUP_WAIT_S)
            try:
                self.process_request(request, client_address, turn)
            except Exception:
                turn.release()
                self.handle_error(request, client_address)
                self.shutdown_request(request)

    def _pause_accepting(self, error: OSError) -> None:
        """Out of file descriptors (EMFILE and kin): the connection waits in
        the backlog, the listener stays readable, and the loop would spin a
        core. Pause, longer each time, while the open connections are served;
        whichever of them ends frees a descriptor and accepting goes on."""
        self._accept_pause_s = min(max(self._accept_pause_s * 2, ACCEPT_BACKOFF_S[0]),
                                   ACCEPT_BACKOFF_S[1])
        now = time.monotonic()
        if now - self._accept_warned_at >= ACCEPT_WARNING_EVERY_S:
            self._accept_warned_at = now
            logger.warning("cannot accept connections: %s (open connections: %d); pausing "
                           "accepts, up to %ss at a time, until descriptors are free (raise "
                           "the limit with ulimit -n)", error.strerror,
                           len(self._connections), ACCEPT_BACKOFF_S[1])
        self._stopping.wait(self._accept_pause_s)

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    def process_request(self, request, client_address, turn=None) -> None:
        """Start the connection's thread."""
        turn = turn or StartupTurn(None)
        with self._connections_lock:
            self._connections[request] = None
        try:
            _thread.start_new_thread(self._thread_main, (request, client_address, turn))
        except BaseException:
            self._handler_finished(request)
            raise

    def process_request_thread(self, request, client_address, turn) -> None:
        _apply_threading_hooks()
        try:
            self.finish_request(request, client_address, turn)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            turn.release()      # if the handler has not already
            self.shutdown_request(request)
            self._handler_finished(request)

    def finish_request(self, request, client_address, turn=None) -> None:
        # The turn goes positionally: a kwargs dict would live as long as the stream.
        self.RequestHandlerClass(request, client_address, self, turn)

    def _handler_finished(self, request) -> None:
        with self._connections_lock:
            del self._connections[request]
            self._handler_done.notify_all()


class SSEServer(BurstAcceptMixIn, http.server.ThreadingHTTPServer):
    """The HTTP server: owns the broker and the settings.

    A ThreadingHTTPServer whose connections are accepted and started by
    BurstAcceptMixIn (see there). It keeps, for each connection, the
    StreamSink of its open stream if it has one: the hang-up watcher ends a
    stream through it, and shutdown() says goodbye through it.

    shutdown() stops accepting, ends every stream with a `retry:` spread and
    a terminating chunk, and returns. Streams whose clients take no more
    bytes get SHUTDOWN_GRACE_S, then are cut, and their threads 0.5 s more
    (measured: 1.7 to 2.0 s with 200 such clients); a fan-out stuck in a
    history's write (a hung disk) adds up to CLOSE_WAIT_S."""

    request_queue_size = 4096   # listen backlog (the default 5 stalls bursts of connects)

    def __init__(self, server_address, settings: Optional[Settings] = None, *,
                 history: Optional[History] = None, handler_class=None,
                 bind_and_activate: bool = True, **options):
        """`settings` (default: Settings()), with `options` (Settings fields
        by name) overriding it; `history` instead of the one the settings
        choose (see open_history)."""
        settings = dataclasses.replace(settings or Settings(), **options)
        self.settings = settings
        if ":" in server_address[0]:
            self.address_family = socket.AF_INET6
        self.static_dir = settings.static_dir or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "static")
        # The demo page is written for a strict policy; a folder of the user's
        # own gets none unless they give one (an inline <script> must just work).
        self.csp = settings.csp if settings.csp is not None else (
            None if settings.static_dir else CONTENT_SECURITY_POLICY)
        self.trusted_proxies = parse_trusted_proxies(settings.trusted_proxies)
        self.access = AccessPolicy(publish_token=settings.publish_token,
                                   jwt_secret=_jwt_secret(settings),
                                   jwt_public_key=_jwt_public_key(settings),
                                   private_topics=settings.private_topics,
                                   require_auth=settings.require_auth,
                                   metrics_token=settings.metrics_token)
        self.publish_limiter = (RateLimiter(settings.publish_rate, settings.publish_burst)
                                if settings.publish_rate > 0 else None)
        self.tls_context = (_tls_context(settings.certfile, settings.keyfile)
                            if settings.certfile else None)
        self.broker = Broker(queue_size=settings.queue_size,
                             max_subscribers=settings.max_clients,
                             history=history or open_history(settings))
        # Under _connections_lock (BurstAcceptMixIn's), with _connections:
        # open streams, counted rather than derived from _connections because
        # shutdown()'s wait re-checks it at every stream's end (O(n) each, O(n²)
        # with 10,000 streams); and streams per client address.
        self.presence = Presence(self.broker) if settings.mercure_subscriptions else None
        self._open_streams = 0
        self._mercure_streams = 0       # of them, on /.well-known/mercure
        self._streams_per_ip: collections.Counter[str] = collections.Counter()
        self._publish_requests: collections.Counter[int] = collections.Counter()  # by status
        self._serving = False
        self._hangups = HangupWatcher(self._readable)
        try:
            super().__init__(server_address, handler_class or SSERequestHandler,
                             bind_and_activate)
        except BaseException:
            self.broker.close()     # stops the Redis reader, closes the store
            raise

    def get_request(self):
        sock, address = super().get_request()
        if self.tls_context is not None:    # the handshake happens in the handler thread
            sock = self.tls_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, address

    def take_stream_quota(self, host: str) -> None:
        """Count a stream from `host` against --max-clients-per-ip (503 when
        its quota is used up); give it back with return_stream_quota()."""
        with self._connections_lock:
            limit = self.settings.max_clients_per_ip
            if limit and self._streams_per_ip[host] >= limit:
                raise ServiceUnavailable(f"too many streams from {host} (limit {limit})")
            self._streams_per_ip[host] += 1

    def return_stream_quota(self, host: str) -> None:
        with self._connections_lock:
            self._streams_per_ip[host] -= 1
            if not self._streams_per_ip[host]:
                del self._streams_per_ip[host]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls_context else "http"
        return f"{scheme}://{host}:{port}/"

    def count_publish_request(self, status: int) -> None:
        with self._connections_lock:
            self._publish_requests[status] += 1

    def stats(self) -> dict:
        stats = self.broker.stats()
        with self._connections_lock:
            stats["connections"] = len(self._connections)
            stats["mercure_subscribers"] = self._mercure_streams
            stats["publish_requests"] = {str(code): count for code, count
                                         in sorted(self._publish_requests.items())}
        return stats

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def stream_started(self, connection: socket.socket, sink: StreamSink,
                       mercure: bool = False) -> None:
        with self._connections_lock:
            self._connections[connection] = sink
            self._open_streams += 1
            self._mercure_streams += mercure
        try:
            self._hangups.watch(connection)
        except OSError as error:    # e.g. epoll's watch limit: heartbeats do it
            logger.warning("cannot watch %s for hang-ups: %r", connection, error)

    def stream_ended(self, connection: socket.socket, mercure: bool = False) -> None:
        """Call before the socket is closed: its number may then be reused."""
        self._hangups.forget(connection)
        with self._connections_lock:
            self._connections[connection] = None
            self._open_streams -= 1
            self._mercure_streams -= mercure
            self._handler_done.notify_all()

    def _readable(self, connection: socket.socket) -> Optional[bool]:
        """The HangupWatcher saw a stream's socket readable: ask its sink."""
        with self._connections_lock:
            sink = self._connections.get(connection)
        return False if sink is None else sink.check_hangup()

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # resets, timeouts, failed TLS handshakes
            logger.debug("connection from %s ended: %r", client_address, error)
        else:
            logger.exception("unexpected error handling a request from %s", client_address)

    def shutdown(self) -> None:
        """Stop accepting, end every stream cleanly, close idle connections."""
        if self._serving:
            super().shutdown()
        self.broker.close()     # each stream writes retry: + its last chunk and ends
        with self._connections_lock:
            idle = [sock for sock, sink in self._connections.items() if sink is None]
        # SHUT_RD ends a thread waiting for the next keep-alive request at once,
        # and still lets a response being written go out.
        _shutdown_sockets(idle, socket.SHUT_RD)
        with self._connections_lock:
            self._handler_done.wait_for(lambda: not self._open_streams,
                                        timeout=SHUTDOWN_GRACE_S)
            stuck = list(self._connections.items())
        # Clients too stuck to take their last chunk are cut (a stream only
        # through its sink, which knows whether the socket is still open).
        for sock, sink in stuck:
            if sink is not None:
                sink.cut()
            else:
                _shutdown_sockets([sock], socket.SHUT_RDWR)
        with self._connections_lock:
            self._handler_done.wait_for(lambda: not self._connections, timeout=0.5)
        self._hangups.close()


def _tls_context(certfile: str, keyfile: Optional[str]):
    import ssl      # here, so that a Python built without ssl still runs plain HTTP
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def _jwt_secret(settings: Settings) -> Optional[str]:
    """--jwt-secret, or the contents of --jwt-secret-file (ValueError if unreadable)."""
    if not settings.jwt_secret_file:
        return settings.jwt_secret
    try:
        with open(settings.jwt_secret_file, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    except OSError as error:
        raise ValueError(f"--jwt-secret-file: {error}") from None


def _jwt_public_key(settings: Settings) -> Optional[RSAPublicKey]:
    """The key of --jwt-public-key (ValueError if unreadable or not one)."""
    if not settings.jwt_public_key:
        return None
    try:
        with open(settings.jwt_public_key, encoding="ascii") as file:
            return RSAPublicKey.from_pem(file.read())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--jwt-public-key: {error}") from None


def open_history(settings: Settings) -> History:
    """The built-in History the settings choose: RedisHistory with --redis,
    SQLiteHistory with --store, else MemoryHistory (all with the same
    Retention, but for Redis, which trims its stream itself)."""
    if settings.store and settings.redis_url:
        raise StoreError("--store and --redis cannot be used together: one server keeps "
                         "its history in a file, several share theirs through Redis")
    if settings.redis_url:
        return RedisHistory(settings.redis_url, key=settings.redis_key,
                            history_size=settings.history_size)
    if settings.store:
        return SQLiteHistory(settings.store, settings.retention(),
                             cache_size=settings.store_cache_size)
    return MemoryHistory(settings.retention())


def _shutdown_sockets(sockets: Iterable[socket.socket], how: int) -> None:
    for sock in sockets:
        try:
            sock.shutdown(how)
        except OSError:     # already closed by its own thread
            pass


# --- Command line ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command line, one option per Settings field (see there)."""
    parser = argparse.ArgumentParser(
        description="Server-Sent Events publish/subscribe server (standard library only).")
    groups: dict[Optional[str], argparse._ActionsContainer] = {None: parser}
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        shown = meta["shown"] or {None: "none", (): "none", False: "off"}.get(
            field.default, field.default)
        if meta["env"]:
            shown = f"${meta['env']}, else {shown}"
        help_text = f"{meta['help']} (default: {shown})".replace("%", "%%")
        options = {"dest": field.name, "help": help_text}
        if meta["kind"] == "flag":
            group.add_argument(meta["flag"], action="store_true", **options)
            continue
        if meta["kind"] == "list":
            options.update(action="append", default=[])
        else:
            options.update(default=os.environ.get(meta["env"]) if meta["env"] else field.default,
                           type=meta["type"], choices=meta["choices"])
        group.add_argument(meta["flag"], metavar=meta["metavar"], **options)
    return parser


FUTEX_HASH_BUCKETS = 4096  # kernel futex hash buckets asked for (Linux >= 6.16)


def _enlarge_futex_hash(buckets: int = FUTEX_HASH_BUCKETS) -> bool:
    """Every parked thread waits on a futex, hashed into a per-process table
    that Linux sizes by CPU count (a few dozen buckets). With thousands of
    subscriber threads every wake-up then walks hundreds of waiters; measured
    here it doubled the time to connect 10,000 subscribers. Linux 6.16 lets a
    process ask for more buckets (prctl PR_FUTEX_HASH). Where there is no
    ctypes, no C library to load, no prctl (macOS, BSD, Windows) or an older
    kernel (EINVAL), nothing happens."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)    # TypeError on Windows
        prctl = libc.prctl                          # AttributeError without prctl
    except (ImportError, OSError, AttributeError, TypeError):
        return False
    pr_futex_hash, set_slots = 78, 1    # the kernel's names (PR_FUTEX_HASH_SET_SLOTS)
    return prctl(pr_futex_hash, set_slots, ctypes.c_ulong(buckets),
                 ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def _raise_open_files_limit(wanted: int) -> None:
    """Each subscriber holds a socket: lift the soft limit towards the hard one."""
    try:
        import resource
    except ImportError:     # Windows: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):   # macOS caps it below a hard limit of "infinity"
            return
    if target < wanted:
        logger.warning("open-files limit %d is below --max-clients; raise it (ulimit -n)", hard)


def _pin_to_cpu(cpu: int) -> None:
    """--cpu: the process on one CPU. Called before any other thread starts,
    so every thread inherits it. Only one thread runs Python at a time (the
    GIL), and every system call lets go of it: with another thread waiting,
    across two cores that wakes the other one, and the caller then waits to
    get the GIL back; on one core the caller mostly just carries on
    (measured in the README, Performance). ValueError if it cannot be done."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpu: this platform cannot pin a process to a CPU from Python "
                         "(os.sched_setaffinity); leave --cpu out, or use the OS's own tool "
                         "(Windows: start /affinity)")
    allowed = sorted(os.sched_getaffinity(0))
    if cpu not in allowed:
        raise ValueError(f"--cpu {cpu}: this process may run only on CPU "
                         f"{', '.join(map(str, allowed))}")
    os.sched_setaffinity(0, {cpu})


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        settings = Settings(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))
    if settings.cpu is not None:
        try:
            _pin_to_cpu(settings.cpu)
        except ValueError as error:
            parser.error(str(error))
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Log records name their thread only if asked to; asking from a handler
    # thread (not a threading.Thread, see SSEServer) would register a dummy
    # Thread object for it in the threading module, one per connection.
    logging.logThreads = False
    try:
        threading.stack_size(THREAD_STACK_BYTES)   # thousands of subscriber threads
    except (ValueError, RuntimeError):      # a platform that cannot set it keeps its own
        pass
    _enlarge_futex_hash()
    # Thousands of long-lived objects per thousand subscribers: keep the
    # start-up objects out of collections and collect young objects less often.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    _raise_open_files_limit(settings.max_clients + 256)
    try:
        server = SSEServer((settings.host, settings.port), settings)
    except StoreError as error:     # a --store file that cannot be used, or with --redis
        print(f"sse_server: --store: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:   # --redis without the redis package
        print(f"sse_server: {error}", file=sys.stderr)
        return 1
    except ValueError as error:     # an unreadable --jwt-secret-file
        parser.error(str(error))
    except HTTPError as error:      # an invalid --private-topic pattern
        parser.error(f"--private-topic: {error.reason}")
    except OSError as error:
        print(f"sse_server: cannot start on {settings.host}:{settings.port}: {error}",
              file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        if stop.is_set():   # asked again while stopping: stop now, whatever is under way
            os.write(2, b"sse_server: stopped at once, without waiting for clients\n")
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    serving = threading.Thread(target=server.serve_forever, name="accept")
    serving.start()
    print(f"sse_server: serving on {server.url} (Ctrl-C to stop)", flush=True)
    stop.wait()
    print("sse_server: stopping (Ctrl-C again to stop at once)", flush=True)
    server.shutdown()
    server.server_close()
    serving.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
