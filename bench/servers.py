"""The servers under test, each one process pinned to CPU 0: the gateway, the baseline, the
Litestar channels peer, nchan.

Server CPU time and RSS are read from /proc/<pid>, so they cover exactly the serving process.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

SERVER_CPU = "0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(
        self, name: str, command: list[str], env: dict[str, str], port: int, cpus: str = SERVER_CPU
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.port = port
        self.cpus = cpus  # for taskset; a multi-process server's workers inherit it
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Server:
        pin = ["taskset", "-c", self.cpus] if shutil.which("taskset") else []
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [*pin, *self.command],
            env={**os.environ, **self.env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        output = self.output()
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port}:\n{output}")

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def pids(self) -> list[int]:
        """The server's process and its children (a gunicorn master's workers)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return [self.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        """utime + stime of the server's processes (a worker that exited is not counted)."""
        ticks = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            ticks += int(fields[11]) + int(fields[12])
        return ticks / CLOCK_TICKS

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def libraries(self) -> list[str]:
        """Which of uvloop and httptools the process has loaded (uvicorn picks them if present)."""
        maps = Path(f"/proc/{self.pid}/maps").read_text()
        return [name for name in ("uvloop", "httptools") if name in maps]

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def gateway(layer: str = "memory://", **settings: str) -> Server:
    """`python -m app`, the documented one-command start, on a free port."""
    port = free_port()
    env = {
        "GATEWAY_PORT": str(port),
        "GATEWAY_LAYER": layer,
        "GATEWAY_MAX_CONNECTIONS": "20000",
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "1",
        **{f"GATEWAY_{key.upper()}": value for key, value in settings.items()},
    }
    return Server(f"gateway {layer}", [sys.executable, "-m", "app"], env, port)


def gunicorn(layer: str, workers: int, cpus: str) -> Server:
    """`gunicorn -c app/gunicorn_conf.py app.main:app`, the documented production start, with
    `GATEWAY_WORKERS` workers on the CPUs `cpus` (taskset's list)."""
    port = free_port()
    env = {
        "GATEWAY_PORT": str(port),
        "GATEWAY_LAYER": layer,
        "GATEWAY_WORKERS": str(workers),
        "GATEWAY_MAX_CONNECTIONS": "20000",
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "1",
    }
    command = [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn_conf.py", "app.main:app"]
    return Server(f"gunicorn {workers}w {layer}", command, env, port, cpus)


def baseline(**settings: str) -> Server:
    return _uvicorn("baseline", "bench.baseline:app", **settings)


def litestar_available() -> str | None:
    """None when the Litestar peer can run here, else why not."""
    if importlib.util.find_spec("litestar") is None:
        return "litestar is not installed (pip install -e '.[bench]')"
    return None


def litestar(**settings: str) -> Server:
    """Litestar channels on its memory backend (`bench/peer_litestar.py`) under the same uvicorn."""
    return _uvicorn("litestar", "bench.peer_litestar:app", **settings)


def _uvicorn(name: str, app: str, **settings: str) -> Server:
    port = free_port()
    env = {f"GATEWAY_{key.upper()}": value for key, value in settings.items()}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "1",
    ]
    return Server(name, command, env, port)


def nchan_available() -> str | None:
    """None when nchan can run here, else why not."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install nginx-light libnginx-mod-nchan)"
    if not NCHAN_MODULE.exists():
        return f"{NCHAN_MODULE} is missing (apt-get install libnginx-mod-nchan)"
    return None


def nchan(keepalive_seconds: int = 15) -> Server:
    """nginx + nchan, one process (no master), the same routes as the gateway."""
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
    config = directory / "nginx.conf"
    config.write_text(
        f"""
load_module {NCHAN_MODULE};
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 30000;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 25000; }}
http {{
  access_log off;
  client_body_temp_path {directory}/body;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/channels/([^/]+)/publish$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_message_buffer_length 1000;
      nchan_message_timeout 1h;
    }}
    location ~ ^/channels/([^/]+)/events$ {{
      nchan_subscriber eventsource;
      nchan_channel_id $1;
      nchan_eventsource_ping_interval {keepalive_seconds};
    }}
  }}
}}
"""
    )
    command = ["nginx", "-p", str(directory), "-c", str(config), "-e", str(directory / "err.log")]
    return Server("nchan", command, {}, port)
