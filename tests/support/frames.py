"""Hand-made frames for spoofing tests: ``python -m tests.support.frames KIND IFACE ARGS...``.

Run inside a container's namespace (root there stands for a container with NET_ADMIN). Kinds:

    ping IFACE SRC_MAC DST_MAC SRC_IP DST_IP COUNT   ICMP echo requests, any source we like
    garp IFACE SRC_MAC CLAIMED_IP COUNT              gratuitous ARP replies claiming CLAIMED_IP

Frames go out through an AF_PACKET socket, past the namespace's own IP stack, exactly as a
process with CAP_NET_RAW would send them.
"""

from __future__ import annotations

import socket
import struct
import sys
import time


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, seq: int) -> bytes:
    payload = b"powerplane-spoof" * 2
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x7070, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + header + icmp


def gratuitous_arp(src_mac: str, claimed_ip: str) -> bytes:
    ip = socket.inet_aton(claimed_ip)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac_bytes(src_mac), ip,
                      b"\xff" * 6, ip)
    return b"\xff" * 6 + mac_bytes(src_mac) + b"\x08\x06" + arp


def main(argv: list[str]) -> None:
    kind, iface, *args = argv
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        if kind == "ping":
            src_mac, dst_mac, src_ip, dst_ip, count = args
            frames = [icmp_echo(src_mac, dst_mac, src_ip, dst_ip, seq)
                      for seq in range(int(count))]
        elif kind == "garp":
            src_mac, claimed_ip, count = args
            frames = [gratuitous_arp(src_mac, claimed_ip)] * int(count)
        else:
            raise SystemExit(f"unknown kind {kind!r}")
        for frame in frames:
            sock.send(frame)
            time.sleep(0.01)


if __name__ == "__main__":
    main(sys.argv[1:])
