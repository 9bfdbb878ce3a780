"""A local Debian base image for building our Dockerfile where no image registry is reachable.

``debootstrap`` (minbase, bookworm) makes a root filesystem with Python 3.11 and venv support,
from the Debian archive this machine's own apt sources name (``debian_archive_uri`` in
deploy/lib.sh, shared with the installers): the machine may reach only its own mirror, so no
address is written here; it is packed once into a tarball cached under
``/var/cache/powerplane-test`` so later runs only ``docker import`` it (a second or two).

``build_wheelhouse`` runs ``pip wheel`` for the project and its dependencies on the host, so the
image build itself installs with ``--no-index`` and needs no network.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("POWERPLANE_TEST_CACHE", "/var/cache/powerplane-test"))
SUITE = "bookworm"
# python3-venv brings ensurepip, so `python3 -m venv` gives a working pip with no download.
PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_TAG = "local/debian-python:bookworm"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_LIB = REPO_ROOT / "deploy" / "lib.sh"


def debian_mirror(suite: str = SUITE) -> str:
    """The archive URI this machine's apt sources use for ``suite``."""
    found = subprocess.run(["bash", "-c", '. "$0" && debian_archive_uri "$1"', str(DEPLOY_LIB),
                            suite], capture_output=True, text=True, timeout=30)
    if found.returncode != 0 or not found.stdout.strip():
        raise RuntimeError(f"no Debian archive for {suite} in this machine's apt sources "
                           "(/etc/apt/sources.list.d/*.sources, /etc/apt/sources.list)")
    return found.stdout.strip()


def _cache_key(mirror: str) -> str:
    return hashlib.sha256(f"{SUITE} {mirror} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]


def rootfs_tarball(cache_dir: Path = CACHE_DIR) -> Path:
    """Return the cached root filesystem tarball, making it with debootstrap if missing.

    A lock file keeps two concurrent runs from bootstrapping at the same time.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    tarball = cache_dir / f"debian-{SUITE}-python-{_cache_key(mirror)}.tar"
    if tarball.exists():
        return tarball
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                 SUITE, str(rootfs), mirror],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900,
            )
            # Package lists and caches are not needed in an image; the archive keeps its size down.
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(rootfs / junk, ignore_errors=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."],
                           check=True)
            partial.rename(tarball)
    return tarball


def import_base(docker_url: str, tag: str = BASE_TAG, cache_dir: Path = CACHE_DIR) -> str:
    """Import the cached Debian root filesystem into the daemon at ``docker_url`` as ``tag``."""
    tarball = rootfs_tarball(cache_dir)
    with tarball.open("rb") as data:
        subprocess.run(
            ["docker", "-H", docker_url, "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
            stdin=data, check=True, stdout=subprocess.DEVNULL, timeout=300,
        )
    return tag


def _pip(*args: str, cache: Path) -> None:
    """Run pip with the wheel cache as a source: offline first, the package index if needed."""
    base = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args,
            "--find-links", str(cache)]
    offline = subprocess.run([*base, "--no-index"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=300)
    if offline.returncode != 0:
        subprocess.run(base, check=True, timeout=600)


def build_wheelhouse(dest: Path, project: Path = REPO_ROOT, cache_dir: Path = CACHE_DIR) -> Path:
    """Put wheels of the project and all its dependencies in ``dest``.

    Dependency wheels and the build backend are kept in ``cache_dir/wheels``: a rerun builds from
    that cache with no index and only asks the package index when something is missing.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    # The build backend the project's pyproject.toml asks for, so isolated builds work offline.
    _pip("download", "--dest", str(cache), "--only-binary", ":all:", "setuptools>=77", "wheel",
         cache=cache)
    for stale in dest.glob("powerplane-*.whl"):
        stale.unlink()
    _pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(project), cache=cache)
    project_wheel = next(dest.glob("powerplane-*.whl"))
    _pip("wheel", "--wheel-dir", str(cache), "--find-links", str(dest), str(project_wheel),
         cache=cache)
    for wheel in cache.glob("*.whl"):
        if wheel.name.startswith("powerplane-"):
            # A project wheel in the cache would shadow the fresh one on the next run.
            wheel.unlink()
        elif not wheel.name.startswith(("setuptools-", "wheel-")):
            shutil.copy2(wheel, dest / wheel.name)
    return dest
