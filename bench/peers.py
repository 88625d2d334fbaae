"""Targets for bench.py besides our own server: the peers (--compare) and two
instances of ours behind one Redis (--redis).

Each installs what it needs on first use: the Python peers into their own
virtualenv (bench/.venv, never into the system, never imported by
sse_server.py), nginx + nchan and redis-server from Debian when missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from bench import HERE, ROOT, OurServer, Target, free_port, wait_for_port

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
        return subprocess.Popen(
            [self.python, "-m", "uvicorn", "starlette_app:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            cwd=PEERS, stdout=subprocess.DEVNULL)


class AiohttpTarget(Target):
    name = "aiohttp-sse"

    def __init__(self, python: str):
        self.python = python

    def start(self, port):
        return subprocess.Popen([self.python, "aiohttp_app.py", str(port)], cwd=PEERS,
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
        return subprocess.Popen(["nginx", "-p", self.folder, "-c", path],
                                stdout=subprocess.DEVNULL)


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
        self.redis = subprocess.Popen(
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
