"""A TCP and UDP echo of the peer's address, for tests that must know where a packet came from.

Run by path (standard library only, so it starts fast in any namespace):

    python echo.py serve tcp|udp PORT
        listens on every address; prints "ready", then one line "<peer ip> <token>" per
        connection or datagram received, and answers each with "<peer ip>\\n".
    python echo.py ask tcp|udp HOST PORT TOKEN [--bind IP] [--timeout S]
        sends TOKEN (from --bind if given) and prints the answer: the address the server saw.
        Exits 1 when no answer came within the timeout.

The server's log tells what arrived even when no answer can return (a forged source, a network
with no way back), so a test can assert both "nothing arrived" and "it arrived from X".
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve_tcp(port: int) -> None:
    with socket.create_server(("0.0.0.0", port), reuse_port=False) as server:
        _say("ready")
        while True:
            conn, (peer, _) = server.accept()
            with conn:
                conn.settimeout(2.0)
                try:
                    token = conn.recv(256).decode(errors="replace").strip()
                    _say(f"{peer} {token}")
                    conn.sendall(f"{peer}\n".encode())
                except OSError:
                    continue


def serve_udp(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("0.0.0.0", port))
        _say("ready")
        while True:
            data, (peer, peer_port) = server.recvfrom(256)
            _say(f"{peer} {data.decode(errors='replace').strip()}")
            with contextlib.suppress(OSError):  # a forged source may have no route back
                server.sendto(f"{peer}\n".encode(), (peer, peer_port))


def ask(proto: str, host: str, port: int, token: str, bind: str | None,
        timeout: float) -> str | None:
    source = (bind or "0.0.0.0", 0)
    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=timeout,
                                          source_address=source) as conn:
                conn.sendall(token.encode() + b"\n")
                return conn.recv(256).decode().strip() or None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.bind(source)
            sock.sendto(token.encode() + b"\n", (host, port))
            return sock.recv(256).decode().strip() or None
    except OSError:  # timed out, refused, unreachable
        return None


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("proto", choices=("tcp", "udp"))
    serve.add_argument("port", type=int)
    client = sub.add_parser("ask")
    client.add_argument("proto", choices=("tcp", "udp"))
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("token")
    client.add_argument("--bind")
    client.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    if args.command == "serve":
        (serve_tcp if args.proto == "tcp" else serve_udp)(args.port)
        return 0
    answer = ask(args.proto, args.host, args.port, args.token, args.bind, args.timeout)
    if answer is None:
        return 1
    _say(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
