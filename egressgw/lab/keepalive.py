"""An HTTP client that keeps one TCP connection open and asks again each time it is told to.

In: ``HOST PORT`` and, on stdin, one line per request (any text). Out: one JSON line per request on
stdout: ``{"ok": true, "source": ..., "source_port": ..., "local_port": ...}`` from the lab's echo
server, or ``{"ok": false, "error": ...}``. It never reconnects, so an answer on the same
``local_port`` proves the original connection survived whatever happened in between. Every socket
operation is bounded by ``--timeout-s``; it exits at end of input or after the first error.

Run inside a pod: ``python -m egressgw.lab.keepalive 203.0.113.20 80``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any


def _request(sock: socket.socket, host: str) -> dict[str, Any]:
    sock.sendall(f"GET /keepalive HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("server closed the connection mid-body")
        body += chunk
    answer: dict[str, Any] = json.loads(body[:length])
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egressgw.lab.keepalive", description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=1000)
    args = parser.parse_args(argv)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    host_header = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout_s)
    except OSError as exc:
        print(json.dumps({"ok": False, "error": f"connect: {exc}"}), flush=True)
        return 1
    local_port = sock.getsockname()[1]
    with sock:
        for _ in range(args.max_requests):
            try:
                answer = _request(sock, host_header)
            except (OSError, ValueError) as exc:
                error = {"ok": False, "error": str(exc), "local_port": local_port}
                print(json.dumps(error), flush=True)
                return 1
            print(json.dumps({"ok": True, "local_port": local_port, **answer}), flush=True)
            if not sys.stdin.readline():
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
