"""Docker, as the host agent and the network hook use it: sandboxes, inspection, events.

The only module that imports docker-py. docker-py blocks, so every call runs in a worker thread;
the client is made on first use, so constructing ``Docker`` touches nothing. docker-py's
errors become ``UpstreamError`` here, once; "no such container" is an answer (``None``), not
an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from adapter.errors import UpstreamError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Pinned rather than negotiated: negotiation costs a round trip on every new client, and 1.41
# is spoken by every daemon from 20.10 on.
API_VERSION = "1.41"


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What a network-only sandbox container is made from."""

    image: str
    labels: Mapping[str, str]
    name: str | None = None
    hostname: str | None = None
    domainname: str | None = None
    dns: Sequence[str] = ()
    dns_search: Sequence[str] = ()
    dns_options: Sequence[str] = ()
    extra_hosts: Sequence[str] = ()
    restart_policy: Mapping[str, Any] = field(default_factory=dict)


class Docker:
    """A thin asynchronous face on docker-py's low-level client."""

    def __init__(self, url: str, *, timeout: float = 120) -> None:
        self._url = url
        # A worker thread cannot be abandoned, only waited for: this bounds each call.
        self._timeout = timeout
        self._client: docker.APIClient | None = None
        self._lock = threading.Lock()

    def _api(self) -> docker.APIClient:
        with self._lock:
            if self._client is None:
                self._client = docker.APIClient(base_url=self._url, version=API_VERSION,
                                                timeout=self._timeout)
            return self._client

    async def _call(self, what: str, fn: Callable[[docker.APIClient], T]) -> T:
        def run() -> T:
            return fn(self._api())

        try:
            return await asyncio.to_thread(run)
        except docker.errors.APIError as exc:
            raise UpstreamError(f"Docker ({self._url}) refused to {what}: "
                                f"{exc.explanation or exc}") from None
        except (requests.exceptions.RequestException, docker.errors.DockerException,
                OSError) as exc:
            raise UpstreamError(f"cannot reach Docker at {self._url} to {what}: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    async def ping(self) -> None:
        await self._call("answer a ping", lambda api: api.ping())

    async def inspect(self, container: str) -> dict[str, Any] | None:
        """The container's inspect document, or None when it does not exist."""

        def run(api: docker.APIClient) -> dict[str, Any] | None:
            try:
                result: dict[str, Any] = api.inspect_container(container)
                return result
            except docker.errors.NotFound:
                return None

        return await self._call(f"inspect container {container}", run)

    async def image_config(self, image: str) -> dict[str, Any] | None:
        """The config of a local image (its ``ExposedPorts``...), or None when Docker has no
        such image or cannot read the reference: the create itself will say why."""

        def run(api: docker.APIClient) -> dict[str, Any] | None:
            try:
                info: dict[str, Any] = api.inspect_image(image)
            except docker.errors.APIError as exc:
                if exc.is_client_error():
                    return None
                raise
            config = info.get("Config")
            return config if isinstance(config, dict) else None

        return await self._call(f"inspect image {image[:80]}", run)

    async def create_sandbox(self, spec: SandboxSpec) -> str:
        """Create (not start) a sandbox with no network of Docker's own; return its id."""

        def run(api: docker.APIClient) -> str:
            host_config = api.create_host_config(
                network_mode="none",
                dns=list(spec.dns) or None,
                dns_search=list(spec.dns_search) or None,
                dns_opt=list(spec.dns_options) or None,
                extra_hosts=list(spec.extra_hosts) or None,
                restart_policy=dict(spec.restart_policy) or None,
            )
            created = api.create_container(
                spec.image,
                # busybox's sleep takes any 32-bit count; the sandbox is killed, never waited on.
                command=["sleep", "2147483647"],
                name=spec.name,
                hostname=spec.hostname,
                domainname=spec.domainname,
                labels=dict(spec.labels),
                host_config=host_config,
                network_disabled=False,
            )
            container_id: str = created["Id"]
            return container_id

        return await self._call(f"create a sandbox from image {spec.image}", run)

    async def start(self, container: str) -> None:
        await self._call(f"start container {container[:12]}", lambda api: api.start(container))

    async def running_pid(self, container: str) -> int | None:
        """PID of the container's first process while it runs, else None."""
        info = await self.inspect(container)
        if info is None or not info["State"].get("Running"):
            return None
        pid = int(info["State"].get("Pid") or 0)
        return pid or None

    async def remove(self, container: str) -> None:
        """Remove a container, running or not; removing a missing one is not an error."""

        def run(api: docker.APIClient) -> None:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(container, force=True, v=True)

        try:
            await self._call(f"remove container {container[:12]}", run)
        except UpstreamError as exc:
            # Removal already under way (e.g. --rm racing us) ends the same way.
            if "already in progress" not in exc.message:
                raise

    async def containers(self, *, label: str) -> list[dict[str, Any]]:
        """Every container, running or not, carrying ``label`` (``key`` or ``key=value``)."""

        def run(api: docker.APIClient) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = api.containers(all=True, filters={"label": label})
            return found

        return await self._call("list containers", run)

    async def events(self, *, types: Sequence[str],
                     since: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Container events with the given actions, as they happen, until cancelled.

        ``since`` (a Unix time) replays the events the daemon still holds from then on first:
        a stream re-opened after dockerd restarted misses nothing the new daemon did.

        The blocking stream is read in a thread and handed over through a queue; cancelling
        the consumer closes the stream so the thread ends too.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

        def open_stream(api: docker.APIClient) -> Any:
            return api.events(decode=True, since=None if since is None else f"{since:.9f}",
                              filters={"type": ["container"], "event": list(types)})

        stream = await self._call("stream events", open_stream)

        def pump() -> None:
            try:
                for event in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as exc:  # handed to the consumer, which decides
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        reader = loop.run_in_executor(None, pump)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    raise UpstreamError(f"Docker at {self._url} closed the event stream")
                if isinstance(item, BaseException):
                    raise UpstreamError(f"event stream from {self._url} failed: {item}")
                yield item
        finally:
            stream.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):  # not wait_for: it can lose a cancellation
                    await reader
