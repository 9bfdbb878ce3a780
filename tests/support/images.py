"""The local ``busybox`` image, made without any image registry.

The root filesystem is ``/bin/busybox`` from Debian's busybox-static plus one symlink per applet
(``busybox --list-full``). It is packed once into a tarball cached under /tmp, keyed by the
binary's content, so every later import is a ``docker import`` of a 2 MB file.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
CACHE_DIR = Path(tempfile.gettempdir()) / "powerplane-images"
DOCKER = "docker"


def busybox_tarball(cache_dir: Path = CACHE_DIR) -> Path:
    """Return the cached busybox root filesystem tarball, making it if missing."""
    binary = BUSYBOX.read_bytes()
    tarball = cache_dir / f"busybox-{hashlib.sha256(binary).hexdigest()[:16]}.tar"
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        applets = subprocess.run(
            [str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True
        ).stdout.split()
        partial = tarball.with_suffix(f".{os.getpid()}.partial")
        with tarfile.open(partial, "w") as archive:
            directories = {"bin", "etc", "tmp", "proc", "sys", "dev", "root", "var", "usr",
                           *(str(Path(a).parent) for a in applets)}
            for directory in sorted(directories):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
                archive.addfile(info)
            info = tarfile.TarInfo("bin/busybox")
            info.size, info.mode = len(binary), 0o755
            archive.addfile(info, io.BytesIO(binary))
            for applet in applets:
                if applet == "bin/busybox":
                    continue
                link = tarfile.TarInfo(applet)
                link.type, link.linkname = tarfile.SYMTYPE, "/bin/busybox"
                archive.addfile(link)
            for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                               ("etc/group", "root:x:0:\n")):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
        partial.rename(tarball)
    return tarball


def import_busybox(docker_url: str, tag: str = "busybox:latest") -> None:
    """Import the busybox root filesystem into the daemon at ``docker_url`` as ``tag``."""
    with busybox_tarball().open("rb") as data:
        subprocess.run(
            [DOCKER, "-H", docker_url, "import", "--change", 'CMD ["sh"]', "-", tag],
            stdin=data, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            timeout=120,
        )
