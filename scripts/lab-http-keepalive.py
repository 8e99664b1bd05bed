#!/usr/bin/env python3
"""Keep one HTTP/1.1 connection open and send a GET on it every INTERVAL seconds.

    lab-http-keepalive.py HOST PORT [--interval 0.05] [--max-seconds 60] [--timeout 2] [--timed]

Prints one line per answer: "<local-port> <body>" (the body is the lab server's
"<name> <client-ip>"), flushed at once, so a test can follow the connection live. With
--timed each line ends with the request's send and answer times (time.time(), seconds):
"<local-port> <body> <sent> <answered>", for the experiments' timelines.
Never reconnects: if the connection breaks, prints "error: <reason>" and exits 1.
Stops by itself after --max-seconds (bounded traffic), or on SIGTERM. --timeout bounds
each wait for an answer (TCP retransmits meanwhile, e.g. while routes converge).
"""

import argparse
import socket
import sys
import time


def read_answer(sock, buf):
    """Reads one response (headers + Content-Length body); returns (body, rest of buf)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise ConnectionError(f"unexpected status: {lines[0]}")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(buf) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        buf += chunk
    return buf[:length].decode().strip(), buf[length:]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--max-seconds", type=float, default=60)
    p.add_argument("--timeout", type=float, default=2)
    p.add_argument("--timed", action="store_true")
    args = p.parse_args()
    deadline = time.monotonic() + args.max_seconds
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        local_port = sock.getsockname()[1]
        request = f"GET / HTTP/1.1\r\nHost: {args.host}\r\n\r\n".encode()
        buf = b""
        while time.monotonic() < deadline:
            sent = time.time()
            sock.sendall(request)
            body, buf = read_answer(sock, buf)
            times = f" {sent:.6f} {time.time():.6f}" if args.timed else ""
            print(f"{local_port} {body}{times}", flush=True)
            time.sleep(args.interval)
    except (OSError, ConnectionError, ValueError) as e:
        print(f"error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
