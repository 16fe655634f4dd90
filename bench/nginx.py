"""nginx as a plain proxy hop, the third side of a benchmark: what any reverse proxy costs.

`find` looks for the ``nginx`` binary (on ``PATH``, then ``/usr/sbin/nginx``; Debian and
Ubuntu: ``apt-get install nginx-light``). `start` runs it as the current user, no root needed:
``nginx -p TMP -c TMP/nginx.conf -e stderr`` with a generated configuration that keeps every
file it writes (pid, temporary bodies) in the benchmark's temporary directory and logs errors
to the log file of its `Server`. The configuration is the plain hop an operator would put in
front of a streaming API: one worker process (as codexlb has one event loop), no access log,
``proxy_pass`` to the fake upstream over HTTP/1.1 with upstream keep-alive, no response
buffering (SSE events go on as they arrive) and the WebSocket upgrade headers passed on.
Whatever the client offers (permessage-deflate included) reaches the fake as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    HOST,
    LOG_POLL_SECONDS,
    START_TIMEOUT_SECONDS,
    BenchError,
    ProcessStats,
    Server,
    cpu_seconds,
    memory_kib,
)

FALLBACK_PATH = "/usr/sbin/nginx"
INSTALL_HINT = "Debian/Ubuntu: apt-get install nginx-light"
WORKER_CONNECTIONS = 1024
UPSTREAM_KEEPALIVE = 128

CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-client-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    client_max_body_size 0;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        "" "";
    }}
    upstream fake {{
        server {upstream};
        keepalive {keepalive};
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Found:
    """Where nginx is, or why the run goes without it."""

    path: str | None
    why_not: str = ""


def find(requested: str | None, *, disabled: bool) -> Found:
    """The nginx to run: ``requested`` (a path or a name on ``PATH``) if given, else ``nginx``
    on ``PATH``, else `FALLBACK_PATH`; none when ``disabled`` (``--no-nginx``)."""
    if disabled:
        return Found(None, "left out (--no-nginx)")
    if requested is not None:
        path = shutil.which(requested)
        return Found(path) if path else Found(None, f"{requested!r} is not an executable")
    path = shutil.which("nginx") or (FALLBACK_PATH if os.access(FALLBACK_PATH, os.X_OK) else None)
    if path is None:
        return Found(None, f"not found on PATH or at {FALLBACK_PATH} ({INSTALL_HINT})")
    return Found(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def write_config(tmp: Path, upstream_url: str, port: int) -> Path:
    path = tmp / "nginx.conf"
    path.write_text(
        CONFIG.format(
            tmp=tmp,
            upstream=upstream_url.removeprefix("http://"),
            host=HOST,
            port=port,
            worker_connections=WORKER_CONNECTIONS,
            keepalive=UPSTREAM_KEEPALIVE,
        )
    )
    return path


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (nginx's workers, for its master)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def group_pids(server: Server) -> list[int]:
    """nginx's master and its workers."""
    return [server.pid, *children(server.pid)]


def group_cpu_seconds(server: Server) -> float:
    """User + system CPU of the master and its workers so far."""
    total = 0.0
    for pid in group_pids(server):
        with contextlib.suppress(OSError):  # a worker that just exited
            total += cpu_seconds(pid)
    return total


def group_stats(server: Server) -> ProcessStats:
    """`ProcessStats` summed over the master and its workers (RSS and peak RSS added up)."""
    cpu = main = rss = peak = 0.0
    for pid in group_pids(server):
        with contextlib.suppress(OSError):
            stats = ProcessStats.read(pid)
            cpu += stats.cpu_seconds
            main += stats.main_thread_cpu_seconds
            rss += stats.rss_mib
            peak += stats.peak_rss_mib
    return ProcessStats(cpu, main, rss, peak)


async def start(binary: str, tmp: Path, upstream_url: str) -> Server:
    """nginx in front of ``upstream_url``, once its worker runs and its port accepts."""
    port = free_port()
    config = write_config(tmp, upstream_url, port)
    log_path = tmp / "nginx.log"
    argv = [binary, "-p", str(tmp), "-c", str(config), "-e", "stderr"]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server("nginx", process, log_path, f"http://{HOST}:{port}")
    try:
        for _ in range(int(START_TIMEOUT_SECONDS / LOG_POLL_SECONDS)):
            if process.returncode is not None:
                raise BenchError(f"nginx exited with code {process.returncode} at start-up")
            if children(process.pid) and await accepts(port):
                return server
            await asyncio.sleep(LOG_POLL_SECONDS)
        raise BenchError(f"nginx did not accept on port {port} within {START_TIMEOUT_SECONDS:g} s")
    except BenchError as exc:
        await server.stop()
        raise BenchError(f"{exc}\n{server.log_tail()}") from None
    except BaseException:
        await server.stop()
        raise


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def memory_mib(server: Server) -> float:
    """Resident memory of the master and its workers now, in MiB."""
    total = 0
    for pid in group_pids(server):
        with contextlib.suppress(OSError):
            total += memory_kib(pid)["VmRSS"]
    return total / 1024
