"""Tests for sse_server.py (stdlib unittest): python3 -m unittest -v

Layers: wire format and request parsing (pure, exact bytes), the broker
(no sockets), then real servers on port 0 read through a strict chunked
decoder and a WHATWG event-stream parser. Every wait has a timeout.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import http.client
import io
import itertools
import json
import logging
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.parse
from http import HTTPStatus

try:
    import resource     # (before the portable shim hides it from the server)
except ImportError:
    resource = None
from typing import Optional

# Portable mode: SSE_PORTABLE=1 runs the whole suite on a Python that looks,
# to sse_server, like one without the Linux facilities (see PortableModeTests).
PORTABLE = os.environ.get("SSE_PORTABLE") == "1"


def install_portable_shim() -> None:
    """Hide what Windows lacks, before sse_server is imported: os.readv and
    os.writev; os.sched_setaffinity and os.sched_getaffinity (macOS lacks
    them too); os.read and os.write on a socket descriptor (EBADF, as a
    socket there is no C file descriptor); epoll, devpoll and kqueue (so the
    hang-up selector is the next best); MSG_DONTWAIT and MSG_NOSIGNAL; the
    resource, ctypes and fcntl modules (so the store has no file lock, as
    on a platform with neither flock nor msvcrt.locking). sys.platform is
    left alone: the server must detect capabilities, not platforms.

    poll() stays: Windows has none, but select() on Linux refuses descriptor
    numbers above 1023, which Windows' does not, so hiding it would test a
    limit no real platform has (and fail the benchmark's 10,000 streams).
    The select() paths have tests of their own instead (SelectPathTests)."""
    import errno
    import selectors
    import select
    import stat
    for name in ("readv", "writev", "sched_setaffinity", "sched_getaffinity"):
        if hasattr(os, name):
            delattr(os, name)

    def refuse_sockets(real):
        def call(fd, *args):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(errno.EBADF, "Bad file descriptor (portable mode: a socket "
                                           "is not a C file descriptor)")
            return real(fd, *args)
        return call
    os.read, os.write = refuse_sockets(os.read), refuse_sockets(os.write)
    for module, names in ((select, ("epoll", "devpoll", "kqueue")),
                          (selectors, ("EpollSelector", "DevpollSelector", "KqueueSelector")),
                          (socket, ("MSG_DONTWAIT", "MSG_NOSIGNAL"))):
        for name in names:
            if hasattr(module, name):
                delattr(module, name)
    selectors.DefaultSelector = selectors.PollSelector
    for name in ("resource", "ctypes", "fcntl"):
        sys.modules[name] = None    # import now raises ImportError


if PORTABLE:
    install_portable_shim()

import sse_server  # noqa: E402 (after the shim, on purpose)
from sse_server import (Broker, HTTPError, SSERequestHandler, SSEServer, encode_chunk,
                        format_comment, format_event, format_retry, parse_event_id,
                        parse_publish, parse_query, resolve_static_path, split_lines,
                        validate_topics)

HERE = os.path.dirname(os.path.abspath(__file__))
OPENSSL = shutil.which("openssl")     # test certificates and RSA keys


class LogRecorder(logging.Handler):
    """Keeps the server's log records: quiet output, and tests can assert on them."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def tracebacks(self):
        return [r for r in self.records if r.exc_info or "Traceback" in r.getMessage()]


SERVER_LOG = LogRecorder()


def setUpModule():
    logger = logging.getLogger("sse_server")
    logger.addHandler(SERVER_LOG)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


def tearDownModule():
    logging.getLogger("sse_server").removeHandler(SERVER_LOG)
WAIT_S = 10.0   # upper bound for any single wait; a healthy run is far quicker


def live_threads() -> int:
    """Threads of this process as the OS counts them. The server starts its
    handler threads with _thread (see SSEServer), which the threading module
    does not list; /proc does (on Linux; elsewhere they go uncounted)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except FileNotFoundError:
        return threading.active_count()


def wait_until(predicate, timeout=WAIT_S, message="condition"):
    """Poll `predicate` until true; fail the test (never hang) after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.005)


# --- A strict client: chunked decoder + WHATWG event-stream parser ----------------

class EventStreamParser:
    """The event-stream interpretation rules of the WHATWG HTML spec."""

    Event = collections.namedtuple("Event", "type data id")

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = ""
        self._data: list[str] = []
        self._type = ""
        self.last_id = ""
        self.retry: int | None = None
        self.events: collections.deque = collections.deque()
        self.comments: list[str] = []
        self.empty_dispatches = 0   # blank lines that ended no event

    def feed(self, data: bytes) -> None:
        self._pending += self._decoder.decode(data)
        while True:
            match = re.search(r"\r\n|\r|\n", self._pending)
            if not match or (match.group() == "\r" and match.end() == len(self._pending)):
                return  # no full line yet (a lone CR may be half of CRLF)
            line, self._pending = self._pending[:match.start()], self._pending[match.end():]
            self._line(line)

    def _line(self, line: str) -> None:
        if line == "":
            if not self._data:
                self.empty_dispatches += 1
                self._type = ""
                return
            self.events.append(self.Event(self._type or "message", "\n".join(self._data),
                                          self.last_id))
            self._data, self._type = [], ""
            return
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)


class ProtocolError(AssertionError):
    pass


class ClosedBeforeHeaders(ProtocolError):
    pass


class ChunkDecoder:
    """The one strict HTTP/1.1 chunked-body decoder of these tests: feed()
    takes bytes as they come and returns the payload of the chunks now
    complete; `ended` once the terminating chunk came. Bad framing, or any
    byte after the end, is a ProtocolError."""

    def __init__(self):
        self.pending = b""      # received, not yet a whole chunk
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        self.pending += data
        payload = []
        while not self.ended:
            size_end = self.pending.find(b"\r\n")
            if size_end < 0:
                break
            size_text = self.pending[:size_end]
            if not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
                raise ProtocolError(f"bad chunk size line {size_text!r}")
            size = int(size_text, 16)
            total = size_end + 2 + size + 2
            if len(self.pending) < total:
                break
            if self.pending[total - 2:total] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            payload.append(self.pending[size_end + 2:total - 2])
            self.pending = self.pending[total:]
            self.ended = size == 0
        if self.ended and self.pending:
            raise ProtocolError(f"bytes after the terminating chunk: {self.pending!r}")
        return b"".join(payload)


