"""A TLS listener with client certificates, driven by the real docker CLI's --tlsverify."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.dockerd import StartProxy
from tests.support.consul import free_port
from tests.support.dockerd import DockerDaemon


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(ca: str, name: str, usage: str, san: str, cwd: Path) -> None:
    """A P-256 key and a certificate for it, signed by the ``ca`` key pair."""
    (cwd / f"{name}.ext").write_text(f"extendedKeyUsage={usage}\n{san}")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=cwd)


def _new_ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=cwd)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA with a server certificate for 127.0.0.1 and a client one; a rogue CA's client."""
    _new_ca("ca", tmp_path)
    _issue("ca", "server", "serverAuth", "subjectAltName=IP:127.0.0.1\n", tmp_path)
    _issue("ca", "client", "clientAuth", "", tmp_path)
    _new_ca("rogue-ca", tmp_path)
    _issue("rogue-ca", "rogue", "clientAuth", "", tmp_path)
    return tmp_path


def _docker(
    url: str, pki: Path, client: str | None, *args: str
) -> subprocess.CompletedProcess[str]:
    tls = ["--tlsverify", "--tlscacert", str(pki / "ca.pem")]
    if client is not None:
        tls += ["--tlscert", str(pki / f"{client}.pem"), "--tlskey", str(pki / f"{client}.key")]
    return subprocess.run(["docker", "-H", url, *tls, *args], capture_output=True, text=True,
                          timeout=120)


def test_tls_listener_requires_a_client_certificate(
    dockerd: DockerDaemon, start_proxy: StartProxy, pki: Path
) -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    start_proxy(dockerd.url, ["--listen", url,
                              "--tls-cert", str(pki / "server.pem"),
                              "--tls-key", str(pki / "server.key"),
                              "--tls-ca", str(pki / "ca.pem")])

    version = _docker(url, pki, "client", "version", "--format", "{{.Server.Version}}")
    assert version.returncode == 0, version.stderr
    direct = subprocess.run(["docker", "-H", dockerd.url, "version", "--format",
                             "{{.Server.Version}}"], capture_output=True, text=True, timeout=60)
    assert version.stdout == direct.stdout
    # A hijacked stream (attach) over TLS; the container's exit ends it.
    run = _docker(url, pki, "client", "run", "--rm", "--net=none", "--pull=never", "busybox",
                  "echo", "over tls")
    assert (run.returncode, run.stdout) == (0, "over tls\n"), run.stderr
    # Piped stdin: the CLI's close_notify ends the container's stdin, its output still arrives.
    piped = subprocess.run(
        ["docker", "-H", url, "--tlsverify", "--tlscacert", str(pki / "ca.pem"),
         "--tlscert", str(pki / "client.pem"), "--tlskey", str(pki / "client.key"),
         "run", "-i", "--rm", "--net=none", "--pull=never", "busybox", "cat"],
        input="hi\n", capture_output=True, text=True, timeout=120)
    assert (piped.returncode, piped.stdout) == (0, "hi\n"), piped.stderr

    for client in (None, "rogue"):
        refused = _docker(url, pki, client, "version", "--format", "{{.Server.Version}}")
        assert refused.returncode != 0
        assert refused.stdout.strip() == ""  # no server version: nothing reached dockerd

    # Plain HTTP to the TLS port gets no Docker answer either.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
        try:
            reply = plain.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            reply = b""
        assert b"OK" not in reply
