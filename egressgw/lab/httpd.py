"""The lab's HTTP echo server: answers every GET with the source address it saw.

In: ``--bind`` addresses and ``--port`` numbers (every address on every port), and ``--listen
ADDR:PORT`` pairs (``0.0.0.0`` and ``::`` are wildcards; ``::`` takes IPv6 only); the lab runs it
inside its external network namespace. Out: a JSON body
``{"source": ..., "source_port": ..., "local": ..., "path": ...}`` and one log line per request.
It stops by itself after ``--lifetime-s`` seconds, drops idle connections after
``--idle-timeout-s`` and serves at most ``--max-connections`` at once.

Run as ``python -m egressgw.lab.httpd --bind 203.0.113.20 --port 80 --log FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

DEFAULT_LIFETIME_S = 24 * 3600.0
DEFAULT_IDLE_TIMEOUT_S = 120.0
DEFAULT_MAX_CONNECTIONS = 64


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a test can hold one connection open
    server_version = "egressgw-lab-httpd"

    def do_GET(self) -> None:
        source, source_port = self.client_address[0], self.client_address[1]
        local = self.connection.getsockname()
        body = json.dumps(
            {
                "source": source,
                "source_port": source_port,
                "local": f"{local[0]}:{local[1]}",
                "path": self.path,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        server = self.server
        assert isinstance(server, EchoServer)
        local = self.connection.getsockname()
        line = (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} source={self.client_address[0]}"
            f" source_port={self.client_address[1]} local={local[0]}:{local[1]} "
            f"{format % args!s}\n"
        )
        with server.log_lock:
            server.log.write(line)
            server.log.flush()


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        log: TextIO,
        log_lock: threading.Lock,
        slots: threading.BoundedSemaphore,
        idle_timeout_s: float,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.log = log
        self.log_lock = log_lock
        self.slots = slots
        self.idle_timeout_s = idle_timeout_s
        super().__init__(address, EchoHandler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # The IPv6 wildcard must not take IPv4 too: IPv4 clients would show up as ::ffff:a.b.c.d
            # and the IPv4 wildcard could not bind the same port.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Bounded concurrency: refuse (close) a connection when every slot is taken.
        return self.slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.idle_timeout_s)
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egressgw.lab.httpd", description=__doc__)
    parser.add_argument("--bind", action="append", default=[], help="address to listen on")
    parser.add_argument("--port", action="append", type=int, default=[])
    parser.add_argument(
        "--listen", action="append", type=_host_port, default=[], metavar="ADDR:PORT"
    )
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, help="created once every socket listens")
    parser.add_argument("--lifetime-s", type=float, default=DEFAULT_LIFETIME_S)
    parser.add_argument("--idle-timeout-s", type=float, default=DEFAULT_IDLE_TIMEOUT_S)
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    args = parser.parse_args(argv)

    log = args.log.open("a", buffering=1)
    log_lock = threading.Lock()
    slots = threading.BoundedSemaphore(args.max_connections)
    endpoints = [(address, port) for address in args.bind for port in args.port]
    endpoints += args.listen
    if not endpoints:
        parser.error("nothing to listen on: give --bind and --port, or --listen")
    servers = [
        EchoServer(endpoint, log, log_lock, slots, args.idle_timeout_s) for endpoint in endpoints
    ]
    threads = [
        threading.Thread(target=server.serve_forever, name=f"serve-{i}", daemon=True)
        for i, server in enumerate(servers)
    ]
    for thread in threads:
        thread.start()
    listening = ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in endpoints)
    log.write(f"listening on {listening}\n")
    if args.ready_file is not None:
        args.ready_file.write_text("ready\n")
    with contextlib.suppress(KeyboardInterrupt):
        time.sleep(args.lifetime_s)
    for server in servers:
        server.shutdown()
        server.server_close()
    log.write("lifetime over, exiting\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
