#!/usr/bin/env python3
"""Tiny HTTP/1.1 server for the xlb network-namespace labs (python3 stdlib only).

    lab-http-server.py --name r1 [--port 80] [--bind ADDR] [--udp-port PORT]

Every GET answers 200 with the body "<name> <client-ip>\\n", where client-ip is the
peer address the server saw on its socket (in DR and TUN mode that is the real client,
which is what the labs check). GET /healthz answers 200 "ok\\n"; /healthz?delay=S
answers after S seconds (a slow machine, for adaptive weights). HEAD works too.
Every POST reads its body (Content-Length; no chunked bodies) and answers 200 with
"<name> <client-ip> <bytes-received> <sha256-of-body>\\n", so a lab can check that a
large upload arrived whole and intact (the TUN lab's path-MTU test, the two-arm lab).
GET /bytes?n=N answers N bytes (byte i is i % 251), for downloads of a known size and content.
With --udp-port, every datagram to that port is answered with "<name> <client-ip>\n".

One thread per connection, HTTP/1.1 keep-alive, Content-Length on every answer, a
large accept backlog for bursts of short connections, no request logging. Without
--bind it listens on every IPv4 and IPv6 address (dual-stack "::"), so it answers on
a VIP bound to lo; IPv4 peers are reported as plain dotted quads.
"""

import argparse
import hashlib
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says otherwise
    server_version = "xlb-lab-http"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body leave at once on kept-alive connections
    timeout = 30  # seconds an idle kept-alive connection may stay open

    def _peer(self):
        ip = self.client_address[0]
        if ip.startswith("::ffff:") and "." in ip:  # IPv4 peer on the dual-stack socket
            ip = ip[len("::ffff:"):]
        return ip

    def _answer(self, with_body, received=None):
        path, _, query = self.path.partition("?")
        if path == "/bytes":
            n = int(urllib.parse.parse_qs(query).get("n", ["0"])[0])
            body = bytes(i % 251 for i in range(min(n, 64 << 20)))
        elif path == "/healthz":
            delay = urllib.parse.parse_qs(query).get("delay", ["0"])[0]
            time.sleep(min(float(delay), 10.0))
            body = b"ok\n"
        elif received is None:
            body = f"{self.server.lab_name} {self._peer()}\n".encode()
        else:
            count, digest = received
            body = f"{self.server.lab_name} {self._peer()} {count} {digest}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)

    def do_POST(self):
        # A request with neither Content-Length nor Transfer-Encoding has no body.
        length = (self.headers.get("Content-Length") or "0").strip()
        if self.headers.get("Transfer-Encoding") or not length.isdigit():
            # The end of the body is unknown: refuse and close the connection.
            self.close_connection = True
            self.send_error(411, "POST needs a Content-Length body (no chunked bodies)")
            return
        want, received, digest = int(length), 0, hashlib.sha256()
        while received < want:
            chunk = self.rfile.read(min(65536, want - received))
            if not chunk:  # the client went away mid-body: nobody to answer
                self.close_connection = True
                return
            received += len(chunk)
            digest.update(chunk)
        self._answer(True, (received, digest.hexdigest()))

    def log_message(self, format, *args):  # quiet: no line per request
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, addr, family, v6only, name):
        self.address_family = family
        self.v6only = v6only
        self.lab_name = name
        super().__init__(addr, Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if self.v6only else 0)
        # HTTPServer.server_bind would call socket.getfqdn(), a DNS lookup that can hang
        # for seconds inside a namespace without a route to the resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request, client_address):
        # Resets and timeouts from clients are normal in a load-balancing lab.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, BrokenPipeError)):
            return
        print(f"{self.lab_name}: error serving {client_address[0]}: {exc!r}", file=sys.stderr)


def udp_echo(name, port):
    """Answers every datagram with "<name> <client-ip>\\n" (dual-stack when possible)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
    while True:
        _, peer = sock.recvfrom(65535)
        ip = peer[0]
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[len("::ffff:"):]
        sock.sendto(f"{name} {ip}\n".encode(), peer)


def main():
    ap = argparse.ArgumentParser(description="HTTP server for the xlb labs")
    ap.add_argument("--name", required=True, help="name put in every answer, e.g. r1")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--bind", default=None,
                    help="address to listen on (default: every IPv4 and IPv6 address)")
    ap.add_argument("--udp-port", type=int, default=None,
                    help="also answer UDP datagrams on this port")
    args = ap.parse_args()
    if args.udp_port is not None:
        threading.Thread(target=udp_echo, args=(args.name, args.udp_port), daemon=True).start()

    if args.bind is None:
        try:
            server = Server(("::", args.port), socket.AF_INET6, False, args.name)
        except OSError:  # IPv6 disabled in this namespace
            server = Server(("0.0.0.0", args.port), socket.AF_INET, False, args.name)
    elif ":" in args.bind:
        server = Server((args.bind, args.port), socket.AF_INET6, True, args.name)
    else:
        server = Server((args.bind, args.port), socket.AF_INET, False, args.name)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
