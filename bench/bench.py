#!/usr/bin/env python3
"""Benchmark sse_server.py (and, with --compare, popular peers) under one load.

    python3 bench/bench.py                      # our server, scenarios S1-S5
    python3 bench/bench.py --scenarios S1,S2    # a subset
    python3 bench/bench.py --compare            # + sse-starlette, aiohttp-sse, nginx+nchan
    python3 bench/bench.py --redis              # + two instances behind one Redis
    python3 bench/bench.py --portable           # + ours in portable mode (no Linux fast paths)
    python3 bench/bench.py --store              # + ours with --store (SQLite, synced)
    python3 bench/bench.py --mercure            # + ours through /.well-known/mercure: exact
                                                #   topics, and a URI template per subscriber
    python3 bench/bench.py --runs 3             # everything three times: medians and ranges
    python3 bench/bench.py --one-core           # servers on one CPU, the load on the other

The load generator (bench/loadgen.c) is compiled with the machine's gcc at
run time; it holds the subscriber connections on one epoll loop and reports
deliveries/s, publishes/s, latency percentiles (every event carries its
CLOCK_MONOTONIC send time), lost events, connect time and its own CPU use.
Each server runs as a fresh process per scenario; its RSS with every
subscriber connected and idle, and its CPU seconds, are read from /proc.
Results print as a Markdown table, with ratios of the medians against
nginx+nchan (with --compare) and against our server in its default mode
(with the other columns of ours), and are saved under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# name: (subscribers, publisher connections, mode, total publish rate, seconds)
SCENARIOS = {
    "S1": (1000, 4, "closed", 0, 5),
    "S2": (1000, 1, "rate", 10, 10),
    "S3": (10, 4, "closed", 0, 5),
    "S4": (5000, 1, "rate", 2, 10),
    "S5": (10000, 1, "rate", 1, 10),
}
SCENARIO_TEXT = {
    "S1": "1,000 subscribers, closed-loop publishing on 4 connections, 5 s",
    "S2": "1,000 subscribers, 10 events/s, 10 s",
    "S3": "10 subscribers, closed-loop publishing on 4 connections, 5 s",
    "S4": "5,000 subscribers, 2 events/s, 10 s",
    "S5": "10,000 subscribers, 1 event/s, 10 s",
}


# With --one-core: the CPUs each role may run on ("server": every server and
# what it forks, nginx's worker and redis-server included; "loadgen").
PINNED: dict[str, set[int]] = {}


def popen(command: list[str], role: str = "server", **options) -> subprocess.Popen:
    """subprocess.Popen, on the role's CPUs when pinned (as `taskset` would:
    set before the exec, inherited by every process it forks)."""
    cpus = PINNED.get(role)
    if cpus:
        options["preexec_fn"] = lambda: os.sched_setaffinity(0, cpus)
    return subprocess.Popen(command, **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as file:
            total += int(file.read().split()[1]) * PAGE_SIZE
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def process_tree(pid: int) -> list[int]:
    """The pid and its children (nginx runs its worker as a child)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            for child in file.read().split():
                pids += process_tree(int(child))
    except FileNotFoundError:
        pass
    return pids


class Target:
    """A server to benchmark: how to start it and its two endpoint paths
    (and, for a form publish, its topic: see bench/loadgen.c)."""

    name = "target"
    events_path = "/events?topic=bench"
    publish_path = "/publish?topic=bench"
    form_topic: str | None = None

    def start(self, port: int) -> subprocess.Popen:
        raise NotImplementedError

    def after(self, port: int) -> dict:
        """Extra results, read from the server before it stops."""
        return {}

    def stop(self, process: subprocess.Popen) -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class OurServer(Target):
    name = "sse_server.py"
    log_level = "warning"       # as every server here runs: no access log

    def __init__(self, extra=()):
        self.extra = list(extra)

    def command(self, port: int) -> list[str]:
        return [sys.executable, os.path.join(ROOT, "sse_server.py"), "--port", str(port),
                "--log-level", self.log_level, "--max-clients", "19000", *self.extra]

    def start(self, port):
        return popen(self.command(port), stdout=subprocess.DEVNULL)


