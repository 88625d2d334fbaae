#!/usr/bin/env python3
"""What one idle subscriber costs our server in memory, and where it goes.

    python3 bench/memory.py                     # 2,000 subscribers on /events
    python3 bench/memory.py --mercure           # on /.well-known/mercure
    python3 bench/memory.py --subscribers 5000 --server-args="--store /tmp/m.db"

The server runs as a child process (sse_server.main, as bench/bench.py runs
it: warnings-only log, its 256 KiB thread stacks). This script connects the
subscribers, waits until every stream has started and the server is quiet,
and asks the child (SIGUSR1) for a report of:

- the Python objects a subscriber holds alone: what its Subscriber, its
  request handler and its thread's frames reach, less what another
  subscriber reaches too (the server, the broker, modules, types, shared
  constants); sys.getsizeof (__sizeof__) of each, by type, for a few
  subscribers (the median);
- the pages each parked thread has touched on its stack: the Rss of the
  stack mappings in /proc/PID/smaps;
- the process's RSS growth per subscriber (/proc/PID/statm), which holds
  the two above and what Python and the C library allocate out of sight:
  the thread's state and frame chunk, malloc's bookkeeping, and pages only
  partly used.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (this folder's bench.py)

SAMPLES = 5     # subscribers measured object by object (each against another)


# --- The child: our server, and the report it writes when asked -----------

def serve_and_report(output: str, argv: list[str]) -> int:
    sys.path.insert(0, bench.ROOT)
    import sse_server

    servers = []
    original_init = sse_server.SSEServer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        servers.append(self)

    def report(signum, frame) -> None:
        with open(output + ".part", "w") as file:
            json.dump(measure(sse_server, servers[0]), file)
        os.replace(output + ".part", output)

    sse_server.SSEServer.__init__ = init
    signal.signal(signal.SIGUSR1, report)
    return sse_server.main(argv)


def measure(sse_server, server) -> dict:
    import gc
    import types

    parked = {}     # Subscriber: the frames of its thread, innermost first
    for top in sys._current_frames().values():
        chain = []
        while top is not None:
            chain.append(top)
            top = top.f_back
        subscriber = next((frame.f_locals.get("self") for frame in chain
                           if frame.f_code.co_name == "pump"), None)
        if isinstance(subscriber, sse_server.Subscriber):
            parked[subscriber] = chain

    # Where a walk stops: what every subscriber shares.
    shared = {id(server), id(server.broker), id(server.settings), id(sys.modules)}
    shared.update(id(vars(module)) for module in list(sys.modules.values()))
    opaque = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
              types.CodeType, types.MethodDescriptorType, types.WrapperDescriptorType)
    ours = {sse_server.Subscriber, sse_server.SSERequestHandler, sse_server.SocketIO,
            sse_server.StartupTurn}
    containers = (dict, list, tuple, set, frozenset, collections.deque, types.MethodType,
                  socket.socket)

    def reach(roots) -> dict:
        seen = {}
        todo = list(roots)
        while todo:
            item = todo.pop()
            if id(item) in seen or id(item) in shared or isinstance(item, opaque):
                continue
            seen[id(item)] = item
            if isinstance(item, types.FrameType):   # a running frame shows its locals only
                todo.extend(item.f_locals.values())     # this way (as a new dict: not counted)
            elif type(item) in ours or isinstance(item, containers) or \
                    type(item).__module__ in ("threading", "_thread", "io", "_io"):
                todo.extend(gc.get_referents(item))
        return seen

    def roots(subscriber):
        chain = parked[subscriber]
        handler = next((frame.f_locals["self"] for frame in chain
                        if isinstance(frame.f_locals.get("self"), sse_server.SSERequestHandler)),
                       None)
        return [subscriber, handler, *chain]

    streams = list(parked)
    samples = []
    for number in range(min(SAMPLES, len(streams) // 2)):
        mine, other = streams[2 * number], streams[2 * number + 1]
        alone = reach(roots(mine))
        for key in reach(roots(other)):
            alone.pop(key, None)
        by_type = collections.Counter()
        counts = collections.Counter()
        for item in alone.values():
            name = type(item).__qualname__
            by_type[name] += sys.getsizeof(item)
            counts[name] += 1
        samples.append((sum(by_type.values()), by_type, counts))
    samples.sort(key=lambda sample: sample[0])
    total, by_type, counts = samples[len(samples) // 2] if samples else (0, {}, {})
    return {"parked": len(parked), "object_bytes": total,
            "by_type": {name: [size, counts[name]] for name, size in
                        sorted(by_type.items(), key=lambda pair: -pair[1])},
            "stacks": stack_pages(sse_server.THREAD_STACK_BYTES)}


def stack_pages(stack_bytes: int) -> dict:
    """The Rss of the thread stacks: anonymous read-write mappings the size
    of a stack (glibc takes its guard page off the bottom of it)."""
    found = collections.defaultdict(list)   # size in KiB: [Rss in KiB, ...]
    with open("/proc/self/smaps") as file:
        header = None
        for line in file:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:   # a mapping's first line
                header = fields
            elif fields[0] == "Size:":
                size = int(fields[1])
            elif fields[0] == "Rss:" and header and header[1] == "rw-p" and len(header) == 5:
                found[size].append(int(fields[1]))
    kib = stack_bytes // 1024
    sizes = [size for size in (kib, kib - 4) if size in found]
    size = max(sizes, key=lambda size: len(found[size])) if sizes else None
    rss = found.get(size, [])
    return {"mapping_kib": size, "mappings": len(rss),
            "rss_kib_median": statistics.median(rss) if rss else None,
            "rss_kib_mean": round(statistics.fmean(rss), 2) if rss else None,
            "rss_kib_max": max(rss) if rss else None}


# --- The parent: start it, connect the subscribers, print the report --------

def connect(port: int, path: str, count: int) -> list[socket.socket]:
    """`count` subscribers, each past its response's head."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        clients.append(client)
    for client in clients:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                raise RuntimeError(f"the server closed a subscriber: {head!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"a subscriber was refused: {head[:200]!r}")
    return clients


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--mercure", action="store_true",
                        help="subscribe through /.well-known/mercure")
    parser.add_argument("--server-args", default="", help="more sse_server.py options")
    args = parser.parse_args(argv)
    target = bench.MercureServer() if args.mercure else bench.OurServer()
    port = bench.free_port()
    with tempfile.TemporaryDirectory(prefix="sse-memory-") as folder:
        output = os.path.join(folder, "report.json")
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                                   output, *target.command(port)[2:],
                                   *args.server_args.split()], stdout=subprocess.DEVNULL)
        clients = []
        try:
            bench.wait_for_port(port)
            time.sleep(0.5)     # imports done, the accept thread started
            before = bench.rss_bytes([server.pid])
            clients = connect(port, target.events_path, args.subscribers)
            time.sleep(1)       # every stream parked on its queue
            after = bench.rss_bytes([server.pid])
            server.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 120
            while not os.path.exists(output):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server wrote no report")
                time.sleep(0.1)
            with open(output) as file:
                report = json.load(file)
        finally:
            for client in clients:
                client.close()
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    print_report(args, report, (after - before) / args.subscribers / 1024)
    return 0


def print_report(args, report: dict, rss_kib: float) -> None:
    route = "/.well-known/mercure" if args.mercure else "/events"
    stacks = report["stacks"]
    print(f"{args.subscribers:,} idle subscribers on {route} "
          f"({report['parked']:,} parked when measured)\n")
    print(f"- RSS growth per subscriber: {rss_kib:.2f} KiB")
    print(f"- stack pages touched per parked thread ({stacks['mappings']:,} stacks of "
          f"{stacks['mapping_kib']} KiB): median {stacks['rss_kib_median']} KiB, "
          f"mean {stacks['rss_kib_mean']} KiB, max {stacks['rss_kib_max']} KiB")
    print(f"- Python objects one subscriber holds alone: {report['object_bytes']:,} bytes "
          f"(sys.getsizeof; median of {SAMPLES})\n")
    print("| type | objects | bytes |\n|---|---|---|")
    for name, (size, count) in report["by_type"].items():
        print(f"| {name} | {count} | {size:,} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(serve_and_report(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
