#!/usr/bin/env python3
"""Profile our server under one bench scenario, every thread that serves.

    python3 bench/hotspots.py S3                 # the publish path
    python3 bench/hotspots.py S5                 # the connect path (10,000 subscribers)
    python3 bench/hotspots.py S3 --server-args="--store /tmp/p.db"
    python3 bench/hotspots.py S5 --mercure       # subscribers on /.well-known/mercure

The server runs as a child process (sse_server.main, as the bench runs it)
with a cProfile profiler in each connection's thread, until a stream parks
on its queue (what follows is waiting, heartbeats and, at shutdown,
goodbyes), and in the accept loop. By default each thread's CPU clock is
used, so waiting (on a queue, a lock, the GIL) counts nothing; --clock wall
counts it. The threads' profiles are merged as they end. The load is
bench/loadgen.c, as in bench/bench.py. Printed: the top functions by own
time and by cumulative time, and the server's CPU per request. cProfile's
own cost inflates every Python call (about 3x here), and it sees nothing of
the kernel: read the ranking, not the times, and see the kernel's share
with `perf stat -e context-switches` or `perf record` (bench/bench.py gives
the real figures).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (this folder's bench.py)


def serve_profiled(output: str, clock: str, argv: list[str]) -> int:
    """The child: sse_server.main with every serving thread profiled, on
    the thread's CPU clock ("cpu") or the wall clock ("wall")."""
    import cProfile
    sys.path.insert(0, bench.ROOT)
    import sse_server

    merged: list[pstats.Stats] = []
    lock = threading.Lock()

    running = threading.local()     # the profile of this thread, until it is merged

    def merge() -> None:
        profile = running.__dict__.pop("profile", None)
        if profile is not None:
            profile.disable()
            with lock:
                if merged:
                    merged[0].add(profile)
                else:
                    merged.append(pstats.Stats(profile))

    def profiled(function):
        def run(*args, **kwargs):
            running.profile = cProfile.Profile(time.thread_time if clock == "cpu" else
                                               time.perf_counter)
            running.profile.enable()
            try:
                return function(*args, **kwargs)
            finally:
                merge()
        return run

    def pump(subscriber, *args, **kwargs):     # a stream parks: its connect path is over
        merge()
        return original_pump(subscriber, *args, **kwargs)

    original_pump = sse_server.Subscriber.pump
    sse_server.Subscriber.pump = pump
    server_class = sse_server.SSEServer
    server_class.process_request_thread = profiled(server_class.process_request_thread)
    server_class.serve_forever = profiled(server_class.serve_forever)
    status = sse_server.main(argv)
    with lock:
        merged[0].dump_stats(output)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(bench.SCENARIOS))
    parser.add_argument("--mercure", action="store_true",
                        help="subscribe and publish through /.well-known/mercure")
    parser.add_argument("--server-args", default="", help="more sse_server.py options")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time each thread's CPU (default; waits count nothing) "
                             "or the wall clock (waits, GIL included)")
    parser.add_argument("--top", type=int, default=25, help="rows per table (25)")
    parser.add_argument("--save", help="keep the merged profile in this file (pstats)")
    args = parser.parse_args(argv)
    target = bench.MercureServer() if args.mercure else bench.OurServer()
    port = bench.free_port()
    subscribers, publishers, mode, rate, seconds = bench.SCENARIOS[args.scenario]
    with tempfile.TemporaryDirectory(prefix="sse-profile-") as folder:
        output = args.save or os.path.join(folder, "profile.pstats")
        loadgen = bench.compile_loadgen(folder)
        server_argv = target.command(port)[2:] + args.server_args.split()
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                                   output, args.clock, *server_argv], stdout=subprocess.DEVNULL)
        try:
            bench.wait_for_port(port)
            time.sleep(0.5)
            env = dict(os.environ)
            if target.form_topic:
                env["LOADGEN_FORM_TOPIC"] = target.form_topic
            cpu_before = bench.cpu_seconds([server.pid])
            generator = subprocess.run(
                [loadgen, "127.0.0.1", str(port), target.events_path, target.publish_path,
                 str(subscribers), str(publishers), mode, str(rate), str(seconds)],
                stdout=subprocess.PIPE, text=True, env=env, check=True)
            cpu_s = bench.cpu_seconds([server.pid]) - cpu_before
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
        lines = generator.stdout.split("\n", 1)
        result = json.loads(lines[1] if lines[0].strip() == "connected" else generator.stdout)
        requests = subscribers + result["published"]
        print(f"{args.scenario}{' (Mercure)' if args.mercure else ''}: "
              f"{result['published']:,} publishes, {subscribers:,} subscribers, "
              f"connect {result['connect_s']} s; server CPU {cpu_s:.2f} s under the "
              f"profiler, {1e6 * cpu_s / requests:.0f} µs per request")
        stats = pstats.Stats(output)
        stats.strip_dirs()
        for order in ("tottime", "cumulative"):
            print(f"\n== by {order}")
            stats.sort_stats(order).print_stats(args.top)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(serve_profiled(sys.argv[2], sys.argv[3], sys.argv[4:]))
    sys.exit(main())