class DefaultLogServer(OurServer):
    """Ours at the default --log-level info (the access log on), S5 only:
    what a user who changes nothing gets, beside the warnings-only column."""

    name = "sse_server.py, log level info"
    log_level = "info"
    scenarios = ("S5",)

    def start(self, port):      # the log goes to stderr: written, and thrown away
        return popen(self.command(port), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


class StoreServer(OurServer):
    """Ours with --store on a new file per run: every publish answered after
    its batch is synced to disk. after() reads the store's counters."""

    name = "sse_server.py --store"

    def start(self, port):
        self.folder = tempfile.mkdtemp(prefix="sse-bench-store-")
        self.extra = ["--store", os.path.join(self.folder, "events.db")]
        return super().start(port)

    def after(self, port: int) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/stats")
        stats = json.loads(connection.getresponse().read())
        connection.close()
        store = stats["store"]
        commits = max(store["commits"], 1)
        return {"store_commits": store["commits"],
                "store_ms_per_commit": round(1000 * store["commit_seconds"] / commits, 3),
                "store_events_per_commit": round(stats["events_published"] / commits, 2),
                "store_size_bytes": store["size_bytes"]}

    def stop(self, process):
        super().stop(process)
        shutil.rmtree(self.folder, ignore_errors=True)


class MercureServer(OurServer):
    """Ours through the Mercure routes: subscribers select the exact topic,
    updates are published as forms."""

    name = "sse_server.py Mercure"
    events_path = "/.well-known/mercure?topic=bench"
    publish_path = "/.well-known/mercure"
    form_topic = "bench"


class MercureTemplateServer(MercureServer):
    """Each subscriber holds a URI template of its own (bench/{id}{?sN}, N
    its number), all matching the topic published: 1,000 distinct selectors."""

    name = "sse_server.py Mercure, a template each"
    events_path = "/.well-known/mercure?topic=bench%2F%7Bid%7D%7B%3Fs@N@%7D"
    form_topic = "bench%2F1"
    scenarios = ("S1", "S2")


def sync_cost_ms(folder: str, count: int = 200) -> float:
    """Median time of one 4 KiB write and fsync in `folder`: the floor
    under every store commit on this disk."""
    times = []
    path = os.path.join(folder, "sync-probe")
    with open(path, "wb") as file:
        for _ in range(count):
            started = time.perf_counter()
            file.write(b"x" * 4096)
            file.flush()
            os.fsync(file.fileno())
            times.append(time.perf_counter() - started)
    os.remove(path)
    return round(1000 * sorted(times)[count // 2], 3)


# Imports the test module with SSE_PORTABLE=1, which applies the portable
# shim (no os.readv, no epoll, no MSG_NOSIGNAL, ...) before sse_server.
PORTABLE_MAIN = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import test_sse_server; "
                 "sys.exit(test_sse_server.sse_server.main(sys.argv[1:]))")


class PortableServer(OurServer):
    """Ours as it runs where Linux's facilities are missing (see the tests'
    install_portable_shim): what the fallbacks cost."""

    name = "sse_server.py portable"

    def start(self, port):
        return popen([sys.executable, "-c", PORTABLE_MAIN, ROOT, *self.command(port)[2:]],
                     stdout=subprocess.DEVNULL, env=dict(os.environ, SSE_PORTABLE="1"))


def run_scenario(loadgen: str, target: Target, scenario: str, ports=None) -> dict:
    subscribers, publishers, mode, rate, seconds = SCENARIOS[scenario]
    port = free_port()
    process = target.start(port)
    try:
        wait_for_port(port)
        extra_ports = []
        if ports:       # a second instance for the subscribers (Redis mode)
            extra_ports = [ports.start_second()]
        time.sleep(0.5)     # let it settle (imports, worker start-up)
        pids = process_tree(process.pid) + (ports.pids() if ports else [])
        rss_before = rss_bytes(pids)
        command = [loadgen, "127.0.0.1", str(port), target.events_path, target.publish_path,
                   str(subscribers), str(publishers), mode, str(rate), str(seconds),
                   *map(str, extra_ports)]
        env = dict(os.environ)
        if target.form_topic:
            env["LOADGEN_FORM_TOPIC"] = target.form_topic
        generator = popen(command, "loadgen", stdout=subprocess.PIPE, text=True, env=env)
        line = generator.stdout.readline()
        if line.strip() != "connected":
            generator.wait()
            raise RuntimeError(f"{target.name} {scenario}: load generator failed: {line!r}")
        time.sleep(0.5)     # all subscribers in and idle
        pids = process_tree(process.pid) + (ports.pids() if ports else [])
        rss_idle = rss_bytes(pids)
        cpu_before = cpu_seconds(pids)
        result = json.loads(generator.stdout.read())
        generator.wait()
        result["server_cpu_s"] = round(cpu_seconds(pids) - cpu_before, 2)
        result["rss_per_subscriber_kib"] = round((rss_idle - rss_before) / subscribers / 1024, 2)
        result["server_rss_mib"] = round(rss_idle / 2**20, 1)
        result.update(target.after(port))
        return result
    finally:
        if ports:
            ports.stop_second()
        target.stop(process)


def compile_loadgen(folder: str) -> str:
    binary = os.path.join(folder, "loadgen")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, os.path.join(HERE, "loadgen.c")],
                   check=True)
    return binary


