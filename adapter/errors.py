"""Powerplane's exceptions. Catch ``PowerplaneError`` to catch everything we raise.

Library errors (aiohttp, docker-py, py-consul, ovsdbapp, pyroute2) are translated into this tree
once, inside the wrapper module that owns that library; nothing else sees them.

    PowerplaneError                 root; ``status`` is the HTTP status a Docker client gets
    ├── ConfigError                 bad flags, environment or adapters.yml (serve refuses to start)
    ├── UpstreamError               dockerd unreachable or misbehaving                      502
    ├── HookError                   an adapter failed, timed out or answered nonsense        502
    ├── BadRequest                  the client's request cannot be handled                   400
    │   ├── RequestTooLarge         a body that must be buffered exceeds the cap             413
    │   └── PortConflict            a host port to publish is taken: published or bound      409
    ├── StateError                  network state in Consul
    │   ├── ConsulUnavailable       Consul does not answer                                   503
    │   ├── ConsulAccessDenied      ACL token missing or lacking rights                      403
    │   ├── InvalidNetwork          malformed name/CIDR/VNI/MTU                              400
    │   ├── NetworkNotFound                                                                  404
    │   ├── NetworkConflict         name, subnet or VNI already taken; network in use         409
    │   ├── PoolExhausted           no free address left in a network                        409
    │   ├── FloatingIPNotFound      no such floating address, or no such container           404
    │   ├── FloatingIPConflict      address taken, attached elsewhere, or still attached     409
    │   ├── InvalidGroup            malformed group name, rule, port range or source          400
    │   ├── GroupNotFound                                                                    404
    │   └── GroupConflict           group exists already, or is still in use                 409
    ├── DataPlaneError              Open vSwitch or netlink refused a change                  500
    └── NotReady                    a part of this host (data plane, Consul) is still starting 503
"""

from __future__ import annotations


class PowerplaneError(Exception):
    """Root of every error Powerplane raises; catch this to catch everything."""

    status: int = 500

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # What went wrong in one word, for metrics: the class's name unless a translation
        # (a 404 answered as a 400) keeps the original's.
        self.reason = reason or _snake_case(type(self).__name__)

    def __str__(self) -> str:
        return self.message


class ConfigError(PowerplaneError):
    """Configuration cannot be used: a flag, an environment variable or adapters.yml."""


class UpstreamError(PowerplaneError):
    """The Docker daemon behind the proxy cannot be reached or answered badly."""

    status = 502


class HookError(PowerplaneError):
    """A hook (built-in or external Powerstrip adapter) failed; the request is stopped."""

    status = 502


class BadRequest(PowerplaneError):
    """The client's request is malformed or too large to handle."""

    status = 400


class RequestTooLarge(BadRequest):
    """A body the proxy must buffer (hooked JSON) is larger than it accepts."""

    status = 413


class PortConflict(BadRequest):
    """A host port a create would publish is taken: by another container, a create in flight
    or a process of this host."""

    status = 409


class StateError(PowerplaneError):
    """Reading or changing network state in Consul failed."""

    status = 500


class ConsulUnavailable(StateError):
    """Consul does not answer at the configured address."""

    status = 503


class ConsulAccessDenied(StateError):
    """Consul refused the request: ACL token missing or without the needed rights."""

    status = 403


class InvalidNetwork(StateError):
    """A network name, CIDR, gateway, VNI or MTU is malformed or out of range."""

    status = 400


class NetworkNotFound(StateError):
    """No network with that name or subnet exists."""

    status = 404


class NetworkConflict(StateError):
    """The name, subnet or VNI is already taken, or the network is still in use."""

    status = 409


class PoolExhausted(StateError):
    """Every usable address of a network is allocated."""

    status = 409


class FloatingIPNotFound(StateError):
    """No such floating address, or no overlay container by that name to attach it to."""

    status = 404


class FloatingIPConflict(StateError):
    """The floating address exists already, is attached elsewhere, or is still attached."""

    status = 409


class InvalidGroup(StateError):
    """A security group name, rule, port range or source is malformed."""

    status = 400


class GroupNotFound(StateError):
    """No security group with that name exists."""

    status = 404


class GroupConflict(StateError):
    """The group exists already, or containers or other groups' rules still use it."""

    status = 409


class DataPlaneError(PowerplaneError):
    """Open vSwitch or the kernel (netlink) refused a data-plane change."""

    status = 500


class NotReady(PowerplaneError):
    """A part of this host that the request needs did not come up within the wait allowed."""

    status = 503


def _snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower()
                   for i, c in enumerate(name))
