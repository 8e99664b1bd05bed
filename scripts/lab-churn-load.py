#!/usr/bin/env python3
"""Bounded HTTP load from a lab client that knows which real each request met.

    lab-churn-load.py VIP PORT --iface eth0 [--workers 2] [--rate 200] [--seconds 60] [--timeout 2]

Each worker sends GETs one after another (together at most --rate a second), each on a new
connection from a source port of its own (never reused within the run; 40,000 at most). A sniffer (AF_PACKET on --iface) notes, per source
port, the MAC address of the first frame that came back from VIP:PORT: in DR the real
answers directly, so that MAC is the real that took the connection (its SYN-ACK), even when
the request then fails (a connection refused is a RST from that real). Prints one JSON line
per request when done:
    {"port": P, "start": T, "end": T, "ok": true|false, "real": NAME|null, "mac": MAC|null,
     "error": TEXT|null}
with wall-clock times (time.time()), so a test can set them against its own events.
"""

import argparse
import json
import socket
import struct
import sys
import threading
import time

ETH_P_ALL = 0x0003


def sniff(iface, vip, port, first_mac, stop):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.settimeout(0.2)
    vip_bytes = socket.inet_aton(vip)
    while not stop.is_set():
        try:
            frame = s.recv(256)
        except socket.timeout:
            continue
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != socket.IPPROTO_TCP or frame[26:30] != vip_bytes:
            continue
        tcp = 14 + ihl
        if len(frame) < tcp + 4:
            continue
        sport, dport = struct.unpack("!HH", frame[tcp : tcp + 4])
        if sport == port and dport not in first_mac:
            first_mac[dport] = ":".join(f"{b:02x}" for b in frame[6:12])


def request(vip, port, local_port, timeout):
    """One GET on a new connection from local_port: (ok, real name or None, error)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    try:
        s.bind(("0.0.0.0", local_port))
        s.connect((vip, port))
        s.sendall(f"GET / HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return False, None, f"bad answer: {head[:40]!r}"
        return True, body.decode().split()[0], None
    except OSError as e:
        return False, None, str(e) or type(e).__name__
    finally:
        s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("vip")
    p.add_argument("port", type=int)
    p.add_argument("--iface", default="eth0")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--timeout", type=float, default=2)
    p.add_argument("--rate", type=float, default=200)
    args = p.parse_args()
    first_mac = {}
    stop = threading.Event()
    sniffer = threading.Thread(target=sniff, args=(args.iface, args.vip, args.port, first_mac, stop))
    sniffer.start()
    time.sleep(0.3)
    results = []
    ports = iter(range(20000, 60000))
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    gap = args.workers / args.rate

    def work():
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            next_at += gap
            with lock:
                local_port = next(ports, None)
            if local_port is None:
                break
            start = time.time()
            ok, real, error = request(args.vip, args.port, local_port, args.timeout)
            with lock:
                results.append(
                    {"port": local_port, "start": start, "end": time.time(), "ok": ok,
                     "real": real, "error": error}
                )
            time.sleep(max(0.0, next_at - time.monotonic()))

    workers = [threading.Thread(target=work) for _ in range(args.workers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    time.sleep(0.3)
    stop.set()
    sniffer.join()
    for r in results:
        r["mac"] = first_mac.get(r["port"])
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