# The summary table's rows: label, scenario, the result's key, its format,
# its unit, and (for a paced scenario) the publish rate asked for, shown
# beside the rate held. Each cell is the median of the runs, with their
# range when there were several.
ROWS = [("S1 deliveries/s", "S1", "deliveries_per_s", "{:,.0f}", "", None),
        ("S1 p99 latency", "S1", "p99_ms", "{:.1f}", " ms", None),
        ("S2 p99 latency", "S2", "p99_ms", "{:.1f}", " ms", None),
        ("S3 publishes/s", "S3", "publishes_per_s", "{:,.0f}", "", None),
        ("S3 deliveries/s", "S3", "deliveries_per_s", "{:,.0f}", "", None),
        ("S4 p99 latency / rate held", "S4", "p99_ms", "{:.1f}", " ms", 2),
        ("S5 p99 latency / rate held", "S5", "p99_ms", "{:.1f}", " ms", 1),
        ("connect 10k subscribers", "S5", "connect_s", "{:.2f}", " s", None),
        ("RSS per idle subscriber (10k)", "S5", "rss_per_subscriber_kib", "{:.2f}", " KiB", None)]
STORE_ROW = ("S3 store: ms per commit", "S3", "store_ms_per_commit", "{:.2f}", " ms", None)
STORE_BATCH_ROW = ("S3 store: events per commit", "S3", "store_events_per_commit", "{:.1f}",
                   "", None)
NCHAN = "nginx + nchan (1 worker)"


def summarize(runs: list[dict]) -> dict:
    """One target's runs of one scenario: for every figure its median,
    lowest and highest ({key: (median, low, high)}), the events lost in all
    runs, and the first error if none ran."""
    done = [run for run in runs if "error" not in run]
    if not done:
        return {"error": runs[0]["error"]}
    figures = {}
    for key, value in done[0].items():
        if isinstance(value, (int, float)):
            values = [run[key] for run in done if key in run]
            figures[key] = (statistics.median(values), min(values), max(values))
    figures["lost"] = (sum(run.get("lost", 0) for run in done),) * 3
    figures["failed_runs"] = (len(runs) - len(done),) * 3
    return figures


def cell(summary: dict, row: tuple, runs: int) -> str:
    label, scenario, key, form, unit, rate = row
    if scenario not in summary:
        return "–"
    figures = summary[scenario]
    if "error" in figures:
        return "failed"
    if key not in figures:
        return "–"
    median, low, high = figures[key]
    text = form.format(median) + unit
    if runs > 1:
        text += f" ({form.format(low)}–{form.format(high)})"
    if rate is not None:
        text += f" / {figures['publishes_per_s'][0]:.2f} of {rate}"
    if figures["failed_runs"][0]:
        text += f", {figures['failed_runs'][0]} of {runs} runs failed"
    return text


def ratio(summary: dict, base: dict, row: tuple) -> str:
    scenario, key = row[1], row[2]
    try:
        ours, theirs = summary[scenario][key][0], base[scenario][key][0]
    except KeyError:        # not run, or failed
        return "–"
    return f"{ours / theirs:.2f}×" if theirs else "–"


