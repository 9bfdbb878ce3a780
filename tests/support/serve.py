"""``powerplane serve`` as a real process for tests, on a private unix socket.

Consul and OVSDB point at addresses where nothing listens, so the proxy runs alone: plain Docker
traffic and hooks work, the host runtime keeps retrying in the background, and nothing another
test started is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.dockerd import ping

POWERPLANE = str(Path(sys.executable).with_name("powerplane"))
READY_TIMEOUT = 20.0


class ServeProcess:
    """A running ``powerplane serve``; ``url`` is what ``docker -H`` takes."""

    def __init__(self, process: subprocess.Popen[bytes], run_dir: Path, log_path: Path) -> None:
        self.process = process
        self.run_dir = run_dir
        self.socket = run_dir / "sock" / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        workdir: Path,
        docker_url: str,
        extra_args: Sequence[str] = (),
        *,
        wait_for_upstream: bool = True,
        command_prefix: Sequence[str] = (),
    ) -> ServeProcess:
        """Start serve relaying to ``docker_url``; return when its socket answers.

        ``command_prefix`` runs serve through another command (``unshare ...``), which must
        exec it in the end so that signals reach serve.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        # Short path: unix socket names are limited to 107 bytes.
        run_dir = Path(tempfile.mkdtemp(prefix="pps-", dir="/tmp"))
        # Searchable by everyone, like /run/powerplane: the socket's own group and mode decide
        # who gets in, as on a real host.
        run_dir.chmod(0o755)
        log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log", dir=workdir)[1])
        args = [
            *command_prefix,
            POWERPLANE, "serve",
            "--listen", f"unix://{run_dir / 'sock' / 'docker.sock'}",
            "--docker", docker_url,
            "--consul", "127.0.0.1:1",
            "--ovsdb", f"unix:{run_dir / 'no-ovsdb.sock'}",
            "--run-dir", str(run_dir),
            *extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERPLANE_", "CONSUL_"))}
        with log_path.open("wb") as log:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
        serve = cls(process, run_dir, log_path)
        try:
            serve._wait_ready(wait_for_upstream)
        except BaseException:
            serve.stop()
            raise
        return serve

    def _wait_ready(self, wait_for_upstream: bool) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not (ping(self.socket) if wait_for_upstream else self.socket.exists()):
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve not ready after {READY_TIMEOUT}s: {self.log()}")
            time.sleep(0.05)

    def status(self) -> dict[str, object] | None:
        """What serve reports in its status file (state, parts it waits for), if written."""
        try:
            document = json.loads((self.run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> int | None:
        """SIGTERM and wait; return the exit code. Safe to call more than once."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.process.returncode