class StreamClient:
    """Opens GET /events on a raw socket and decodes every byte strictly."""

    def __init__(self, port, query="topic=t", *, headers=(), version="HTTP/1.1",
                 path="/events", recv_buffer=None, tls=None, host="127.0.0.1", source=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if recv_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(WAIT_S)
        self.sock.connect((host, port))
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        lines = [f"GET {path}?{query} {version}", "Host: 127.0.0.1", *headers, "", ""]
        self.sock.sendall("\r\n".join(lines).encode("utf-8"))
        self.raw = b""              # everything received, as received
        self._buffer = b""          # received and not yet decoded
        self.parser = EventStreamParser()
        self._chunks = ChunkDecoder()
        self.closed = False         # saw EOF
        try:
            self.status, self.headers = self._read_head()
        except BaseException:       # the caller gets no client to close
            self.sock.close()
            raise
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self._decode()      # the first chunk may have come with the headers

    def _recv(self, timeout=WAIT_S) -> bool:
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True     # nothing yet, still open
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.raw += data
        self._buffer += data
        return True

    def _read_head(self):
        while b"\r\n\r\n" not in self._buffer:
            if not self._recv():
                raise ClosedBeforeHeaders(f"connection closed before headers: {self.raw!r}")
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.body = self._buffer
        return int(status_line.split()[1]), headers

    @property
    def ended(self) -> bool:
        """Saw the terminating chunk."""
        return self._chunks.ended

    def _decode(self) -> None:
        data, self._buffer = self._buffer, b""
        self.parser.feed(self._chunks.feed(data) if self.chunked else data)

    def pump(self, timeout=WAIT_S) -> bool:
        """Receive once and decode; False at EOF."""
        alive = self._recv(timeout)
        self._decode()
        return alive

    def next_event(self, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        self._decode()
        while not self.parser.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.pump(remaining):
                raise AssertionError(f"no event arrived; received so far: {self.raw[-300:]!r}")
        return self.parser.events.popleft()

    def take(self, count, timeout=WAIT_S):
        return [self.next_event(timeout) for _ in range(count)]

    def read_to_end(self, timeout=WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.pump(max(0.01, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError("stream did not end")

    def close(self) -> None:
        self.sock.close()


def assert_nothing_else(test, clients, publish, topic: str) -> None:
    """Prove that nothing more arrived on the streams of `clients` (one, or
    a list, all subscribed to `topic`): a marker published now is the very
    next event of each. (A dead or garbled stream fails here, where waiting
    for silence would pass.)"""
    marker = f"marker {next(MARKERS)}"
    publish(topic, marker)
    for client in clients if isinstance(clients, list) else [clients]:
        event = client.next_event()
        test.assertEqual((event.type, event.data), ("message", marker),
                         "something arrived before the marker")


MARKERS = itertools.count()


def run_server(test: unittest.TestCase, port=0, **options) -> SSEServer:
    """Start a server on 127.0.0.1 in a thread; the test's cleanup stops it
    (shutdown, server_close, join), and so does calling server.stop()."""
    server = SSEServer(("127.0.0.1", port), **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(WAIT_S)
    server.stop = stop
    test.addCleanup(stop)
    return server


def memory_history(clock=time.monotonic, **bounds):
    """A MemoryHistory with these Retention bounds."""
    return sse_server.MemoryHistory(sse_server.Retention(**bounds), clock=clock)


def cut_stream(server, connection) -> None:
    """Cut a stream's connection, as a network failure would (its client
    reconnects), through its StreamSink."""
    with server._connections_lock:
        sink = server._connections.get(connection)
    if sink is not None:
        sink.cut()


def open_streams(server) -> list[socket.socket]:
    """The sockets of the server's open streams."""
    with server._connections_lock:
        return [sock for sock, stream in server._connections.items() if stream is not None]


def http_request(port, method, path, body=None, headers=None, timeout=WAIT_S):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def publish_form(port, **fields):
    body = urllib.parse.urlencode(fields, doseq=True)
    status, _, answer = http_request(
        port, "POST", "/publish", body,
        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, (status, answer)
    return json.loads(answer)


def raw_exchange(port, data: bytes, timeout=WAIT_S) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    assert match, f"not an HTTP response: {answer[:200]!r}"
    return int(match.group(1))


# --- Wire format -------------------------------------------------------------------

class FormatEventTests(unittest.TestCase):
    CASES = [
        # (data, keyword fields, exact bytes)
        ("hello", {}, b"data: hello\n\n"),
        ("", {}, b"data: \n\n"),
        ("a\nb", {}, b"data: a\ndata: b\n\n"),
        ("a\r\nb", {}, b"data: a\ndata: b\n\n"),
        ("a\rb", {}, b"data: a\ndata: b\n\n"),
        ("a\r\n\r\nb", {}, b"data: a\ndata: \ndata: b\n\n"),
        ("a\n", {}, b"data: a\ndata: \n\n"),
        ("\n", {}, b"data: \ndata: \n\n"),
        (" lead", {}, b"data:  lead\n\n"),
        ("a\u2028b\x0bc\x1cd", {}, "data: a\u2028b\x0bc\x1cd\n\n".encode()),
        ("h\u00e9llo \u263a \U0001F600", {}, "data: h\u00e9llo \u263a \U0001F600\n\n".encode()),
        ("x", {"event": "update"}, b"event: update\ndata: x\n\n"),
        ("x", {"event": "message"}, b"data: x\n\n"),
        ("x", {"id": "r-7"}, b"id: r-7\ndata: x\n\n"),
        ("x", {"retry": 2500}, b"retry: 2500\ndata: x\n\n"),
        ("x\ny", {"id": "r-1", "event": "e", "retry": 0},
         b"id: r-1\nevent: e\nretry: 0\ndata: x\ndata: y\n\n"),
    ]

    def test_exact_bytes(self):
        for data, fields, expected in self.CASES:
            with self.subTest(data=data, fields=fields):
                self.assertEqual(format_event(data, **fields), expected)

    def test_browser_parser_reads_back_the_same_data(self):
        for data, fields, _ in self.CASES:
            with self.subTest(data=data):
                parser = EventStreamParser()
                parser.feed(format_event(data, **fields))
                event = parser.events.popleft()
                # A browser's reading: CR and CRLF both become LF.
                self.assertEqual(event.data, re.sub(r"\r\n|\r", "\n", data))
                self.assertEqual(event.type, fields.get("event", "message"))
                self.assertEqual(parser.empty_dispatches, 0)

    def test_fields_with_line_breaks_or_nul_are_refused(self):
        for field in ("event", "id"):
            for bad in ("a\nb", "a\rb", "a\0b"):
                with self.subTest(field=field, value=bad), self.assertRaises(ValueError):
                    format_event("x", **{field: bad})

    def test_split_lines_only_on_cr_lf(self):
        self.assertEqual(split_lines("a\r\nb\rc\nd\u2028e\x85f"), ["a", "b", "c", "d\u2028e\x85f"])
        self.assertEqual(split_lines(""), [""])

    def test_comment_and_retry_have_no_blank_line(self):
        self.assertEqual(format_comment("heartbeat"), b": heartbeat\n")
        self.assertEqual(format_comment("a\r\nb"), b": a\n: b\n")
        self.assertEqual(format_retry(3000), b"retry: 3000\n")
        parser = EventStreamParser()
        parser.feed(format_comment("x") + format_retry(10) + format_comment("y"))
        self.assertEqual((list(parser.events), parser.empty_dispatches, parser.retry),
                         ([], 0, 10))

    def test_bad_retry_is_refused(self):
        for bad in (-1, 1.5, "10", True, None):
            with self.subTest(retry=bad), self.assertRaises(ValueError):
                format_retry(bad)

    def test_chunk_framing(self):
        self.assertEqual(encode_chunk(b"data: x\n\n"), b"9\r\ndata: x\n\n\r\n")
        self.assertEqual(encode_chunk(b"x" * 255), b"FF\r\n" + b"x" * 255 + b"\r\n")
        with self.assertRaises(ValueError):
            encode_chunk(b"")


class ParsingTests(unittest.TestCase):
    def test_valid_topics(self):
        self.assertEqual(validate_topics(["a", "b/c", "x.y:z@w-1_2", "a"]),
                         ("a", "b/c", "x.y:z@w-1_2"))
        self.assertEqual(validate_topics(["t" * 128]), ("t" * 128,))

    def test_invalid_topics(self):
        for topics in ([], [""], ["t" * 129], ["a b"], ["a*"], ["é"], ["a\n"],
                       [f"t{i}" for i in range(33)]):
            with self.subTest(topics=topics), self.assertRaises(HTTPError) as caught:
                validate_topics(topics)
            self.assertEqual(caught.exception.status, 400)

    def test_query_strictness(self):
        self.assertEqual(parse_query("topic=a&topic=b&x="), {"topic": ["a", "b"], "x": [""]})
        self.assertEqual(parse_query("data=%C3%A9+x"), {"data": ["\u00e9 x"]})
        for bad in ("topic=%zz", "topic=%4", "data=%ff", "&".join(["a=1"] * 101)):
            with self.subTest(query=bad), self.assertRaises(HTTPError):
                parse_query(bad)

    def test_publish_form_body(self):
        request = parse_publish({}, "application/x-www-form-urlencoded; charset=UTF-8",
                                b"topic=a&topic=b&data=hi%0Athere&event=update&retry=100")
        self.assertEqual(request, sse_server.PublishRequest(("a", "b"), "hi\nthere", "update", 100))

    def test_a_form_without_data_is_refused_not_published_empty(self):
        """`curl -d hello` sends a form whose only field is "hello"."""
        for body in (b"hello", b"topic=a", b"topic=a&event=ping"):
            with self.subTest(body=body), self.assertRaises(HTTPError) as caught:
                parse_publish({"topic": ["a"]}, "application/x-www-form-urlencoded", body)
            self.assertEqual(caught.exception.status, 400)
            self.assertIn("data=", caught.exception.reason)
        self.assertEqual(parse_publish({}, "application/x-www-form-urlencoded",
                                       b"topic=a&data=").data, "")     # empty, on purpose
        self.assertEqual(parse_publish({"topic": ["a"], "data": ["q"]},
                                       "application/x-www-form-urlencoded", b"").data, "q")

    def test_publish_raw_body_with_query_fields(self):
        request = parse_publish(parse_query("topic=news&event=greeting"), "text/plain",
                                "line 1\r\nl\u00efne 2".encode())
        self.assertEqual(request, sse_server.PublishRequest(
            ("news",), "line 1\r\nl\u00efne 2", "greeting", None))
        self.assertEqual(parse_publish({"topic": ["a"]}, None, b"").data, "")

    def test_publish_errors(self):
        cases = [
            ("", "text/plain", b"x"),                                   # no topic
            ("topic=a", "text/plain", b"\xff\xfe"),                     # invalid UTF-8
            ("topic=a&event=a&event=b", None, b""),                     # event twice
            ("topic=a&retry=soon", None, b""),                          # non-numeric retry
            ("topic=a&retry=-1", None, b""),
            ("", "application/x-www-form-urlencoded", b"topic=a&data=1&data=2"),
            ("", "application/x-www-form-urlencoded", b"topic=a&data=%E9"),
        ]
        for query, content_type, body in cases:
            with self.subTest(query=query, body=body), self.assertRaises(HTTPError) as caught:
                parse_publish(parse_query(query), content_type, body)
            self.assertEqual(caught.exception.status, 400)

    def test_event_fields_are_checked_once_where_every_publish_goes(self):
        # parse_publish leaves the event name to Broker.publish, which checks it
        # for HTTP and Python callers alike: a 400 for one, a ValueError for the other.
        request = parse_publish(parse_query("topic=a&event=a%0Ab"), None, b"")
        broker = Broker()
        for bad in ({"event": "a\nb"}, {"event": "a\rb"}, {"event": "a\0b"},
                    {"event": "e" * 129}, {"retry": -1}, {"retry": True}):
            with self.subTest(bad=bad), self.assertRaises(sse_server.InvalidEvent) as caught:
                broker.publish("a", "x", **bad)
            self.assertEqual(caught.exception.status, 400)
            self.assertIsInstance(caught.exception, ValueError)
        with self.assertRaises(sse_server.InvalidEvent):
            broker.publish(request.topics, request.data, event=request.event)
        self.assertEqual(broker.stats()["events_published"], 0)

    def test_checked_topics_are_not_checked_again(self):
        topics = validate_topics(["a", "b", "a"])
        self.assertEqual(topics, ("a", "b"))
        self.assertIs(validate_topics(topics), topics)

    def test_event_ids(self):
        self.assertEqual(parse_event_id("abcd-42", "abcd"), 42)
        for foreign in ("zzzz-42", "abcd-", "abcd-x", "42", "", None, "abcd-\u0664\u0662",
                        "abcd-4-2"):
            with self.subTest(id=foreign):
                self.assertIsNone(parse_event_id(foreign, "abcd"))

    def test_publish_access(self):
        def check(host, bearer, token=None):
            return sse_server.AccessPolicy(publish_token=token).check_publisher(host, bearer, None)
        self.assertIsNone(check("127.0.0.1", None))
        self.assertIsNone(check("::1", None))
        self.assertIsNone(check("::ffff:127.0.0.1", None))
        self.assertIsNone(check("192.0.2.7", "s3cret", "s3cret"))
        with self.assertRaises(HTTPError) as caught:
            check("192.0.2.7", None)
        self.assertEqual(caught.exception.status, 403)
        for bearer in (None, "wrong", ""):
            with self.subTest(bearer=bearer), self.assertRaises(HTTPError) as caught:
                check("127.0.0.1", bearer, "s3cret")
            self.assertEqual(caught.exception.status, 401)
            self.assertIn(("WWW-Authenticate", "Bearer"), caught.exception.headers)


class ReadHeadersTests(unittest.TestCase):
    def read(self, data: bytes, max_bytes=32768):
        return sse_server.read_headers(io.BytesIO(data).readline, max_bytes)

    def test_reads_names_case_insensitively_and_repeats(self):
        headers = self.read(b"Host: x\r\nX-A:  1 \r\nx-a: 2\nAccept:text/event-stream\r\n\r\nbody")
        self.assertEqual((headers.get("HOST"), headers["accept"]), ("x", "text/event-stream"))
        self.assertEqual(headers.get_all("X-A"), ["1", "2"])
        self.assertIn("x-a", headers)
        self.assertNotIn("Cookie", headers)
        self.assertEqual(headers.get_all("Cookie"), [])

    def test_malformed_lines_are_400(self):
        for data in (b"No colon here\r\n\r\n", b"Host : x\r\n\r\n", b": x\r\n\r\n",
                     b"Host: x\r\n folded\r\n\r\n", b"Bad Name: x\r\n\r\n",
                     b"A: x\ry\r\n\r\n", b"A: x\x00\r\n\r\n"):
            with self.subTest(data=data), self.assertRaises(HTTPError) as caught:
                self.read(data)
            self.assertEqual(caught.exception.status, 400)

    def test_too_much_is_431(self):
        for data, limit in ((b"A: " + b"x" * 70_000 + b"\r\n\r\n", 10**6),
                            (b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n", 10**6),
                            (b"A: " + b"x" * 200 + b"\r\n\r\n", 100)):
            with self.subTest(size=len(data)), self.assertRaises(HTTPError) as caught:
                self.read(data, limit)
            self.assertEqual(caught.exception.status, 431)


class StaticPathTests(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.TemporaryDirectory()
        self.addCleanup(self.folder.cleanup)
        self.root = os.path.join(self.folder.name, "static")
        os.makedirs(os.path.join(self.root, "sub"))
        for name in ("index.html", "app.js", "sub/index.html", ".secret"):
            with open(os.path.join(self.root, name), "w") as file:
                file.write(name)
        with open(os.path.join(self.folder.name, "outside.txt"), "w") as file:
            file.write("secret")
        os.symlink(os.path.join(self.folder.name, "outside.txt"),
                   os.path.join(self.root, "link.txt"))

    def test_files_inside(self):
        real = os.path.realpath(self.root)
        self.assertEqual(resolve_static_path(self.root, "/"), os.path.join(real, "index.html"))
        self.assertEqual(resolve_static_path(self.root, "/app.js"), os.path.join(real, "app.js"))
        self.assertEqual(resolve_static_path(self.root, "/sub/"),
                         os.path.join(real, "sub", "index.html"))

    def test_escapes_are_refused(self):
        for path in ("/../outside.txt", "/%2e%2e/outside.txt", "/%2E%2E%2Foutside.txt",
                     "/sub/../../outside.txt", "//etc/passwd", "/link.txt", "/.secret",
                     "/..%5coutside.txt", "/app.js%00.html", "/nope.html", "/%ff",
                     "/C:/Windows/win.ini", "/c%3a/x", "/app.js::$DATA"):
            with self.subTest(path=path):
                self.assertIsNone(resolve_static_path(self.root, path))


# --- Broker (no sockets) ---------------------------------------------------------------

def drain(subscriber):
    frames = []
    while not subscriber.queue.empty():
        frames.append(subscriber.queue.get_nowait())
    return frames


def unchunk(data: bytes) -> bytes:
    """The payload of whole HTTP chunks (what a broker queue holds)."""
    decoder = ChunkDecoder()
    payload = decoder.feed(data)
    assert not decoder.pending, f"a partial chunk: {decoder.pending!r}"
    return payload


def events_of(frames):
    """The events in queued items (chunked) or replay frames (raw), as the
    client parses them."""
    parser = EventStreamParser()
    for frame in frames:
        if isinstance(frame, bytes):    # the queue also ends with a StreamEnd
            parser.feed(unchunk(frame) if re.match(rb"[0-9A-F]+\r\n", frame) else frame)
    return list(parser.events)


def data_of(frames):
    """The data of every event in queued items or replay frames."""
    return [event.data for event in events_of(frames)]


class BrokerTests(unittest.TestCase):
    def test_publish_reaches_only_subscribers_of_the_topic(self):
        broker = Broker()
        a, _ = broker.subscribe(["a"])
        ab, _ = broker.subscribe(["a", "b"])
        event_id, reached = broker.publish("a", {"n": 1}, event="update")
        self.assertEqual(reached, 2)
        self.assertEqual(event_id, f"{broker.run_id}-1")
        self.assertEqual(broker.publish(["a", "b"], "both").subscribers, 2)
        self.assertEqual(broker.publish("c", "nobody").subscribers, 0)
        self.assertEqual(data_of(drain(a)), ['{"n":1}', "both"])
        self.assertEqual(data_of(drain(ab)), ['{"n":1}', "both"])   # once, not twice

    def test_data_encoding(self):
        broker = Broker()
        subscriber, _ = broker.subscribe(["a"])
        for data in ("text", b"bytes", [1, "\u00e9"], 3, None):
            broker.publish("a", data)
        self.assertEqual(data_of(drain(subscriber)),
                         ["text", "bytes", '[1,"\u00e9"]', "3", "null"])

    def test_same_bytes_for_every_subscriber(self):
        broker = Broker()
        subscribers = [broker.subscribe(["a"])[0] for _ in range(3)]
        broker.publish("a", "x")
        frames = [subscriber.queue.get_nowait() for subscriber in subscribers]
        self.assertTrue(all(frame is frames[0] for frame in frames))

    def test_bad_api_input_spends_no_id(self):
        broker = Broker()
        for kwargs in ({"event": "a\nb"}, {"retry": -5}):
            with self.subTest(kwargs=kwargs), self.assertRaises(ValueError):
                broker.publish("a", "x", **kwargs)
        with self.assertRaises(HTTPError):
            broker.publish("bad topic", "x")
        self.assertEqual(broker.publish("a", "x").id, f"{broker.run_id}-1")

    def test_full_queue_drops_the_subscriber_not_the_publisher(self):
        broker = Broker(queue_size=3)
        slow, _ = broker.subscribe(["a"])
        fast, _ = broker.subscribe(["a"])
        for n in range(3):
            broker.publish("a", str(n))
            drain(fast)
        self.assertEqual(broker.publish("a", "3").subscribers, 1)
        self.assertIs(slow.state, slow.ENDED)
        self.assertIs(drain(slow)[-1], sse_server.DROPPED)
        self.assertEqual(data_of(drain(fast)), ["3"])
        self.assertEqual(broker.stats()["clients_dropped"], 1)
        self.assertEqual(broker.subscriber_count, 1)

    def test_replay_after_id_merges_topics_in_order(self):
        broker = Broker()
        ids = [broker.publish(topic, topic + str(n)).id
               for n, topic in enumerate(["a", "b", "c", "a", "b"])]
        _, replay = broker.subscribe(["a", "b"], last_event_id=ids[0])
        self.assertEqual(data_of(replay), ["b1", "a3", "b4"])

    def test_replay_without_gap_or_duplicate_under_concurrent_publishing(self):
        broker = Broker(history=memory_history(history_size=100_000), queue_size=100_000)
        stop = threading.Event()

        def publisher():
            n = 0
            while not stop.is_set() and n < 20_000:
                broker.publish("a", str(n))
                n += 1

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            wait_until(lambda: broker.stats()["events_published"] > 100)
            first_id = broker.stats()["last_event_id"]
            wait_until(lambda: broker.stats()["events_published"] > 300)
            subscriber, replay = broker.subscribe(["a"], last_event_id=first_id)
            wait_until(lambda: subscriber.queue.qsize() > 200)
        finally:
            stop.set()
            thread.join(WAIT_S)
        numbers = [int(d) for d in data_of(replay + drain(subscriber))]
        start = parse_event_id(first_id, broker.run_id)   # seq n is data n - 1
        self.assertEqual(numbers, list(range(start, start + len(numbers))))

    def test_foreign_and_future_ids_reset(self):
        broker = Broker()
        broker.publish("a", "x")
        for stale in ("0000-1", "garbage", f"{broker.run_id}-99"):
            with self.subTest(id=stale):
                _, replay = broker.subscribe(["a"], last_event_id=stale)
                reset, event = events_of(replay)
                self.assertEqual(reset.type, "reset")
                self.assertEqual(json.loads(reset.data)["reason"], "unknown-id")
                self.assertEqual(json.loads(reset.data)["lastEventId"], stale)
                self.assertEqual(event.data, "x")

    def test_a_history_that_fails_acknowledges_no_event_of_its_batch(self):
        """Even a history with a bug: the leader's publish raises it, the
        other publishers of the batch get 503, none is told it was kept."""
        gate, batches = threading.Event(), []

        class Failing(sse_server.MemoryHistory):
            def append(self, batch):
                batches.append(len(batch))
                if len(batches) > 1:
                    raise RuntimeError("a bug in a history")
                gate.wait(WAIT_S)       # hold the first batch while two more queue
                super().append(batch)

        broker = Broker(history=Failing())
        outcomes = {}

        def publish(name):
            try:
                outcomes[name] = broker.publish("a", name).id
            except Exception as error:      # what each publisher was told
                outcomes[name] = type(error).__name__

        threads = [threading.Thread(target=publish, args=(name,)) for name in "abc"]
        threads[0].start()
        wait_until(lambda: batches == [1], message="the first batch in append()")
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: len(broker._pending) == 2, message="two events queued behind it")
        gate.set()
        for thread in threads:
            thread.join(WAIT_S)
        self.assertEqual(batches, [1, 2])
        self.assertEqual(outcomes["a"], f"{broker.run_id}-1")
        self.assertEqual(sorted([outcomes["b"], outcomes["c"]]),
                         ["RuntimeError", "ServiceUnavailable"])
        self.assertEqual(broker.stats()["events_published"], 1)

    def test_a_publishers_id_is_held_while_its_event_is(self):
        now = [1000.0]
        history = memory_history(clock=lambda: now[0], history_ttl_s=60, max_topics=2)
        broker = Broker(history=history)
        self.assertEqual(broker.publish("a", "x", event_id="rev").id, "rev")
        with self.assertRaises(sse_server.Conflict):
            broker.publish("b", "y", event_id="rev")
        self.assertEqual(history.find("rev"), f"{history.run_id}-1")
        now[0] += 61                            # the TTL lets it go
        self.assertIsNone(history.find("rev"))
        broker.publish("a", "x", event_id="rev")
        broker.publish("b", "y")
        broker.publish("c", "z")                # max_topics drops topic a, and the id
        self.assertIsNone(history.find("rev"))
        broker.publish("d", "w", event_id="rev")
        self.assertEqual(history.find("rev"), f"{history.run_id}-5")   # (a 409 spends no id)
        # A history that cannot keep them (a shared one, say) gets none: the
        # broker numbers the event, as the Mercure draft allows.
        class Plain(sse_server.MemoryHistory):
            keeps_publisher_ids = False
        plain = Broker(history=Plain())
        self.assertEqual(plain.publish("a", "x", event_id="rev").id, f"{plain.history.run_id}-1")
        broker.close()
        plain.close()

    def test_publish_after_close_is_refused(self):
        broker = Broker()
        subscriber, _ = broker.subscribe(["a"])
        broker.close()
        with self.assertRaises(sse_server.ServiceUnavailable):
            broker.publish("a", "too late")
        self.assertEqual(broker.stats()["events_published"], 0)
        self.assertEqual(drain(subscriber), [sse_server.SHUTDOWN])

    def test_close_waits_for_a_stuck_fan_out_only_so_long(self):
        """A history stuck in append() (a hung disk) cannot hold shutdown."""
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        class Stuck(sse_server.MemoryHistory):
            def append(self, batch):
                entered.set()
                release.wait(WAIT_S)

        broker = Broker(history=Stuck())
        publisher = threading.Thread(target=broker.publish, args=("a", "x"))
        publisher.start()
        self.addCleanup(publisher.join, WAIT_S)
        self.assertTrue(entered.wait(WAIT_S))
        with unittest.mock.patch.object(sse_server, "CLOSE_WAIT_S", 0.1):
            closing = threading.Thread(target=broker.close)
            closing.start()
            closing.join(WAIT_S)
        self.assertFalse(closing.is_alive(), "close() waited for the stuck fan-out")
        self.assertTrue(any("still running" in r.getMessage() for r in SERVER_LOG.records))
        release.set()

    def test_max_subscribers(self):
        broker = Broker(max_subscribers=2)
        first, _ = broker.subscribe(["a"])
        broker.subscribe(["b"])
        with self.assertRaises(HTTPError) as caught:
            broker.subscribe(["c"])
        self.assertEqual(caught.exception.status, 503)
        broker.unsubscribe(first)
        broker.unsubscribe(first)   # twice is harmless
        broker.subscribe(["c"])

    def test_concurrent_publishers_keep_each_order(self):
        broker = Broker(queue_size=10_000)
        subscribers = [broker.subscribe(["a"])[0] for _ in range(5)]
        threads = [threading.Thread(target=lambda p=p: [broker.publish("a", f"{p}:{n}")
                                                      for n in range(500)])
                   for p in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        for subscriber in subscribers:
            got = data_of(drain(subscriber))
            self.assertEqual(len(got), 4000)
            for p in range(8):
                self.assertEqual([d for d in got if d.startswith(f"{p}:")],
                                 [f"{p}:{n}" for n in range(500)])


class StreamSinkTests(unittest.TestCase):
    """The one owner of a stream's socket (StreamSink's rules), on a socketpair."""

    def test_server_needs_a_write_timeout(self):
        for bad in (None, 0, -1):
            with self.subTest(write_timeout_s=bad), self.assertRaises(ValueError):
                SSEServer(("127.0.0.1", 0), write_timeout_s=bad)

    def setUp(self):
        self.server_end, self.client_end = socket.socketpair()
        self.addCleanup(self.server_end.close)
        self.addCleanup(self.client_end.close)
        self.broker = Broker(queue_size=1_000_000)
        self.subscriber, _ = self.broker.subscribe(["a"], io=self.socket_io())

    def socket_io(self, **options):
        return sse_server.SocketIO(self.server_end, sse_server.StartupTurn(None),
                                   write_timeout_s=WAIT_S, **options)

    def received(self) -> bytes:
        self.client_end.setblocking(False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while True:
                chunk = self.client_end.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        return data

    def test_owned_by_its_thread_until_it_parks_then_direct(self):
        sink = self.subscriber
        self.assertIs(sink.state, sink.THREAD)
        self.broker.publish("a", "queued")              # the thread still owns the socket
        self.assertEqual(self.received(), b"")
        self.assertEqual(data_of(drain(sink)), ["queued"])
        sink.park()
        self.assertIs(sink.state, sink.IDLE)
        self.broker.publish("a", "direct")
        self.assertTrue(sink.queue.empty())
        self.assertIs(sink.state, sink.IDLE)
        self.assertEqual(data_of([self.received()]), ["direct"])

    def test_park_keeps_the_socket_while_something_is_queued(self):
        sink = self.subscriber
        self.broker.publish("a", "waiting")
        sink.park()
        self.assertIs(sink.state, sink.THREAD)
        self.broker.publish("a", "behind it")
        self.assertEqual(data_of(drain(sink)), ["waiting", "behind it"])
        self.assertEqual(self.received(), b"")

    def test_partial_write_queues_the_rest_first_and_keeps_order(self):
        self.subscriber.park()
        payload = "x" * 50_000
        for n in range(100):        # far more than the socket buffers hold
            self.broker.publish("a", f"{n} {payload}")
        self.assertIs(self.subscriber.state, self.subscriber.THREAD)
        wire = self.received() + b"".join(drain(self.subscriber))
        self.assertEqual(data_of([wire]), [f"{n} {payload}" for n in range(100)])

    def test_claim_for_heartbeat_and_end(self):
        sink = self.subscriber
        sink.park()
        self.assertTrue(sink.claim())                   # its thread writes a heartbeat
        self.assertIs(sink.state, sink.THREAD)
        self.broker.publish("a", "meanwhile")
        self.assertEqual(self.received(), b"")          # queued, not interleaved
        self.assertFalse(sink.claim())                  # something waits: write that first
        self.assertTrue(sink.end(sse_server.CLIENT_GONE))
        self.assertFalse(sink.end(sse_server.SHUTDOWN))     # the first reason stands
        self.assertIs(sink.state, sink.ENDED)
        self.assertEqual(self.broker.publish("a", "after the end").subscribers, 0)
        sink.park()
        self.assertIs(sink.state, sink.ENDED)
        self.assertEqual(drain(sink)[-1], sse_server.CLIENT_GONE)
        self.assertFalse(sink.claim())
        self.assertEqual(self.received(), b"")

    def test_full_queue_ends_the_stream_and_cuts_its_socket(self):
        broker = Broker(queue_size=2)
        sink, _ = broker.subscribe(["a"], io=self.socket_io())
        for n in range(2):
            self.assertEqual(broker.publish("a", str(n)).subscribers, 1)
        self.assertEqual(broker.publish("a", "one too many").subscribers, 0)
        self.assertIs(sink.state, sink.ENDED)
        self.assertIs(drain(sink)[-1], sse_server.DROPPED)
        self.client_end.settimeout(WAIT_S)
        self.assertEqual(self.client_end.recv(10), b"")     # cut: the client sees the end

    def test_a_delivery_racing_the_end_is_whole_or_absent(self):
        sink = self.subscriber
        sink.park()
        started = threading.Event()

        def publish():
            for n in range(3000):
                self.broker.publish("a", f"{n} " + "y" * 200)
                started.set()

        publisher = threading.Thread(target=publish)
        publisher.start()
        received = []
        self.client_end.settimeout(0.05)
        self.assertTrue(started.wait(WAIT_S))
        sink.end(sse_server.CLIENT_GONE)
        while publisher.is_alive() or not received or received[-1]:
            try:
                received.append(self.client_end.recv(1 << 20))
            except socket.timeout:
                if not publisher.is_alive():
                    break
        publisher.join(WAIT_S)
        queued = drain(sink)
        ends = [item for item in queued if isinstance(item, sse_server.StreamEnd)]
        self.assertEqual(ends, [sse_server.CLIENT_GONE])
        self.assertIs(queued[-1], sse_server.CLIENT_GONE)   # nothing after the end
        wire = b"".join(received) + b"".join(queued[:-1])
        got = data_of([wire])       # a strict parse: no half event anywhere
        self.assertEqual(got, [f"{n} " + "y" * 200 for n in range(len(got))])
        self.assertLess(len(got), 3000)

    def test_nothing_touches_the_socket_after_close(self):
        sink = self.subscriber
        sink.park()
        sink.close()
        self.assertIs(sink.state, sink.CLOSED)
        self.assertEqual(self.broker.publish("a", "too late").subscribers, 0)
        self.assertFalse(sink.end(sse_server.SHUTDOWN))
        self.assertFalse(sink.claim())
        sink.cut()                                      # no effect either
        sink.park()
        self.assertIs(sink.state, sink.CLOSED)
        self.server_end.sendall(b"still open")
        self.client_end.settimeout(WAIT_S)
        self.assertEqual(self.client_end.recv(100), b"still open")
        self.assertTrue(sink.queue.empty())

    def test_tls_and_socketless_sinks_never_take_direct_writes(self):
        for sink in (sse_server.StreamSink(), sse_server.StreamSink(self.socket_io(tls=True))):
            with self.subTest(io=sink.io):
                sink.park()
                self.assertIs(sink.state, sink.THREAD)
                self.assertTrue(sink.deliver(sse_server.Payload(b"data: x\n\n"), 10))
                self.assertEqual(sink.queue.get_nowait(), encode_chunk(b"data: x\n\n"))

    def test_http10_subscriber_gets_raw_frames(self):
        broker = Broker()
        subscriber, _ = broker.subscribe(["a"], io=self.socket_io(), chunked=False)
        subscriber.park()
        event_id = broker.publish("a", "raw").id
        self.assertEqual(self.received(), f"id: {event_id}\ndata: raw\n\n".encode())

    def test_pump_writes_heartbeats_events_and_a_clean_end(self):
        sink = self.subscriber
        outcome = []
        pump = threading.Thread(target=lambda: outcome.append(sink.pump(heartbeat_s=0.05)))
        pump.start()
        self.addCleanup(pump.join, WAIT_S)
        self.client_end.settimeout(WAIT_S)
        wire = b""
        while b"heartbeat" not in unchunk_prefix(wire):
            wire += self.client_end.recv(4096)
        self.broker.publish("a", "live")
        while b"live" not in unchunk_prefix(wire):
            wire += self.client_end.recv(4096)
        sink.end(sse_server.SHUTDOWN)
        pump.join(WAIT_S)
        self.assertEqual(outcome, [sse_server.SHUTDOWN])
        sink.say_goodbye(outcome[0])
        while not wire.endswith(sse_server.LAST_CHUNK):
            wire += self.client_end.recv(4096)
        client = EventStreamParser()
        client.feed(unchunk(wire[:-len(sse_server.LAST_CHUNK)]))
        self.assertIn("heartbeat", client.comments)
        self.assertEqual([event.data for event in client.events], ["live"])
        self.assertGreaterEqual(client.retry, 1000)     # the shutdown's reconnect spread
        self.assertEqual(client.empty_dispatches, 0)

    def test_pump_ends_the_stream_at_its_deadline(self):
        sink = self.subscriber
        end = sink.pump(heartbeat_s=WAIT_S, deadline=time.monotonic() + 0.05)
        self.assertIs(end, sse_server.TOKEN_EXPIRED)
        self.assertIs(sink.state, sink.ENDED)
        sink.say_goodbye(end)
        self.assertEqual(unchunk(self.received()[:-5]), b": token expired\n")

    def test_many_subscribers_split_with_a_helper_keep_order(self):
        broker = Broker(queue_size=1_000_000)
        subscribers = [broker.subscribe(["b"])[0] for _ in range(
            sse_server.FAN_OUT_SPLIT_SUBSCRIBERS + 1)]
        for n in range(5):
            self.assertEqual(broker.publish("b", str(n)).subscribers, len(subscribers))
        for subscriber in subscribers:
            self.assertEqual(data_of(drain(subscriber)), ["0", "1", "2", "3", "4"])
        broker.close()


class SocketIOTests(unittest.TestCase):
    """Every wait for a client is SocketIO.wait: with a deadline, after the
    start-up turn is given back."""

    def setUp(self):
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.turns = threading.BoundedSemaphore(1)
        self.io = sse_server.SocketIO(self.ours, sse_server.StartupTurn(self.turns, 1),
                                      write_timeout_s=0.2)

    def test_a_read_that_must_wait_gives_the_turn_back_and_keeps_its_deadline(self):
        self.assertFalse(self.turns.acquire(blocking=False))    # held
        buffer = bytearray(10)
        with self.assertRaises(socket.timeout):
            self.io.recv_into(buffer, time.monotonic() + 0.05)
        self.assertTrue(self.turns.acquire(blocking=False))     # given back
        self.peer.sendall(b"ready")
        self.assertEqual(self.io.recv_into(buffer, time.monotonic()), 5)     # no wait needed

    def test_a_write_to_a_client_that_takes_nothing_times_out(self):
        with self.assertRaises(socket.timeout):
            self.io.send_all(b"x" * 20_000_000)
        self.assertTrue(self.turns.acquire(blocking=False))

    def test_a_write_waits_for_room_and_sends_everything(self):
        data = os.urandom(4_000_000)
        self.io.write_timeout_s = WAIT_S
        received = []
        reader = threading.Thread(target=lambda: received.append(recv_exactly(self.peer,
                                                                               len(data))))
        reader.start()
        self.io.send_all(data)
        reader.join(WAIT_S)
        self.assertEqual(received, [data])


def recv_exactly(sock, size) -> bytes:
    sock.settimeout(WAIT_S)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def unchunk_prefix(data: bytes) -> bytes:
    """The payload of the complete chunks at the start of `data`."""
    return ChunkDecoder().feed(data)


# --- Servers on port 0 ---------------------------------------------------------------------

class ServerTestCase(unittest.TestCase):
    """Starts a real server per test; tearDown checks no thread leaked."""

    server_options: dict = {}
    handler_class = SSERequestHandler

    def setUp(self):
        self.baseline_threads = live_threads()
        self.server = self.start_server(**self.server_options)
        self.port = self.server.server_address[1]

    def start_server(self, **options):
        options.setdefault("heartbeat_s", 5)
        return run_server(self, handler_class=self.handler_class, **options)

    def tearDown(self):
        self.doCleanups()
        wait_until(lambda: live_threads() <= self.baseline_threads,
                   message=f"threads to end (back to {self.baseline_threads})")

    def use_server(self, **options):
        """Serve the rest of the test from a server with these options."""
        self.server = self.start_server(**options)
        self.port = self.server.server_address[1]

    def subscribe(self, query="topic=t", **kwargs):
        client = StreamClient(self.port, query, **kwargs)
        self.addCleanup(client.close)
        return client

    def subscribed(self, count):
        wait_until(lambda: self.server.broker.subscriber_count == count,
                   message=f"{count} subscribers")


class StreamTests(ServerTestCase):
    def test_headers_and_first_bytes(self):
        client = self.subscribe("topic=news")
        self.assertEqual(client.status, 200)
        self.assertEqual(client.headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertEqual(client.headers["cache-control"], "no-cache")
        self.assertEqual(client.headers["x-accel-buffering"], "no")
        self.assertEqual(client.headers["transfer-encoding"], "chunked")
        self.assertNotIn("content-length", client.headers)
        while b"retry" not in client.raw.split(b"\r\n\r\n", 1)[1]:
            client.pump()
        # The first chunk, before anything is published: a comment and retry.
        self.assertEqual(client.raw.split(b"\r\n\r\n", 1)[1], b"18\r\n: connected\nretry: 3000\n\r\n")

    def test_event_bytes_on_the_wire(self):
        client = self.subscribe("topic=news")
        self.subscribed(1)
        result = publish_form(self.port, topic="news", data="a\r\nb", event="update")
        client.next_event()
        frame = f"id: {result['id']}\nevent: update\ndata: a\ndata: b\n\n".encode()
        self.assertTrue(client.raw.endswith(b"%X\r\n%s\r\n" % (len(frame), frame)),
                        client.raw)

    def test_events_in_publish_order_per_topic(self):
        news = [self.subscribe("topic=news") for _ in range(2)]
        sport = self.subscribe("topic=sport")
        both = self.subscribe("topic=news&topic=sport")
        self.subscribed(4)
        for n in range(5):
            publish_form(self.port, topic="news", data=f"n{n}")
            publish_form(self.port, topic="sport", data=f"s{n}", event="score")
        for client in news:
            self.assertEqual([e.data for e in client.take(5)], [f"n{n}" for n in range(5)])
        self.assertEqual([(e.type, e.data) for e in sport.take(5)],
                         [("score", f"s{n}") for n in range(5)])
        self.assertEqual([e.data for e in both.take(10)],
                         [x for n in range(5) for x in (f"n{n}", f"s{n}")])
        assert_nothing_else(self, list(news), self.server.broker.publish, "news")
        assert_nothing_else(self, sport, self.server.broker.publish, "sport")
        for client in (*news, sport, both):
            self.assertEqual(client.parser.empty_dispatches, 0)

    def test_multi_topic_event_arrives_once(self):
        client = self.subscribe("topic=a&topic=b")
        self.subscribed(1)
        status, _, body = http_request(self.port, "POST", "/publish?topic=a&topic=b", b"x")
        self.assertEqual(json.loads(body)["subscribers"], 1)
        self.assertEqual(client.next_event().data, "x")
        assert_nothing_else(self, client, self.server.broker.publish, "b")

    def test_raw_body_publish_and_non_ascii(self):
        client = self.subscribe("topic=t")
        self.subscribed(1)
        body = "l\u00efne 1\r\nline \u263a 2\rline 3".encode()
        status, headers, answer = http_request(
            self.port, "POST", "/publish?topic=t&event=greeting", body,
            {"Content-Type": "text/plain"})
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/json")
        answer = json.loads(answer)
        self.assertEqual((answer["topics"], answer["subscribers"]), (["t"], 1))
        event = client.next_event()
        self.assertEqual((event.type, event.data, event.id),
                         ("greeting", "l\u00efne 1\nline \u263a 2\nline 3", answer["id"]))

    def test_http10_client_gets_close_delimited_stream(self):
        client = self.subscribe("topic=t", version="HTTP/1.0")
        self.assertEqual(client.status, 200)
        self.assertNotIn("transfer-encoding", client.headers)
        self.subscribed(1)
        publish_form(self.port, topic="t", data="plain")
        self.assertEqual(client.next_event().data, "plain")
        self.assertIn(b"\r\n\r\n: connected\nretry: 3000\n", client.raw)
        self.server.shutdown()
        client.read_to_end()
        self.assertTrue(client.closed)
        self.assertTrue(client.raw.endswith(b"\n"))
        self.assertRegex(client.raw, rb"retry: \d+\n$")

    def test_heartbeat_comment_when_idle(self):
        self.use_server(heartbeat_s=0.05)
        client = self.subscribe()
        wait_until(lambda: client.pump() and "heartbeat" in client.parser.comments)
        self.assertEqual(client.parser.empty_dispatches, 0)
        self.assertEqual(list(client.parser.events), [])

    def test_shutdown_ends_streams_with_terminating_chunk(self):
        clients = [self.subscribe() for _ in range(3)]
        self.subscribed(3)
        started = time.monotonic()
        self.server.shutdown()
        self.assertLess(time.monotonic() - started, 2.0)
        for client in clients:
            client.read_to_end()
            self.assertTrue(client.ended, client.raw[-100:])
            retry = client.parser.retry
            self.assertTrue(1000 <= retry <= 5000, retry)
            self.assertTrue(client.raw.endswith(b"\r\n0\r\n\r\n"))


class ConcurrencyTests(ServerTestCase):
    server_options = {"queue_size": 5000}

    def test_eight_publishers_twenty_subscribers(self):
        subscribers = [self.subscribe("topic=load") for _ in range(20)]
        self.subscribed(20)
        errors = []

        def publisher(p):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
            try:
                for n in range(500):    # keep-alive: one connection per publisher
                    connection.request("POST", "/publish?topic=load", body=f"{p}:{n}")
                    response = connection.getresponse()
                    response.read()
                    if response.status != 200:
                        errors.append(response.status)
            finally:
                connection.close()

        threads = [threading.Thread(target=publisher, args=(p,)) for p in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        for client in subscribers:
            events = client.take(4000)
            self.assertEqual(len({e.id for e in events}), 4000)
            for p in range(8):
                mine = [e.data for e in events if e.data.startswith(f"{p}:")]
                self.assertEqual(mine, [f"{p}:{n}" for n in range(500)])
            sequence = [parse_event_id(e.id, self.server.broker.run_id) for e in events]
            self.assertEqual(sequence, sorted(sequence))

    def test_clients_come_and_go_without_leaks(self):
        warm_up = StreamClient(self.port, "topic=w")  # starts the hang-up watcher thread
        warm_up.close()
        self.subscribed(0)
        base_subscribers = self.server.broker.subscriber_count
        wait_until(lambda: self.server.stats()["connections"] == 0, message="connections")
        base_threads = live_threads()
        clients = [StreamClient(self.port, f"topic=c{n % 5}") for n in range(50)]
        self.subscribed(50)
        self.assertEqual(live_threads(), base_threads + 50)
        for client in clients:
            client.close()
        self.subscribed(base_subscribers)
        wait_until(lambda: live_threads() == base_threads, message="threads")
        wait_until(lambda: self.server.stats()["connections"] == 0, message="connections")


class SlowConsumerTests(ServerTestCase):
    server_options = {"queue_size": 20}

    def test_slow_consumer_dropped_others_get_everything(self):
        slow = self.subscribe("topic=t", recv_buffer=4096)      # never reads again
        fast = self.subscribe("topic=t")
        self.subscribed(2)
        payload = "x" * 16_000
        sent = 0
        while self.server.broker.stats()["clients_dropped"] == 0:
            self.assertLess(sent, 2000, "slow consumer was never dropped")
            publish_form(self.port, topic="t", data=f"{sent} {payload}")
            self.assertEqual(fast.next_event().data, f"{sent} {payload}")
            sent += 1
        publish_form(self.port, topic="t", data="after")
        self.assertEqual(fast.next_event().data, "after")
        self.subscribed(1)
        self.assertEqual(self.server.stats()["clients_dropped"], 1)
        slow.sock.settimeout(WAIT_S)   # the dropped client's connection is closed
        with contextlib.suppress(ConnectionResetError):
            while slow.sock.recv(1 << 20):
                pass


class ErrorTests(ServerTestCase):
    def test_error_statuses(self):
        cases = [
            ("GET", "/events", None, {}, 400),
            ("GET", "/events?topic=", None, {}, 400),
            ("GET", "/events?topic=" + "t" * 129, None, {}, 400),
            ("GET", "/events?topic=a%20b", None, {}, 400),
            ("GET", "/events?" + "&".join(f"topic=t{i}" for i in range(33)), None, {}, 400),
            ("POST", "/publish", b"x", {"Content-Type": "text/plain"}, 400),
            ("POST", "/publish?topic=t", b"\xff", {"Content-Type": "text/plain"}, 400),
            ("POST", "/publish?topic=t&event=a%0Ab", b"x", {}, 400),
            ("POST", "/publish?topic=t&event=a%00b", b"x", {}, 400),
            ("POST", "/publish?topic=t&retry=abc", b"x", {}, 400),
            ("POST", "/publish?topic=t", b"x" * (64 * 1024 + 1), {}, 413),
            ("GET", "/nope", None, {}, 404),
            ("POST", "/nope", b"", {}, 404),
            ("PUT", "/events", b"", {}, 405),
            ("HEAD", "/events?topic=t", None, {}, 405),
        ]
        for method, path, body, headers, expected in cases:
            with self.subTest(method=method, path=path[:60]):
                status, answer_headers, answer = http_request(self.port, method, path, body,
                                                              headers)
                self.assertEqual(status, expected, answer)
                self.assertEqual(answer_headers["Content-Type"], "text/plain; charset=utf-8")
                if method != "HEAD":
                    self.assertTrue(answer.strip(), "an error needs a reason")
                    self.assertEqual(answer.count(b"\n"), 1, answer)

    def test_curl_d_hello_is_400_and_publishes_nothing(self):
        client = self.subscribe()
        self.subscribed(1)
        status, _, body = http_request(self.port, "POST", "/publish?topic=t", b"hello",
                                       {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 400)
        self.assertIn(b"data=hello", body)
        assert_nothing_else(self, client, self.server.broker.publish, "t")
        self.assertEqual(self.server.stats()["events_published"], 1)    # the marker

    def test_publishing_once_the_broker_is_closed_is_503(self):
        self.server.broker.close()
        status, headers, body = http_request(self.port, "POST", "/publish?topic=t", b"late",
                                             {"Content-Type": "text/plain"})
        self.assertEqual(status, 503)
        self.assertIn("Retry-After", headers)
        self.assertIn(b"shutting down", body)

    def test_get_publish_is_405_with_allow(self):
        status, headers, body = http_request(self.port, "GET", "/publish")
        self.assertEqual((status, headers["Allow"]), (405, "POST, OPTIONS"))
        self.assertIn(b"POST", body)

    def test_unknown_method_is_501(self):
        answer = raw_exchange(self.port, b"BREW /events HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_of(answer), 501)

    def test_overlong_request_line_is_414(self):
        # just over the 65,536-byte limit, so the server reads all that was sent
        target = b"/events?topic=" + b"t" * 65_540
        answer = raw_exchange(self.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_of(answer), 414)
        self.assertEqual(http_request(self.port, "GET", "/healthz")[0], 200)

    def test_oversized_body_is_refused_without_reading_it(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /publish?topic=t HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100000000\r\n\r\n" + b"x" * 1000)
            answer = sock.recv(65536)
        self.assertEqual(status_of(answer), 413)
        self.assertIn(b"Connection: close", answer)

    def test_publish_response_is_one_piece(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /publish?topic=t HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 2\r\n\r\nhi")
            answer = sock.recv(65536)   # one send from the server: all of it in one recv
            head, body = answer.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            self.assertEqual(len(body), length)
            self.assertEqual(json.loads(body)["topics"], ["t"])
            # keep-alive: the same connection publishes again
            sock.sendall(b"POST /publish?topic=t HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 2\r\n\r\nho")
            self.assertEqual(status_of(sock.recv(65536)), 200)

    def test_healthz_and_stats(self):
        self.assertEqual(http_request(self.port, "GET", "/healthz")[::2], (200, b"ok\n"))
        self.assertEqual(http_request(self.port, "HEAD", "/healthz")[::2], (200, b""))
        client = self.subscribe("topic=s")
        self.subscribed(1)
        publish_form(self.port, topic="s", data="1")
        client.next_event()
        status, headers, body = http_request(self.port, "GET", "/stats")
        stats = json.loads(body)
        self.assertEqual(headers["Content-Type"], "application/json")
        for key, value in {"subscribers": 1, "topics": 1, "events_published": 1,
                           "events_delivered": 1, "clients_dropped": 0}.items():
            self.assertEqual(stats[key], value, key)
        self.assertGreaterEqual(stats["uptime_s"], 0)

    def test_options_lists_methods(self):
        status, headers, _ = http_request(self.port, "OPTIONS", "/publish")
        self.assertEqual((status, headers["Allow"]), (204, "POST, OPTIONS"))


class StaticTests(ServerTestCase):
    def test_index_and_assets(self):
        status, headers, body = http_request(self.port, "GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        self.assertIn(b"EventSource", http_request(self.port, "GET", "/app.js")[2])
        self.assertIn("Content-Security-Policy", headers)
        self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
        with open(os.path.join(HERE, "static", "index.html"), "rb") as file:
            self.assertEqual(body, file.read())
        for path, mime in (("/app.js", "javascript"), ("/style.css", "text/css")):
            self.assertIn(mime, http_request(self.port, "GET", path)[1]["Content-Type"])

    def test_head(self):
        status, headers, body = http_request(self.port, "HEAD", "/")
        self.assertEqual((status, body), (200, b""))
        self.assertGreater(int(headers["Content-Length"]), 0)

    def test_traversal_is_404(self):
        for path in ("/../sse_server.py", "/%2e%2e/sse_server.py", "/%2e%2e%2fsse_server.py",
                     "/static/../../etc/passwd", "/..%2f..%2fetc/passwd", "/.hidden"):
            with self.subTest(path=path):
                answer = raw_exchange(self.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                      f"Connection: close\r\n\r\n".encode())
                self.assertEqual(status_of(answer), 404)
                self.assertNotIn(b"import", answer)


class PublishTokenTests(ServerTestCase):
    server_options = {"publish_token": "s3cret"}

    def test_token_required(self):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            with self.subTest(headers=headers):
                status, answer_headers, _ = http_request(self.port, "POST", "/publish?topic=t",
                                                         b"x", headers)
                self.assertEqual(status, 401)
                self.assertEqual(answer_headers["WWW-Authenticate"], "Bearer")
        status, _, _ = http_request(self.port, "POST", "/publish?topic=t", b"x",
                                    {"Authorization": "Bearer s3cret"})
        self.assertEqual(status, 200)


class RemoteClientHandler(SSERequestHandler):
    """Pretends every client comes from a non-loopback address."""

    def setup(self):
        super().setup()
        self.client_address = ("192.0.2.10", self.client_address[1])


class LoopbackRuleTests(ServerTestCase):
    handler_class = RemoteClientHandler

    def test_remote_publish_refused_without_token(self):
        status, _, body = http_request(self.port, "POST", "/publish?topic=t", b"x")
        self.assertEqual(status, 403)
        self.assertIn(b"--publish-token", body)
        self.subscribe("topic=t")     # subscribing stays open to everyone
        self.subscribed(1)

    def test_remote_publish_allowed_with_token(self):
        self.server.access.publish_token = "tok"
        status, _, _ = http_request(self.port, "POST", "/publish?topic=t", b"x",
                                    {"Authorization": "Bearer tok"})
        self.assertEqual(status, 200)


class ShutdownTests(ServerTestCase):
    def test_shutdown_with_hundreds_of_streams_is_fast(self):
        clients = [StreamClient(self.port, f"topic=t{n % 7}") for n in range(300)]
        self.addCleanup(lambda: [client.close() for client in clients])
        self.subscribed(300)
        idle = socket.create_connection(("127.0.0.1", self.port))   # idle keep-alive
        self.addCleanup(idle.close)
        publishing, refused = threading.Event(), []

        def publish_until_refused():
            for n in itertools.count():
                try:
                    self.server.broker.publish(f"t{n % 7}", str(n))
                except sse_server.ServiceUnavailable:
                    refused.append(n)
                    return
                publishing.set()

        publisher = threading.Thread(target=publish_until_refused)
        publisher.start()
        self.addCleanup(publisher.join, WAIT_S)
        self.assertTrue(publishing.wait(WAIT_S))
        started = time.monotonic()
        self.server.shutdown()      # with publishes in flight
        self.assertLess(time.monotonic() - started, 2.0)
        publisher.join(WAIT_S)
        self.assertEqual(len(refused), 1, "publishing went on after shutdown")
        for client in clients:      # every stream: its events in order, then a clean end
            client.read_to_end()
            self.assertTrue(client.ended, client.raw[-100:])
            self.assertIsNotNone(client.parser.retry)
            numbers = [int(event.data) for event in client.parser.events]
            self.assertEqual(numbers, sorted(numbers))


# --- Replay and faults ----------------------------------------------------------------------

class ReplayTests(ServerTestCase):
    def publish_many(self, topic, count, prefix=""):
        return [self.server.broker.publish(topic, f"{prefix}{n}").id for n in range(count)]

    def test_replay_missed_events_then_live(self):
        client = self.subscribe("topic=r")
        self.subscribed(1)
        ids = self.publish_many("r", 3)
        seen = client.take(3)
        client.close()
        self.subscribed(0)
        missed = self.publish_many("r", 4, prefix="missed")
        again = self.subscribe("topic=r", headers=[f"Last-Event-ID: {seen[-1].id}"])
        self.subscribed(1)
        self.publish_many("r", 2, prefix="live")
        events = again.take(6)
        self.assertEqual([e.data for e in events],
                         ["missed0", "missed1", "missed2", "missed3", "live0", "live1"])
        self.assertEqual([e.id for e in events[:4]], missed)
        self.assertNotIn("reset", [e.type for e in events])
        assert_nothing_else(self, again, self.server.broker.publish, "r")
        self.assertEqual(ids[-1], seen[-1].id)

    def test_multi_topic_replay_in_global_order(self):
        first = self.server.broker.publish("x", "x0").id
        for n in range(1, 7):
            self.server.broker.publish("xyz"[n % 3], f"{'xyz'[n % 3]}{n}")
        client = self.subscribe(f"topic=x&topic=y&lastEventId={first}")
        self.assertEqual([e.data for e in client.take(4)], ["y1", "x3", "y4", "x6"])

    def test_header_wins_over_query_parameter(self):
        ids = self.publish_many("h", 3)
        client = self.subscribe(f"topic=h&lastEventId={ids[0]}",
                                headers=[f"Last-Event-ID: {ids[1]}"])
        self.assertEqual(client.next_event().data, "2")

    def test_foreign_stale_and_garbage_ids_reset_then_full_replay(self):
        self.publish_many("g", 3)
        for stale in ("deadbeef-2", "not-an-id", "%FF", f"{self.server.broker.run_id}-999"):
            with self.subTest(id=stale):
                client = self.subscribe(f"topic=g&lastEventId={urllib.parse.quote(stale)}")
                reset, *events = client.take(4)
                self.assertEqual(reset.type, "reset")
                info = json.loads(reset.data)
                self.assertEqual((info["reason"], info["lastEventId"]),
                                 ("unknown-id", stale))
                self.assertEqual([e.data for e in events], ["0", "1", "2"])
                client.close()

    def test_history_window_exceeded_resets(self):
        self.use_server(history_size=5)
        ids = self.publish_many("w", 10)
        client = self.subscribe("topic=w", headers=[f"Last-Event-ID: {ids[1]}"])
        reset, *events = client.take(6)
        self.assertEqual(json.loads(reset.data)["reason"], "history-exceeded")
        self.assertEqual([e.data for e in events], ["5", "6", "7", "8", "9"])

    def test_publish_and_stats_report_ids(self):
        result = publish_form(self.port, topic="s", data="x")
        self.assertEqual(result["id"], f"{self.server.broker.run_id}-1")
        stats = json.loads(http_request(self.port, "GET", "/stats")[2])
        self.assertEqual(stats["last_event_id"], result["id"])

    def test_history_bound_keeps_memory_bounded(self):
        import tracemalloc
        broker = Broker(history=memory_history(history_size=200))
        tracemalloc.start()
        try:
            for n in range(200):
                broker.publish("m", f"{n:08d}" * 10)
            filled = tracemalloc.get_traced_memory()[0]
            for n in range(2000):       # ten times the history
                broker.publish("m", f"{n:08d}" * 10)
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        self.assertEqual(broker.stats()["events_retained"], 200)
        self.assertLess(after - filled, 20_000)


class ChurnTests(ServerTestCase):
    server_options = {"history_size": 10_000}
    EVENTS = 5000
    SUBSCRIBERS = 10

    def test_no_loss_while_subscribers_are_cut_and_reconnect(self):
        results = {}
        errors = []
        all_connected = threading.Barrier(self.SUBSCRIBERS + 1, timeout=WAIT_S)
        rng = random.Random(7)

        def follow(n):
            got, last_id, connections = [], None, 0
            try:
                while len(got) < self.EVENTS:
                    headers = [f"Last-Event-ID: {last_id}"] if last_id else []
                    try:
                        client = StreamClient(self.port, "topic=churn", headers=headers)
                    except ClosedBeforeHeaders:
                        continue        # cut before the stream started: reconnect
                    connections += 1
                    if connections == 1:
                        all_connected.wait()
                    quota = rng.randint(50, 400)
                    try:
                        for _ in range(quota):
                            event = client.next_event(timeout=WAIT_S)
                            got.append(event.data)
                            last_id = event.id
                            if len(got) == self.EVENTS:
                                break
                    except AssertionError:
                        if not client.closed:
                            raise
                    finally:
                        client.close()      # client-side cut
            except Exception as error:      # reported by the main thread
                errors.append((n, error))
            results[n] = (got, connections)

        def cutter(stop):
            while not stop.wait(0.02):      # server-side cuts, at random
                streams = open_streams(self.server)
                if streams:
                    cut_stream(self.server, rng.choice(streams))

        followers = [threading.Thread(target=follow, args=(n,)) for n in range(self.SUBSCRIBERS)]
        for thread in followers:
            thread.start()
        all_connected.wait()
        self.subscribed(self.SUBSCRIBERS)
        stop = threading.Event()
        cutting = threading.Thread(target=cutter, args=(stop,))
        cutting.start()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
        for n in range(self.EVENTS):
            connection.request("POST", "/publish?topic=churn", body=str(n))
            connection.getresponse().read()
        connection.close()
        for thread in followers:
            thread.join(60)
        stop.set()
        cutting.join(WAIT_S)
        self.assertEqual(errors, [])
        self.assertEqual([thread for thread in followers if thread.is_alive()], [])
        self.assertEqual(sorted(results), list(range(self.SUBSCRIBERS)))   # every follower
        expected = [str(n) for n in range(self.EVENTS)]
        for n, (got, connections) in results.items():
            self.assertEqual(got, expected, f"subscriber {n}")
            self.assertGreater(connections, 5, f"subscriber {n} was hardly cut")


class WriteTimeoutTests(ServerTestCase):
    server_options = {"write_timeout_s": 0.3, "queue_size": 100_000}

    def test_client_that_stops_reading_is_dropped(self):
        stuck = self.subscribe("topic=t", recv_buffer=4096)
        reader = self.subscribe("topic=t")
        self.subscribed(2)
        payload = "y" * 60_000
        sent = 0
        while self.server.broker.subscriber_count == 2:
            self.assertLess(sent, 3000, "the stuck client was never dropped")
            self.server.broker.publish("t", payload)
            sent += 1
            reader.next_event()
        self.subscribed(1)
        self.assertEqual(self.server.stats()["clients_dropped"], 1)
        self.assertEqual(self.server.stats()["clients_dropped_by_reason"], {"write_timeout": 1})
        self.server.broker.publish("t", "still flowing")
        self.assertEqual(reader.next_event().data, "still flowing")
        self.assertTrue(any("write-timeout" in r.getMessage() for r in SERVER_LOG.records))
        wait_until(lambda: any(r.getMessage().endswith("end=write_timeout")
                               for r in SERVER_LOG.records if r.name == "sse_server.access"),
                   message="the dropped stream's access-log line")


class RequestTimeoutTests(ServerTestCase):
    server_options = {"request_timeout_s": 0.5, "heartbeat_s": 0.1}

    def assert_closed_within(self, sock, seconds):
        started = time.monotonic()
        sock.settimeout(WAIT_S)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):
                pass
        self.assertLess(time.monotonic() - started, seconds)

    def test_silent_client_is_dropped(self):
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            self.assert_closed_within(sock, 3)

    def test_slowloris_is_dropped_though_bytes_keep_coming(self):
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"GET /events?topic=t HTTP/1.1\r\n")
            started = time.monotonic()
            with contextlib.suppress(OSError):
                for _ in range(100):         # a header byte every 50 ms, never finishing
                    sock.sendall(b"X")
                    time.sleep(0.05)
            self.assertLess(time.monotonic() - started, 3)
            self.assert_closed_within(sock, 3)

    def test_open_stream_has_no_timeout(self):
        client = self.subscribe()
        # Outlive the request timeout several times over; heartbeats keep coming.
        wait_until(lambda: client.pump(0.5) and client.parser.comments.count("heartbeat") >= 15)
        self.assertFalse(client.closed)
        self.server.broker.publish("t", "late")
        self.assertEqual(client.next_event().data, "late")


def startup_turn_free(server) -> bool:
    """True if a start-up turn is free (checked by taking and returning one)."""
    if not server._startup_turns.acquire(blocking=False):
        return False
    server._startup_turns.release()
    return True


class StartupTests(ServerTestCase):
    """How connections are set up: start-up turns, _thread handler threads."""

    server_options = {"request_timeout_s": 30}

    def test_silent_and_slow_clients_hold_no_startup_turn(self):
        clients = [socket.create_connection(("127.0.0.1", self.port)) for _ in range(20)]
        for client in clients:
            self.addCleanup(client.close)
        clients[0].sendall(b"GET /events?topic=t HTTP/1.1\r\n")    # and no more
        wait_until(lambda: self.server.stats()["connections"] == 20, message="accepted")
        # Each handler gave its turn back when it had to wait for bytes, long
        # before the 30 s request timeout would have ended it.
        wait_until(lambda: startup_turn_free(self.server), timeout=5, message="a free turn")
        self.assertEqual(http_request(self.port, "GET", "/healthz")[0], 200)
        client = self.subscribe()
        self.server.broker.publish("t", "still served")
        self.assertEqual(client.next_event().data, "still served")

    def test_pipelined_requests_hold_the_turn_for_the_first_one_only(self):
        entered, gate = threading.Event(), threading.Event()
        self.addCleanup(gate.set)

        class Handler(SSERequestHandler):
            def _handle_wait(self, url):
                entered.set()
                gate.wait(WAIT_S)
                self._respond(HTTPStatus.OK, b"done\n")

            routes = {**SSERequestHandler.routes, ("GET", "/wait"): _handle_wait}

        server = run_server(self, handler_class=Handler, request_timeout_s=30)
        with socket.create_connection(server.server_address, timeout=WAIT_S) as sock:
            # Both requests arrive at once: the second is read from the buffer.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(entered.wait(WAIT_S))
            self.assertTrue(startup_turn_free(server))
            gate.set()
            answers = b""
            while answers.count(b"HTTP/1.1 200") < 2:
                answers += sock.recv(4096)

    def test_a_turn_is_given_back_once(self):
        turns = threading.BoundedSemaphore(1)
        first = sse_server.StartupTurn(turns, wait_s=WAIT_S)
        second = sse_server.StartupTurn(turns, wait_s=0.01)    # none left: goes ahead
        for turn in (second, second, first, first):
            turn.release()      # a BoundedSemaphore raises if released too often
        self.assertTrue(turns.acquire(blocking=False))

    @unittest.skipUnless(hasattr(threading, "gettrace"), "threading.gettrace is 3.10+")
    def test_handler_threads_get_threading_trace_hooks(self):
        traced_threads = set()

        def tracer(frame, event, arg):
            if frame.f_code.co_name == "_handle_healthz":
                traced_threads.add(threading.get_ident())

        threading.settrace(tracer)
        self.addCleanup(threading.settrace, None)
        self.assertEqual(http_request(self.port, "GET", "/healthz")[0], 200)
        self.assertEqual(len(traced_threads), 1)
        self.assertNotIn(threading.get_ident(), traced_threads)

    def test_streams_work_when_hang_ups_cannot_be_watched(self):
        server = self.start_server(heartbeat_s=0.05)

        def refuse(sock):
            raise OSError("epoll watch limit reached")
        server._hangups.watch = refuse
        client = StreamClient(server.server_address[1], "topic=t")
        server.broker.publish("t", "still served")
        self.assertEqual(client.next_event().data, "still served")
        client.close()      # noticed by a failed heartbeat instead
        wait_until(lambda: server.broker.subscriber_count == 0, message="stream to end")
        wait_until(lambda: server.stats()["connections"] == 0, message="connection to close")

    def test_large_response_is_written_whole(self):
        # More than one direct write can take: the rest goes through sendall.
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        content = os.urandom(8 * 2**20)
        with open(os.path.join(folder, "big.bin"), "wb") as file:
            file.write(content)
        server = self.start_server(static_dir=folder)
        status, headers, body = http_request(server.server_address[1], "GET", "/big.bin")
        self.assertEqual((status, len(body)), (200, len(content)))
        self.assertEqual(body, content)


class VerifyRequestTests(ServerTestCase):
    def test_a_refused_peer_costs_no_thread_and_gets_no_answer(self):
        seen = []

        class Picky(SSEServer):
            def verify_request(self, request, client_address):
                seen.append(client_address[0])
                return False

        server = Picky(("127.0.0.1", 0))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        self.addCleanup(thread.join, WAIT_S)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        answer = raw_exchange(server.server_address[1], b"GET /healthz HTTP/1.1\r\n\r\n")
        self.assertEqual(answer, b"")
        self.assertEqual(seen, ["127.0.0.1"])
        self.assertEqual(server.stats()["connections"], 0)


class MaxClientsTests(ServerTestCase):
    server_options = {"max_clients": 2}

    def test_over_the_limit_gets_503_existing_untouched(self):
        first, second = self.subscribe(), self.subscribe()
        self.subscribed(2)
        status, headers, body = http_request(self.port, "GET", "/events?topic=t")
        self.assertEqual(status, 503)
        self.assertEqual(headers["Retry-After"], "5")
        self.assertIn(b"too many subscribers", body)
        self.server.broker.publish("t", "x")
        self.assertEqual((first.next_event().data, second.next_event().data), ("x", "x"))
        first.close()
        self.subscribed(1)
        self.assertEqual(self.subscribe().status, 200)


class FuzzTests(ServerTestCase):
    """Hundreds of malformed requests while a subscriber listens and events flow."""

    server_options = {"request_timeout_s": 1.0}

    def malformed_requests(self, rng):
        good = b"POST /publish?topic=fz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        yield good[:rng.randint(1, len(good) - 1)]                   # truncated anywhere
        yield b"POST /publish?topic=fz HTTP/1.1\r\nContent-Length: 50\r\n\r\nshort"
        yield b"POST /publish?topic=fz HTTP/1.1\r\nContent-Length: 2\r\n\r\nlonger body"
        yield b"POST /publish?topic=fz HTTP/1.1\r\nContent-Length: ten\r\n\r\nx"
        yield b"POST /publish?topic=fz HTTP/1.1\r\nContent-Length: -1\r\n\r\nx"
        yield b"POST /publish?topic=fz HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx"
        yield b"POST /publish?topic=fz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
        yield b"GET /events?topic=%zz HTTP/1.1\r\n\r\n"
        yield b"GET /events?topic=%ff%fe HTTP/1.1\r\n\r\n"
        yield b"GET /events?topic=\xff\xfe HTTP/1.1\r\n\r\n"
        yield b"GET /events?topic=a%00b HTTP/1.1\r\n\r\n"
        yield b"GET /events?topic=a%0D%0Ab HTTP/1.1\r\n\r\n"
        yield b"POST /publish?topic=fz&event=x%0D%0Ay HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        yield (b"POST /publish HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               b"Content-Length: 12\r\n\r\ntopic=fz&d=\xff")
        yield (b"POST /publish HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               b"Content-Length: 11\r\n\r\ntopic=%%%zz")
        yield b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        yield b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n"
        yield b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"
        yield b"FROB /events HTTP/1.1\r\n\r\n"
        yield b"get /events HTTP/1.1\r\n\r\n"
        yield bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        yield b"\r\n\r\n\r\n"
        yield b"GET /events?topic=t HTTP/1.1\r\nLast-Event-ID: " + b"\x00\x01" * 10 + b"\r\n\r\n"
        yield b"GET\x00/ HTTP/1.1\r\n\r\n"
        yield b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n"
        yield b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n"
        yield b"GET / HTTP/1.1\r\n lead: x\r\nHost: y\r\n\r\n"
        yield b""                                                      # connect, close

    def test_malformed_requests_get_clean_answers(self):
        subscriber = self.subscribe("topic=fz")
        self.subscribed(1)
        rng = random.Random(1234)
        statuses = collections.Counter()
        published = accepted_publishes = 0
        for round_number in range(12):
            for request in self.malformed_requests(rng):
                answer = raw_exchange(self.port, request)
                if not answer:
                    statuses["closed"] += 1
                    continue
                status = status_of(answer)
                statuses[status] += 1
                if status == 200:
                    # Only a prefix that is itself a valid request may succeed: a
                    # publish whose Content-Length cut the body short, or a stream
                    # whose garbage Last-Event-ID gets a reset.
                    if request.startswith(b"POST /publish?topic=fz "):
                        accepted_publishes += 1
                    else:
                        self.assertTrue(request.startswith(b"GET /events?topic=t "), request)
                        self.assertIn(b"event: reset", answer)
                else:
                    self.assertTrue(400 <= status < 500 or status in (501, 505),
                                    (request[:80], answer[:200]))
            self.server.broker.publish("fz", f"event {round_number}")
            published += 1
        self.assertGreater(sum(statuses.values()), 300)
        self.assertGreater(statuses[400], 50)
        self.assertGreater(statuses[501], 0)
        self.assertGreater(statuses[431], 0)
        self.assertGreater(statuses["closed"], 0)
        events = [e.data for e in subscriber.take(published + accepted_publishes)
                  if e.data.startswith("event ")]
        self.assertEqual(events, [f"event {n}" for n in range(published)])
        self.assertEqual(SERVER_LOG.tracebacks(), [])
        self.assertEqual(self.server.broker.subscriber_count, 1)


# --- A real browser --------------------------------------------------------------------------

CHROMIUM = next((path for path in (os.environ.get("SSE_CHROMIUM"), "/usr/bin/chromium",
                                   "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
                 if path and os.path.exists(path)), None)
REQUIRE_BROWSER = os.environ.get("SSE_REQUIRE_BROWSER") == "1"


def read_text(path) -> str:
    """The file's text, or "" while it does not exist yet."""
    try:
        with open(path) as file:
            return file.read()
    except FileNotFoundError:
        return ""


class DevTools:
    """Just enough of a WebSocket client (RFC 6455) to speak the Chrome
    DevTools protocol: masked text frames out, unmasked frames in."""

    def __init__(self, ws_url):
        import base64
        url = urllib.parse.urlsplit(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=WAIT_S)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._recv_some()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"DevTools refused the WebSocket: {head!r}")
        self._next_id = 0
        self.events: list[dict] = []

    def _recv_some(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("DevTools closed the connection")
        return data

    def _read(self, size) -> bytes:
        while len(self._buffer) < size:
            self._buffer += self._recv_some()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _send_frame(self, opcode, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = bytes([0x80 | opcode, 0x80 | size])
        elif size < 1 << 16:
            header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _receive_message(self) -> dict:
        message = b""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size == 126:
                size = int.from_bytes(self._read(2), "big")
            elif size == 127:
                size = int.from_bytes(self._read(8), "big")
            payload = self._read(size)
            opcode = first & 0x0F
            if opcode == 0x9:
                self._send_frame(0xA, payload)      # ping -> pong
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            message += payload
            if first & 0x80:
                return json.loads(message)

    def call(self, method, **params):
        self._next_id += 1
        self._send_frame(0x1, json.dumps({"id": self._next_id, "method": method,
                                          "params": params}).encode())
        while True:
            message = self._receive_message()
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression, **options):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           **options)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        self.sock.close()


@unittest.skipUnless(CHROMIUM or REQUIRE_BROWSER,
                     "Chromium not found (apt-get install chromium); "
                     "set SSE_REQUIRE_BROWSER=1 to make this a failure")
class BrowserTests(unittest.TestCase):
    """The demo page in headless Chromium: open, events, two topics, reconnect, replay."""

    PAGE_EVENTS = ("JSON.stringify([...document.querySelectorAll('#events li')].reverse()"
                   ".map(li => [li.dataset.type, li.dataset.id,"
                   " li.querySelector('.data').textContent]))")

    def setUp(self):
        if not CHROMIUM:
            self.fail("SSE_REQUIRE_BROWSER=1 but no Chromium was found")
        self.baseline_threads = live_threads()
        self.server = self.start_server(0)
        self.port = self.server.server_address[1]
        self.profile = tempfile.mkdtemp(prefix="sse-chromium-")
        self.addCleanup(__import__("shutil").rmtree, self.profile, ignore_errors=True)
        self.browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", "--window-size=1100,900",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(self.stop_browser)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        wait_until(lambda: read_text(port_file).count("\n") >= 1,
                   timeout=20, message="Chromium's DevTools port")
        with open(port_file) as file:
            devtools_port = int(file.readline())
        targets = json.loads(http_request(devtools_port, "GET", "/json/list")[2])
        page = next(target for target in targets if target["type"] == "page")
        self.devtools = DevTools(page["webSocketDebuggerUrl"])
        self.addCleanup(self.devtools.close)
        self.devtools.call("Log.enable")
        self.devtools.call("Runtime.enable")

    def start_server(self, port):
        # (the key is for the Mercure test's private updates; /events topics stay public)
        return run_server(self, port, retry_ms=1500, heartbeat_s=5, jwt_secret=SECRET)

    def stop_browser(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.browser.pid, signal.SIGKILL)
        self.browser.wait(WAIT_S)

    def tearDown(self):
        self.doCleanups()
        wait_until(lambda: live_threads() <= self.baseline_threads,
                   message="threads to end")

    def page_events(self):
        return json.loads(self.devtools.evaluate(self.PAGE_EVENTS))

    def wait_for_state(self, state):
        wait_until(lambda: self.devtools.evaluate(
            "document.getElementById('state')?.dataset.state") == state,
            timeout=WAIT_S, message=f"page state {state}")

    def wait_for_events(self, count):
        wait_until(lambda: len(self.page_events()) >= count, message=f"{count} events on the page")
        events = self.page_events()
        self.assertEqual(len(events), count, events)
        return events

    def test_demo_page_receives_reconnects_and_replays(self):
        started = time.monotonic()
        self.devtools.call("Page.navigate",
                           url=f"http://127.0.0.1:{self.port}/?topics=news,sport&types=greeting")
        self.wait_for_state("open")
        self.assertEqual(self.server.broker.subscriber_count, 1)   # one connection, two topics
        broker = self.server.broker
        first = broker.publish("news", "plain message").id
        broker.publish("news", "h\u00e9llo\nw\u00f6rld \u263a\r\nthird line", event="greeting")
        third = broker.publish("sport", "2:1").id
        self.assertEqual(self.wait_for_events(3), [
            ["message", first, "plain message"],
            ["greeting", f"{broker.run_id}-2", "h\u00e9llo\nw\u00f6rld \u263a\nthird line"],
            ["message", third, "2:1"],
        ])

        # The network drops: the browser reconnects by itself with Last-Event-ID
        # and gets what was published meanwhile, exactly once.
        for stream in open_streams(self.server):
            cut_stream(self.server, stream)
        self.wait_for_state("reconnecting")
        missed = [broker.publish("news", f"missed {n}").id for n in range(2)]
        self.wait_for_state("open")
        broker.publish("sport", "live again")
        events = self.wait_for_events(6)
        self.assertEqual([e[2] for e in events[3:]], ["missed 0", "missed 1", "live again"])
        self.assertEqual([e[1] for e in events[3:5]], missed)

        # The server restarts on the same port: the browser comes back by itself;
        # the new run does not know its id, so it says `reset` and replays all
        # it retains: the events published while the browser was away.
        self.server.stop()
        self.wait_for_state("reconnecting")
        self.server = self.start_server(self.port)
        away = [self.server.broker.publish("news", f"while away {n}").id for n in range(2)]
        self.wait_for_state("open")
        events = self.wait_for_events(9)
        self.assertEqual(events[6][0], "reset")
        self.assertEqual(json.loads(events[6][2])["reason"], "unknown-id")
        self.assertEqual(events[7:], [["message", away[0], "while away 0"],
                                      ["message", away[1], "while away 1"]])

        screenshot = self.devtools.call("Page.captureScreenshot", format="png")["data"]
        folder = os.environ.get("SSE_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="sse-shot-")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "demo-page.png")
        with open(path, "wb") as file:
            file.write(__import__("base64").b64decode(screenshot))
        print(f"\n    screenshot of the demo page: {path}", file=sys.stderr)
        csp_errors = [e for e in self.devtools.events if e.get("method") == "Log.entryAdded"
                      and "Content Security Policy" in e["params"]["entry"]["text"]]
        self.assertEqual(csp_errors, [])
        self.assertLess(time.monotonic() - started, 30)


    def test_event_source_on_the_mercure_hub_with_a_template_and_the_cookie(self):
        self.devtools.call("Page.navigate", url=f"http://127.0.0.1:{self.port}/")
        wait_until(lambda: self.devtools.evaluate("document.readyState") == "complete",
                   message="the page to load")
        reader = token(mercure={"subscribe": ["https://example.com/users/{id}"]})
        hub = f"http://127.0.0.1:{self.port}{MERCURE}?" + mercure_query(
            "https://example.com/books/{id}")
        # The first EventSource has no token; the second sends the cookie, as
        # a browser does when the page's origin set it.
        self.devtools.evaluate(f"""(() => {{
            window.got = {{anonymous: [], withCookie: []}};
            const open = (name) => {{
                const source = new EventSource({json.dumps(hub)});
                source.onmessage = (e) => window.got[name].push([e.lastEventId, e.data]);
                return new Promise((resolve) => {{ source.onopen = resolve; }});
            }};
            window.ready = open("anonymous").then(() => {{
                document.cookie = "mercureAuthorization={reader}; path=/";
                return open("withCookie");
            }}).then(() => "open");
        }})()""")
        self.assertEqual(self.devtools.evaluate("window.ready", awaitPromise=True), "open")
        wait_until(lambda: self.server.stats()["mercure_subscribers"] == 2,
                   message="two EventSources on the hub")
        publisher = token(mercure={"publish": ["*"]})
        ids = []
        for fields in ([("topic", "https://example.com/books/1"),
                        ("topic", "https://example.com/users/7"), ("data", "private news"),
                        ("private", "on")],
                       [("topic", "https://example.com/books/2"), ("data", "line 1\nline 2")],
                       [("topic", "https://example.com/authors/1"), ("data", "not selected")],
                       [("topic", "https://example.com/books/3"), ("data", "last")]):
            status, _, body = mercure_post(self.port, fields, publisher)
            self.assertEqual(status, 200, body)
            ids.append(body.decode())
        got = lambda: json.loads(self.devtools.evaluate("JSON.stringify(window.got)"))
        wait_until(lambda: len(got()["withCookie"]) == 3 and len(got()["anonymous"]) == 2,
                   message="the updates in the browser")
        self.assertEqual(got(), {
            "anonymous": [[ids[1], "line 1\nline 2"], [ids[3], "last"]],
            "withCookie": [[ids[0], "private news"], [ids[1], "line 1\nline 2"],
                           [ids[3], "last"]]})


# --- Access control and hardening -------------------------------------------------------------

SECRET = "test-secret-that-is-long-enough"


def token(now=None, **claims):
    return sse_server.encode_jwt(claims, SECRET.encode())


def forged_tokens():
    """(name, token) pairs that must all be refused with 401."""
    good = token(sse={"subscribe": ["*"], "publish": ["*"]})
    header, payload, signature = good.split(".")
    b64 = lambda data: __import__("base64").urlsafe_b64encode(data).rstrip(b"=").decode()
    tampered = b64(json.dumps({"sse": {"subscribe": ["*"], "publish": ["*"]},
                               "admin": True}).encode())
    return [
        ("alg none", b64(b'{"alg":"none","typ":"JWT"}') + "." + payload + "."),
        ("alg HS512", b64(b'{"alg":"HS512"}') + "." + payload + "." + signature),
        ("no alg", b64(b'{"typ":"JWT"}') + "." + payload + "." + signature),
        ("wrong secret", sse_server.encode_jwt({"sse": {"subscribe": ["*"]}}, b"other")),
        ("tampered payload", header + "." + tampered + "." + signature),
        ("expired", token(exp=time.time() - 3600, sse={"subscribe": ["*"], "publish": ["*"]})),
        ("not yet valid", token(nbf=time.time() + 3600, sse={"subscribe": ["*"], "publish": ["*"]})),
        ("oversized", token(sse={"subscribe": ["*"], "publish": ["*"]}, pad="x" * 9000)),
        ("garbage base64", "abc.d!f.ghi"),
        ("two parts", header + "." + payload),
        ("header not JSON", b64(b"{nope") + "." + payload + "." + signature),
        ("string exp", token(exp="tomorrow", sse={"subscribe": ["*"], "publish": ["*"]})),
        ("not a JWT", "hello"),
    ]


class JWTTests(unittest.TestCase):
    def test_valid_token_round_trip(self):
        claims = {"sse": {"subscribe": ["a"]}, "exp": time.time() + 60}
        self.assertEqual(sse_server.decode_jwt(token(**claims), SECRET.encode(),
                                               now=time.time()), claims)

    def test_forged_tokens_are_refused(self):
        for name, forged in forged_tokens():
            with self.subTest(name), self.assertRaises(HTTPError) as caught:
                sse_server.decode_jwt(forged, SECRET.encode(), now=time.time())
            self.assertEqual(caught.exception.status, 401)

    def test_leeway_on_exp_and_nbf(self):
        now = 1_000_000
        decode = lambda **claims: sse_server.decode_jwt(token(**claims), SECRET.encode(), now=now)
        decode(exp=now - 20)                    # within 30 s of skew
        decode(nbf=now + 20)
        for claims in ({"exp": now - 40}, {"nbf": now + 40}):
            with self.subTest(claims=claims), self.assertRaises(HTTPError):
                decode(**claims)

    def test_selectors(self):
        allowed = sse_server.topic_allowed
        self.assertTrue(allowed(["orders/*"], "orders/1"))
        self.assertTrue(allowed(["orders/*"], "orders/"))
        self.assertFalse(allowed(["orders/*"], "order"))
        self.assertTrue(allowed(["a", "b"], "b"))
        self.assertFalse(allowed(["a"], "ab"))
        self.assertTrue(allowed(["*"], "anything"))
        self.assertFalse(allowed([], "a"))


def b64url(data: bytes) -> str:
    return __import__("base64").urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@unittest.skipUnless(OPENSSL or REQUIRE_BROWSER, "openssl not found to make RSA test keys")
class RS256Tests(unittest.TestCase):
    """RS256 tokens, signed by the openssl command line, verified by ours."""

    @classmethod
    def setUpClass(cls):
        if not OPENSSL:
            raise AssertionError("openssl is needed to make the RSA test keys")
        cls.folder = tempfile.TemporaryDirectory()
        cls.key, cls.public_pem = cls.make_key("key", 2048)
        cls.other_key, _ = cls.make_key("other", 2048)
        cls.pkcs1_pem = cls.openssl("rsa", "-in", cls.key, "-RSAPublicKey_out").decode()
        cls.public = sse_server.RSAPublicKey.from_pem(cls.public_pem)
        cls.public_path = os.path.join(cls.folder.name, "public.pem")
        with open(cls.public_path, "w") as file:
            file.write(cls.public_pem)

    @classmethod
    def tearDownClass(cls):
        cls.folder.cleanup()

    @classmethod
    def openssl(cls, *args, data: bytes = b"") -> bytes:
        return subprocess.run([OPENSSL, *args], input=data, capture_output=True, check=True,
                              timeout=WAIT_S).stdout

    @classmethod
    def make_key(cls, name: str, bits: int, algorithm: str = "RSA") -> tuple[str, str]:
        path = os.path.join(cls.folder.name, f"{name}.pem")
        options = (["-pkeyopt", f"rsa_keygen_bits:{bits}"] if algorithm == "RSA"
                   else ["-pkeyopt", "ec_paramgen_curve:prime256v1"])
        cls.openssl("genpkey", "-algorithm", algorithm, *options, "-out", path)
        return path, cls.openssl("pkey", "-in", path, "-pubout").decode()

    @classmethod
    def sign(cls, claims: dict, key=None, header=None) -> str:
        signing_input = (b64url(json.dumps(header or {"alg": "RS256", "typ": "JWT"}).encode())
                         + "." + b64url(json.dumps(claims).encode()))
        signature = cls.openssl("dgst", "-sha256", "-sign", key or cls.key,
                                data=signing_input.encode())
        return signing_input + "." + b64url(signature)

    def decode(self, token, keys=None):
        return sse_server.decode_jwt(token, keys or self.public, now=time.time())

    def test_a_token_signed_by_the_key_is_accepted_in_either_pem_form(self):
        claims = {"sub": "alice", "sse": {"subscribe": ["*"]}}
        self.assertEqual(self.decode(self.sign(claims)), claims)
        pkcs1 = sse_server.RSAPublicKey.from_pem(self.pkcs1_pem)
        self.assertEqual(pkcs1, self.public)
        self.assertEqual(self.decode(self.sign(claims), pkcs1), claims)

    def test_forged_tokens_are_refused(self):
        good = self.sign({"sub": "alice"})
        header, payload, signature = good.split(".")
        raw = __import__("base64").urlsafe_b64decode(signature + "==")
        n_bytes = self.public.n.to_bytes(len(raw), "big")
        mallory = b64url(json.dumps({"sub": "mallory"}).encode())
        alg_none = b64url(json.dumps({"alg": "none"}).encode())
        cases = {
            "another key": self.sign({"sub": "alice"}, key=self.other_key),
            "truncated signature": f"{header}.{payload}.{b64url(raw[:-1])}",
            "padded signature": f"{header}.{payload}.{b64url(bytes(1) + raw)}",
            "signature not below the modulus": f"{header}.{payload}.{b64url(n_bytes)}",
            "tampered payload": f"{header}.{mallory}.{signature}",
            "alg none": f"{alg_none}.{payload}.",
            "HS256 with the PEM as its secret": sse_server.encode_jwt(
                {"sub": "alice"}, self.public_pem.encode()),
            "RS512 named": self.sign({"sub": "alice"}, header={"alg": "RS512"}),
        }
        for name, forged in cases.items():
            with self.subTest(name), self.assertRaises(HTTPError) as caught:
                self.decode(forged)
            self.assertEqual(caught.exception.status, 401)

    def test_each_key_takes_only_its_own_algorithm(self):
        keys = [sse_server.HMACKey(SECRET.encode()), self.public]
        self.assertEqual(self.decode(self.sign({"a": 1}), keys), {"a": 1})
        self.assertEqual(self.decode(token(a=2), keys), {"a": 2})
        with self.assertRaises(HTTPError):      # an HS256 token, but no secret configured
            self.decode(token(a=3))

    def test_keys_that_are_not_usable_rsa_public_keys_are_refused(self):
        _, small = self.make_key("small", 1024)
        _, ec = self.make_key("ec", 0, algorithm="EC")
        certificate = self.openssl("req", "-x509", "-key", self.key, "-subj", "/CN=x",
                                   "-days", "1").decode()
        cases = {"1024 bits": (small, "at least 2048"), "EC": (ec, "not an RSA key"),
                 "certificate": (certificate, "openssl x509 -pubkey"),
                 "garbage": ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
                             "DER"),
                 "private key": (read_text(self.key), "not a PEM public key")}
        for name, (pem, says) in cases.items():
            with self.subTest(name), self.assertRaises(ValueError) as caught:
                sse_server.RSAPublicKey.from_pem(pem)
            self.assertIn(says, str(caught.exception))

    def test_a_server_with_the_public_key_checks_subscribers_and_publishers(self):
        server = run_server(self, jwt_public_key=self.public_path, private_topics=["private/*"])
        port = server.server_address[1]
        allowed = self.sign({"sse": {"subscribe": ["private/*"], "publish": ["private/x"]}})
        client = StreamClient(port, "topic=private/x",
                              headers=[f"Authorization: Bearer {allowed}"])
        self.addCleanup(client.close)
        self.assertEqual(client.status, 200)
        status, _, _ = http_request(port, "POST", "/publish?topic=private/x", b"hi",
                                    {"Authorization": f"Bearer {allowed}",
                                     "Content-Type": "text/plain"})
        self.assertEqual(status, 200)
        self.assertEqual(client.next_event().data, "hi")
        forged = self.sign({"sse": {"subscribe": ["*"]}}, key=self.other_key)
        status, _, _ = http_request(port, "GET", "/events?topic=private/x",
                                    headers={"Authorization": f"Bearer {forged}"})
        self.assertEqual(status, 401)

    def test_the_command_line_refuses_an_unusable_key_file(self):
        process = run_command_line("--jwt-public-key", self.key)   # a private key
        self.assertEqual(process.returncode, 2)
        self.assertIn("--jwt-public-key: not a PEM public key", process.stderr)


class AccessPolicyTests(unittest.TestCase):
    def policy(self, **options):
        return sse_server.AccessPolicy(jwt_secret=SECRET, **options)

    def assert_status(self, status, function, *args):
        with self.assertRaises(HTTPError) as caught:
            function(*args)
        self.assertEqual(caught.exception.status, status)

    def test_private_topics(self):
        policy = self.policy(private_topics=["orders/*", "admin"])
        exact = token(sse={"subscribe": ["orders/1"]})
        prefix = token(sse={"subscribe": ["orders/*"]})
        self.assertIsNone(policy.check_subscribe(["news"], None))   # public stays open
        self.assert_status(401, policy.check_subscribe, ["orders/1"], None)
        self.assert_status(401, policy.check_subscribe, ["admin"], None)
        policy.check_subscribe(["orders/1", "news"], exact)
        self.assert_status(403, policy.check_subscribe, ["orders/2"], exact)
        policy.check_subscribe(["orders/2", "orders/3"], prefix)
        self.assert_status(403, policy.check_subscribe, ["admin"], prefix)
        self.assert_status(401, policy.check_subscribe, ["news"], "garbage")

    def test_require_auth_closes_every_topic(self):
        policy = self.policy(require_auth=True)
        self.assert_status(401, policy.check_subscribe, ["news"], None)
        self.assert_status(403, policy.check_subscribe, ["news"], token(sse={"subscribe": ["x"]}))
        expires = time.time() + 60
        self.assertEqual(policy.check_subscribe(
            ["news"], token(exp=expires, sse={"subscribe": ["*"]})), expires)

    def test_publish_claims_per_topic(self):
        policy = self.policy(publish_token="shared")
        allowed = policy.check_publisher("127.0.0.1", None, token(sse={"publish": ["a", "p/*"]}))
        policy.check_publish_topics(allowed, ["a", "p/q"])
        self.assert_status(403, policy.check_publish_topics, allowed, ["a", "b"])
        self.assertIsNone(policy.check_publisher("192.0.2.1", "shared", None))
        self.assert_status(401, policy.check_publisher, "127.0.0.1", None, None)
        self.assert_status(401, policy.check_publisher, "127.0.0.1", "wrong", "wrong")
        no_claim = policy.check_publisher("127.0.0.1", None, token(sse={"subscribe": ["*"]}))
        self.assert_status(403, policy.check_publish_topics, no_claim, ["a"])

    def test_private_topics_need_a_secret(self):
        with self.assertRaises(ValueError):
            sse_server.AccessPolicy(private_topics=["a"])
        with self.assertRaises(HTTPError):
            self.policy(private_topics=["bad pattern"])


class RateLimiterTests(unittest.TestCase):
    def test_bucket(self):
        now = [0.0]
        limiter = sse_server.RateLimiter(2, 3, clock=lambda: now[0], max_keys=2)
        self.assertEqual([limiter.acquire("a") for _ in range(3)], [0, 0, 0])
        self.assertAlmostEqual(limiter.acquire("a"), 0.5)
        self.assertEqual(limiter.acquire("b"), 0)       # per key
        now[0] = 0.5
        self.assertEqual(limiter.acquire("a"), 0)
        self.assertGreater(limiter.acquire("a"), 0)
        limiter.acquire("c")                            # forgets the least recent key
        self.assertEqual(len(limiter._buckets), 2)


class JWTServerTests(ServerTestCase):
    server_options = {"jwt_secret": SECRET, "private_topics": ["private/*"],
                      "publish_token": "shared"}

    def test_anonymous_clients_get_public_topics_only(self):
        self.assertEqual(self.subscribe("topic=news").status, 200)
        status, headers, body = http_request(self.port, "GET", "/events?topic=private/x")
        self.assertEqual(status, 401)
        self.assertIn("Bearer", headers["WWW-Authenticate"])
        self.assertIn(b"needs a token", body)

    def test_token_from_header_cookie_or_query(self):
        good = token(sse={"subscribe": ["private/*"]})
        clients = [
            self.subscribe("topic=private/x", headers=[f"Authorization: Bearer {good}"]),
            self.subscribe("topic=private/x", headers=[f"Cookie: theme=dark; sse_token={good}"]),
            self.subscribe(f"topic=private/x&access_token={good}"),
        ]
        self.subscribed(3)
        self.server.broker.publish("private/x", "secret news")
        for client in clients:
            self.assertEqual(client.status, 200)
            self.assertEqual(client.next_event().data, "secret news")

    def test_token_covers_exactly_its_topics(self):
        exact = token(sse={"subscribe": ["private/a"]})
        status = lambda query: http_request(self.port, "GET", f"/events?{query}",
                                            headers={"Authorization": f"Bearer {exact}"})[0]
        self.assertEqual(status("topic=private/b"), 403)
        self.assertEqual(status("topic=private/a&topic=private/b"), 403)
        client = self.subscribe("topic=private/a&topic=news",
                                headers=[f"Authorization: Bearer {exact}"])
        self.assertEqual(client.status, 200)

    def test_forged_tokens_get_401_without_traceback(self):
        for name, forged in forged_tokens():
            with self.subTest(name):
                status, _, _ = http_request(self.port, "GET", "/events?topic=private/x",
                                            headers={"Authorization": f"Bearer {forged}"})
                self.assertEqual(status, 401)
                status, _, _ = http_request(self.port, "POST", "/publish?topic=news", b"x",
                                            {"Authorization": f"Bearer {forged}"})
                self.assertEqual(status, 401)
        self.assertEqual(SERVER_LOG.tracebacks(), [])

    def test_publish_needs_a_claim_for_every_topic(self):
        publisher = token(sse={"publish": ["news"]})
        publish = lambda query, bearer: http_request(
            self.port, "POST", f"/publish?{query}", b"x", {"Authorization": f"Bearer {bearer}"})[0]
        self.assertEqual(publish("topic=news", publisher), 200)
        self.assertEqual(publish("topic=news&topic=private/x", publisher), 403)
        self.assertEqual(publish("topic=private/x", "shared"), 200)      # the shared token
        self.assertEqual(http_request(self.port, "POST", "/publish?topic=news", b"x")[0], 401)

    def test_query_tokens_never_reach_the_log(self):
        secret_token = token(sse={"subscribe": ["private/*"]})
        SERVER_LOG.records.clear()
        client = self.subscribe(f"topic=private/x&access_token={secret_token}")
        self.subscribed(1)
        http_request(self.port, "GET", f"/events?access_token={secret_token}&topic=bad%20topic")
        wait_until(lambda: any("access_token=[redacted]" in r.getMessage()
                               for r in SERVER_LOG.records), message="the 400's log line")
        logged = "\n".join(record.getMessage() for record in SERVER_LOG.records)
        self.assertNotIn(secret_token.split(".")[2], logged)
        client.close()

    def test_stream_ends_when_the_token_expires(self):
        expiring = token(exp=time.time() + 1.0, sse={"subscribe": ["private/*"]})
        client = self.subscribe("topic=private/x", headers=[f"Authorization: Bearer {expiring}"])
        self.subscribed(1)
        self.server.broker.publish("private/x", "before expiry")
        self.assertEqual(client.next_event().data, "before expiry")
        client.read_to_end(timeout=5)
        self.assertTrue(client.ended)
        self.assertIn("token expired", client.parser.comments)
        self.subscribed(0)
        self.assertEqual(self.server.stats()["clients_dropped_by_reason"], {"token_expired": 1})
        # Reconnecting with the expired token is refused (leeway aside, it is stale).
        stale = token(exp=time.time() - 60, sse={"subscribe": ["private/*"]})
        self.assertEqual(http_request(self.port, "GET", "/events?topic=private/x",
                                      headers={"Authorization": f"Bearer {stale}"})[0], 401)


class CORSTests(ServerTestCase):
    server_options = {"cors_origins": ["https://app.example"]}

    def test_listed_origin_gets_cors_headers_with_credentials(self):
        client = self.subscribe(headers=["Origin: https://app.example"])
        self.assertEqual(client.headers["access-control-allow-origin"], "https://app.example")
        self.assertEqual(client.headers["access-control-allow-credentials"], "true")
        status, headers, _ = http_request(self.port, "POST", "/publish?topic=t", b"x",
                                          {"Origin": "https://app.example"})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]),
                         (200, "https://app.example"))

    def test_other_origins_get_none(self):
        client = self.subscribe(headers=["Origin: https://evil.example"])
        self.assertNotIn("access-control-allow-origin", client.headers)
        _, headers, _ = http_request(self.port, "POST", "/publish?topic=t", b"x",
                                     {"Origin": "https://evil.example"})
        self.assertNotIn("Access-Control-Allow-Origin", headers)

    def test_preflight(self):
        request = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization, content-type"}
        status, headers, _ = http_request(self.port, "OPTIONS", "/publish", headers=request)
        self.assertEqual(status, 204)
        self.assertEqual(headers["Access-Control-Allow-Origin"], "https://app.example")
        self.assertIn("POST", headers["Access-Control-Allow-Methods"])
        self.assertIn("Authorization", headers["Access-Control-Allow-Headers"])
        self.assertIn("Content-Type", headers["Access-Control-Allow-Headers"])
        request["Origin"] = "https://evil.example"
        status, headers, _ = http_request(self.port, "OPTIONS", "/publish", headers=request)
        self.assertEqual(status, 204)
        self.assertNotIn("Access-Control-Allow-Origin", headers)
        self.assertNotIn("Access-Control-Allow-Methods", headers)

    def test_wildcard_never_allows_credentials(self):
        self.use_server(cors_origins=["*"])
        client = self.subscribe(headers=["Origin: https://any.example"])
        self.assertEqual(client.headers["access-control-allow-origin"], "*")
        self.assertNotIn("access-control-allow-credentials", client.headers)




@unittest.skipUnless(OPENSSL or REQUIRE_BROWSER, "openssl not found to make a test certificate")
class TLSTests(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        if not OPENSSL:
            raise AssertionError("openssl is needed to make the test certificate")
        cls.folder = tempfile.TemporaryDirectory()
        cls.cert = os.path.join(cls.folder.name, "cert.pem")
        cls.key = os.path.join(cls.folder.name, "key.pem")
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", cls.key, "-out", cls.cert],
                       check=True, capture_output=True, timeout=WAIT_S)

    @classmethod
    def tearDownClass(cls):
        cls.folder.cleanup()

    def setUp(self):
        self.server_options = {"certfile": self.cert, "keyfile": self.key,
                               "request_timeout_s": 0.5}
        super().setUp()
        import ssl
        self.tls = ssl.create_default_context(cafile=self.cert)

    def test_round_trip_over_tls(self):
        self.assertTrue(self.server.url.startswith("https://"))
        client = self.subscribe("topic=secure", tls=self.tls)
        self.assertEqual(client.status, 200)
        self.subscribed(1)
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls,
                                                 timeout=WAIT_S)
        connection.request("POST", "/publish?topic=secure", body="over tls")
        self.assertEqual(connection.getresponse().status, 200)
        connection.close()
        event = client.next_event()
        self.assertEqual(event.data, "over tls")
        self.assertEqual(client.sock.version()[:6], "TLSv1.")
        self.assertIn(client.sock.version(), ("TLSv1.2", "TLSv1.3"))

    def test_a_client_that_leaves_is_noticed_at_once_as_over_plain_http(self):
        """No heartbeat for a minute: only the hang-up watcher can notice."""
        self.use_server(certfile=self.cert, keyfile=self.key, heartbeat_s=60)
        for how in ("close", "close_notify", "reset"):
            with self.subTest(how=how):
                client = StreamClient(self.port, "topic=t", tls=self.tls)
                self.subscribed(1)
                if how == "close_notify":       # TLS's goodbye, then the FIN
                    client.sock.settimeout(0.2)
                    with contextlib.suppress(OSError):
                        client.sock.unwrap()    # (waits for a reply that never comes)
                elif how == "reset":
                    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                client.close()
                wait_until(lambda: self.server.stats()["subscribers"] == 0, timeout=3,
                           message=f"a {how} to be noticed")
        client = self.subscribe("topic=t", tls=self.tls)    # and the server serves on
        self.subscribed(1)
        assert_nothing_else(self, client, self.server.broker.publish, "t")

    def test_a_client_silent_before_the_handshake_holds_no_startup_turn(self):
        server = self.start_server(certfile=self.cert, keyfile=self.key, request_timeout_s=30)
        with socket.create_connection(server.server_address):     # and silent
            wait_until(lambda: server.stats()["connections"] == 1, message="accepted")
            wait_until(lambda: startup_turn_free(server), timeout=5, message="a free turn")

    def test_plain_http_to_the_tls_port_does_not_hang(self):
        threads = live_threads()
        started = time.monotonic()
        answer = raw_exchange(self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(b"ok", answer)
        with socket.create_connection(("127.0.0.1", self.port)) as silent:
            silent.settimeout(WAIT_S)
            with contextlib.suppress(ConnectionResetError):
                self.assertEqual(silent.recv(100), b"")     # handshake timed out: closed
        self.assertLess(time.monotonic() - started, 3)
        wait_until(lambda: live_threads() <= threads, message="handler threads")
        self.assertEqual(SERVER_LOG.tracebacks(), [])


class ClientLimitTests(ServerTestCase):
    server_options = {"max_clients_per_ip": 2, "publish_rate": 1, "publish_burst": 3,
                      "max_header_bytes": 2048}

    def test_streams_per_address(self):
        first, _ = self.subscribe(), self.subscribe()
        self.subscribed(2)
        status, headers, body = http_request(self.port, "GET", "/events?topic=t")
        self.assertEqual((status, headers["Retry-After"]), (503, "5"))
        self.assertIn(b"too many streams from 127.0.0.1", body)
        first.close()
        self.subscribed(1)
        self.assertEqual(self.subscribe().status, 200)

    def test_publish_rate(self):
        statuses = [http_request(self.port, "POST", "/publish?topic=t", b"x")
                    for _ in range(4)]
        self.assertEqual([s[0] for s in statuses], [200, 200, 200, 429])
        self.assertGreaterEqual(int(statuses[3][1]["Retry-After"]), 1)

    def test_header_section_limit(self):
        answer = raw_exchange(self.port, b"GET /healthz HTTP/1.1\r\n" +
                              b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(30)) +
                              b"\r\n")
        self.assertEqual(status_of(answer), 431)
        self.assertEqual(http_request(self.port, "GET", "/healthz")[0], 200)


# --- Several instances through Redis ------------------------------------------------------------

REDIS_SERVER = __import__("shutil").which("redis-server")
REQUIRE_REDIS = os.environ.get("SSE_REQUIRE_REDIS") == "1"
try:
    import redis as redis_package
except ImportError:
    redis_package = None


def candidate_ports(count: int = 8) -> list[int]:
    """Ports for a child server (redis-server, nginx) that cannot bind port 0
    and tell us: below the kernel's ephemeral range, so no connection on
    this machine is given one meanwhile. A child that still finds its port
    taken is started again on the next one. (Reserving a port with bind()
    and letting it go before the child binds it would be a race.)"""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            low = int(file.read().split()[0])
    return random.sample(range(10_000, max(low, 10_100)), count)


def start_on_a_free_port(start) -> None:
    """Call start(port) with candidate ports until one is not taken: start
    raises PortTaken when the child could not bind."""
    for port in candidate_ports():
        try:
            return start(port)
        except PortTaken:
            continue
    raise AssertionError("no free port found for a child server")


class PortTaken(Exception):
    pass


class RedisProcess:
    """A real redis-server on a free loopback port, with its data in a temp dir."""

    def __init__(self):
        self.folder = tempfile.TemporaryDirectory(prefix="sse-redis-")
        self.port = None        # chosen at the first start, kept for restarts
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        if self.port is None:
            start_on_a_free_port(self._start)
        else:
            self._start(self.port)

    def _start(self, port):
        self.port = port
        # appendfsync always: what Redis accepted survives the restart in the tests.
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.folder.name, "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_package.Redis(port=self.port, socket_connect_timeout=1)
        try:
            wait_until(lambda: self._pings(client), message="redis-server to start")
        finally:
            client.close()

    def _pings(self, client) -> bool:
        if self.process.poll() is not None:     # it could not bind its port
            raise PortTaken()
        try:
            return client.ping()
        except redis_package.ConnectionError:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(WAIT_S)

    def cleanup(self):
        self.stop()
        self.folder.cleanup()


@unittest.skipUnless((REDIS_SERVER and redis_package) or REQUIRE_REDIS,
                     "redis-server or the redis package is missing (apt-get install "
                     "redis-server; pip install redis); set SSE_REQUIRE_REDIS=1 to fail instead")
class RedisTests(unittest.TestCase):
    """Two instances on one real Redis."""

    def setUp(self):
        if not (REDIS_SERVER and redis_package):
            self.fail("SSE_REQUIRE_REDIS=1 but redis-server or the redis package is missing")
        self.baseline_threads = live_threads()
        self.redis = RedisProcess()
        self.addCleanup(self.redis.cleanup)
        self.redis.start()
        self.a = self.start_instance()
        self.b = self.start_instance()

    def start_instance(self):
        server = run_server(self, redis_url=self.redis.url, heartbeat_s=0.2,
                            queue_size=10_000)  # the trimming tests publish in bursts
        wait_until(lambda: server.broker.health()[0], message="instance connected to redis")
        return server

    def tearDown(self):
        self.doCleanups()
        wait_until(lambda: live_threads() <= self.baseline_threads,
                   message=f"threads to end (back to {self.baseline_threads})")

    def subscribe(self, server, query, **kwargs):
        client = StreamClient(server.server_address[1], query, **kwargs)
        self.addCleanup(client.close)
        return client

    @staticmethod
    def publish(server, query, body):
        status, _, answer = http_request(server.server_address[1], "POST",
                                         f"/publish?{query}", body)
        return status, json.loads(answer) if status == 200 else answer

    def test_mercure_updates_cross_instances_with_privacy_and_templates(self):
        hub = run_server(self, redis_url=self.redis.url, jwt_secret=SECRET, heartbeat_s=0.2)
        wait_until(lambda: hub.broker.health()[0], message="instance connected to redis")
        hub_port = hub.server_address[1]
        publisher = token(mercure={"publish": ["*"]})
        reader = token(mercure={"subscribe": ["urn:book:{n}"]})
        live = StreamClient(hub_port, mercure_query("urn:book:{n}", authorization=reader),
                            path=MERCURE)
        self.addCleanup(live.close)
        wait_until(lambda: hub.broker.subscriber_count == 1)
        ids = []
        for fields in ([("topic", "urn:book:1"), ("data", "secret"), ("private", "on")],
                       [("topic", "urn:x,y"), ("topic", "urn:book:2"), ("data", "public")],
                       [("topic", "urn:author:1"), ("data", "other")]):
            status, _, body = mercure_post(self.a.server_address[1], fields)  # (loopback)
            self.assertEqual(status, 200, body)
            ids.append(body.decode())
        self.assertTrue(all(i.startswith("urn:sse:") for i in ids), ids)
        # A publisher's own id is not kept by Redis: the hub assigns its own
        # (which the draft allows), and says which in the answer.
        status, _, body = mercure_post(self.a.server_address[1], [
            ("topic", "urn:author:2"), ("data", "named"), ("id", "urn:uuid:1")])
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"urn:sse:"), body)
        # An id the draft forbids is still refused, though it would not be kept.
        for bad in ("#x", "a\rb", "urn:sse:x-1"):
            with self.subTest(bad_id=bad):
                status, _, body = mercure_post(self.a.server_address[1], [
                    ("topic", "urn:author:2"), ("data", "bad"), ("id", bad)])
                self.assertEqual(status, 400, body)
        self.assertEqual([(e.data, e.id) for e in live.take(2)],
                         [("secret", ids[0]), ("public", ids[1])])
        for query, expected in [
                (mercure_query("urn:book:{n}", lastEventID="earliest"), ["public"]),
                (mercure_query("urn:book:{n}", lastEventID=ids[0], authorization=reader),
                 ["public"]),
                (mercure_query("urn:book:{n}", lastEventID="earliest", authorization=reader),
                 ["secret", "public"])]:
            with self.subTest(query=query):
                client = StreamClient(hub_port, query, path=MERCURE)
                self.addCleanup(client.close)
                self.assertEqual([e.data for e in client.take(len(expected))], expected)
                status, _, _ = mercure_post(hub_port, [("topic", "urn:book:3"),
                                                       ("data", "marker")], publisher)
                self.assertEqual(status, 200)
                self.assertEqual(client.next_event().data, "marker")

    def test_metrics_report_redis_health(self):
        status, _, body = http_request(self.a.server_address[1], "GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"\nsse_redis_connected 1\n", body)
        self.assertIn(b"\nsse_redis_reconnects_total 0\n", body)
        self.assertNotIn(b"sse_events_retained", body)     # Redis keeps the history

    def test_events_from_either_instance_reach_both_in_one_order(self):
        on_a = self.subscribe(self.a, "topic=x&topic=y")
        on_b = self.subscribe(self.b, "topic=x")
        wait_until(lambda: self.a.broker.subscriber_count == 1 and
                   self.b.broker.subscriber_count == 1)
        ids = [self.publish(self.b, "topic=x", b"b1")[1]["id"],
               self.publish(self.a, "topic=y", b"a1")[1]["id"],
               self.a.broker.publish(["x", "y"], "a2 both", event="multi").id,
               self.publish(self.b, "topic=y&event=named", "b2 \u263a".encode())[1]["id"]]
        self.assertTrue(all(sse_server._STREAM_ID.fullmatch(i) for i in ids), ids)
        events = on_a.take(4)
        self.assertEqual([(e.type, e.data) for e in events],
                         [("message", "b1"), ("message", "a1"), ("multi", "a2 both"),
                          ("named", "b2 \u263a")])
        self.assertEqual([e.id for e in events], ids)
        self.assertEqual(sorted(ids, key=sse_server._stream_position), ids)
        self.assertEqual([e.data for e in on_b.take(2)], ["b1", "a2 both"])

    def test_cut_from_one_instance_resume_on_the_other(self):
        first = self.subscribe(self.a, "topic=r&topic=s")
        wait_until(lambda: self.a.broker.subscriber_count == 1)
        for n in range(3):
            self.a.broker.publish("r", f"seen {n}")
        seen = first.take(3)
        first.close()
        wait_until(lambda: self.a.broker.subscriber_count == 0)
        missed = [self.b.broker.publish("r", "missed 0").id,
                  self.a.broker.publish("other", "not mine").id,
                  self.a.broker.publish("s", "missed 1").id,
                  self.b.broker.publish(["r", "s"], "missed 2").id]
        again = self.subscribe(self.b, "topic=r&topic=s",
                               headers=[f"Last-Event-ID: {seen[-1].id}"])
        wait_until(lambda: self.b.broker.subscriber_count == 1)
        live = self.a.broker.publish("s", "live").id
        events = again.take(4)
        self.assertEqual([e.data for e in events], ["missed 0", "missed 1", "missed 2", "live"])
        self.assertEqual([e.id for e in events], [missed[0], missed[2], missed[3], live])
        assert_nothing_else(self, again, self.a.broker.publish, "r")

    def test_foreign_id_resets(self):
        self.a.broker.publish("f", "kept")
        client = self.subscribe(self.b, "topic=f&lastEventId=abcd-12")
        reset, event = client.take(2)
        self.assertEqual((reset.type, json.loads(reset.data)["reason"]), ("reset", "unknown-id"))
        self.assertEqual(event.data, "kept")

    def fill_stream(self, server, count):
        """Append `count` entries straight to Redis; returns the last id."""
        pipe = server.broker.history._client.pipeline(transaction=False)
        for n in range(count):
            pipe.xadd(server.broker.history.key, {"topics": "t", "data": str(n)},
                      maxlen=server.broker.history.stream_len, approximate=True)
        return pipe.execute()[-1]

    def test_trimmed_history_resets(self):
        first = self.a.broker.publish("t", "first").id
        last = self.fill_stream(self.a, 3 * self.a.broker.history.stream_len)
        wait_until(lambda: self.b.broker.stats()["last_event_id"] == last)
        client = self.subscribe(self.b, "topic=t", headers=[f"Last-Event-ID: {first}"])
        reset = client.next_event()
        self.assertEqual((reset.type, json.loads(reset.data)["reason"]),
                         ("reset", "history-exceeded"))
        self.assertTrue(client.next_event().data.isdigit())

    def test_reader_that_falls_behind_the_trimming_tells_its_subscribers(self):
        client = self.subscribe(self.b, "topic=t&topic=u")
        wait_until(lambda: self.b.broker.subscriber_count == 1)
        with self.b.broker._lock:       # the reader stalls while Redis trims
            last = self.fill_stream(self.a, 3 * self.b.broker.history.stream_len)
        reset = client.next_event()
        while reset.type != "reset":
            reset = client.next_event()
        self.assertEqual(json.loads(reset.data)["reason"], "history-exceeded")
        wait_until(lambda: self.b.broker.stats()["last_event_id"] == last)
        self.assertTrue(any("fell behind" in r.getMessage() for r in SERVER_LOG.records))

    def test_redis_outage(self):
        client = self.subscribe(self.a, "topic=o")
        wait_until(lambda: self.a.broker.subscriber_count == 1)
        accepted = [self.publish(self.b, "topic=o", f"before {n}".encode())[1]["id"]
                    for n in range(3)]
        self.redis.stop()       # the reader may not have delivered all three yet
        status, answer = self.publish(self.b, "topic=o", b"during")
        self.assertEqual(status, 503)
        self.assertIn(b"redis is unavailable", answer)
        wait_until(lambda: http_request(self.a.server_address[1], "GET", "/healthz")[0] == 503,
                   message="/healthz to report degraded")
        heartbeats = client.parser.comments.count("heartbeat")
        wait_until(lambda: client.pump(0.5) and
                   client.parser.comments.count("heartbeat") >= heartbeats + 2,
                   message="heartbeats during the outage")
        self.assertFalse(client.closed)
        self.redis.start()
        wait_until(lambda: http_request(self.a.server_address[1], "GET", "/healthz")[0] == 200,
                   message="/healthz to recover")
        accepted += [self.publish(self.b, "topic=o", f"after {n}".encode())[1]["id"]
                     for n in range(3)]
        events = client.take(6)
        self.assertEqual([e.data for e in events],
                         [f"before {n}" for n in range(3)] + [f"after {n}" for n in range(3)])
        self.assertEqual([e.id for e in events], accepted)
        assert_nothing_else(self, client, self.b.broker.publish, "o")
        stats = json.loads(http_request(self.a.server_address[1], "GET", "/stats")[2])
        self.assertTrue(stats["redis"]["connected"])
        self.assertGreaterEqual(stats["redis"]["reconnects"], 1)


# --- History: one contract for every backend; the store across restarts ---------------------

class HistoryContract:
    """What every History does, seen through a Broker, its only caller.
    A backend's test class gives make_history(**bounds)."""

    def broker(self, queue_size=sse_server.QUEUE_SIZE, **bounds):
        broker = Broker(history=self.make_history(**bounds), queue_size=queue_size)
        self.addCleanup(broker.close)
        return broker

    def publish(self, broker, topics, data):
        """Publish and wait until it was handed out (a shared history gives it
        back through its reader; the others before publish() returns)."""
        event_id = broker.publish(topics, data).id
        wait_until(lambda: broker.stats()["last_event_id"] == event_id,
                   message=f"{event_id} to be handed out")
        return event_id

    def test_replay_is_what_came_after_the_id_on_these_topics_once_each(self):
        broker = self.broker()
        ids = [self.publish(broker, topics, data) for topics, data in
               [("a", "a0"), ("b", "b0"), (["a", "b"], "ab"), ("c", "c0"), ("a", "a1")]]
        _, replay = broker.subscribe(["a", "b"], last_event_id=ids[0])
        self.assertEqual([(e.data, e.id) for e in events_of(replay)],
                         [("b0", ids[1]), ("ab", ids[2]), ("a1", ids[4])])
        _, replay = broker.subscribe(["a", "b"], last_event_id=ids[4])
        self.assertEqual(replay, [])

    def test_a_foreign_id_resets_then_replays_everything_kept(self):
        broker = self.broker()
        kept = self.publish(broker, "f", "kept")
        _, replay = broker.subscribe(["f"], last_event_id="not-an-id-of-ours")
        reset, event = events_of(replay)
        self.assertEqual((reset.type, json.loads(reset.data)["reason"]), ("reset", "unknown-id"))
        self.assertEqual((event.data, event.id), ("kept", kept))

    def test_registration_while_publishing_gets_every_event_exactly_once(self):
        """Replay up to the mark taken at registration, live after it: under
        concurrent publishers no event is missed or doubled, order holds."""
        broker = self.broker(queue_size=100_000)
        first = self.publish(broker, "r", "first")
        done = threading.Barrier(4)

        def publisher(name):
            for n in range(150):
                broker.publish("r", f"{name}-{n}")
            done.wait(WAIT_S)

        threads = [threading.Thread(target=publisher, args=(p,)) for p in range(3)]
        for thread in threads:
            thread.start()
        joined = []
        while len(joined) < 30:
            joined.append(broker.subscribe(["r"], last_event_id=first))
        done.wait(WAIT_S)
        for thread in threads:
            thread.join(WAIT_S)
        last = self.publish(broker, "r", "last")
        _, everything = broker.subscribe(["r"], last_event_id=first)
        expected = [(e.id, e.data) for e in events_of(everything)]
        self.assertEqual(len(expected), 451)
        self.assertEqual(expected[-1], (last, "last"))
        for subscriber, replay in joined:
            got = [(e.id, e.data) for e in events_of(replay + drain(subscriber))]
            self.assertEqual(got, expected)


class BoundedHistoryContract(HistoryContract):
    """The bounds a local history applies (Redis trims its stream itself)."""

    reconnects = 2000       # (a history that syncs every publish to disk does fewer)

    def test_the_newest_history_size_events_of_a_topic_are_kept(self):
        broker = self.broker(history_size=5)
        ids = [self.publish(broker, "w", str(n)) for n in range(10)]
        self.publish(broker, "other", "x")
        self.assertEqual(broker.stats()["events_retained"], 6)
        _, replay = broker.subscribe(["w"], last_event_id=ids[1])
        reset, *events = events_of(replay)
        self.assertEqual(json.loads(reset.data)["reason"], "history-exceeded")
        self.assertEqual([e.data for e in events], ["5", "6", "7", "8", "9"])
        _, replay = broker.subscribe(["w"], last_event_id=ids[4])   # just within
        self.assertEqual([e.data for e in events_of(replay)], ["5", "6", "7", "8", "9"])

    def test_max_topics_forgets_the_least_recently_published(self):
        broker = self.broker(max_topics=3)
        ids = [self.publish(broker, topic, topic) for topic in ("a", "b", "c", "a", "d")]
        stats = broker.stats()
        self.assertEqual((stats["topics_with_history"], stats["events_retained"]), (3, 4))
        _, replay = broker.subscribe(["b"], last_event_id=ids[0])
        self.assertEqual(json.loads(events_of(replay)[0].data)["reason"], "history-exceeded")
        _, replay = broker.subscribe(["a", "c", "d"], last_event_id=ids[1])
        self.assertEqual([e.data for e in events_of(replay)], ["c", "a", "d"])


    def test_a_topic_forgotten_by_max_topics_and_published_again_still_resets(self):
        broker = self.broker(max_topics=2)
        a1 = broker.publish("a", "a1").id
        broker.publish("a", "a2")
        broker.publish("b", "b")
        broker.publish("c", "c")        # forgets a's history
        broker.publish("a", "a3")       # a starts a new one
        _, replay = broker.subscribe(["a"], last_event_id=a1)
        reset, event = events_of(replay)
        self.assertEqual((reset.type, json.loads(reset.data)["reason"]),
                         ("reset", "history-exceeded"))      # a2 was missed: say so
        self.assertEqual(event.data, "a3")

    def test_no_silent_gap_while_topics_churn_through_max_topics(self):
        """A follower of one topic comes and goes while other topics push its
        history out: each replay either continues exactly where it left off
        or starts with a reset; it never skips an event in silence."""
        rng = random.Random(14)
        broker = self.broker(max_topics=8, history_size=50, queue_size=100_000)
        published, got, last_id, resets = [], [], None, 0

        def publish_watched(count, when):
            for n in range(count):
                published.append(f"{len(published)} {when}")
                broker.publish("watched", published[-1])

        for _ in range(400):
            publish_watched(rng.randint(0, 2), "while away")
            for _ in range(rng.randint(0, 12)):     # other topics churn
                broker.publish(f"other-{rng.randint(0, 30)}", "x")
            publish_watched(rng.randint(0, 2), "while away, later")
            subscriber, replay = broker.subscribe(["watched"], last_event_id=last_id)
            publish_watched(rng.randint(0, 2), "live")
            events = events_of(replay + drain(subscriber))
            broker.unsubscribe(subscriber)
            if events and events[0].type == "reset":
                resets += 1
                got = []            # start over from what the replay holds
                events = events[1:]
            got += [event.data for event in events]
            if events:
                last_id = events[-1].id
            # What it holds is an unbroken run of what was published, up to now.
            self.assertEqual(got, published[len(published) - len(got):])
        self.assertGreater(resets, 0, "the churn never pushed the watched topic out")

    def test_needless_resets_are_rare_while_topics_churn_through_max_topics(self):
        """A client switches topics (one of 400, max_topics 100) at every
        reconnect, resuming from the last id it saw; now and then it was away
        long enough for that id to be older than every topic history. A reset
        must come whenever an event after that id is gone (never missed), and
        may come otherwise in at most 1 of 1,000 reconnects. (One mark for
        all forgotten topics gave 1,291 needless resets in 8,000 here.)"""
        rng = random.Random(19)
        broker = self.broker(max_topics=100, history_size=5)
        ids_of = collections.defaultdict(list)     # topic -> ids published, in order

        def publish_somewhere(count):
            for _ in range(count):
                topic = f"topic-{rng.randrange(400)}"
                ids_of[topic].append(broker.publish(topic, "x").id)

        publish_somewhere(800)      # every topic known, 300 forgotten
        seen, needless, reconnects = broker.publish("start", "x").id, 0, self.reconnects
        for _ in range(reconnects):
            publish_somewhere(rng.randrange(300) if rng.random() < 0.1 else rng.randrange(6))
            topic = f"topic-{rng.randrange(400)}"
            after = parse_event_id(seen, broker.run_id)
            missed = [i for i in ids_of[topic] if parse_event_id(i, broker.run_id) > after]
            subscriber, replay = broker.subscribe([topic], last_event_id=seen)
            events = events_of(replay)
            broker.unsubscribe(subscriber)
            reset = bool(events) and events[0].type == "reset"
            got = [event.id for event in events[reset:]]
            if reset:
                needless += got[len(got) - len(missed):] == missed
            else:
                self.assertEqual(got, missed, "events were missed without a reset")
            seen = got[-1] if got else seen
        self.assertLessEqual(needless, max(1, reconnects // 1000), f"{needless} needless resets")

    def test_history_ttl(self):
        now = [0.0]
        broker = self.broker(history_ttl_s=10, clock=lambda: now[0])
        broker.publish("a", "old")
        now[0] = 5
        broker.publish("a", "new")
        now[0] = 12
        _, replay = broker.subscribe(["a"], last_event_id=f"{broker.run_id}-0")
        self.assertEqual(data_of(replay)[1:], ["new"])
        self.assertEqual(json.loads(data_of(replay)[0])["reason"], "history-exceeded")


class MemoryHistoryTests(BoundedHistoryContract, unittest.TestCase):
    def make_history(self, **bounds):
        return memory_history(**bounds)


class SQLiteHistoryTests(BoundedHistoryContract, unittest.TestCase):
    cache_size = sse_server.STORE_CACHE_SIZE
    reconnects = 1000

    def make_history(self, clock=time.time, **bounds):
        folder = tempfile.mkdtemp(prefix="sse-store-")
        self.addCleanup(shutil.rmtree, folder)
        return sse_server.SQLiteHistory(os.path.join(folder, "events.db"),
                                        sse_server.Retention(**bounds),
                                        cache_size=self.cache_size, clock=clock)


class SQLiteFileOnlyTests(SQLiteHistoryTests):
    """The same with no cache: every replay reads the file."""
    cache_size = 0


@unittest.skipUnless((REDIS_SERVER and redis_package) or REQUIRE_REDIS,
                     "redis-server or the redis package is missing (apt-get install "
                     "redis-server; pip install redis); set SSE_REQUIRE_REDIS=1 to fail instead")
class RedisHistoryTests(HistoryContract, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not (REDIS_SERVER and redis_package):
            raise AssertionError("SSE_REQUIRE_REDIS=1 but redis-server or the redis package "
                                 "is missing")
        cls.redis = RedisProcess()
        cls.redis.start()

    @classmethod
    def tearDownClass(cls):
        cls.redis.cleanup()

    def make_history(self, history_size=sse_server.HISTORY_SIZE):
        history = sse_server.RedisHistory(self.redis.url, key=f"sse:test:{self.id()}",
                                          history_size=history_size)
        return history

    def broker(self, **options):
        broker = super().broker(**options)
        wait_until(lambda: broker.health()[0], message="the reader to reach redis")
        return broker


class StoreTests(unittest.TestCase):
    """--store: what the file keeps, its bounds, its errors (in this process)."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="sse-store-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "events.db")

    def open(self, cache_size=sse_server.STORE_CACHE_SIZE, **bounds):
        history = sse_server.SQLiteHistory(self.path, sse_server.Retention(**bounds),
                                           cache_size=cache_size)
        broker = Broker(history=history, queue_size=100_000)
        self.addCleanup(broker.close)
        return broker

    def test_ids_and_history_outlive_the_broker(self):
        before = self.open()
        ids = [before.publish(topic, f"{topic}{n}").id
               for n, topic in enumerate(["a", "b", "a", "a"])]
        before.close()
        after = self.open()
        self.assertEqual(after.run_id, before.run_id)
        self.assertEqual(after.stats()["last_event_id"], ids[-1])
        subscriber, replay = after.subscribe(["a"], last_event_id=ids[0])
        self.assertEqual([(e.id, e.data) for e in events_of(replay)],
                         [(ids[2], "a2"), (ids[3], "a3")])      # no reset, nothing twice
        new = after.publish("a", "new").id
        self.assertEqual(parse_event_id(new, after.run_id), len(ids) + 1)
        self.assertEqual(events_of(drain(subscriber))[0].id, new)

    def test_the_numbering_continues_even_when_nothing_is_retained(self):
        before = self.open(history_size=0)
        last = before.publish("a", "x").id
        before.close()
        self.assertEqual(self.open(history_size=0).publish("a", "y").id,
                         f"{before.run_id}-{parse_event_id(last, before.run_id) + 1}")

    def test_a_client_behind_the_cache_is_replayed_from_the_file(self):
        broker = self.open(history_size=50, cache_size=5)
        ids = [broker.publish("far", str(n)).id for n in range(40)]
        self.assertEqual(broker.stats()["store"]["events_cached"], 5)
        _, replay = broker.subscribe(["far"], last_event_id=ids[9])
        self.assertEqual([e.data for e in events_of(replay)], [str(n) for n in range(10, 40)])
        _, replay = broker.subscribe(["far"], last_event_id=ids[36])    # in the cache
        self.assertEqual([e.data for e in events_of(replay)], ["37", "38", "39"])

    def test_a_file_that_cannot_be_read_is_a_503_for_replays_and_id_lookups(self):
        broker = self.open(cache_size=1)
        first = broker.publish("a", "one").id
        broker.publish("a", "named", event_id="urn:x")
        broker.publish("a", "newer")    # the cache holds only this one
        history = broker.history    # the file breaks, through the store's own connection
        with history._lock:         # (it may hold the file exclusively: portable mode)
            history._db.execute("ALTER TABLE events RENAME TO gone")
        for what, read in [("a replay", lambda: broker.subscribe(["a"], last_event_id=first)),
                           ("an id lookup", lambda: broker.history.find("urn:x"))]:
            with self.subTest(what=what), self.assertLogs(sse_server.logger, "WARNING") as logs:
                with self.assertRaises(sse_server.ServiceUnavailable) as raised:
                    read()
                self.assertIn("the event store cannot be read", raised.exception.reason)
                self.assertIn(f"{what} failed", logs.output[0])
        with history._lock:
            history._db.execute("ALTER TABLE gone RENAME TO events")
        self.assertEqual(broker.history.find("urn:x"), f"{broker.run_id}-2")  # its position
        _, replay = broker.subscribe(["a"], last_event_id=first)
        self.assertEqual([(e.id, e.data) for e in events_of(replay)],
                         [("urn:x", "named"), (f"{broker.run_id}-3", "newer")])

    def test_the_file_stays_about_the_size_of_what_is_retained(self):
        """100,000 events with history 100 on a few topics: old rows go as
        new ones come. Concurrent publishers, so commits batch as they do
        in a server (one transaction for each fan-out batch)."""
        broker = self.open(history_size=100)
        count, publishers = 100_000, 8

        def publisher(p):
            for n in range(count // publishers):
                broker.publish(f"topic-{n % 4}", f"event {p}:{n} " + "x" * 40)

        threads = [threading.Thread(target=publisher, args=(p,)) for p in range(publishers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        stats = broker.stats()
        self.assertEqual(stats["events_published"], count)
        self.assertEqual(stats["store"]["events_retained"], 400)
        size = stats["store"]["size_bytes"]
        self.assertLess(size, 2 * 1024 * 1024, f"the file and its log hold {size} bytes")
        self.assertLess(stats["store"]["commits"], count)   # batches shared a sync
        broker.close()
        self.assertLess(os.path.getsize(self.path), 512 * 1024)

    def test_a_publish_after_close_is_refused_quietly(self):
        broker = self.open()
        broker.close()
        logged = len(SERVER_LOG.records)
        with self.assertRaises(sse_server.ServiceUnavailable) as caught:
            broker.publish("late", "x")
        self.assertIn("shutting down", caught.exception.reason)
        self.assertEqual(SERVER_LOG.records[logged:], [])

    def test_a_second_server_on_the_file_is_refused(self):
        self.open()
        with self.assertRaises(sse_server.StoreError) as caught:
            sse_server.SQLiteHistory(self.path)
        self.assertIn("in use by another server", str(caught.exception))

    def test_unusable_paths_are_one_clear_error(self):
        garbage = os.path.join(self.folder, "garbage.db")
        with open(garbage, "wb") as file:
            file.write(random.Random(1).randbytes(8192) if hasattr(random.Random, "randbytes")
                       else bytes(random.Random(1).getrandbits(8) for _ in range(8192)))
        other = os.path.join(self.folder, "other.db")
        with contextlib.closing(sqlite3.connect(other)) as database:
            database.execute("CREATE TABLE invoices (number INTEGER)")
            database.commit()
        for path, says in ((self.folder, "is a directory"),
                           (garbage, "is not an SQLite database"),
                           (other, "an SQLite database of something else"),
                           (os.path.join(self.folder, "no", "such", "folder.db"), "cannot open")):
            with self.subTest(path=path), self.assertRaises(sse_server.StoreError) as caught:
                sse_server.SQLiteHistory(path)
            self.assertIn(says, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
        with contextlib.closing(sqlite3.connect(other)) as database:     # left as it was
            self.assertEqual(database.execute("PRAGMA journal_mode").fetchone()[0], "delete")


class StoreServerTests(ServerTestCase):
    """A server with --store: a failing disk, and what /stats and /healthz say."""

    def setUp(self):
        folder = tempfile.mkdtemp(prefix="sse-store-")
        self.addCleanup(shutil.rmtree, folder)
        self.path = os.path.join(folder, "events.db")
        self.server_options = {"store": self.path}
        super().setUp()

    def fill_the_disk(self, full: bool) -> None:
        """SQLite's own page limit: past it, writes fail with SQLITE_FULL
        ("database or disk is full"), exactly as on a full disk."""
        history = self.server.broker.history
        with history._lock:
            pages = history._db.execute("PRAGMA page_count").fetchone()[0]
            history._db.execute(f"PRAGMA max_page_count={pages if full else 1 << 30}")

    def test_a_full_disk_answers_503_keeps_subscribers_and_recovers(self):
        client = StreamClient(self.port, "topic=d")
        self.addCleanup(client.close)
        wait_until(lambda: self.server.broker.subscriber_count == 1)
        acknowledged = [publish_form(self.port, topic="d", data="before")["id"]]
        self.fill_the_disk(True)
        logged = len(SERVER_LOG.records)
        for n in range(3):
            status, headers, body = http_request(self.port, "POST", "/publish?topic=d",
                                                 ("x" * 5000).encode())
            self.assertEqual(status, 503)
            self.assertEqual(headers["Retry-After"], str(sse_server.STORE_RETRY_AFTER_S))
            self.assertIn(b"full", body)
        errors = [r for r in SERVER_LOG.records[logged:] if r.levelno >= logging.ERROR]
        self.assertEqual(len(errors), 1, [r.getMessage() for r in errors])    # once
        status, _, body = http_request(self.port, "GET", "/healthz")
        self.assertEqual(status, 503)
        self.assertIn(b"event store", body)
        stats = json.loads(http_request(self.port, "GET", "/stats")[2])
        self.assertIn("full", stats["store"]["error"])
        self.fill_the_disk(False)
        acknowledged.append(publish_form(self.port, topic="d", data="after")["id"])
        self.assertEqual(http_request(self.port, "GET", "/healthz")[0], 200)
        self.assertTrue(any("works again" in r.getMessage() for r in SERVER_LOG.records))
        events = client.take(2)
        self.assertEqual([(e.id, e.data) for e in events],
                         list(zip(acknowledged, ["before", "after"])))  # none of the refused
        self.assertFalse(client.closed)
        again = StreamClient(self.port, "topic=d&lastEventId=" + acknowledged[0])
        self.addCleanup(again.close)
        self.assertEqual(again.next_event().id, acknowledged[1])

    def test_a_backup_taken_while_running_is_a_store_with_every_acknowledged_event(self):
        if self.server.broker.history._owner is None:
            self.skipTest("no file lock here: the store falls back to SQLite's exclusive "
                          "mode, which lets no other program read it while running")
        ids = [publish_form(self.port, topic="b", data=str(n))["id"] for n in range(5)]
        copy = os.path.join(os.path.dirname(self.path), "copy.db")
        if shutil.which("sqlite3"):     # as the README says
            command = ["sqlite3", self.path, f".backup {copy}"]
        else:                           # the same SQLite backup API, from Python
            command = [sys.executable, "-c", "import sqlite3, sys; sqlite3.connect(sys.argv[1])"
                       ".backup(sqlite3.connect(sys.argv[2]))", self.path, copy]
        subprocess.run(command, check=True, timeout=WAIT_S, capture_output=True)
        self.assertEqual(publish_form(self.port, topic="b", data="still serving")["id"],
                         f"{self.server.broker.run_id}-6")
        restored = Broker(history=sse_server.SQLiteHistory(copy))
        self.addCleanup(restored.close)
        _, replay = restored.subscribe(["b"], last_event_id=f"{restored.run_id}-0")
        self.assertEqual([(e.id, e.data) for e in events_of(replay)],
                         [(event_id, str(n)) for n, event_id in enumerate(ids)])

    def test_stats_show_the_store(self):
        publish_form(self.port, topic="s", data="x")
        store = json.loads(http_request(self.port, "GET", "/stats")[2])["store"]
        self.assertEqual((store["path"], store["events_retained"], store["error"]),
                         (self.path, 1, None))
        self.assertGreater(store["size_bytes"], 0)
        self.assertGreaterEqual(store["commits"], 1)


class ServerProcess:
    """sse_server.py run as its own process, as a user runs it."""

    def __init__(self, test, *args, open_files: Optional[int] = None):
        def limit_open_files():     # (in the child, before it runs Python)
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sse_server.py"), "--port", "0",
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=limit_open_files if open_files else None)
        test.addCleanup(self.cleanup)
        line = self.process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            self.process.wait(WAIT_S)
            raise AssertionError(f"no URL printed: {line!r} {self.process.stderr.read()!r}")
        self.port = int(match.group(1))

    def stop(self, signum) -> str:
        """Send `signum`, wait for the end; returns what it wrote to stderr."""
        self.process.send_signal(signum)
        self.process.wait(WAIT_S)
        return self.process.stderr.read()

    def cleanup(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT_S)
        self.process.stdout.close()
        self.process.stderr.close()


def run_command_line(*args, env=None) -> subprocess.CompletedProcess:
    """Run `python3 sse_server.py --port 0 ARGS` to its end (for what exits
    by itself: --help, refusals); ServerProcess runs one that serves."""
    return subprocess.run([sys.executable, os.path.join(HERE, "sse_server.py"), "--port", "0",
                           *args], capture_output=True, text=True, timeout=WAIT_S, env=env)


class StoreRestartTests(unittest.TestCase):
    """Real servers on one file, stopped by SIGKILL or SIGTERM while several
    keep-alive connections publish, then started again."""

    def setUp(self):
        folder = tempfile.mkdtemp(prefix="sse-store-")
        self.addCleanup(shutil.rmtree, folder)
        self.path = os.path.join(folder, "events.db")

    def publish_until_stopped(self, server, watcher, signum):
        """Four publishers on keep-alive connections; once the watcher has
        seen some of their events, the server gets `signum`. Returns the
        acknowledged {id: data}."""
        acknowledged: dict[str, str] = {}
        lock = threading.Lock()

        def publisher(name):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
            try:
                for n in range(100_000):
                    data = f"{name}-{n}"
                    connection.request("POST", "/publish?topic=k", body=data.encode())
                    response = connection.getresponse()
                    answer = response.read()
                    if response.status != 200:
                        return
                    with lock:
                        acknowledged[json.loads(answer)["id"]] = data
            except (OSError, http.client.HTTPException):    # the server went away
                return
            finally:
                connection.close()

        threads = [threading.Thread(target=publisher, args=(p,)) for p in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + WAIT_S
        while len(watcher.parser.events) < 200 or len(acknowledged) < 200:
            self.assertTrue(watcher.pump(0.05), "the stream ended early")
            self.assertLess(time.monotonic(), deadline, "publishing did not get going")
        server.stop(signum)
        for thread in threads:
            thread.join(WAIT_S)
        watcher.read_to_end()
        with lock:
            return dict(acknowledged)

    def check_restart(self, signum):
        first = ServerProcess(self, "--store", self.path, "--history", "100000")
        watcher = StreamClient(first.port, "topic=k")
        self.addCleanup(watcher.close)
        acknowledged = self.publish_until_stopped(first, watcher, signum)
        seen = [(e.id, e.data) for e in watcher.parser.events]
        self.assertGreaterEqual(len(seen), 200)
        self.assertGreaterEqual(len(acknowledged), 200)

        second = ServerProcess(self, "--store", self.path, "--history", "100000")
        resumed = StreamClient(second.port, "topic=k", headers=[f"Last-Event-ID: {seen[-1][0]}"])
        self.addCleanup(resumed.close)
        marker = publish_form(second.port, topic="k", data="after the restart")["id"]
        replayed = []
        while not replayed or replayed[-1][0] != marker:
            event = resumed.next_event()
            self.assertNotEqual(event.type, "reset", event.data)
            replayed.append((event.id, event.data))
        replayed.pop()
        run_id = marker.rpartition("-")[0]
        seq = lambda event_id: parse_event_id(event_id, run_id)     # noqa: E731

        # Every acknowledged event it had not seen, none it had, in id order.
        seen_ids = {event_id for event_id, _ in seen}
        replayed_ids = [event_id for event_id, _ in replayed]
        self.assertEqual(set(acknowledged) - seen_ids - set(replayed_ids), set())
        self.assertFalse(seen_ids & set(replayed_ids))
        self.assertEqual(replayed_ids, sorted(replayed_ids, key=seq))
        self.assertEqual(len(replayed_ids), len(set(replayed_ids)))
        self.assertGreater(seq(replayed_ids[0]) if replayed else seq(marker), seq(seen[-1][0]))
        # No id names two events, and the new ones come after every old one.
        everything = {}
        for event_id, data in [*seen, *replayed, *acknowledged.items()]:
            self.assertEqual(everything.setdefault(event_id, data), data, event_id)
        self.assertGreater(seq(marker), max(map(seq, everything)))
        # Nothing a subscriber saw was forgotten by the restart.
        full = StreamClient(second.port, f"topic=k&lastEventId={run_id}-0")
        self.addCleanup(full.close)
        kept = [(e.id, e.data) for e in full.take(seq(marker))]
        self.assertEqual(kept[-1][0], marker)
        self.assertTrue(set(seen) <= set(kept), "a subscriber saw an event the file lost")
        return second

    def test_sigkill_while_publishing_loses_nothing_acknowledged(self):
        self.check_restart(signal.SIGKILL)

    def test_sigterm_while_publishing_loses_nothing_acknowledged(self):
        second = self.check_restart(signal.SIGTERM)
        self.assertNotIn("Traceback", second.stop(signal.SIGTERM))

    def test_a_second_server_on_the_file_is_refused_and_the_first_serves_on(self):
        first = ServerProcess(self, "--store", self.path)
        refused = run_command_line("--store", self.path)
        self.assertEqual(refused.returncode, 2)
        self.assertEqual(len(refused.stderr.strip().splitlines()), 1, refused.stderr)
        self.assertIn("in use by another server", refused.stderr)
        self.assertIn("id", publish_form(first.port, topic="still", data="serving"))

    def test_unusable_stores_are_one_line_and_exit_status_2(self):
        folder = os.path.dirname(self.path)
        garbage = os.path.join(folder, "notes.txt")
        with open(garbage, "w") as file:
            file.write("not a database\n" * 100)
        cases = [(["--store", folder], "is a directory"),
                 (["--store", garbage], "is not an SQLite database"),
                 (["--store", os.path.join(read_only_folder(self), "events.db")], "cannot"),
                 (["--store", self.path, "--redis", "redis://127.0.0.1:1/0"],
                  "cannot be used together")]
        for args, says in cases:
            with self.subTest(args=args):
                process = run_command_line(*args)
                self.assertEqual(process.returncode, 2)
                lines = process.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, process.stderr)
                self.assertIn(says, lines[0])
                self.assertTrue(lines[0].startswith("sse_server: --store: "), lines[0])
        self.assertFalse(os.path.exists(self.path))     # --redis was refused before opening


def read_only_folder(test) -> str:
    """A folder nobody can create a file in: a 0555 folder, or, for root (who
    ignores modes), an immutable one (chattr +i), or else /proc."""
    folder = tempfile.mkdtemp(prefix="sse-read-only-")
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    os.chmod(folder, 0o555)
    test.addCleanup(os.chmod, folder, 0o755)
    if os.geteuid() == 0 and shutil.which("chattr"):
        if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0:
            test.addCleanup(subprocess.run, ["chattr", "-i", folder], capture_output=True)
    try:
        open(os.path.join(folder, "probe"), "w").close()
    except OSError:
        return folder
    os.remove(os.path.join(folder, "probe"))
    return "/proc"


# --- Platforms: hang-ups, SIGPIPE, and the suite again in portable mode -----------------

class HangupTests(ServerTestCase):
    """A client that leaves is noticed within about a second, on every
    selector, long before a heartbeat would find out."""

    server_options = {"heartbeat_s": 60}

    def test_a_client_that_closes_or_resets_is_noticed_at_once(self):
        for how in ("close", "reset"):
            with self.subTest(how=how):
                client = StreamClient(self.port, "topic=t")
                self.subscribed(1)
                if how == "reset":
                    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                client.close()
                wait_until(lambda: self.server.broker.subscriber_count == 0, timeout=3,
                           message=f"a {how} to be noticed")

    def test_streams_beyond_the_selectors_capacity_fall_back_to_heartbeats(self):
        # The select() path with a capacity of two (Windows' is 500).
        def small_select():
            return selectors.SelectSelector(), 2
        original = sse_server.hangup_selector
        sse_server.hangup_selector = small_select
        self.addCleanup(setattr, sse_server, "hangup_selector", original)
        server = self.start_server(heartbeat_s=0.3)
        port = server.server_address[1]
        clients = [StreamClient(port, "topic=t") for _ in range(4)]
        wait_until(lambda: server.broker.subscriber_count == 4, message="4 subscribers")
        self.assertEqual(server.broker.publish("t", "all four").subscribers, 4)
        for client in clients:
            self.assertEqual(client.next_event().data, "all four")
        full = [r for r in SERVER_LOG.records if "watches at most 2 streams" in r.getMessage()]
        self.assertEqual(len(full), 1, "logged once, not per stream")
        for client in clients:
            client.close()
        wait_until(lambda: server.broker.subscriber_count == 0, timeout=5,
                   message="every stream to end, watched or not")


SIGPIPE_SCRIPT = r"""
import signal, socket, struct, sys, threading, time
sys.path.insert(0, sys.argv[1])
import sse_server
if sys.argv[2] == "without-flags":
    sse_server.SEND_FLAGS = 0       # the control: what a write without MSG_NOSIGNAL does
signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as an embedding program may
server = sse_server.SSEServer(("127.0.0.1", 0), heartbeat_s=60)
server._hangups.watch = lambda sock: False      # the writes, not the watcher, meet the reset
threading.Thread(target=server.serve_forever, daemon=True).start()
# Twenty times: a subscriber resets, events are published until it is gone.
# (A write that meets the reset fails with ECONNRESET, and only a write after
# it raises SIGPIPE; whether the server makes one is a race, and over twenty
# rounds the control is all but sure to meet one.)
for _ in range(20):
    client = socket.create_connection(server.server_address, timeout=10)
    client.sendall(b"GET /events?topic=t HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"retry" not in received:
        received += client.recv(4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()                                  # a reset
    deadline = time.monotonic() + 10
    while server.broker.subscriber_count and time.monotonic() < deadline:
        server.broker.publish("t", "x" * 1000)
print("alive, subscribers:", server.broker.subscriber_count, flush=True)
"""


class SigpipeTests(unittest.TestCase):
    @unittest.skipIf(PORTABLE, "portable mode hides MSG_NOSIGNAL (as Windows and macOS lack "
                               "it): there only Python's default SIG_IGN protects")
    @unittest.skipUnless(hasattr(signal, "SIGPIPE"), "no SIGPIPE on this platform")
    def test_writing_to_a_reset_client_never_kills_the_process(self):
        def run(mode):
            return subprocess.run([sys.executable, "-c", SIGPIPE_SCRIPT, HERE, mode],
                                  capture_output=True, text=True, timeout=60)
        result = run("with-flags")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("alive, subscribers: 0", result.stdout)
        control = run("without-flags")      # proves the scenario does raise SIGPIPE
        self.assertEqual(control.returncode, -signal.SIGPIPE, control.stdout + control.stderr)


class PlatformTests(unittest.TestCase):
    """What sse_server detected here, by capability."""

    @unittest.skipIf(PORTABLE, "portable mode hides these")
    @unittest.skipUnless(hasattr(select, "epoll"), "the Linux accelerations need Linux")
    def test_linux_gets_its_accelerations(self):
        self.assertIn("os.readv", sse_server.recv_plain.__doc__)
        self.assertEqual(sse_server.SEND_FLAGS, socket.MSG_NOSIGNAL)
        selector, capacity = sse_server.hangup_selector()
        self.addCleanup(selector.close)
        self.assertIsInstance(selector, selectors.EpollSelector)
        self.assertIsNone(capacity)

    @unittest.skipUnless(PORTABLE, "only in portable mode")
    def test_portable_mode_takes_every_fallback(self):
        self.assertNotIn("os.readv", sse_server.recv_plain.__doc__)
        self.assertEqual(sse_server.SEND_FLAGS, 0)
        selector, capacity = sse_server.hangup_selector()
        self.addCleanup(selector.close)
        self.assertIsInstance(selector, selectors.PollSelector)
        self.assertIsNone(capacity)
        self.assertFalse(sse_server._enlarge_futex_hash())     # no ctypes: silently nothing
        sse_server._raise_open_files_limit(10**6)               # no resource: silently nothing



class SelectPathTests(ServerTestCase):
    """What a platform with select() only (Windows) runs, on this one."""

    def test_waits_report_readiness_hang_ups_and_time_out(self):
        for wait in (sse_server.wait_with_select, sse_server.wait_with_poll):
            with self.subTest(wait=wait.__name__):
                ours, peer = socket.socketpair()
                self.addCleanup(ours.close)
                self.assertTrue(wait(ours, True, 0))
                self.assertFalse(wait(ours, False, 0.01))
                peer.send(b"x")
                self.assertTrue(wait(ours, False, WAIT_S))
                ours.recv(1)
                peer.close()
                self.assertTrue(wait(ours, False, WAIT_S))      # EOF is readiness too

    def test_a_stream_served_through_select_waits(self):
        waits = []

        def wait_with_select(*args):
            waits.append(args[1])
            return sse_server.wait_with_select(*args)
        original = sse_server.wait_ready
        sse_server.wait_ready = wait_with_select
        self.addCleanup(setattr, sse_server, "wait_ready", original)
        client = self.subscribe(recv_buffer=4096)
        self.subscribed(1)
        payload = "z" * 500_000     # more than the buffers hold: the thread must wait
        for n in range(20):
            self.server.broker.publish("t", f"{n} {payload}")
        self.assertEqual([event.data for event in client.take(20)],
                         [f"{n} {payload}" for n in range(20)])
        self.assertIn(True, waits, "the stream's thread never had to wait to write")


class PortableModeTests(unittest.TestCase):
    @unittest.skipIf(PORTABLE, "this is the portable run")
    def test_the_whole_suite_passes_in_portable_mode(self):
        """The README's test command runs every test a second time, in a
        subprocess with install_portable_shim() applied before sse_server is
        imported (SSE_PORTABLE=1): every fallback path is exercised on Linux."""
        result = subprocess.run([sys.executable, "-m", "unittest", "test_sse_server"],
                                cwd=HERE, env=dict(os.environ, SSE_PORTABLE="1"),
                                capture_output=True, text=True, timeout=900)
        lines = result.stderr.strip().splitlines()
        summary = " ".join(lines[-3:])
        sys.stderr.write(f"\n    portable mode: {summary}\n")
        self.assertEqual(result.returncode, 0, result.stderr[-8000:])
        self.assertRegex(summary, r"Ran \d+ tests .* OK")


# --- In production: proxies, metrics, the access log, static files ----------------------

class TrustedProxyTests(unittest.TestCase):
    """client_host(): whose address a request has, behind proxies (pure)."""

    TRUSTED = sse_server.parse_trusted_proxies(["127.0.0.1", "10.0.0.0/8", "::1"])

    def host(self, peer, **headers):
        fields = sse_server.Headers()
        for name, value in headers.items():
            fields._fields[name.replace("_", "-").lower()] = (
                value if isinstance(value, list) else [value])
        return sse_server.client_host(peer, fields, self.TRUSTED)

    def test_the_rightmost_untrusted_hop_is_the_client(self):
        cases = [
            ("127.0.0.1", {"x_forwarded_for": "203.0.113.9"}, "203.0.113.9"),
            ("127.0.0.1", {"x_forwarded_for": "203.0.113.9, 10.1.2.3"}, "203.0.113.9"),
            ("127.0.0.1", {"x_forwarded_for": "6.6.6.6, 203.0.113.9"}, "203.0.113.9"),  # spoof
            ("127.0.0.1", {"x_forwarded_for": ["6.6.6.6", "203.0.113.9:4711"]}, "203.0.113.9"),
            ("127.0.0.1", {"x_forwarded_for": "10.0.0.1, 10.0.0.2"}, "10.0.0.1"),   # all proxies
            ("127.0.0.1", {"x_forwarded_for": "[2001:db8::1]:443"}, "2001:db8::1"),
            ("127.0.0.1", {"x_forwarded_for": "::ffff:192.0.2.1"}, "192.0.2.1"),
            ("::1", {"forwarded": 'for=192.0.2.60;proto=http;by=203.0.113.43, '
                                  'for="[2001:db8:cafe::17]:4711"'}, "2001:db8:cafe::17"),
            ("127.0.0.1", {"forwarded": "for=192.0.2.60", "x_forwarded_for": "198.51.100.1"},
             "198.51.100.1"),                                      # X-Forwarded-For first
            ("127.0.0.1", {"forwarded": "proto=https"}, "127.0.0.1"),       # no for=
            ("127.0.0.1", {}, "127.0.0.1"),                                 # no header
        ]
        for peer, headers, expected in cases:
            with self.subTest(peer=peer, headers=headers):
                self.assertEqual(self.host(peer, **headers), expected)

    def test_headers_from_other_peers_are_ignored(self):
        self.assertEqual(self.host("192.0.2.50", x_forwarded_for="127.0.0.1"), "192.0.2.50")
        self.assertEqual(sse_server.client_host("127.0.0.1", sse_server.Headers(), []),
                         "127.0.0.1")

    def test_malformed_chains_from_a_trusted_proxy_are_400(self):
        for headers in ({"x_forwarded_for": "garbage"}, {"x_forwarded_for": "1.2.3.4,,5.6.7.8"},
                        {"x_forwarded_for": "1.2.3.4:99999999"}, {"x_forwarded_for": "[::1"},
                        {"x_forwarded_for": "1.2.3.4:x"}, {"forwarded": "for"},
                        {"forwarded": "for=unknown"}, {"x_forwarded_for": ""}):
            with self.subTest(headers=headers), self.assertRaises(HTTPError) as caught:
                self.host("127.0.0.1", **headers)
            self.assertEqual(caught.exception.status, 400)

    def test_trusted_proxy_specs(self):
        networks = sse_server.parse_trusted_proxies(["192.0.2.1", "10.0.0.0/8", "2001:db8::/32"])
        self.assertEqual([str(n) for n in networks], ["192.0.2.1/32", "10.0.0.0/8",
                                                       "2001:db8::/32"])
        for bad in ("nginx", "10.0.0.0/33", ""):
            with self.subTest(spec=bad), self.assertRaises(ValueError):
                sse_server.parse_trusted_proxies([bad])


class ForwardedClientTests(ServerTestCase):
    """A server behind a trusted proxy on loopback: every rule sees the client."""

    server_options = {"trusted_proxies": ["127.0.0.1"], "max_clients_per_ip": 1,
                      "publish_rate": 1, "publish_burst": 1}

    def test_the_loopback_rule_sees_the_forwarded_client(self):
        status, _, body = http_request(self.port, "POST", "/publish?topic=t", b"x",
                                       {"X-Forwarded-For": "192.0.2.7"})
        self.assertEqual(status, 403, body)
        server = self.start_server()        # without --trusted-proxy the header means nothing
        status, _, _ = http_request(server.server_address[1], "POST", "/publish?topic=t", b"x",
                                    {"X-Forwarded-For": "192.0.2.7"})
        self.assertEqual(status, 200)

    def test_per_address_limits_count_forwarded_clients(self):
        first = self.subscribe(headers=["X-Forwarded-For: 198.51.100.1"])
        self.assertEqual(first.status, 200)
        again = StreamClient(self.port, headers=["X-Forwarded-For: 198.51.100.1"])
        self.addCleanup(again.close)
        self.assertEqual(again.status, 503)
        other = self.subscribe(headers=["X-Forwarded-For: 198.51.100.2"])
        self.assertEqual(other.status, 200)
        for address, expected in (("127.0.0.8", 200), ("127.0.0.8", 429), ("127.0.0.9", 200)):
            status, _, _ = http_request(self.port, "POST", "/publish?topic=t", b"x",
                                        {"X-Forwarded-For": address})
            self.assertEqual(status, expected, address)

    def test_a_malformed_header_is_400_and_the_log_names_the_client(self):
        status, _, body = http_request(self.port, "GET", "/healthz",
                                       headers={"X-Forwarded-For": "not-an-address"})
        self.assertEqual(status, 400, body)
        http_request(self.port, "GET", "/healthz", headers={"X-Forwarded-For": "192.0.2.77"})
        # (a line is written just after its answer is sent: wait for it)
        wait_until(lambda: any(r.getMessage().startswith('192.0.2.77 - - [') and
                               '"GET /healthz HTTP/1.1" 200 ' in r.getMessage()
                               for r in SERVER_LOG.records if r.name == "sse_server.access"),
                   message="the forwarded client's access-log line")


NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx",) if os.path.exists(path)), None)
REQUIRE_NGINX = os.environ.get("SSE_REQUIRE_NGINX") == "1"


def readme_block(language: str, containing: str = "") -> str:
    """The first ```language block of the README (with `containing` in it):
    tests use what users copy."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        blocks = re.findall(rf"```{language}\n(.*?)```", file.read(), re.S)
    match = next((block for block in blocks if containing in block), None)
    assert match, f"no {language} block in the README"
    return match


class NginxProcess:
    """A real nginx in front of a server, configured with the README's snippet:
    it listens on 127.0.0.2 and connects to the server from 127.0.0.3, so
    the proxy, its clients (127.0.0.4, ...) and the server all differ."""

    def __init__(self, upstream_port: int, read_timeout_s: int):
        self.folder = tempfile.TemporaryDirectory(prefix="sse-nginx-")
        start_on_a_free_port(lambda port: self._start(port, upstream_port, read_timeout_s))

    def _start(self, port: int, upstream_port: int, read_timeout_s: int) -> None:
        self.port = port
        snippet = readme_block("nginx").replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
        snippet = re.sub(r"proxy_read_timeout \w+;", f"proxy_read_timeout {read_timeout_s}s;",
                         snippet)
        folder = self.folder.name
        user = "user root;" if os.geteuid() == 0 else ""
        config = f"""
            {user}
            worker_processes 1;
            daemon off;
            pid {folder}/nginx.pid;
            error_log {folder}/error.log warn;
            events {{ worker_connections 512; }}
            http {{
                access_log off;
                client_body_temp_path {folder}/body;
                proxy_temp_path {folder}/proxy;
                fastcgi_temp_path {folder}/fastcgi;
                uwsgi_temp_path {folder}/uwsgi;
                scgi_temp_path {folder}/scgi;
                server {{
                    listen 127.0.0.2:{self.port};
                    proxy_bind 127.0.0.3;
                    {snippet}
                }}
            }}"""
        with open(os.path.join(folder, "nginx.conf"), "w") as file:
            file.write(config)
        self.process = subprocess.Popen(
            [NGINX, "-p", folder, "-c", os.path.join(folder, "nginx.conf"), "-e",
             os.path.join(folder, "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._listening, message="nginx to listen")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            error = self.process.stderr.read()
            self.process.stderr.close()
            if b"Address already in use" in error:
                raise PortTaken()
            raise AssertionError(f"nginx failed: {error!r}")
        try:
            socket.create_connection(("127.0.0.2", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(WAIT_S)
        self.process.stderr.close()
        self.folder.cleanup()


@unittest.skipUnless(NGINX or REQUIRE_NGINX, "nginx is missing (apt-get install nginx); "
                                             "set SSE_REQUIRE_NGINX=1 to fail instead")
class NginxTests(ServerTestCase):
    """Behind a real nginx, configured with the README's snippet."""

    server_options = {"trusted_proxies": ["127.0.0.3"], "heartbeat_s": 0.3,
                      "max_clients_per_ip": 1}

    def setUp(self):
        if not NGINX:
            self.fail("SSE_REQUIRE_NGINX=1 but nginx is missing")
        super().setUp()
        self.nginx = NginxProcess(self.port, read_timeout_s=1)
        self.addCleanup(self.nginx.stop)

    def via_nginx(self, query="topic=t", source="127.0.0.4", **kwargs):
        client = StreamClient(self.nginx.port, query, host="127.0.0.2", source=source,
                              **kwargs)
        self.addCleanup(client.close)
        return client

    def test_events_arrive_unbuffered_and_heartbeats_outlast_the_read_timeout(self):
        client = self.via_nginx()
        self.assertEqual(client.status, 200)
        self.subscribed(1)
        self.server.broker.publish("t", "first")
        self.assertEqual(client.next_event(timeout=2).data, "first")
        # Heartbeats every 0.3 s keep nginx's 1 s proxy_read_timeout from firing.
        wait_until(lambda: client.pump() and client.parser.comments.count("heartbeat") >= 6,
                   message="heartbeats through nginx for longer than its read timeout")
        self.server.broker.publish("t", "still open")
        self.assertEqual(client.next_event(timeout=2).data, "still open")
        self.assertFalse(client.closed)

    def test_last_event_id_resumes_through_nginx(self):
        client = self.via_nginx()
        self.subscribed(1)
        seen = self.server.broker.publish("t", "seen").id
        self.assertEqual(client.next_event().id, seen)
        client.close()
        self.subscribed(0)
        missed = [self.server.broker.publish("t", f"missed {n}").id for n in range(2)]
        again = self.via_nginx(headers=[f"Last-Event-ID: {seen}"])
        self.assertEqual([e.id for e in again.take(2)], missed)

    def test_shutdown_ends_streams_cleanly_through_nginx(self):
        client = self.via_nginx()
        self.subscribed(1)
        self.server.stop()
        # nginx keeps its client connection alive: the end is the terminating chunk.
        wait_until(lambda: client.pump(0.1) is not None and client.ended,
                   message="the terminating chunk through nginx")
        self.assertGreaterEqual(client.parser.retry, 1000)

    def test_per_client_limits_see_the_forwarded_address(self):
        self.assertEqual(self.via_nginx().status, 200)
        self.subscribed(1)
        self.assertEqual(self.via_nginx().status, 503)       # same client, through nginx
        spoofed = self.via_nginx(headers=["X-Forwarded-For: 127.0.0.99"])
        self.assertEqual(spoofed.status, 503)                 # nginx appends the real one
        self.assertEqual(self.via_nginx(source="127.0.0.5").status, 200)
        self.subscribed(2)


try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    text_string_to_metric_families = None
REQUIRE_PROMETHEUS = os.environ.get("SSE_REQUIRE_PROMETHEUS") == "1"


class MetricsTests(ServerTestCase):
    def metrics(self, **headers):
        status, answer_headers, body = http_request(self.port, "GET", "/metrics",
                                                    headers=headers)
        self.assertEqual(status, 200, body)
        self.assertEqual(answer_headers["Content-Type"],
                         "text/plain; version=0.0.4; charset=utf-8")
        return body.decode("utf-8")

    def families(self, text):
        if text_string_to_metric_families is None:
            if REQUIRE_PROMETHEUS:
                self.fail("SSE_REQUIRE_PROMETHEUS=1 but prometheus-client is missing")
            self.skipTest("the prometheus-client package is missing (pip install "
                          "prometheus-client); set SSE_REQUIRE_PROMETHEUS=1 to fail instead")
        return {family.name: family for family in text_string_to_metric_families(text)}

    def test_the_real_parser_reads_every_metric_and_the_values_agree_with_stats(self):
        client = self.subscribe()
        self.subscribed(1)
        for n in range(3):
            self.assertEqual(publish_form(self.port, topic="t", data=str(n))["subscribers"], 1)
        client.take(3)
        http_request(self.port, "POST", "/publish", b"x")      # a 400: no topic
        text = self.metrics()
        families = self.families(text)
        stats = json.loads(http_request(self.port, "GET", "/stats")[2])
        for family in families.values():
            self.assertTrue(family.name.startswith("sse_"), family.name)
            self.assertTrue(family.documentation, family.name)
            self.assertIn(f"# TYPE {family.name}", text)
        value = {sample.name: sample.value for family in families.values()
                 for sample in family.samples if not sample.labels}
        self.assertEqual(value["sse_subscribers"], stats["subscribers"])
        self.assertEqual(value["sse_events_published_total"], stats["events_published"])
        self.assertEqual(value["sse_events_delivered_total"], stats["events_delivered"])
        self.assertEqual(value["sse_events_retained"], stats["events_retained"])
        self.assertEqual(value["sse_delivery_seconds_count"], 3)
        self.assertEqual(families["sse_events_published"].type, "counter")
        self.assertEqual(families["sse_delivery_seconds"].type, "histogram")
        codes = {s.labels["code"]: s.value for s in families["sse_publish_requests"].samples}
        self.assertEqual(codes, {"200": 3, "400": 1})
        self.assertEqual(stats["publish_requests"], {"200": 3, "400": 1})
        reasons = {s.labels["reason"] for s in families["sse_clients_dropped"].samples}
        self.assertEqual(reasons, {"slow", "write_timeout", "token_expired"})

    def test_series_do_not_grow_with_topics(self):
        before = self.metrics().count("\n")
        for n in range(300):
            self.server.broker.publish(f"topic-{n}", "x")
        self.assertEqual(self.metrics().count("\n"), before)

    def test_head_and_access(self):
        self.assertEqual(http_request(self.port, "HEAD", "/metrics")[0], 200)
        remote = run_server(self, handler_class=RemoteClientHandler)
        port = remote.server_address[1]
        self.assertEqual(http_request(port, "GET", "/metrics")[0], 403)
        remote.access.metrics_token = "scrape"
        self.assertEqual(http_request(port, "GET", "/metrics")[0], 401)
        self.assertEqual(http_request(port, "GET", "/metrics",
                                      headers={"Authorization": "Bearer scrape"})[0], 200)
        self.assertEqual(http_request(port, "GET", "/metrics",
                                      headers={"Authorization": "Bearer wrong"})[0], 401)


ACCESS_LINE = re.compile(r'(?P<host>\S+) - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} \+0000\] '
                         r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) '
                         r'(?P<seconds>\d+\.\d{3})s(?P<extra>.*)')



class StoreMetricsTests(MetricsTests):
    """The metrics again with --store, which adds its own."""

    def setUp(self):
        folder = tempfile.mkdtemp(prefix="sse-store-")
        self.addCleanup(shutil.rmtree, folder)
        self.server_options = {**self.server_options, "store": os.path.join(folder, "e.db")}
        super().setUp()

    def test_the_store_has_its_metrics(self):
        publish_form(self.port, topic="m", data="x")
        families = self.families(self.metrics())
        stats = json.loads(http_request(self.port, "GET", "/stats")[2])["store"]
        value = lambda name: families[name].samples[0].value     # noqa: E731
        self.assertEqual(value("sse_store_up"), 1)
        self.assertEqual(value("sse_store_commits"), stats["commits"])
        self.assertGreater(value("sse_store_size_bytes"), 0)
        self.assertGreater(value("sse_store_commit_seconds"), 0)

class AccessLogTests(ServerTestCase):
    def access_lines(self):
        return [ACCESS_LINE.fullmatch(r.getMessage()) for r in SERVER_LOG.records
                if r.name == "sse_server.access" and r.levelno == logging.INFO]

    def test_one_line_per_request(self):
        wait_until(lambda: not self.server.stats()["connections"], message="a quiet server")
        SERVER_LOG.records.clear()
        http_request(self.port, "GET", "/healthz")
        http_request(self.port, "GET", "/nope")
        wait_until(lambda: len(self.access_lines()) == 2, message="two access-log lines")
        lines = self.access_lines()
        self.assertEqual([(m["host"], m["request"], m["status"], m["bytes"]) for m in lines],
                         [("127.0.0.1", "GET /healthz HTTP/1.1", "200", "3"),
                          ("127.0.0.1", "GET /nope HTTP/1.1", "404", str(len(
                              b"no such resource: /nope\n")))])

    def test_a_streams_line_comes_at_its_end_with_events_bytes_and_why(self):
        SERVER_LOG.records.clear()
        client = self.subscribe("topic=t")
        self.subscribed(1)
        self.assertEqual(self.access_lines(), [], "no line while the stream is open")
        for n in range(3):
            self.server.broker.publish("t", str(n))
        client.take(3)
        client.close()
        wait_until(lambda: self.access_lines(), message="the stream's line")
        line, = self.access_lines()
        self.assertEqual((line["request"], line["status"]), ("GET /events?topic=t HTTP/1.1",
                                                             "200"))
        self.assertEqual(line["extra"], " events=3 end=client_gone")
        self.assertEqual(int(line["bytes"]), len(client.raw))


class StaticPolicyTests(ServerTestCase):
    def test_only_the_demo_page_gets_the_strict_policy_unless_asked(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        with open(os.path.join(folder, "index.html"), "w") as file:
            file.write("<script>new EventSource('/events?topic=t')</script>")
        demo = http_request(self.port, "GET", "/")[1]
        self.assertEqual(demo["Content-Security-Policy"], sse_server.CONTENT_SECURITY_POLICY)
        own = self.start_server(static_dir=folder)
        headers = http_request(own.server_address[1], "GET", "/")[1]
        self.assertNotIn("Content-Security-Policy", headers)
        asked = self.start_server(static_dir=folder, csp="default-src 'self'")
        headers = http_request(asked.server_address[1], "GET", "/")[1]
        self.assertEqual(headers["Content-Security-Policy"], "default-src 'self'")


@unittest.skipIf(resource is None or PORTABLE, "needs POSIX open-files limits; the server "
                 "runs in a child process, so the portable run would test nothing new")
class OpenFilesLimitTests(unittest.TestCase):
    def test_out_of_descriptors_the_server_warns_pauses_and_recovers(self):
        server = ServerProcess(self, open_files=40)
        stderr_lines = queue_lines(server.process.stderr)
        first = StreamClient(server.port, "topic=t")
        self.addCleanup(first.close)
        waiting = []        # connections beyond the limit wait in the backlog
        for _ in range(80):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
            self.addCleanup(sock.close)
            waiting.append(sock)
        self.assertIn("below --max-clients", stderr_lines.get(timeout=WAIT_S))  # at start
        warning = stderr_lines.get(timeout=WAIT_S)
        self.assertIn("WARNING sse_server: cannot accept connections: Too many open files",
                      warning)
        # Paused, not spinning: the accept loop uses little CPU meanwhile.
        cpu_before, started = process_cpu_s(server.process.pid), time.monotonic()
        time.sleep(1.0)     # a measuring window, not a synchronisation
        cpu = process_cpu_s(server.process.pid) - cpu_before
        self.assertLess(cpu, 0.3 * (time.monotonic() - started), "the accept loop spins")
        for sock in waiting:    # free the descriptors: the server recovers by itself
            sock.close()
        again = StreamClient(server.port, "topic=t")
        self.addCleanup(again.close)
        while "connected" not in again.parser.comments:
            again.pump()
        status, _, _ = http_request(server.port, "POST", "/publish?topic=t", b"after",
                                    {"Content-Type": "text/plain"})
        self.assertEqual(status, 200)
        self.assertEqual(first.next_event().data, "after")      # served all along
        self.assertEqual(again.next_event().data, "after")
        self.assertIn("accepting connections again", stderr_lines.get(timeout=WAIT_S))


def queue_lines(stream) -> queue.Queue:
    """The lines of a child's pipe, as they come, read by a daemon thread."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class UserHistoryTests(ServerTestCase):
    """The README's History of your own, as printed, end to end."""

    def start_server(self, **options):
        code = readme_block("python", "class ListHistory").replace(
            'server = SSEServer(("127.0.0.1", 0), history=ListHistory())', "")
        namespace: dict = {}
        exec(code, namespace)
        return super().start_server(history=namespace["ListHistory"](), **options)

    def test_replay_after_an_id_and_after_a_foreign_one(self):
        ids = [self.server.broker.publish(topic, data).id
               for topic, data in [("a", "a0"), ("b", "b0"), ("a", "a1"), ("c", "c0")]]
        client = self.subscribe("topic=a&topic=b", headers=[f"Last-Event-ID: {ids[0]}"])
        self.assertEqual([(e.data, e.id) for e in client.take(2)],
                         [("b0", ids[1]), ("a1", ids[2])])
        self.subscribed(1)
        live = self.server.broker.publish("a", "live").id
        self.assertEqual(client.next_event().id, live)
        again = self.subscribe("topic=c", headers=["Last-Event-ID: elsewhere-7"])
        reset, event = again.take(2)
        self.assertEqual((reset.type, json.loads(reset.data)["reason"]), ("reset", "unknown-id"))
        self.assertEqual((event.data, event.id), ("c0", ids[3]))
        assert_nothing_else(self, again, self.server.broker.publish, "c")


# --- Mercure hub (draft-dunglas-mercure-07) ----------------------------------------------

MERCURE = sse_server.MERCURE_PATH


def mercure_query(*selectors, **more) -> str:
    return urllib.parse.urlencode([*(("topic", s) for s in selectors), *more.items()])


def mercure_post(port, fields, token_text=None, content_type=sse_server.FORM_CONTENT_TYPE,
                 query=""):
    """POST a Mercure update (fields: a list of pairs); (status, headers, body)."""
    headers = {"Content-Type": content_type}
    if token_text is not None:
        headers["Authorization"] = f"Bearer {token_text}"
    body = fields if isinstance(fields, (bytes, str)) else urllib.parse.urlencode(fields)
    return http_request(port, "POST", MERCURE + query, body, headers)


class URITemplateTests(unittest.TestCase):
    """Selectors as RFC 6570 templates: is the topic an expansion?"""

    def matches(self, template, topic):
        return sse_server.URITemplate(template).matches(topic)

    def test_simple_expression_is_one_segment(self):
        template = "https://example.com/books/{id}"
        self.assertTrue(self.matches(template, "https://example.com/books/1"))
        self.assertTrue(self.matches(template, "https://example.com/books/"))   # empty value
        self.assertTrue(self.matches(template, "https://example.com/books/a%2Fb"))
        self.assertTrue(self.matches(template, "https://example.com/books/caf\u00e9"))
        self.assertTrue(self.matches(template, "https://example.com/books/1,2"))  # a list
        for other in ("https://example.com/books/1/reviews", "https://example.com/book/1",
                      "https://example.com/books/a?b", "https://example.com/books/%zz"):
            with self.subTest(other):
                self.assertFalse(self.matches(template, other))

    def test_operators(self):
        cases = [
            ("/files{+path}", "/files/a/b/c.txt", True),
            ("/files{+path}", "/files/a b", False),            # a space is never in a URI
            ("/page{#section}", "/page#intro", True),
            ("/page{#section}", "/page", True),
            ("/page{#section}", "/pageintro", False),
            ("/doc{.format}", "/doc.json", True),
            ("/doc{.format}", "/doc/json", False),
            ("/map{/x,y}", "/map/1/2", True),
            ("/map{/x,y}", "/map/1/2/3/4", True),              # explode is allowed too
            ("/map{/x}", "/map1", False),
            ("/m{;x,y}", "/m;x=1;y=2", True),
            ("/search{?q,lang}", "/search?q=cat&lang=en", True),
            ("/search{?q,lang}", "/search&q=cat", False),
            ("/search?q=1{&page}", "/search?q=1&page=2", True),
            ("{a}", "", True),
            ("https://e.com/{a}/{b}", "https://e.com/x/y", True),
            ("https://e.com/{a}/{b}", "https://e.com/x", False),
            ("https://e.com/{a}-{b}", "https://e.com/x-y-z", True),    # any split will do
        ]
        for template, topic, expected in cases:
            with self.subTest(template=template, topic=topic):
                self.assertEqual(self.matches(template, topic), expected)

    def test_invalid_templates_are_refused(self):
        for bad in ("https://e.com/{id", "https://e.com/id}", "/{}", "/{a b}", "/{a,}",
                    "/{!a}", "/{a:0}", "/{a:10000}"):
            with self.subTest(bad), self.assertRaises(ValueError):
                sse_server.URITemplate(bad)

    def test_no_template_can_make_matching_blow_up(self):
        # A backtracking matcher takes 2^40 steps here: each expression may
        # end anywhere. The position-set walk takes (parts x length).
        template = "{a}" * 40 + "!"
        self.assertFalse(self.matches(template, "x" * 2000 + "?"))
        self.assertTrue(self.matches(template, "x" * 2000 + "!"))

    def test_selectors(self):
        compile_selector = sse_server.compile_selector
        self.assertTrue(compile_selector("*").matches("anything at all"))
        self.assertTrue(compile_selector("urn:a").matches("urn:a"))
        self.assertFalse(compile_selector("urn:a").matches("urn:ab"))
        template = compile_selector("https://e.com/{id}")
        self.assertTrue(template.matches("https://e.com/{id}"))  # a selector matches itself
        self.assertTrue(template.matches("https://e.com/7"))
        self.assertIs(compile_selector("https://e.com/{id}"), template)   # compiled once
        self.assertEqual([sse_server.is_pattern(s) for s in ("*", "a/{b}", "urn:x")],
                         [True, True, False])

    def test_selector_sets_answer_private_questions_once_per_topic_list(self):
        selectors = sse_server.SelectorSet(["https://e.com/users/{id}", "urn:admin"])
        self.assertTrue(selectors.matches_any(("https://e.com/books/1", "https://e.com/users/1")))
        self.assertFalse(selectors.matches_any(("https://e.com/books/1",)))
        self.assertTrue(selectors.matches_any(("urn:admin",)))
        self.assertEqual(len(selectors._answers), 3)

    def test_mercure_claims(self):
        claims = sse_server.mercure_claims({"mercure": {"publish": ["*"], "payload": {"u": 1}}})
        self.assertEqual(claims, (("*",), (), {"u": 1}))
        self.assertIsNone(sse_server.mercure_claims({"sub": "x"}))
        for bad in ({"mercure": ["*"]}, {"mercure": {"subscribe": "*"}},
                    {"mercure": {"publish": [1]}}, {"mercure": {"subscribe": ["/{"]}}):
            with self.subTest(bad), self.assertRaises(HTTPError) as caught:
                sse_server.mercure_claims(bad)
            self.assertEqual(caught.exception.status, 401)

    def test_reserved_topics(self):
        reserved = sse_server.is_reserved_topic
        self.assertTrue(reserved("/.well-known/mercure/subscriptions/a/b"))
        self.assertTrue(reserved("https://hub.example/.well-known/mercure/subscriptions"))
        self.assertFalse(reserved("https://e.com/.well-known/mercurex"))
        self.assertFalse(reserved("urn:.well-known/mercure/x"))


class MercureHubTests(ServerTestCase):
    """The Mercure routes on a server with a JWT key, read at the byte level."""

    server_options = {"jwt_secret": SECRET}
    publisher = token(mercure={"publish": ["*"]})

    def hub(self, *selectors, headers=(), **query):
        return self.subscribe(mercure_query(*selectors, **query), path=MERCURE, headers=headers)

    def post(self, fields, token_text=publisher, **options):
        return mercure_post(self.port, fields, token_text, **options)

    def publish_update(self, *topics, data="x", **fields):
        status, headers, body = self.post([*(("topic", t) for t in topics), ("data", data),
                                           *fields.items()])
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["Content-Type"], "text/plain; charset=utf-8")
        return body.decode("utf-8")

    def test_publish_answers_the_id_and_the_stream_carries_it_byte_for_byte(self):
        client = self.hub("https://example.com/books/{id}")
        self.subscribed(1)
        update_id = self.publish_update("https://example.com/books/1",
                                        data="first line\n\n  indented\nlast", type="book",
                                        retry="2500")
        self.assertRegex(update_id, r"^urn:sse:[0-9a-f]{8}-1$")    # an IRI (RFC 3987)
        event = client.next_event()
        self.assertEqual((event.type, event.data, event.id),
                         ("book", "first line\n\n  indented\nlast", update_id))
        self.assertEqual(client.parser.retry, 2500)
        self.assertIn((f"id: {update_id}\nevent: book\nretry: 2500\ndata: first line\n"
                       "data: \ndata:   indented\ndata: last\n\n").encode(), client.raw)

    def test_form_decoding_turns_plus_into_space(self):
        client = self.hub("urn:t")
        self.subscribed(1)
        status, _, body = self.post("topic=urn:t&data=one+two%2Bthree")
        self.assertEqual(status, 200, body)
        self.assertEqual(client.next_event().data, "one two+three")

    def test_selectors_pick_canonical_and_alternate_topics_once(self):
        books = self.hub("https://example.com/books/{id}")
        exact = self.hub("https://example.com/authors/2")
        everything = self.hub("*")
        self.subscribed(3)
        self.publish_update("https://example.com/books/1", "https://example.com/authors/2",
                            data="both")
        self.publish_update("https://example.com/books/1/reviews/3", data="neither")
        self.publish_update("https://example.com/authors/2", data="author")
        self.assertEqual([e.data for e in books.take(1)], ["both"])
        self.assertEqual([e.data for e in exact.take(2)], ["both", "author"])
        self.assertEqual([e.data for e in everything.take(3)], ["both", "neither", "author"])
        assert_nothing_else(self, [books], lambda topic, data: self.publish_update(
            topic, data=data), "https://example.com/books/9")
        self.assertEqual(self.server.stats()["selectors"], 2)   # the template and *

    def test_a_topic_selector_matches_itself(self):
        client = self.hub("https://example.com/books/{id}")
        self.subscribed(1)
        self.publish_update("https://example.com/books/{id}", data="the template itself")
        self.assertEqual(client.next_event().data, "the template itself")

    def test_events_route_is_unchanged(self):
        mercure = self.hub("t")
        plain = self.subscribe("topic=t", headers=[f"Authorization: Bearer {self.publisher}"])
        self.subscribed(2)
        self.server.broker.publish("t", "from the api")
        self.assertRegex(plain.next_event().id, r"^[0-9a-f]{8}-1$")
        self.assertEqual(mercure.next_event().data, "from the api")

    def test_publishing_needs_a_mercure_publish_claim_covering_every_topic(self):
        fields = [("topic", "https://example.com/books/1"), ("topic", "urn:other"),
                  ("data", "x")]
        status, headers, _ = self.post(fields, token_text=None)
        self.assertEqual((status, headers["WWW-Authenticate"]), (401, "Bearer"))
        status, _, body = self.post(fields, token_text=token(sse={"publish": ["*"]}))
        self.assertEqual((status, b"mercure.publish" in body), (403, True))
        narrow = token(mercure={"publish": ["https://example.com/books/{id}"]})
        status, _, body = self.post(fields, token_text=narrow)
        self.assertEqual(status, 403)
        self.assertIn(b"urn:other", body)
        status, _, body = self.post(fields[:1] + fields[2:], token_text=narrow)
        self.assertEqual(status, 200, body)
        status, _, _ = self.post(fields, token_text="not.a.token")
        self.assertEqual(status, 401)
        self.assertEqual(self.server.broker.events_published, 1)

    def test_publishing_by_cookie_needs_an_allowed_origin(self):
        self.use_server(jwt_secret=SECRET, cors_origins=["https://app.example"])
        body = "topic=urn:a&data=x"
        cookie = f"mercureAuthorization={self.publisher}"
        for origin, status in ((None, 403), ("https://evil.example", 403),
                               ("https://app.example", 200),
                               (f"http://127.0.0.1:{self.port}", 200)):
            headers = {"Content-Type": sse_server.FORM_CONTENT_TYPE, "Cookie": cookie,
                       "Host": f"127.0.0.1:{self.port}"}
            if origin:
                headers["Origin"] = origin
            with self.subTest(origin=origin):
                got, _, answer = http_request(self.port, "POST", MERCURE, body, headers)
                self.assertEqual(got, status, answer)
        self.assertEqual(self.server.broker.events_published, 2)

    def test_bad_updates_get_the_drafts_status_codes(self):
        cases = [
            ([("data", "no topic")], 400, b"missing topic"),
            ([("topic", "")], 400, b"empty topic"),
            ([("topic", "u" * (sse_server.MAX_IRI_CHARS + 1))], 400, b"longer than"),
            ([("topic", "urn:a\x01")], 400, b"control character"),
            ([("topic", "urn:a"), ("retry", "soon")], 400, b"retry"),
            ([("topic", "urn:a"), ("retry", "-1")], 400, b"retry"),
            ([("topic", "urn:a"), ("type", "a\nb")], 400, b""),
            ([("topic", "/.well-known/mercure/subscriptions/x/y")], 403, b"hub's own"),
            ([("topic", "https://hub/.well-known/mercure/subscriptions")], 403, b"hub's own"),
        ]
        for fields, status, message in cases:
            with self.subTest(fields=fields):
                got, _, body = self.post(fields)
                self.assertEqual(got, status, body)
                self.assertIn(message, body)
        got, _, body = self.post(b'{"topic": "urn:a"}', content_type="application/json")
        self.assertEqual(got, 415, body)
        got, _, body = self.post(b"topic=urn:a&data=%FF")
        self.assertEqual(got, 400, body)
        self.assertEqual(self.server.broker.events_published, 0)

    def test_bad_subscriptions(self):
        for query, status, message in [
                ("", 400, b"missing topic"), (mercure_query("https://e.com/{id"), 400,
                                              b"invalid URI template"),
                (mercure_query("x" * (sse_server.MAX_IRI_CHARS + 1)), 400, b"longer than")]:
            with self.subTest(query=query):
                got, _, body = http_request(self.port, "GET", f"{MERCURE}?{query}")
                self.assertEqual((got, message in body), (status, True), body)
        bad_claim = token(mercure={"subscribe": "everything"})
        got, headers, body = http_request(self.port, "GET", f"{MERCURE}?topic=a",
                                          headers={"Authorization": f"Bearer {bad_claim}"})
        self.assertEqual(got, 401, body)
        self.assertIn('error="invalid_token"', headers["WWW-Authenticate"])
        got, headers, _ = http_request(self.port, "PUT", f"{MERCURE}?topic=a")
        self.assertEqual((got, headers["Allow"]), (405, "GET, POST, OPTIONS"))

    def test_private_updates_reach_only_subscribers_whose_claim_matches(self):
        mine = token(mercure={"subscribe": ["https://example.com/users/{id}"]})
        other = token(mercure={"subscribe": ["https://example.com/users/2"]})
        anonymous = self.hub("https://example.com/books/{id}")
        by_header = self.hub("https://example.com/books/{id}",
                             headers=[f"Authorization: Bearer {mine}"])
        by_cookie = self.hub("https://example.com/books/{id}",
                             headers=[f"Cookie: a=b; mercureAuthorization={mine}"])
        by_query = self.hub("https://example.com/books/{id}", authorization=mine)
        unrelated = self.hub("https://example.com/books/{id}",
                             headers=[f"Authorization: Bearer {other}"])
        self.subscribed(5)
        # Private with an empty value: the field's presence is what counts;
        # the subscriber's claim matches the alternate topic.
        self.publish_update("https://example.com/books/1", "https://example.com/users/1",
                            data="secret", private="")
        self.publish_update("https://example.com/books/1", data="public")
        for client in (by_header, by_cookie, by_query):
            self.assertEqual([e.data for e in client.take(2)], ["secret", "public"])
        for client in (anonymous, unrelated):
            self.assertEqual(client.next_event().data, "public")

    def test_require_auth_refuses_anonymous_subscribers(self):
        self.use_server(jwt_secret=SECRET, require_auth=True)
        status, headers, _ = http_request(self.port, "GET", f"{MERCURE}?topic=a")
        self.assertEqual((status, headers["WWW-Authenticate"]), (401, "Bearer"))  # no error=
        client = self.hub("a", authorization=token(mercure={"subscribe": []}))
        self.assertEqual(client.status, 200)

    def test_a_token_ends_the_stream_when_it_expires(self):
        client = self.hub("a", authorization=token(mercure={}, exp=time.time() + 1))
        client.read_to_end(timeout=WAIT_S)
        self.assertTrue(client.ended)

    def test_reconnection_by_header_query_and_earliest(self):
        ids = [self.publish_update("urn:book:1", data=f"event {n}") for n in range(3)]
        ids.append(self.publish_update("urn:author:1", data="not selected"))
        header = self.hub("urn:book:{n}", headers=[f"Last-Event-ID: {ids[0]}"])
        self.assertEqual(header.headers["last-event-id"], ids[0])
        self.assertEqual([e.data for e in header.take(2)], ["event 1", "event 2"])
        query = self.hub("urn:book:{n}", lastEventID=ids[1])
        self.assertEqual([e.data for e in query.take(1)], ["event 2"])
        wins = self.hub("urn:book:{n}", lastEventID=ids[0],
                        headers=[f"Last-Event-ID: {ids[1]}"])   # the header wins
        self.assertEqual(wins.headers["last-event-id"], ids[1])
        self.assertEqual([e.data for e in wins.take(1)], ["event 2"])
        earliest = self.hub("urn:book:{n}", lastEventID="earliest")
        self.assertEqual(earliest.headers["last-event-id"], "earliest")
        self.assertEqual([e.data for e in earliest.take(3)], ["event 0", "event 1", "event 2"])
        # The native form of the id works too, and an unknown id says so.
        native = self.hub("urn:book:{n}", lastEventID=sse_server.native_id(ids[1]))
        self.assertEqual(native.next_event().data, "event 2")
        unknown = self.hub("urn:book:{n}", lastEventID="urn:uuid:1234")
        self.assertEqual(unknown.headers["last-event-id"], "earliest")
        self.assertEqual(unknown.next_event().type, "reset")
        self.assertEqual([e.data for e in unknown.take(3)], ["event 0", "event 1", "event 2"])
        assert_nothing_else(self, [header, query, wins, earliest, native, unknown],
                            lambda topic, data: self.publish_update(topic, data=data),
                            "urn:book:9")

    def test_a_publishers_id_is_the_events_id_and_a_reconnection_point(self):
        client = self.hub("urn:book:{n}")
        self.subscribed(1)
        first = self.publish_update("urn:book:1", data="one", id="https://example.com/rev/1")
        self.assertEqual(first, "https://example.com/rev/1")
        self.publish_update("urn:book:1", data="two", id="urn:uuid:5e0c-2")
        hub_id = self.publish_update("urn:book:2", data="three")
        self.assertEqual([e.id for e in client.take(3)],
                         ["https://example.com/rev/1", "urn:uuid:5e0c-2", hub_id])
        self.assertIn(b"id: https://example.com/rev/1\ndata: one\n\n", client.raw)
        resumed = self.hub("urn:book:{n}", headers=["Last-Event-ID: https://example.com/rev/1"])
        self.assertEqual(resumed.headers["last-event-id"], "https://example.com/rev/1")
        self.assertEqual([(e.data, e.id) for e in resumed.take(2)],
                         [("two", "urn:uuid:5e0c-2"), ("three", hub_id)])
        by_query = self.hub("urn:book:{n}", lastEventID="urn:uuid:5e0c-2")
        self.assertEqual(by_query.next_event().data, "three")
        # While an event holds an id, the id is refused; nothing is published.
        status, _, body = self.post([("topic", "urn:book:3"), ("data", "again"),
                                     ("id", "urn:uuid:5e0c-2")])
        self.assertEqual(status, 409, body)
        self.assertIn(b"still held", body)
        for bad, message in (("#1", b"'#'"), ("a\rb", b"line break"),
                             ("urn:sse:x-1", b"hub's own"), ("earliest", b"hub's own"),
                             (sse_server.native_id(hub_id), b"hub's own")):
            with self.subTest(id=bad):
                status, _, body = self.post([("topic", "urn:book:3"), ("id", bad)])
                self.assertEqual((status, message in body), (400, True), body)
        assert_nothing_else(self, [client, resumed, by_query],
                            lambda topic, data: self.publish_update(topic, data=data),
                            "urn:book:9")

    def test_an_id_is_free_again_once_its_event_is_gone(self):
        self.use_server(jwt_secret=SECRET, history_size=1)
        self.publish_update("urn:a", "urn:b", data="old", id="rev-1")
        self.publish_update("urn:a", data="newer")      # urn:b still holds rev-1
        status, _, _ = self.post([("topic", "urn:c"), ("id", "rev-1")])
        self.assertEqual(status, 409)
        self.publish_update("urn:b", data="newer too")  # now no topic does
        self.assertEqual(self.publish_update("urn:c", data="reused", id="rev-1"), "rev-1")
        client = self.hub("urn:c", lastEventID="rev-1")
        assert_nothing_else(self, client, lambda topic, data: self.publish_update(
            topic, data=data), "urn:c")

    def test_concurrent_publishers_of_one_id_one_wins(self):
        results = []
        barrier = threading.Barrier(8)

        def publish():
            barrier.wait()
            results.append(self.post([("topic", "urn:race"), ("data", "x"),
                                      ("id", "urn:race:1")])[0])
        threads = [threading.Thread(target=publish) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        self.assertEqual(sorted(results), [200] + [409] * 7)
        self.assertEqual(self.server.broker.events_published, 1)

    def test_a_replay_never_shows_a_private_update_to_whom_may_not_see_it(self):
        self.publish_update("urn:book:1", data="secret", private="on")
        self.publish_update("urn:book:1", data="public")
        anonymous = self.hub("urn:book:{n}", lastEventID="earliest")
        self.assertEqual(anonymous.next_event().data, "public")
        allowed = self.hub("urn:book:{n}", lastEventID="earliest",
                           authorization=token(mercure={"subscribe": ["urn:book:{n}"]}))
        self.assertEqual([e.data for e in allowed.take(2)], ["secret", "public"])

    def test_stats_and_metrics_count_mercure_subscribers(self):
        self.hub("a")
        self.subscribe("topic=b")
        self.subscribed(2)
        wait_until(lambda: self.server.stats()["mercure_subscribers"] == 1)
        status, _, body = http_request(self.port, "GET", "/metrics")
        self.assertIn(b"\nsse_mercure_subscribers 1\n", body)

    def test_cors_preflight_on_the_hub(self):
        self.use_server(jwt_secret=SECRET, cors_origins=["https://app.example"])
        status, headers, _ = http_request(self.port, "OPTIONS", MERCURE, headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        self.assertEqual(status, 204)
        self.assertIn("POST", headers["Access-Control-Allow-Methods"])
        self.assertEqual(headers["Access-Control-Allow-Origin"], "https://app.example")

    def test_tokens_in_the_query_are_not_logged(self):
        SERVER_LOG.records.clear()
        secret_token = token(mercure={"subscribe": ["*"]})
        self.hub("a", authorization=secret_token).close()
        lines = lambda: [r.getMessage() for r in SERVER_LOG.records
                         if r.name == "sse_server.access" and "mercure" in r.getMessage()]
        wait_until(lines, message="the stream's access-log line")
        self.assertNotIn(secret_token, "\n".join(lines()))
        self.assertIn("authorization=[redacted]", lines()[0])


class MercurePresenceTests(ServerTestCase):
    """--subscriptions: subscription updates and the subscriptions API."""

    server_options = {"jwt_secret": SECRET, "mercure_subscriptions": True}
    ALL = "/.well-known/mercure/subscriptions{/topic}{/subscriber}"
    watcher_token = token(mercure={"subscribe": [ALL], "payload": {"role": "admin"}})

    def hub(self, *selectors, **query):
        return self.subscribe(mercure_query(*selectors, **query), path=MERCURE)

    def api(self, path, token_text=watcher_token):
        headers = {"Authorization": f"Bearer {token_text}"} if token_text else {}
        status, headers, body = http_request(self.port, "GET", path, headers=headers)
        return status, headers, json.loads(body) if status == 200 else body

    def test_subscribe_and_disconnect_are_private_updates_on_the_subscriptions_topic(self):
        watcher = self.hub(self.ALL, authorization=self.watcher_token)
        anonymous = self.hub(self.ALL)
        own = json.loads(watcher.next_event().data)     # its own subscription, first
        self.assertEqual((own["topic"], own["active"], own["payload"]),
                         (self.ALL, True, {"role": "admin"}))
        theirs = json.loads(watcher.next_event().data)  # the anonymous one's (no payload)
        self.assertEqual((theirs["topic"], "payload" in theirs), (self.ALL, False))
        reader = token(mercure={"subscribe": ["urn:x"], "payload": {"user": 7}})
        client = self.hub("https://example.com/books/{id}", "urn:a", authorization=reader)
        joined = [json.loads(e.data) for e in watcher.take(2)]
        subscriber = joined[0]["subscriber"]
        self.assertRegex(subscriber, r"^urn:uuid:[0-9a-f-]{36}$")
        quote = lambda text: urllib.parse.quote(text, safe="")
        self.assertEqual(joined[0], {
            "@context": "https://mercure.rocks/",
            "id": f"/.well-known/mercure/subscriptions/{quote('https://example.com/books/{id}')}"
                  f"/{quote(subscriber)}",
            "type": "Subscription", "topic": "https://example.com/books/{id}",
            "subscriber": subscriber, "active": True, "payload": {"user": 7}})
        self.assertEqual((joined[1]["topic"], joined[1]["subscriber"]), ("urn:a", subscriber))
        client.close()
        left = [json.loads(e.data) for e in watcher.take(2)]
        self.assertEqual([(d["topic"], d["active"]) for d in left],
                         [("https://example.com/books/{id}", False), ("urn:a", False)])
        # The anonymous subscriber to the same selector saw none of it.
        # (the marker comes from the API: publishers may not use the hub's topics)
        assert_nothing_else(self, [anonymous], lambda topic, data: self.server.broker.publish(
            sse_server.validate_iris([topic]), data), self.ALL)

    def test_the_subscriptions_api(self):
        reader = token(mercure={"subscribe": [], "payload": "p"})
        self.hub("urn:a", authorization=reader)
        self.hub("urn:a", "urn:b")
        wait_until(lambda: self.server.stats()["mercure_subscribers"] == 2)
        status, headers, everything = self.api(sse_server.MERCURE_SUBSCRIPTIONS)
        self.assertEqual((status, headers["Content-Type"]), (200, "application/ld+json"))
        self.assertEqual((everything["@context"], everything["id"], everything["type"]),
                         ("https://mercure.rocks/", "/.well-known/mercure/subscriptions",
                          "Subscriptions"))
        self.assertEqual(everything["lastEventID"],
                         "urn:sse:" + sse_server.native_id(self.server.broker.last_event_id))
        self.assertEqual(sorted(d["topic"] for d in everything["subscriptions"]),
                         ["urn:a", "urn:a", "urn:b"])
        self.assertTrue(all("@context" not in d for d in everything["subscriptions"]))
        status, _, of_a = self.api(f"{sse_server.MERCURE_SUBSCRIPTIONS}/urn%3Aa")
        self.assertEqual((status, len(of_a["subscriptions"])), (200, 2))
        one = of_a["subscriptions"][0]
        status, _, single = self.api(one["id"])
        self.assertEqual(single, {"@context": "https://mercure.rocks/", **one,
                                  "lastEventID": everything["lastEventID"]})
        for path, expected in [(f"{sse_server.MERCURE_SUBSCRIPTIONS}/urn%3Aa/urn%3Auuid%3Ax", 404),
                               (f"{sse_server.MERCURE_SUBSCRIPTIONS}/a/b/c", 404)]:
            with self.subTest(path=path):
                self.assertEqual(self.api(path)[0], expected)
        # No token: a bare challenge (RFC 6750 3.1); a bad one: invalid_token.
        for sent, challenge in [(None, "Bearer"), ("x.y.z", 'Bearer error="invalid_token"')]:
            with self.subTest(token=sent):
                status, headers, _ = self.api(sse_server.MERCURE_SUBSCRIPTIONS, sent)
                self.assertEqual((status, headers["WWW-Authenticate"]), (401, challenge))
        narrow = token(mercure={"subscribe": [sse_server.MERCURE_SUBSCRIPTIONS + "/urn%3Ab{/s}"]})
        self.assertEqual(self.api(sse_server.MERCURE_SUBSCRIPTIONS, narrow)[0], 403)
        status, _, of_b = self.api(f"{sse_server.MERCURE_SUBSCRIPTIONS}/urn%3Ab", narrow)
        self.assertEqual([d["topic"] for d in of_b["subscriptions"]], ["urn:b"])
        status, headers, _ = http_request(self.port, "POST", sse_server.MERCURE_SUBSCRIPTIONS)
        self.assertEqual((status, headers["Allow"]), (405, "GET, OPTIONS"))

    def test_off_by_default(self):
        self.use_server(jwt_secret=SECRET)
        self.assertEqual(self.api(sse_server.MERCURE_SUBSCRIPTIONS)[0], 404)
        self.assertIsNone(self.server.presence)
        self.assertEqual(self.server.broker.events_published, 0)
        self.hub("urn:a")
        self.subscribed(1)
        self.assertEqual(self.server.broker.events_published, 0)    # nothing announced


PHP = shutil.which("php")
SYMFONY_MERCURE = "/usr/share/php/Symfony/Component/Mercure/autoload.php"   # Debian's
REQUIRE_MERCURE_CLIENT = os.environ.get("SSE_REQUIRE_MERCURE_CLIENT") == "1"
SYMFONY_PUBLISHER = r"""<?php
// argv: hub URL, JWT. Each line of stdin, a JSON update, is published with
// the Symfony Mercure component; each answer (the update's id) is printed.
require_once 'Symfony/Component/Mercure/autoload.php';
require_once 'Symfony/Component/HttpClient/autoload.php';
use Symfony\Component\Mercure\Hub;
use Symfony\Component\Mercure\Jwt\StaticTokenProvider;
use Symfony\Component\Mercure\Update;

$hub = new Hub($argv[1], new StaticTokenProvider($argv[2]));
while (($line = fgets(STDIN)) !== false) {
    $u = json_decode($line, true);
    echo $hub->publish(new Update($u['topics'], $u['data'], $u['private'] ?? false,
                                  $u['id'] ?? null, $u['type'] ?? null,
                                  $u['retry'] ?? null)), "\n";
}
"""


@unittest.skipUnless((PHP and os.path.exists(SYMFONY_MERCURE)) or REQUIRE_MERCURE_CLIENT,
                     "php or Symfony's Mercure component not found (apt-get install php-cli "
                     "php-symfony-mercure); set SSE_REQUIRE_MERCURE_CLIENT=1 to fail instead")
class SymfonyMercureTests(ServerTestCase):
    """Publishing through a real client: Symfony's Mercure component (the
    one Symfony and API Platform use), as Debian packages it."""

    server_options = {"jwt_secret": SECRET}

    def publish_with_symfony(self, updates: list[dict], token_text: str) -> list[str]:
        if not (PHP and os.path.exists(SYMFONY_MERCURE)):
            self.fail("SSE_REQUIRE_MERCURE_CLIENT=1 but php or php-symfony-mercure is missing")
        folder = tempfile.mkdtemp(prefix="sse-symfony-")
        self.addCleanup(shutil.rmtree, folder)
        script = os.path.join(folder, "publish.php")
        with open(script, "w") as file:
            file.write(SYMFONY_PUBLISHER)
        done = subprocess.run([PHP, script, f"http://127.0.0.1:{self.port}{MERCURE}",
                               token_text], input="".join(json.dumps(u) + "\n" for u in updates),
                              capture_output=True, text=True, timeout=WAIT_S)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        return done.stdout.splitlines()

    def test_updates_published_by_symfony_arrive_exactly(self):
        reader = token(mercure={"subscribe": ["https://example.com/users/{id}"]})
        anonymous = self.subscribe(mercure_query("https://example.com/books/{id}"), path=MERCURE)
        allowed = self.subscribe(mercure_query("https://example.com/books/{id}",
                                               authorization=reader), path=MERCURE)
        self.subscribed(2)
        ids = self.publish_with_symfony([
            {"topics": ["https://example.com/books/1"], "data": "a b+c\n\n  indented",
             "type": "book", "retry": 2500, "id": "https://example.com/books/1/rev/1"},
            {"topics": ["https://example.com/books/1", "https://example.com/users/7"],
             "data": "{\"secret\": true}", "private": True},
            {"topics": "https://example.com/books/2", "data": "caf\u00e9 \u263a"},
        ], token(mercure={"publish": ["*"]}))
        self.assertEqual(ids[0], "https://example.com/books/1/rev/1")
        self.assertRegex(ids[1], r"^urn:sse:[0-9a-f]{8}-2$")
        got = [(e.type, e.data, e.id) for e in allowed.take(3)]
        self.assertEqual(got, [("book", "a b+c\n\n  indented", ids[0]),
                               ("message", '{"secret": true}', ids[1]),
                               ("message", "caf\u00e9 \u263a", ids[2])])
        self.assertEqual(allowed.parser.retry, 2500)
        self.assertEqual([e.data for e in anonymous.take(2)],
                         ["a b+c\n\n  indented", "caf\u00e9 \u263a"])

    def test_symfony_sees_a_refusal_as_a_failure(self):
        done = None
        with self.assertRaises(AssertionError) as caught:
            done = self.publish_with_symfony([{"topics": "urn:a", "data": "x"}],
                                             token(mercure={"publish": ["urn:b"]}))
        self.assertIsNone(done)
        self.assertIn("Failed to send an update", str(caught.exception))
        self.assertEqual(self.server.broker.events_published, 0)


class MercureWithoutKeyTests(ServerTestCase):
    """No JWT key: the loopback rule, as for /publish."""

    def test_loopback_publishes_without_a_token(self):
        client = self.subscribe(mercure_query("urn:a"), path=MERCURE)
        self.subscribed(1)
        status, _, body = mercure_post(self.port, [("topic", "urn:a"), ("data", "hi")])
        self.assertEqual(status, 200, body)
        self.assertEqual(client.next_event().data, "hi")

    def test_private_updates_reach_nobody_without_a_key(self):
        client = self.subscribe(mercure_query("urn:a"), path=MERCURE)
        self.subscribed(1)
        status, _, _ = mercure_post(self.port, [("topic", "urn:a"), ("data", "p"),
                                                ("private", "on")])
        self.assertEqual(status, 200)
        assert_nothing_else(self, client, lambda topic, data: mercure_post(
            self.port, [("topic", topic), ("data", data)]), "urn:a")


class MercureStoreTests(unittest.TestCase):
    """Private updates and templates replayed from the store, across a restart."""

    def test_replay_after_a_restart_keeps_privacy_and_selectors(self):
        baseline = live_threads()
        folder = tempfile.mkdtemp(prefix="sse-mercure-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "events.db")
        publisher = token(mercure={"publish": ["*"]})
        server = run_server(self, store=path, jwt_secret=SECRET)
        port = server.server_address[1]
        for fields in ([("topic", "urn:book:1"), ("data", "secret"), ("private", "")],
                       [("topic", "urn:book:2"), ("topic", "urn:all"), ("data", "public")],
                       [("topic", "urn:author:1"), ("data", "other")]):
            self.assertEqual(mercure_post(port, fields, publisher)[0], 200)
        server.stop()
        server = run_server(self, store=path, jwt_secret=SECRET)
        port = server.server_address[1]
        allowed = token(mercure={"subscribe": ["urn:book:{n}"]})
        for authorization, expected in ((None, ["public"]), (allowed, ["secret", "public"])):
            query = mercure_query("urn:book:{n}", lastEventID="earliest",
                                  **({"authorization": authorization} if authorization else {}))
            client = StreamClient(port, query, path=MERCURE)
            self.addCleanup(client.close)
            self.assertEqual([e.data for e in client.take(len(expected))], expected)
            self.assertEqual(client.parser.events, collections.deque())
        server.stop()
        wait_until(lambda: live_threads() <= baseline, message="threads to end")

    def test_publishers_ids_are_kept_in_the_file(self):
        baseline = live_threads()
        folder = tempfile.mkdtemp(prefix="sse-mercure-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "events.db")
        ids = []
        for run in range(2):
            server = run_server(self, store=path, store_cache_size=1)
            port = server.server_address[1]
            for n in range(3):
                status, _, body = mercure_post(port, [("topic", "urn:a"), ("data", f"{run}.{n}"),
                                                      ("id", f"rev-{run}-{n}")])
                self.assertEqual(status, 200, body)
                ids.append(body.decode())
            # rev-0-0 is held by the file (the cache keeps one event): refused,
            # and a reconnection point, in the first run and after the restart.
            status, _, body = mercure_post(port, [("topic", "urn:b"), ("id", "rev-0-0")])
            self.assertEqual(status, 409, body)
            client = StreamClient(port, mercure_query("urn:a", lastEventID="rev-0-0"),
                                  path=MERCURE)
            self.addCleanup(client.close)
            expected = [f"{r}.{n}" for r in range(run + 1) for n in range(3)][1:]
            self.assertEqual([e.data for e in client.take(len(expected))], expected)
            client.close()
            server.stop()
        self.assertEqual(ids, [f"rev-{r}-{n}" for r in range(2) for n in range(3)])
        wait_until(lambda: live_threads() <= baseline, message="threads to end")

    def test_a_format_2_store_is_migrated(self):
        folder = tempfile.mkdtemp(prefix="sse-mercure-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "events.db")
        history = sse_server.SQLiteHistory(path)
        broker = sse_server.Broker(history=history)
        broker.publish("a", "kept")
        broker.close()
        history.close()
        with contextlib.closing(sqlite3.connect(path)) as db:     # back to format 2
            db.execute("CREATE TABLE old AS SELECT topic, seq, created, frame FROM events")
            db.execute("DROP TABLE events")
            db.execute("CREATE TABLE events (topic TEXT NOT NULL, seq INTEGER NOT NULL, "
                       "created REAL NOT NULL, frame BLOB NOT NULL, "
                       "PRIMARY KEY (topic, seq)) WITHOUT ROWID")
            db.execute("INSERT INTO events SELECT * FROM old")
            db.execute("DROP TABLE old")
            db.execute("UPDATE meta SET value = '2' WHERE key = 'format'")
            db.commit()
        history = sse_server.SQLiteHistory(path)
        broker = sse_server.Broker(history=history)
        broker.publish("a", "new", private=True)
        subscriber, replay = broker.subscribe(["a"], last_event_id="earliest")
        self.assertEqual(data_of(replay), ["kept"])
        broker.close()
        history.close()
        with contextlib.closing(sqlite3.connect(path)) as db:
            self.assertEqual(db.execute("SELECT value FROM meta WHERE key='format'").fetchone(),
                             (sse_server.STORE_FORMAT,))


class DocumentationTests(unittest.TestCase):
    def test_the_readme_says_how_many_tests_there_are(self):
        count = unittest.defaultTestLoader.loadTestsFromModule(
            sys.modules[__name__]).countTestCases()
        said = re.search(r"runs everything \((\d+) tests\)", read_text(
            os.path.join(HERE, "README.md")))
        self.assertIsNotNone(said, "the README's Tests section names no count")
        self.assertEqual(int(said.group(1)), count)

    def test_every_name_in_the_roadmap_is_real(self):
        doc = sse_server.__doc__
        roadmap = doc[doc.index("Roadmap"):doc.index("The premise of the I/O")]
        dotted = re.findall(r"\b([A-Z]\w+)\.(\w+)\b", roadmap)
        self.assertGreater(len(dotted), 20)
        for owner, name in dotted:
            with self.subTest(name=f"{owner}.{name}"):
                self.assertTrue(hasattr(getattr(sse_server, owner), name))
        classes = [value for value in vars(sse_server).values() if isinstance(value, type)]
        for name in set(re.findall(r"(?<![.\w])([a-z]+_\w+|[A-Z][a-z]+[A-Z]\w*)\b", roadmap)):
            with self.subTest(name=name):
                self.assertTrue(hasattr(sse_server, name) or
                                any(hasattr(cls, name) for cls in classes), name)


class CommandLineTests(unittest.TestCase):
    def test_every_setting_has_a_flag_a_help_line_with_its_default_and_a_readme_row(self):
        parser = sse_server.build_parser()
        actions = {action.dest: action for action in parser._actions}
        readme = read_text(os.path.join(HERE, "README.md"))
        table = readme[readme.index("## Options"):readme.index("## Securing a deployment")]
        output = run_command_line("--help").stdout
        for field in dataclasses.fields(sse_server.Settings):
            flag = field.metadata["flag"]
            with self.subTest(field=field.name):
                action = actions[field.name]
                self.assertEqual(action.option_strings, [flag])
                self.assertIn(flag, output)
                self.assertEqual(action.help.count("default"), 1, action.help)
                if field.metadata["shown"] is None and field.default not in (None, (), False):
                    self.assertTrue(action.help.endswith(f"(default: {field.default})")
                                    or field.metadata["env"], action.help)
                    self.assertEqual(action.default, field.default)
                self.assertRegex(table, rf"\n\| [^\n]*`{flag}[ `]", "no README row")

    def test_no_arguments_give_the_default_settings(self):
        names = [f.metadata["env"] for f in dataclasses.fields(sse_server.Settings)
                 if f.metadata["env"]]
        saved = {name: os.environ.pop(name) for name in names if name in os.environ}
        self.addCleanup(os.environ.update, saved)
        args = vars(sse_server.build_parser().parse_args([]))
        self.assertEqual(sse_server.Settings(**args), sse_server.Settings())
        os.environ["SSE_PUBLISH_TOKEN"] = "from-env"
        self.addCleanup(os.environ.pop, "SSE_PUBLISH_TOKEN")
        args = vars(sse_server.build_parser().parse_args([]))
        self.assertEqual(sse_server.Settings(**args).publish_token, "from-env")

    def test_redis_without_the_package_says_how_to_install_it(self):
        with tempfile.TemporaryDirectory() as shim:
            os.makedirs(os.path.join(shim, "redis"))
            with open(os.path.join(shim, "redis", "__init__.py"), "w") as file:
                file.write("raise ImportError('no redis here')\n")
            process = run_command_line("--redis", "redis://127.0.0.1:1/0",
                                       env={**os.environ, "PYTHONPATH": shim})
        self.assertEqual(process.returncode, 1)
        self.assertEqual(process.stderr.strip().splitlines(),
                         ["sse_server: --redis needs the redis package: pip install redis"])

    def test_bad_option_value_is_refused(self):
        for args, says in ((["--queue-size", "0"], "--queue-size must be greater than 0"),
                           (["--store-cache", "-1"], "--store-cache must not be negative")):
            with self.subTest(args=args):
                process = run_command_line(*args)
                self.assertEqual(process.returncode, 2)
                self.assertIn(says, process.stderr)

    def test_a_second_signal_while_stopping_exits_at_once(self):
        """Shutdown waits for streams to say goodbye; clients that read
        nothing make it wait its whole grace. A second SIGTERM ends that."""
        server = ServerProcess(self)
        clients = [StreamClient(server.port, "topic=full", recv_buffer=4096)
                   for _ in range(20)]
        for client in clients:
            self.addCleanup(client.close)
        wait_until(lambda: json.loads(http_request(server.port, "GET", "/stats")[2])[
            "subscribers"] == 20, message="20 subscribers")
        payload = "x" * 60_000
        for _ in range(100):    # far more than the socket buffers hold: writes wait
            http_request(server.port, "POST", "/publish?topic=full", payload.encode(),
                         {"Content-Type": "text/plain"})
        server.process.send_signal(signal.SIGTERM)
        self.assertIn("stopping", server.process.stdout.readline())
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(WAIT_S)
        self.assertEqual(server.process.returncode, 128 + signal.SIGTERM)
        self.assertIn("stopped at once", server.process.stderr.read())

    def test_cpu_pins_every_thread_or_says_why_it_cannot(self):
        if not hasattr(os, "sched_setaffinity"):    # portable mode: as on Windows or macOS
            with self.assertRaisesRegex(ValueError, "cannot pin a process"):
                sse_server._pin_to_cpu(0)
            return
        cpu = max(os.sched_getaffinity(0))
        server = ServerProcess(self, "--cpu", str(cpu))
        client = StreamClient(server.port, "topic=pinned")    # a stream's thread too
        self.addCleanup(client.close)
        while "connected" not in client.parser.comments:
            client.pump()
        allowed = {}
        for task in os.listdir(f"/proc/{server.process.pid}/task"):
            with open(f"/proc/{server.process.pid}/task/{task}/status") as file:
                allowed[task] = next(line.split()[1] for line in file
                                     if line.startswith("Cpus_allowed_list:"))
        self.assertGreaterEqual(len(allowed), 3)    # main, accept, the stream (and helpers)
        self.assertEqual(set(allowed.values()), {str(cpu)})
        refused = run_command_line("--cpu", "100000")
        self.assertEqual(refused.returncode, 2)
        self.assertIn("--cpu 100000: this process may run only on CPU", refused.stderr)

    def test_runs_prints_url_and_stops_on_sigterm(self):
        server = ServerProcess(self)        # fails unless it prints its URL
        client = StreamClient(server.port, "topic=cli")
        self.addCleanup(client.close)
        while "connected" not in client.parser.comments:
            client.pump()
        started = time.monotonic()
        errors = server.stop(signal.SIGTERM)
        self.assertEqual(server.process.returncode, 0)
        self.assertLess(time.monotonic() - started, 2.0)
        client.read_to_end()
        self.assertTrue(client.ended)
        self.assertNotIn("Traceback", errors)


if __name__ == "__main__":
    unittest.main()