def markdown(results: dict[str, dict[str, list[dict]]], scenarios: list[str],
             runs: int) -> str:
    summaries = {name: {scenario: summarize(found) for scenario, found in by_scenario.items()}
                 for name, by_scenario in results.items()}
    names = list(results)
    rows = [row for row in ROWS if row[1] in scenarios]
    if any("store_ms_per_commit" in figures for summary in summaries.values()
           for figures in summary.values()):
        rows += [STORE_ROW, STORE_BATCH_ROW]
    lines = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row[0]} | " + " | ".join(cell(summaries[name], row, runs)
                                                  for name in names) + " |")
    lines.append("| lost events (all scenarios, all runs) | " + " | ".join(
        str(sum(figures.get("lost", (0,))[0] for figures in summaries[name].values()))
        for name in names) + " |")
    ours = [name for name in names if name.startswith("sse_server.py")]
    # Ratios of medians: above 1 is more for deliveries/s and publishes/s
    # (better), more time or memory for the rest (worse).
    for base, against in ((NCHAN, ours), (ours[0], ours[1:])):
        if base not in summaries or not against:
            continue
        lines += ["", f"Ratios of the medians, each ÷ {base}:", "",
                  "| measure | " + " | ".join(against) + " |", "|---" * (len(against) + 1) + "|"]
        for row in (row for row in rows if row in ROWS):
            lines.append(f"| {row[0].split(' / ')[0]} | " + " | ".join(
                ratio(summaries[name], summaries[base], row) for name in against) + " |")
    lines += ["", "| scenario | target | run | deliveries/s | publishes/s | p50 | p99 | max | "
              "lost | connect | server CPU s | load generator CPU s |", "|---" * 12 + "|"]
    for name in names:
        for scenario, found in results[name].items():
            for number, r in enumerate(found, 1):
                if "error" in r:
                    lines.append(f"| {scenario} | {name} | {number} | failed: {r['error']} |"
                                 + " |" * 8)
                    continue
                lines.append(f"| {scenario} | {name} | {number} | {r['deliveries_per_s']:,.0f} | "
                             f"{r['publishes_per_s']:,.1f} | {r['p50_ms']:.1f} ms | "
                             f"{r['p99_ms']:.1f} ms | {r['max_ms']:.1f} ms | {r['lost']} | "
                             f"{r['connect_s']:.2f} s | {r['server_cpu_s']} | "
                             f"{r['loadgen_cpu_s']} |")
    return "\n".join(lines)


def machine() -> str:
    with open("/proc/cpuinfo") as file:
        model = next((line.split(":", 1)[1].strip() for line in file
                      if line.startswith("model name")), platform.machine())
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({model}), {memory_gib:.0f} GiB, Linux "
            f"{platform.release()}, Python {platform.python_version()}; load generator "
            f"on the same machine")


# --- Other targets: the peers (--compare) and two instances behind Redis (--redis) ----
#
# Each installs what it needs on first use: the Python peers into their own
# virtualenv (bench/.venv, never into the system, never imported by
# sse_server.py), nginx + nchan and redis-server from Debian when missing.

PEERS = os.path.join(HERE, "peers")
VENV = os.path.join(HERE, ".venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
PEER_PACKAGES = ["sse-starlette", "uvicorn[standard]", "aiohttp", "aiohttp-sse"]


def apt_install(*packages: str) -> None:
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def python_peers_venv() -> str:
    if not os.path.exists(VENV_PYTHON):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([VENV_PYTHON, "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *PEER_PACKAGES], check=True)
    return VENV_PYTHON


class StarletteTarget(Target):
    name = "sse-starlette + uvicorn"

    def __init__(self, python: str):
        self.python = python

    def start(self, port):
        return popen(
            [self.python, "-m", "uvicorn", "starlette_app:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            cwd=PEERS, stdout=subprocess.DEVNULL)


class AiohttpTarget(Target):
    name = "aiohttp-sse"

    def __init__(self, python: str):
        self.python = python

    def start(self, port):
        return popen([self.python, "aiohttp_app.py", str(port)], cwd=PEERS,
                     stdout=subprocess.DEVNULL)


class NchanTarget(Target):
    name = "nginx + nchan (1 worker)"

    def __init__(self):
        if not os.path.exists("/usr/lib/nginx/modules/ngx_nchan_module.so"):
            apt_install("nginx", "libnginx-mod-nchan")
        self.folder = tempfile.mkdtemp(prefix="sse-nchan-")

    def start(self, port):
        with open(os.path.join(PEERS, "nchan.conf")) as file:
            config = file.read().replace("{prefix}", self.folder).replace("{port}", str(port))
        path = os.path.join(self.folder, "nginx.conf")
        with open(path, "w") as file:
            file.write(config)
        return popen(["nginx", "-p", self.folder, "-c", path], stdout=subprocess.DEVNULL)


def peer_targets() -> list[Target]:
    python = python_peers_venv()
    return [StarletteTarget(python), AiohttpTarget(python), NchanTarget()]


class RedisPair:
    """A redis-server and two instances of ours sharing it: the benchmark
    publishes to the first instance, half the subscribers are on the second."""

    def __init__(self):
        if not shutil.which("redis-server"):
            apt_install("redis-server")
        subprocess.run([sys.executable, "-c", "import redis"], check=True)
        self.folder = tempfile.mkdtemp(prefix="sse-redis-bench-")
        self.port = free_port()
        self.redis = popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             self.folder, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_for_port(self.port)
        url = f"redis://127.0.0.1:{self.port}/0"
        self.target = OurServer(["--redis", url])
        self.target.name = "sse_server.py ×2 + Redis"
        self.second = None

    def first_instance(self) -> Target:
        return self.target

    def start_second(self) -> int:
        port = free_port()
        self.second = self.target.start(port)
        wait_for_port(port)
        return port

    def pids(self) -> list[int]:
        return [self.second.pid] if self.second else []

    def stop_second(self) -> None:
        if self.second:
            self.target.stop(self.second)
            self.second = None

    def close(self) -> None:
        self.redis.terminate()
        self.redis.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ", ".join(SCENARIOS))
    parser.add_argument("--compare", action="store_true",
                        help="also run sse-starlette, aiohttp-sse and nginx+nchan")
    parser.add_argument("--redis", action="store_true",
                        help="also run two instances of ours behind one Redis")
    parser.add_argument("--portable", action="store_true",
                        help="also run ours in portable mode (the fallbacks other platforms use)")
    parser.add_argument("--store", action="store_true",
                        help="also run ours with --store (history synced to an SQLite file)")
    parser.add_argument("--mercure", action="store_true",
                        help="also run ours through the Mercure hub (exact topics, templates)")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="run everything N times, one round after another, and report "
                             "medians and ranges (default 1)")
    parser.add_argument("--one-core", action="store_true",
                        help="pin every server to one CPU and the load generator to another, "
                             "as taskset would: what a one-core host gets")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.one_core:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--one-core needs two CPUs: one for the server, one for the load")
        PINNED.update(server={cpus[0]}, loadgen={cpus[1]})
        os.sched_setaffinity(0, PINNED["loadgen"])  # this script stays off the server's CPU
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # inherited by the servers

    targets: list[Target] = [OurServer()]
    if "S5" in scenarios:
        targets.append(DefaultLogServer())
    if args.portable:
        targets.append(PortableServer())
    if args.store:
        targets.append(StoreServer())
    if args.mercure:
        targets += [MercureServer(), MercureTemplateServer()]
    if args.compare:
        targets += peer_targets()       # installs and starts the peers
    redis = None
    if args.redis:
        redis = RedisPair()
        targets.append(redis.first_instance())

    results: dict[str, dict[str, list[dict]]] = {target.name: {} for target in targets}
    with tempfile.TemporaryDirectory(prefix="sse-bench-") as folder:
        loadgen = compile_loadgen(folder)
        for run in range(1, args.runs + 1):     # rounds: each target once in every one
            for target in targets:  # one at a time, each a fresh process per scenario
                for scenario in scenarios:
                    if scenario not in getattr(target, "scenarios", scenarios):
                        continue
                    print(f"... run {run} of {args.runs}: {target.name} {scenario}",
                          file=sys.stderr, flush=True)
                    ports = redis if (redis and target is redis.target) else None
                    try:
                        result = run_scenario(loadgen, target, scenario, ports)
                    except RuntimeError as error:   # reported in the table; the run goes on
                        result = {"error": str(error)}
                    results[target.name].setdefault(scenario, []).append(result)
                    print("    " + json.dumps(result), file=sys.stderr)
    if redis:
        redis.close()

    table = markdown(results, scenarios, args.runs)
    if args.store:
        with tempfile.TemporaryDirectory(prefix="sse-bench-sync-") as folder:
            table += (f"\n\nOne 4 KiB write + fsync on this disk (median of 200): "
                      f"{sync_cost_ms(folder)} ms")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    pinned = (f"; one core: every server on CPU {min(PINNED['server'])}, the load "
              f"generator on CPU {min(PINNED['loadgen'])}" if PINNED else "")
    report = (f"# Benchmark {stamp}\n\nMachine: {machine()}{pinned}\n\nCommand: "
              f"`python3 bench/bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f"\n\nScenarios (one topic):\n" +
              "".join(f"- {s}: {SCENARIO_TEXT[s]}\n" for s in scenarios) + "\n" + table + "\n")
    print(report)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"{stamp}.md"), "w") as file:
        file.write(report)
        file.write("\n<details><summary>raw results</summary>\n\n```json\n" +
                   json.dumps(results, indent=1) + "\n```\n</details>\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
